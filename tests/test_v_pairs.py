"""V read as 16-bit pairs of values in the decode kernels (FP8: `kernels/quant.fp8_pairs`;
q8_0 on request: `q8_0_pair_blocks`):
which plans and calls take it, the same results as reading bytes, against float64 on the
dequantized K/V under the interpreter, and the sm_90 build's loads."""
import pytest
import torch

import skattn
from skattn import launch, quant, reference
from helpers import main_ptx_counts
from tolerance import bound, rel_err

FP8 = torch.float8_e4m3fn


def _plan(q, k, v, **kw):
    return skattn.plan(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1], q_heads=q.shape[2],
                       kv_heads=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3],
                       dtype=kw.pop("dtype", FP8), sms=4, occupancy=2, block_n=16, causal=True,
                       **kw)


def _spy(monkeypatch) -> list:
    """The V_PAIRS constant of every main kernel launched."""
    seen = []
    real = launch._launch

    def spy(kernel, key, args, const, *rest):
        if "V_PAIRS" in const:
            seen.append(const["V_PAIRS"])
        return real(kernel, key, args, const, *rest)
    monkeypatch.setattr(launch, "_launch", spy)
    return seen


def _odd_rows(v: torch.Tensor) -> torch.Tensor:
    """v's values in a cache whose rows are an odd number of bytes apart."""
    B, L, H, D = v.shape
    big = torch.zeros(B, L, H, D + 1, dtype=FP8)
    big[..., :D] = v
    return big[..., :D]


def _odd_address(v: torch.Tensor) -> torch.Tensor:
    """v's values at an odd address (a contiguous view one byte into a buffer)."""
    buf = torch.zeros(v.numel() + 1, dtype=torch.uint8)
    out = buf[1:].view(FP8).view(v.shape)
    out.copy_(v)
    assert out.data_ptr() % 2 == 1
    return out


@pytest.mark.parametrize("Lq, Hq, programs", [(1, 4, 4), (3, 4, 7), (2, 8, 5)])
def test_pairs_and_bytes_give_the_same_output(monkeypatch, Lq, Hq, programs):
    g = torch.Generator().manual_seed(Lq * 10 + Hq)
    q = torch.randn(1, Lq, Hq, 32, generator=g).half()
    k = torch.randn(1, 90, 2, 32, generator=g)
    v = torch.randn(1, 90, 2, 32, generator=g) * 3
    (kq, ks), (vq, vs) = quant.fp8(k), quant.fp8(v, per_head=True)
    p = _plan(q, kq, vq, programs=programs)
    assert launch.v_pairs(p)
    seen = _spy(monkeypatch)
    ref = reference.attention(q, kq, vq, causal=True, k_scale=ks, v_scale=vs)
    kd, vd = quant.dequantize_kv(kq, vq, ks, vs, q.dtype)
    tol = bound(q, kd, vd, causal=True)
    outs = []
    for vx in (vq, _odd_rows(vq), _odd_address(vq)):
        out = torch.full((*q.shape[:3], 32), float("nan"), dtype=q.dtype)
        skattn.attention(q, kq, vx, plan=p, out=out, k_scale=ks, v_scale=vs, causal=True)
        assert not out.isnan().any()
        assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
        outs.append(out)
    assert seen == [True, False, False]
    # the same products and sums in another order of the MMAs: within f16 rounding
    assert (outs[0].float() - outs[1].float()).abs().max() <= 2e-3 * outs[1].abs().max()


def test_which_plans_read_pairs():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    k = torch.zeros(1, 64, 1, 64, dtype=FP8)
    assert launch.v_pairs(_plan(q, k, k))                     # 16-row tiles
    assert not launch.v_pairs(_plan(q[:, :, :3, :], k, k[..., :63].contiguous()))  # odd Dv
    q16 = torch.zeros(1, 16, 4, 64, dtype=torch.float16)
    assert _plan(q16, k, k).geometry.block_m == 64             # 64-row tiles: warpgroup MMAs
    assert not launch.v_pairs(_plan(q16, k, k))
    assert not launch.v_pairs(_plan(q, k, k, dtype=torch.float16))
    assert not launch.v_pairs(_plan(q, k, k, dtype="q8_0"))


