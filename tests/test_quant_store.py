"""`skattn.quant_store`: new K/V rows quantized into a cache in one launch (under the
interpreter here), bit for bit as the torch quantizers write them."""
import pytest
import torch

from skattn import quant, quant_store
from skattn.transformers_fp8 import quantize as fp8_quantize
from helpers import run_gpu_build

FP8 = torch.float8_e4m3fn


def _new(B, n, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, n, D, generator=g) * 3
    x[..., :32] *= 0  # an all-zero q8_0 block: scale 0, values 0
    return x.to(dtype).transpose(1, 2)  # transformers' [B, Hkv, n, D] seen as [B, n, Hkv, D]


@pytest.mark.parametrize("dtype, n, D, per_head", [(torch.float16, 1, 64, True),
                                                   (torch.bfloat16, 5, 96, False),
                                                   (torch.float32, 3, 32, True)])
def test_q8_0_rows_are_the_bits_of_quant_q8_0(dtype, n, D, per_head):
    B, L, H, start = 2, 12, 3, 6
    k_new, v_new = _new(B, n, H, D, dtype, 1), _new(B, n, H, D, dtype, 2)
    caches = [quant.Q8_0(torch.full((B, L, H, D), 7, dtype=torch.int8),
                         torch.full((B, L, H, D // 32), 9.0, dtype=torch.float16))
              for _ in range(2)]
    quant_store.store_q8_0(*caches, k_new, v_new, torch.tensor([start]))
    for cache, new in zip(caches, (k_new, v_new)):
        want = quant.q8_0(new)
        assert torch.equal(cache.values[:, start:start + n], want.values)
        assert torch.equal(cache.scales[:, start:start + n], want.scales)
        untouched = torch.ones(L, dtype=torch.bool)
        untouched[start:start + n] = False
        assert (cache.values[:, untouched] == 7).all() and (cache.scales[:, untouched] == 9).all()


@pytest.mark.parametrize("dtype, n, Dk, Dv, per_head", [(torch.float16, 1, 64, 64, True),
                                                        (torch.bfloat16, 4, 48, 80, False)])
def test_fp8_rows_are_the_bits_of_the_cache_quantizer(dtype, n, Dk, Dv, per_head):
    B, L, H, start = 1, 9, 2, 3
    k_new, v_new = _new(B, n, H, Dk, dtype, 3) * 40, _new(B, n, H, Dv, dtype, 4)  # saturates
    k_scale = torch.tensor([0.5, 0.03]) if per_head else torch.tensor([0.25])
    v_scale = torch.tensor([0.02, 0.7]) if per_head else torch.tensor([0.01])
    kc = torch.zeros(B, L, H, Dk, dtype=torch.uint8).view(FP8)
    vc = torch.zeros(B, L, H, Dv, dtype=torch.uint8).view(FP8)
    quant_store.store_fp8(kc, vc, k_scale, v_scale, k_new, v_new, torch.tensor(start))
    for cache, new, scale in ((kc, k_new, k_scale), (vc, v_new, v_scale)):
        per = scale if scale.numel() > 1 else scale.expand(H)
        want = fp8_quantize(new.transpose(1, 2), per).transpose(1, 2)
        got = cache[:, start:start + n]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert (cache.view(torch.uint8)[:, :start] == 0).all()
        assert (cache.view(torch.uint8)[:, start + n:] == 0).all()


def test_rows_past_the_cache_are_not_written():
    k_new = v_new = _new(1, 4, 2, 32, torch.float16, 5)
    caches = [quant.Q8_0(torch.zeros(1, 6, 2, 32, dtype=torch.int8),
                         torch.zeros(1, 6, 2, 1, dtype=torch.float16)) for _ in range(2)]
    quant_store.store_q8_0(*caches, k_new, v_new, torch.tensor([4], dtype=torch.int32))
    want = quant.q8_0(k_new[:, :2])
    assert torch.equal(caches[0].values[:, 4:], want.values)
    kc = torch.zeros(1, 6, 2, 32, dtype=torch.uint8).view(FP8)
    vc = torch.zeros_like(kc)
    quant_store.store_fp8(kc, vc, torch.ones(1), torch.ones(1), k_new, v_new, torch.tensor([-2]))
    assert (kc.view(torch.uint8)[:, 2:] == 0).all() and (kc.view(torch.uint8)[:, :2] != 0).any()


@pytest.mark.parametrize("change, err, match", [
    (dict(start=3), TypeError, "start must be a one-element int32 or int64 tensor"),
    (dict(start=torch.tensor([1.0])), TypeError, "start must be"),
    (dict(k_new="int"), TypeError, "k_new must be a float16, bfloat16 or float32 tensor"),
    (dict(v_new="heads"), ValueError, r"v_new must be \[1, n, 2, 32\]"),
    (dict(k_scale=torch.ones(3)), ValueError, r"k_scale must have shape \[\], \[1\] or \[2\]"),
    (dict(k_scale=torch.ones(2, 2)[:, 0]), ValueError, "k_scale must be contiguous"),
    (dict(v_scale=0.5), TypeError, "v_scale must be a float32 tensor"),
    (dict(kc="f16"), ValueError, "k cache must be a torch.float8_e4m3fn"),
])
def test_fp8_errors(change, err, match):
    new = _new(1, 2, 2, 32, torch.float16, 6)
    kw = dict(kc=torch.zeros(1, 5, 2, 32, dtype=torch.uint8).view(FP8),
              vc=torch.zeros(1, 5, 2, 32, dtype=torch.uint8).view(FP8), k_scale=torch.ones(1),
              v_scale=torch.ones(2), k_new=new, v_new=new, start=torch.tensor([0]))
    forms = {"int": new.to(torch.int32), "heads": _new(1, 2, 3, 32, torch.float16, 7),
             "f16": torch.zeros(1, 5, 2, 32, dtype=torch.float16)}
    kw.update({k: forms.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(err, match=match):
        quant_store.store_fp8(kw["kc"], kw["vc"], kw["k_scale"], kw["v_scale"], kw["k_new"],
                              kw["v_new"], kw["start"])


def test_q8_0_errors():
    new = _new(1, 2, 2, 32, torch.float16, 8)
    q = quant.q8_0(torch.zeros(1, 5, 2, 32))
    with pytest.raises(TypeError, match="k cache must be a skattn.quant.Q8_0"):
        quant_store.store_q8_0(q.values, q, new, new, torch.tensor([0]))
    with pytest.raises(ValueError, match="same"):
        quant_store.store_q8_0(q, q, new, new[:, :1], torch.tensor([0]))


def test_fp8_rounding_of_every_value_and_tie():
    # every e4m3 value, every midpoint between neighbours (ties to even), values just off
    # them, subnormals, -0 and beyond +-448 (clamped), as torch rounds them
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20), -mids,
                      torch.tensor([-0.0, 0.0, 500.0, -1e4, 2 ** -12, -(2 ** -10), 447.9])])
    vals = torch.cat([vals, torch.zeros(-len(vals) % 64)])
    new = vals.reshape(1, -1, 1, 64)
    n = new.shape[1]
    kc = torch.zeros(1, n, 1, 64, dtype=torch.uint8).view(FP8)
    quant_store.store_fp8(kc, kc.clone(), torch.ones(1), torch.ones(1), new, new,
                          torch.tensor([0]))
    want = new.clamp(-448, 448).to(FP8)
    assert torch.equal(kc.view(torch.uint8), want.view(torch.uint8))


def test_store_kernels_compile_for_sm90():
    # the GPU builds (hardware float8 conversion, correctly rounded division, no FMA
    # contraction: quant_store launches them with enable_fp_fusion=False), compiled here
    # for sm_90 without a GPU, in a subprocess (this session runs kernels under the
    # interpreter): the FP8 build converts with the hardware's satfinite e4m3 instruction
    code = (
        "import torch, triton, resources\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from skattn.kernels import store\n"
        "h, f8, i8 = torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float8_e4m3fn), torch.zeros(1, dtype=torch.int8)\n"
        "s, st, z = torch.zeros(1), torch.zeros(1, dtype=torch.int64), 5\n"
        "builds = [(store.store_fp8_kernel, (h, z, z, z, h, z, z, z, f8, z, z, z, f8, z, z, z, s, s, st, z, z, z, z),\n"
        "           dict(DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, K_HEAD_SCALES=1, V_HEAD_SCALES=0, INTERPRET=False)),\n"
        "          (store.store_q8_0_kernel, (h, z, z, z, h, z, z, z, i8, z, z, z, h, z, z, z, i8, z, z, z, h, z, z, z, st, z, z, z, z),\n"
        "           dict(DK=96, DV=128, BLOCK_DK=128, BLOCK_DV=128))]\n"
        "builds += [(fn, args, dict(kw, SLOTS=True)) for fn, args, kw in builds]  # (the paged forms)\n"
        "for fn, args, kw in builds:\n"
        "    sig, consts, attrs = resources.signature(fn, args, kw)\n"
        "    ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget('cuda', 90, 32),\n"
        "                         options=dict(num_warps=4, enable_fp_fusion=False)).asm['ptx']\n"
        "    print(ptx.count('cvt.rn.satfinite.e4m3x2.f32'), ptx.count('div.rn.f32'), ptx.count('fma.'))\n")
    out = run_gpu_build(code)
    counts = [list(map(int, line.split())) for line in out.splitlines()[-4:]]
    for (fp8_cvt, fp8_div, _), (q8_cvt, q8_div, q8_fma) in (counts[:2], counts[2:]):
        assert fp8_cvt > 0 and fp8_div > 0 and q8_cvt == 0 and q8_div > 0, out
        # q8_0's x * (1 / d) + 0.5 as two roundings (torch's), not fused into one FMA,
        # which rounds some values the other way (seen on an H200)
        assert q8_fma == 0, out


def test_nan_and_infinities_as_torch_writes_them():
    # FP8: NaN stays NaN (its sign kept), infinities saturate; q8_0: a block with a NaN gets
    # a NaN scale and values 0, as quant.q8_0 gives
    x = torch.randn(1, 2, 1, 64)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    x[0, 1, 0, 40] = float("nan")
    kc = torch.zeros(1, 2, 1, 64, dtype=torch.uint8).view(FP8)
    quant_store.store_fp8(kc, kc.clone(), torch.ones(1), torch.ones(1), x, x, torch.tensor([0]))
    want = x.clamp(-448, 448).to(FP8)
    assert torch.equal(kc.view(torch.uint8), want.view(torch.uint8))
    caches = [quant.q8_0(torch.zeros(1, 2, 1, 64)) for _ in range(2)]
    quant_store.store_q8_0(*caches, x, x, torch.tensor([0]))
    want = quant.q8_0(x)
    assert torch.equal(caches[0].values, want.values)
    assert torch.equal(caches[0].scales.isnan(), want.scales.isnan())
    assert torch.equal(caches[0].scales.nan_to_num(), want.scales.nan_to_num())


def test_fp8_store_asks_for_sm89(monkeypatch):
    # store_fp8 applies the kernels' capability rule (skattn's error, not a Triton compile
    # error below sm_89): the rule on a pretend sm_80, and store_fp8 calling it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability 8.9"):
        quant.fp8_capability(torch.device("cuda", 0))
    seen = []
    monkeypatch.setattr(quant, "fp8_capability", seen.append)
    new = _new(1, 1, 2, 32, torch.float16, 9)
    kc = torch.zeros(1, 3, 2, 32, dtype=torch.uint8).view(FP8)
    quant_store.store_fp8(kc, kc.clone(), torch.ones(1), torch.ones(1), new, new,
                          torch.tensor([0]))
    assert seen == [kc.device]


@pytest.mark.parametrize("dtype, page_size", [(torch.float16, 16), (torch.bfloat16, 32)])
def test_slots_write_tokens_into_pages(dtype, page_size):
    # a serving step: 7 tokens of several sequences into a paged cache at vLLM-style slots,
    # one of them padding (-1) and one past the cache, neither written; the rest as the
    # torch quantizers write them, every other slot untouched
    pages, H, D, T = 5, 2, 64, 7
    g = torch.Generator().manual_seed(12)
    k_new = (torch.randn(T, H, D, generator=g) * 3).to(dtype)
    v_new = (torch.randn(T, H, D, generator=g) * 3).to(dtype)
    slots = torch.tensor([3, page_size * 4 + 1, -1, page_size + 2, 0, page_size * pages,
                          page_size * 2 + page_size - 1])
    written = [t for t, s in enumerate(slots.tolist()) if 0 <= s < pages * page_size]
    caches = [quant.Q8_0(torch.full((pages, page_size, H, D), 5, dtype=torch.int8),
                         torch.full((pages, page_size, H, D // 32), 2.0, dtype=torch.float16))
              for _ in range(2)]
    quant_store.store_q8_0_slots(*caches, k_new, v_new, slots)
    scale = torch.tensor([0.02, 0.05])
    fp8 = [torch.zeros(pages, page_size, H, D, dtype=torch.uint8).view(FP8) for _ in range(2)]
    quant_store.store_fp8_slots(*fp8, scale, scale, k_new, v_new, slots.to(torch.int32))
    for cache, c8, new in zip(caches, fp8, (k_new, v_new)):
        flat_v, flat_s = cache.values.flatten(0, 1), cache.scales.flatten(0, 1)
        flat_8 = c8.view(torch.uint8).flatten(0, 1)
        want = quant.q8_0(new[written])
        want8 = fp8_quantize(new[written][None].transpose(1, 2), scale).transpose(1, 2)[0]
        at = slots[written]
        assert torch.equal(flat_v[at], want.values) and torch.equal(flat_s[at], want.scales)
        assert torch.equal(flat_8[at], want8.view(torch.uint8))
        rest = torch.ones(pages * page_size, dtype=torch.bool)
        rest[at] = False
        assert (flat_v[rest] == 5).all() and (flat_s[rest] == 2).all()
        assert (flat_8[rest] == 0).all()


def test_slot_errors():
    new = torch.zeros(3, 2, 32, dtype=torch.float16)
    q = quant.q8_0(torch.zeros(4, 16, 2, 32))
    with pytest.raises(TypeError, match=r"slot_mapping must be an int32 or int64 \[T\] = \[3\]"):
        quant_store.store_q8_0_slots(q, q, new, new, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"k_new must be \[T, 2, 32\]"):
        quant_store.store_q8_0_slots(q, q, new[None], new, torch.tensor([0]))
