"""Quantized K/V on a CUDA GPU: fp8 (sm_89+), q8_0 and q4_0 at seed-grid shapes against
float64 on the dequantized K/V, every fixup kind, bf16 q, features, cache views, CUDA graphs
with device scales."""
import pytest
import torch

import skattn
from skattn import quant, reference
from skattn.bench.models import MODELS
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FP8 = torch.float8_e4m3fn


def _fp8_ok() -> bool:
    return torch.cuda.get_device_capability() >= quant.FP8_MIN_CAPABILITY


def make(B, Lq, Lk, Hq, Hkv, D, *, qdtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, device="cuda", generator=g).to(qdtype)
    # heads of different magnitudes, so that per-head scales differ
    mag = 1 + torch.arange(Hkv, device="cuda")[:, None] / 2
    k = torch.randn(B, Lk, Hkv, D, device="cuda", generator=g) * mag
    v = torch.randn(B, Lk, Hkv, D, device="cuda", generator=g) * mag
    return q, k, v


def quantize(form, k, v):
    """(k, v, kwargs of skattn.attention, plan dtype) of K/V in `form`."""
    if form in ("q8_0", "q4_0"):
        pack = getattr(quant, form)
        return pack(k), pack(v), {}, form
    per_head = form == "fp8-head"
    (kq, ks), (vq, vs) = quant.fp8(k, per_head=per_head), quant.fp8(v, per_head=per_head)
    return kq, vq, dict(k_scale=ks, v_scale=vs), FP8


FORMS = ["fp8", "fp8-head", "q8_0", "q4_0"]


def _skip_fp8(form):
    if form.startswith("fp8") and not _fp8_ok():
        pytest.skip("float8_e4m3fn K/V need compute capability 8.9+ (the refusal is tested below)")


# (model, n): D 128 and 64, GQA ratio 5, decode tiles of 16 and 64 rows, a prompt chunk
CELLS = (("llama-8b", 1), ("gpt-oss", 1), ("qwen3-14b", 4), ("llama-8b", 16), ("gpt-oss", 16),
         ("llama-8b", 512))


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c[0]}-n{c[1]}")
@pytest.mark.parametrize("form", FORMS)
def test_seed_shapes(form, cell):
    # one test a cell, so that the parallel GPU run spreads them over its workers
    _skip_fp8(form)
    model, n = cell
    Hq, Hkv, D = MODELS[model][:3]
    for L in (8192, 12345):  # 12345: Lk not a multiple of any block size
        q, k, v = make(1, n, L, Hq, Hkv, D, seed=L + n)
        kq, vq, kw, dtype = quantize(form, k, v)
        kd, vd = quant.dequantize_kv(kq, vq, kw.get("k_scale"), kw.get("v_scale"), q.dtype)
        ref = reference.attention(q, kq, vq, causal=True, **kw)
        tol = bound(q, kd, vd, causal=True)
        # prompt chunks: by default FP8 and q8_0 are dequantized first (`Tuning.quant_route`),
        # so the kernels that read them as stored run as "native"
        native = skattn.Tuning(quant_route="native")
        variants = [("auto", None, None)] + ([("llamacpp-before", "fused", None)] if n <= 16
                                             else [("auto", None, native)])
        for policy, fixup, tuning in variants:
            p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                            dtype=dtype, causal=True, policy=policy, fixup=fixup, tuning=tuning)
            out = torch.full((1, n, Hq, D), float("nan"), device="cuda", dtype=q.dtype)
            skattn.attention(q, kq, vq, causal=True, plan=p, out=out, **kw)
            assert not torch.isnan(out).any(), f"{form} {model} n={n} L={L}: unwritten output"
            err = rel_err(out, ref)
            assert err <= tol, f"{form} {model} n={n} L={L} {p.fixup}: {err:.2e} > {tol:.2e}"




@pytest.mark.parametrize("form", FORMS)
def test_bf16_q_and_features(form):
    # bf16 tensor-core dots on dequantized K/V, with sinks, softcap (K's fp8 scale goes into
    # the softcap's inner scale), a window, and the general fixup
    _skip_fp8(form)
    q, k, v = make(2, 7, 5000, 16, 2, 64, qdtype=torch.bfloat16, seed=3)
    kq, vq, kw, dtype = quantize(form, k, v)
    kd, vd = quant.dequantize_kv(kq, vq, kw.get("k_scale"), kw.get("v_scale"), q.dtype)
    g = torch.Generator(device="cuda").manual_seed(4)
    sinks = torch.randn(16, device="cuda", generator=g)
    for extra in (dict(causal=True, sinks=sinks), dict(causal=True, window=300, softcap=20.0)):
        ref = reference.attention(q, kq, vq, **kw, **extra)
        p = skattn.plan(batch=2, q_len=7, kv_len=5000, q_heads=16, kv_heads=2, head_dim=64,
                        dtype=dtype, causal=True, window=extra.get("window"),
                        policy="llamacpp-before")
        out = torch.full((2, 7, 16, 64), float("nan"), device="cuda", dtype=q.dtype)
        skattn.attention(q, kq, vq, plan=p, out=out, **kw, **extra)
        assert rel_err(out, ref) <= bound(q, kd, vd, causal=True), (form, extra.keys())