def test_sm90_build_reads_v_with_the_transposing_load():
    # the decode kernel (llama-8b heads, n = 1) for an H100/H200, compiled here: with pairs,
    # V reaches the MMAs through ldmatrix.trans and no single-byte shared-memory load is left;
    # reading bytes gathers them one at a time
    c = main_ptx_counts("float8_e4m3fn", "V_PAIRS", (True, False),
                        (("ld.shared.u8", "ld.shared.b8"), (".trans.shared",)))
    assert c[True][0] == 0 and c[True][1] > 0, c
    assert c[False][0] > 0, c


def test_serving_plans_run_three_quantized_decode_programs_an_sm():
    # serving plans that do not name an occupancy run FP8 pair, q8_0 and q4_0 decode tiles of
    # head sizes 65-128 three an SM (under a cap of 168 registers, 47-70 KB of shared memory);
    # the GPU's default elsewhere
    from skattn import Tuning
    from skattn.device import hardware

    default = hardware()[1]

    def occ(D=128, dtype=FP8, **kw):
        kw = dict(q_len=1, max_kv_len=4096, page_size=16, **kw) if "max_q_len" not in kw else kw
        return skattn.serving_plan(q_split=None, batch=8, q_heads=32, kv_heads=8, head_dim=D, dtype=dtype,
                                   sms=132, **kw).occupancy
    assert occ() == occ(96) == 3
    assert occ(64) == occ(256) == default      # head sizes outside the measured 65-128
    assert occ(occupancy=2) == 2               # the caller's word
    assert occ(dtype="q8_0") == occ(96, dtype="q8_0") == 3
    assert occ(dtype="q4_0") == occ(96, dtype="q4_0") == 3
    assert occ(64, dtype="q8_0") == occ(64, dtype="q4_0") == default
    assert occ(dtype=torch.float16) == default
    assert occ(tuning=Tuning(fp8_v_pairs=False)) == default
    assert occ(max_q_len=512, total_q=600, max_kv_len=4096) == default  # 128-row tiles


def test_decode_plans_three_an_sm_compile_under_a_register_cap():
    # a serving plan of decode tiles three or more an SM builds its main kernel with
    # Triton's maxnreg, so that its programs fit an SM together (65536 registers); two an SM
    # and prompt-sized tiles (one or two an SM by shared memory) are left to ptxas
    from skattn import serving_launch
    from skattn.config import register_cap

    assert register_cap(2, 4) is None and register_cap(1, 8) is None
    assert (register_cap(3, 4), register_cap(4, 4), register_cap(3, 8)) == (168, 128, 80)

    def cap(dtype, occupancy, **kw):
        kw = kw or dict(q_len=1)
        p = skattn.serving_plan(q_split=None, batch=8, max_kv_len=4096, page_size=16, q_heads=32, kv_heads=8,
                                head_dim=128, dtype=dtype, sms=132, occupancy=occupancy, **kw)
        return serving_launch.bind(p, torch.device("cpu")).main_const.get("maxnreg")
    assert cap("q8_0", 3) == cap(FP8, 3) == cap(torch.float16, 3) == 168
    assert cap("q8_0", 2) is None and cap(torch.float16, 4) == 128
    assert cap(torch.float16, 3, max_q_len=512, total_q=600) is None  # 128-row tiles


@pytest.mark.parametrize("Lq, Hq, D, programs, v_size", [(1, 4, 64, 4, 3.0), (3, 4, 64, 7, 3.0),
                                                         (2, 8, 96, 5, 3.0),
                                                         (1, 4, 128, 4, 1e-3)])
