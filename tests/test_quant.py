"""Quantized K/V: the q8_0 and fp8 helpers, the input rules, and the kernels under the
interpreter (which reads float8_e4m3fn, int8 and f16 pointers) against float64 on the
dequantized K/V."""
import math
import struct

import numpy as np
import pytest
import torch

import skattn
from skattn import quant, reference
from skattn.config import shared_bytes
from helpers import FP8_ARG_ERRORS, fp8_case, main_ptx_counts
from tolerance import bound, rel_err

FP8 = torch.float8_e4m3fn
SMS, OCC = 4, 2


# -- q8_0: llama.cpp's quantizer, bit for bit
def _ggml_q8_0(row: np.ndarray) -> bytes:
    """llama.cpp's quantize_row_q8_0_ref, transcribed with numpy float32 scalars."""
    out = b""
    for blk in row.astype(np.float32).reshape(-1, 32):
        amax = np.float32(0)
        for x in blk:
            amax = max(amax, np.float32(abs(x)))
        d = np.float32(amax / np.float32(127))
        inv = np.float32(1) / d if d else np.float32(0)
        qs = []
        for x in blk:
            x0 = np.float32(x * inv)
            qs.append(int(math.copysign(math.floor(abs(float(x0)) + 0.5), float(x0))))  # roundf
        out += np.float16(d).tobytes() + struct.pack("32b", *qs)
    return out