@pytest.mark.parametrize("form", ["q8_0", "q4_0"])
def test_block_head_sizes(form):
    # Dk not a power of two (its last block masked), Dk != Dv, and Dk > 256 (chunks)
    pack = getattr(quant, form)
    for D, Dv in ((96, 96), (192, 128), (576, 512)):
        q, k, v = make(1, 4, 3000, 16, 1, D, seed=D)
        kq, vq = pack(k), pack(v[..., :Dv].contiguous())
        ref = reference.attention(q, kq, vq, causal=True)
        out = skattn.attention(q, kq, vq, causal=True)
        tol = bound(q, kq.dequantize(), vq.dequantize(), causal=True) + 2e-3
        assert rel_err(out, ref) <= tol, (D, Dv)


def test_fp8_graph_reads_scales_on_device():
    # tensor scales are read by the kernel: a captured graph follows their new values
    if not _fp8_ok():
        pytest.skip("needs compute capability 8.9+")
    B, n, L, Hq, Hkv, D = 1, 4, 16384, 32, 8, 128
    q, k, v = make(B, n, L, Hq, Hkv, D, seed=10)
    (kq, ks), (vq, vs) = quant.fp8(k, per_head=True), quant.fp8(v)
    p = skattn.plan(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=FP8, causal=True)
    out = torch.empty(B, n, Hq, D, device="cuda", dtype=q.dtype)
    ws = skattn.workspace(p)
    call = dict(causal=True, plan=p, out=out, workspace=ws, k_scale=ks, v_scale=vs)
    skattn.attention(q, kq, vq, **call)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skattn.attention(q, kq, vq, **call)
    for factor in (1.0, 0.5, 3.0):
        ks2, vs2 = ks * factor, vs / factor
        ks.copy_(ks2), vs.copy_(vs2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention(q, kq, vq, causal=True, k_scale=ks2, v_scale=vs2)
        kd, vd = quant.dequantize_kv(kq, vq, ks2, vs2, q.dtype)
        assert rel_err(out, ref) <= bound(q, kd, vd, causal=True), factor


def test_q4_0_cache_view_decode_graph():
    # a decode step on views [:, :L] of a preallocated q4_0 cache (llama-8b, n = 1), planned
    # and run in a CUDA graph; the cache is refilled between replays (the graph reads it)
    Hq, Hkv, D = MODELS["llama-8b"][:3]
    B, n, L, cap = 1, 1, 12345, 16384
    q, k, v = make(B, n, cap, Hq, Hkv, D, seed=21)
    kc, vc = quant.q4_0(k), quant.q4_0(v)
    kq, vq = kc[:, :L], vc[:, :L]
    assert kq.values.stride(1) == Hkv * D // 2 and kq.scales.stride(1) == Hkv * D // 32
    p = skattn.plan(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype="q4_0", causal=True)
    out = torch.empty(B, n, Hq, D, device="cuda", dtype=q.dtype)
    call = dict(causal=True, plan=p, out=out, workspace=skattn.workspace(p))
    skattn.attention(q, kq, vq, **call)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skattn.attention(q, kq, vq, **call)
    for seed in (22, 23):
        _, k2, v2 = make(B, n, cap, Hq, Hkv, D, seed=seed)
        k2q, v2q = quant.q4_0(k2), quant.q4_0(v2)
        for dst, src in ((kc, k2q), (vc, v2q)):
            dst.values.copy_(src.values), dst.scales.copy_(src.scales)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention(q, kq, vq, causal=True)
        assert not torch.isnan(out).any()
        assert rel_err(out, ref) <= bound(q, kq.dequantize(), vq.dequantize(), causal=True), seed


def test_fp8_v_at_odd_bytes_reads_bytes():
    # decode reads FP8 V as 16-bit pairs where its rows sit at even bytes; a V at an odd
    # address or with odd strides takes the byte loads, on its first call and on the
    # repeat calls a recipe would otherwise serve (llama-8b heads, n = 1)
    if not _fp8_ok():
        pytest.skip("float8_e4m3fn K/V need compute capability 8.9+")
    q, k, v = make(1, 1, 4096, 32, 8, 128, seed=3)
    kq, vq, kw, _ = quantize("fp8-head", k, v)
    ref = reference.attention(q, kq, vq, causal=True, **kw)
    kd, vd = quant.dequantize_kv(kq, vq, kw["k_scale"], kw["v_scale"], q.dtype)
    tol = bound(q, kd, vd, causal=True)
    buf = torch.zeros(vq.numel() + 1, dtype=torch.uint8, device="cuda")
    odd = buf[1:].view(FP8).view(vq.shape)
    odd.copy_(vq)
    wide = torch.zeros(*vq.shape[:3], 129, dtype=torch.uint8, device="cuda").view(FP8)
    wide[..., :128] = vq
    for vx in (vq, odd, wide[..., :128], odd, vq):
        for _ in range(2):
            out = torch.full_like(q, float("nan"))
            skattn.attention(q, kq, vx, causal=True, out=out, **kw)
            torch.cuda.synchronize()
            assert rel_err(out, ref) <= tol