def test_q8_0_v_blocks_against_float64(monkeypatch, Lq, Hq, D, programs, v_size):
    # Tuning(q8_0_v_blocks=True): q8_0 V as int8 pairs, its scales applied to p per 32-column
    # block; D = 96 masks the last block of a 128-column tile; small V (scales ~1e-5), whose
    # products with p would be f16 subnormals without the kernel's 2^6
    from skattn import Tuning

    g = torch.Generator().manual_seed(Lq * 100 + D)
    q = torch.randn(1, Lq, Hq, D, generator=g).half()
    k = torch.randn(1, 90, 2, D, generator=g).half()
    v = (torch.randn(1, 90, 2, D, generator=g) * v_size).half()
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    seen = _spy(monkeypatch)
    ref = reference.attention(q, kq, vq, causal=True)
    tol = bound(q, kq.dequantize(), vq.dequantize(), causal=True)
    outs, errs = [], []
    for on in (True, False):
        p = _plan(q, k, v, dtype="q8_0", programs=programs, tuning=Tuning(q8_0_v_blocks=on))
        assert launch.v_pairs(p) == on
        out = torch.full((*q.shape[:3], D), float("nan"), dtype=q.dtype)
        skattn.attention(q, kq, vq, plan=p, out=out, causal=True)
        errs.append(rel_err(out, ref))
        assert errs[-1] <= tol, (errs[-1], tol)
        outs.append(out)
    assert seen == [True, False]
    assert errs[0] <= 2 * errs[1] + 1e-4, errs  # as accurate as V scaled value by value
    assert (outs[0].float() - outs[1].float()).abs().max() <= 4e-3 * outs[1].abs().max()


def test_q8_0_v_blocks_default():
    # on where it was measured faster (V head size 128, tiles under 64 rows; 64 in two-warp
    # tiles); off at 64 in four-warp tiles, at sizes not measured and for 64-row tiles
    # (warpgroup MMAs over V staged in f16); the caller's word wins
    from skattn import Tuning

    def pairs(D=128, Dv=None, q_len=1, q_heads=4, **kw):
        return launch.v_pairs(skattn.plan(batch=1, q_len=q_len, kv_len=4096, q_heads=q_heads,
                                          kv_heads=1, head_dim=D, head_dim_v=Dv or D,
                                          dtype="q8_0", causal=True, **kw))
    assert pairs() and pairs(256, 128)
    assert pairs(64, q_heads=8)                  # the two-warp decode default
    assert not pairs(64, occupancy=2, sms=132)   # named occupancy: four warps
    assert not pairs(64, q_heads=8, num_warps=2, block_n=32, occupancy=4, sms=132)
    assert not pairs(128, 64, q_heads=8)         # D != Dv: not measured
    assert not pairs(96) and not pairs(256) and not pairs(128, 64)
    assert not pairs(q_len=16)                   # 64-row tiles
    assert pairs(64, tuning=Tuning(q8_0_v_blocks=True))
    assert not pairs(tuning=Tuning(q8_0_v_blocks=False))


@pytest.mark.parametrize("D, Hq", [(64, 8), (128, 4)])
def test_q8_0_unplanned_decode_reads_pairs_in_two_warp_tiles(monkeypatch, D, Hq):
    # a call with no plan takes the dense q8_0 decode default (two-warp tiles,
    # `config.q8_0_narrow_decode`), which reads V as pairs at head sizes 64 and 128
    g = torch.Generator().manual_seed(D)
    q = torch.randn(1, 1, Hq, D, generator=g).half()
    k, v = (torch.randn(1, 200, 1, D, generator=g).half() for _ in range(2))
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    seen = _spy(monkeypatch)
    out = skattn.attention(q, kq, vq, causal=True)
    assert seen == [True]
    ref = reference.attention(q, kq, vq, causal=True)
    assert rel_err(out, ref) <= bound(q, kq.dequantize(), vq.dequantize(), causal=True)
    plan = skattn.plan(batch=1, q_len=1, kv_len=200, q_heads=Hq, kv_heads=1, head_dim=D,
                       dtype="q8_0", causal=True)
    assert plan.geometry.num_warps == 2 and launch.v_pairs(plan)