def test_q8_0_matches_llamacpp_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g) * torch.tensor([1e-3, 1.0, 300.0])[:, None]
    x[0, :32] = 0.0  # an all-zero block: d = 0, values 0
    # ties: x * (1 / d) lands on k + 0.5 exactly (d = 127 / 127 = 1), rounded away from zero
    x[1, 32:64] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5] + [1.0] * 27)
    c = skattn.quant.q8_0(x)
    want = b"".join(_ggml_q8_0(r.numpy()) for r in x)
    assert c.to_ggml().numpy().tobytes() == want
    assert c.values[1, 33:37].tolist() == [3, -3, 1, -1]
    back = quant.Q8_0.from_ggml(c.to_ggml())
    assert torch.equal(back.values, c.values) and torch.equal(back.scales, c.scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_q8_0_dequantize(dtype):
    x = torch.randn(2, 5, 3, 64).to(dtype)
    c = skattn.quant.q8_0(x)
    assert c.values.dtype == torch.int8 and c.scales.shape == (2, 5, 3, 2)
    d64 = c.dequantize(torch.float64)
    want = c.values.double() * c.scales.double().repeat_interleave(32, -1)
    assert torch.equal(d64, want)
    # within half a step of the block's scale (plus the f16 rounding of the scale)
    step = c.scales.float().repeat_interleave(32, -1)
    assert ((d64 - x.double()).abs() <= 0.5 * step + 1e-3 * x.double().abs() + 1e-6).all()


def test_q8_0_views_of_a_cache():
    cache = skattn.quant.q8_0(torch.randn(2, 40, 4, 64))
    view = cache[:, :17]  # the first 17 positions: strides kept, still laid out alike
    assert view.shape == (2, 17, 4, 64) and view.values.stride() == cache.values.stride()
    assert torch.equal(view.dequantize(), cache.dequantize()[:, :17])
    with pytest.raises(IndexError):
        cache[..., :32]
    with pytest.raises(ValueError, match="laid out like the values"):
        quant.Q8_0(cache.values, cache.scales.transpose(1, 2).contiguous().transpose(1, 2))


def test_block_caches_of_gathered_and_empty_rows():
    # a sequence's rows gathered through a block table (the serving reference): one scale a
    # row at head size 32 (a dimension of one, any stride), and no rows at all (an empty
    # sequence: torch gives any strides) make caches; a scale of two, strided, does not
    for make, d in ((quant.q8_0, 32), (quant.q4_0, 32), (quant.q8_0, 64)):
        cache = make(torch.randn(10, 16, 2, d).half())
        for n in (0, 3):
            pages, pos = torch.full((n,), 4), torch.arange(n)
            rows = type(cache)(cache.values[pages, pos], cache.scales[pages, pos])
            assert rows.shape == (n, 2, d)
            assert torch.equal(rows.dequantize(), cache.dequantize()[pages, pos])
    one = quant.q8_0(torch.randn(3, 2, 32))
    odd = one.scales.as_strided(one.scales.shape, (*one.scales.stride()[:-1], 7))
    assert torch.equal(quant.Q8_0(one.values, odd).dequantize(), one.dequantize())
    two = quant.q8_0(torch.randn(3, 2, 64))
    with pytest.raises(ValueError, match="contiguous in their last dimension"):
        quant.Q8_0(two.values, torch.zeros(3, 2, 4, dtype=torch.float16)[..., ::2])


@pytest.mark.parametrize("make, err, match", [
    (lambda: quant.Q8_0(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 1, dtype=torch.float16)),
     TypeError, "values must be an int8"),
    (lambda: quant.Q8_0(torch.zeros(1, 2, 1, 32, dtype=torch.int8), torch.zeros(1, 2, 1, 1)),
     TypeError, "scales must be a float16"),
    (lambda: quant.Q8_0(torch.zeros(1, 2, 1, 48, dtype=torch.int8),
                        torch.zeros(1, 2, 1, 1, dtype=torch.float16)), ValueError, "multiple of 32"),
    (lambda: quant.Q8_0(torch.zeros(1, 2, 1, 64, dtype=torch.int8),
                        torch.zeros(1, 2, 1, 1, dtype=torch.float16)), ValueError, "shape"),
    (lambda: skattn.quant.q8_0(torch.zeros(2, 40)), ValueError, "multiple of 32"),
    (lambda: skattn.quant.q8_0(torch.zeros(2, 32, dtype=torch.int32)), TypeError, "float16"),
])
def test_q8_0_rules(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_helper(per_head):
    x = torch.randn(1, 50, 3, 32) * torch.tensor([1.0, 10.0, 0.01])[:, None]
    xq, s = skattn.quant.fp8(x, per_head=per_head)
    assert xq.dtype == FP8 and s.dtype == torch.float32 and s.shape == ((3,) if per_head else (1,))
    amax = x.abs().amax(dim=(0, 1, 3)) if per_head else x.abs().amax()
    assert torch.allclose(s, amax / 448.0)
    k64, _ = quant.dequantize_kv(xq, xq, s, s)
    diff, ref = (k64 - x.double()).transpose(2, 3), x.double().transpose(2, 3)
    err = diff.reshape(-1, 3).norm(dim=0) / ref.reshape(-1, 3).norm(dim=0)
    assert (err < 0.05).all()  # e4m3: 3 mantissa bits
    if per_head:  # per head, a small head keeps its own precision
        assert err.max() < 0.05 and s[2] < s[1] / 100


# -- the kernels under the interpreter
def _inputs(Lq=1, Lk=60, Hq=4, Hkv=2, D=32, Dv=None, qdtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(1, Lq, Hq, D, generator=g).to(qdtype)
    k = torch.randn(1, Lk, Hkv, D, generator=g) * (1 + torch.arange(Hkv))[:, None]
    v = torch.randn(1, Lk, Hkv, Dv, generator=g)
    return q, k, v


def _plan(q, k, v, dtype, **kw):
    return skattn.plan(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1], q_heads=q.shape[2],
                       kv_heads=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3],
                       dtype=dtype, sms=SMS, occupancy=OCC, block_n=kw.pop("block_n", 16), **kw)


def _check(q, kq, vq, p, k_factor=3.0, **kw):
    """Kernel vs float64 on the dequantized K/V, with the tolerance of q's dtype on them."""
    k_scale, v_scale = kw.pop("k_scale", None), kw.pop("v_scale", None)
    out = torch.full((*q.shape[:3], vq.shape[3]), float("nan"), dtype=q.dtype)
    out, lse = skattn.attention(q, kq, vq, plan=p, out=out, return_lse=True, k_scale=k_scale,
                                v_scale=v_scale, **kw)
    ref, ref_lse = reference.attention(q, kq, vq, return_lse=True, k_scale=k_scale,
                                       v_scale=v_scale, **kw)
    kd, vd = quant.dequantize_kv(kq, vq, k_scale, v_scale, q.dtype)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    tol = bound(q, kd, vd, causal=kw.get("causal", False), k_factor=k_factor)
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    assert (lse.double() - ref_lse).abs().max() <= 20 * tol
    exe = reference.run_plan(p, q, *quant.dequantize_kv(kq, vq, k_scale, v_scale), **kw)
    assert rel_err(out, exe) <= tol
    return out


@pytest.mark.parametrize("per_head, fixup, programs", [
    (False, None, 4),      # uniform
    (True, None, 7),       # general, one scale per KV head
    (True, "fused", 7),    # fused: partials carry V's scale
])
def test_fp8_kernel(per_head, fixup, programs):
    q, k, v = _inputs()
    (kq, ks), (vq, vs) = skattn.quant.fp8(k, per_head=per_head), skattn.quant.fp8(v, per_head=per_head)
    p = _plan(q, kq, vq, FP8, programs=programs, fixup=fixup, causal=True)
    _check(q, kq, vq, p, k_scale=ks, v_scale=vs, causal=True)


def test_fp8_features_and_bf16_q():
    # softcap: K's scale goes into the softcap's inner scale; sinks; bf16 q (K/V become bf16)
    q, k, v = _inputs(Lq=3, Lk=40, qdtype=torch.bfloat16, seed=1)
    (kq, ks), (vq, vs) = skattn.quant.fp8(k, per_head=True), skattn.quant.fp8(v)
    p = _plan(q, kq, vq, FP8, causal=True)
    sinks = torch.randn(q.shape[2])
    _check(q, kq, vq, p, k_scale=ks, v_scale=vs, causal=True, softcap=5.0, sinks=sinks)


def test_fp8_scales_as_floats_and_views():
    # float scales (a [1] tensor is made per call); K/V as strided views of a larger cache
    q, k, v = _inputs(Lk=33, seed=2)
    big = torch.randn(1, 50, 3, 32).to(FP8)
    big[:, :33, :2] = k.to(FP8)
    kq = big[:, :33, :2]
    vq = v.to(FP8)
    p = _plan(q, kq, vq, FP8)
    a = _check(q, kq, vq, p, k_scale=0.5, v_scale=2.0)
    b = skattn.attention(q, kq, vq, plan=p, k_scale=torch.tensor(0.5), v_scale=torch.tensor([2.0]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("D, Dv, Lq, causal, qdtype, programs", [
    (64, 64, 2, True, torch.float16, 5),     # general fixup, causal edge blocks
    (96, 64, 1, False, torch.float16, 4),    # Dk not a power of two: its last block masked; Dk != Dv
    (64, 64, 1, True, torch.bfloat16, 3),    # bf16 q: K/V dequantized to bf16
])
def test_q8_0_kernel(D, Dv, Lq, causal, qdtype, programs):
    q, k, v = _inputs(Lq=Lq, D=D, Dv=Dv, qdtype=qdtype, seed=D + Lq)
    kq, vq = skattn.quant.q8_0(k), skattn.quant.q8_0(v)
    p = _plan(q, kq, vq, "q8_0", programs=programs, causal=causal)
    # Triton 3.6's interpreter truncates f32 -> bf16 (the GPU rounds to nearest): the
    # dequantized bf16 K/V carry twice the rounding error here (GPU tests keep k = 3)
    _check(q, kq, vq, p, k_factor=6.0 if qdtype == torch.bfloat16 else 3.0, causal=causal)


def test_q8_0_cache_view_and_unplanned_call():
    # a view [:, :L] of a larger q8_0 cache, and the call without a plan (planned per shape)
    q, k, v = _inputs(Lk=70, D=64, seed=5)
    kc, vc = skattn.quant.q8_0(k), skattn.quant.q8_0(v)
    kq, vq = kc[:, :45], vc[:, :45]
    out = skattn.attention(q, kq, vq, causal=True)
    ref = reference.attention(q, kq, vq, causal=True)
    kd, vd = kq.dequantize(), vq.dequantize()
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True)


def test_q8_0_large_head_chunks():
    # Dk > 256: the scores are summed over chunks of 64 columns (two q8_0 blocks each)
    q, k, v = _inputs(Lq=1, Lk=20, Hq=2, Hkv=1, D=288, Dv=64, seed=7)
    kq, vq = skattn.quant.q8_0(k), skattn.quant.q8_0(v)
    p = _plan(q, kq, vq, "q8_0", programs=2)
    assert p.geometry.dk_chunks > 1
    _check(q, kq, vq, p)


# -- rules
def _fp8_pair():
    q, k, v = _inputs(Lq=2, Lk=20, Hq=4, Hkv=2, D=32)
    return q, k.to(FP8), v.to(FP8)


@pytest.mark.parametrize("change, err, match", [
    *FP8_ARG_ERRORS,
    (dict(k_scale=torch.ones(1, 2)), ValueError, "shape"),
    (dict(k_scale=float("nan")), ValueError, "positive and finite"),
])
def test_fp8_errors(change, err, match):
    q, k, v, kw = fp8_case(change, *_fp8_pair())
    with pytest.raises(err, match=match):
        skattn.attention(q, k, v, **kw)
    if err is ValueError and "scale" in match:  # the reference has the same rules
        with pytest.raises(err, match=match):
            reference.attention(q, k, v, **kw)


def test_quantized_mixups():
    q, k, v = _inputs(Lq=2, Lk=20, D=32)
    kq, vq = skattn.quant.q8_0(k), skattn.quant.q8_0(v)
    with pytest.raises(TypeError, match="both be skattn.quant.Q8_0"):
        skattn.attention(q, kq, v.half())
    with pytest.raises(ValueError, match="k_scale must be None with q8_0"):
        skattn.attention(q, kq, vq, k_scale=torch.ones(1))
    with pytest.raises(ValueError, match="k_scale applies to float8_e4m3fn K/V only"):
        skattn.attention(q, k.half(), v.half(), k_scale=torch.ones(1))
    with pytest.raises(TypeError, match="q must be float16 or bfloat16"):
        skattn.attention(q.float(), kq, vq)
    # a plan for f16 K/V refuses fp8 K/V (and the other way round)
    p16 = _plan(q, k, v, torch.float16)
    with pytest.raises(ValueError, match="plan was made for dtype='float16'.*float8_e4m3fn"):
        skattn.attention(q, k.to(FP8), v.to(FP8), plan=p16, k_scale=1.0, v_scale=1.0)
    with pytest.raises(ValueError, match="plan was made for dtype='float16'.*q8_0"):
        skattn.attention(q, kq, vq, plan=p16)
    p8 = _plan(q, k, v, "q8_0")
    with pytest.raises(ValueError, match="plan was made for dtype='q8_0'"):
        skattn.attention(q, k.half(), v.half(), plan=p8)


def test_plan_formats():
    kw = dict(batch=1, q_len=4, kv_len=4096, q_heads=32, kv_heads=8, head_dim=128, causal=True,
              sms=132, occupancy=2)
    p16, p8, pq = (skattn.plan(dtype=d, **kw) for d in (torch.float16, FP8, "q8_0"))
    assert (p16.dtype, p8.dtype, pq.dtype) == ("float16", "float8_e4m3fn", "q8_0")
    assert "q8_0" in pq.describe()
    s16, s8, sq = (shared_bytes(p.geometry, kv_format=p.dtype) for p in (p16, p8, pq))
    g = p16.geometry  # the K/V buffers take half: 3 stages of [64, 128 + 128] at 1 byte less,
    # and V is counted once more as an f16 [64, 128] tile (staged so by the serving kernel)
    assert s8 < sq < s16
    assert s16 - s8 == (g.num_stages - 1) * g.block_n * 256 - g.block_n * g.block_dv * 2
    with pytest.raises(ValueError, match="multiples of 32"):
        skattn.plan(dtype="q8_0", **{**kw, "head_dim": 80})
    with pytest.raises(ValueError, match="dtype is K/V's"):
        skattn.plan(dtype=torch.float8_e5m2, **kw)
    with pytest.raises(ValueError, match="dtype is K/V's"):
        skattn.plan(dtype="q5_0", **kw)


def test_fp8_needs_sm89(monkeypatch):
    # the capability rule, on a pretend CUDA q of compute capability 8.0 (checked first)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    _, k, v = _fp8_pair()
    cuda_q = type("Q", (), {"dtype": torch.float16, "device": torch.device("cuda", 0)})()
    with pytest.raises(ValueError, match="compute capability 8.9"):
        quant.check_kv(cuda_q, k, v, torch.ones(1), torch.ones(1), kernel=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="k_scale is on cpu"):  # past it on sm_90
        quant.check_kv(cuda_q, k, v, torch.ones(1), torch.ones(1), kernel=True)


def test_quantized_kernels_compile_for_sm90():
    # compiled ahead of time for an H100/H200 (no GPU needed; in a subprocess, as this
    # session runs the interpreter): the dequantizing loads build, fit shared memory, and the
    # planner's estimate bounds what Triton allocates (compiled as far as its allocation).
    # Tiles of 64 rows (warpgroup MMA) and 16 (warp MMA), a masked last q8_0 block (96),
    # chunked Dk (576/512); q4_0's nibble loads too
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "scripts"),
                                         env.get("PYTHONPATH", "")])
    cases = [(128, 128, 16, "float8_e4m3fn"), (576, 512, 1, "float8_e4m3fn"),
             (96, 96, 4, "q8_0"), (128, 128, 1, "q8_0"), (96, 96, 4, "q4_0"),
             (576, 512, 1, "q4_0")]
    code = ("import json, resources\n"
            f"for D, Dv, n, kv in {cases!r}:\n"
            "    print(json.dumps(resources.allocation(D, Dv, n, kv=kv)), flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases)
    for case, r in zip(cases, rows):
        assert r["shared"] <= 232448 and r["estimate"] >= r["shared"], (case, r)


def test_q8_0_gpu_build_converts_four_values_at_a_time():
    # the sm_90 build of the q8_0 decode kernel (llama-8b heads, n = 1) takes the inline-PTX
    # conversion (`kernels/quant.py:i8x4_to_f16`, `words_to_f16`), not Triton's one
    # instruction a value; the interpreter's build (INTERPRET) has no inline PTX at all
    c = main_ptx_counts("q8_0", "INTERPRET", (False, True),
                        (("0x64646464",), ("cvt.rn.f32.s",), ("cvt.rn.f16.s",)))
    # GPU: the PTX's f16 exponent byte 0x64, no int -> float conversion instruction; the
    # interpreter's build converts value by value instead
    assert c[False][0] > 0 and c[False][1:] == [0, 0], c
    assert c[True][0] == 0 and c[True][1] > 0, c


def test_block_values_at_an_address_not_a_multiple_of_4_are_refused():
    # the kernels read q8_0 values as 32-bit words: a cache carved from a byte buffer at an
    # odd offset is a clear error when the Q8_0 is made, not a misaligned load on the GPU
    x = quant.q8_0(torch.randn(1, 8, 2, 32, dtype=torch.float16))
    buf = torch.empty(x.values.numel() + 1, dtype=torch.int8)[1:]
    odd = buf.view(x.values.shape)
    odd.copy_(x.values)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.Q8_0(odd, x.scales)
    assert torch.equal(quant.Q8_0(odd.clone(), x.scales).values, x.values)  # aligned: accepted
