"""The custom op with quantized K/V under torch.compile + CUDA graphs, on a CUDA GPU."""
import pytest
import torch

import skattn.ops
from skattn import quant, reference
from helpers import FP8Block, cuda_qkv
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < quant.FP8_MIN_CAPABILITY,
    reason="float8_e4m3fn K/V need compute capability 8.9")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@needs_fp8
def test_compile_reduce_overhead_fp8_cache():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    block = FP8Block(1024, 8, 2, 128).cuda().half().requires_grad_(False)
    (kc, ks), (vc, vs) = (quant.fp8(torch.randn(1, 3000, 2, 128, device="cuda"), per_head=True)
                          for _ in range(2))
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for i in range(5):  # record, then replays on fresh inputs and new scale values
            x = torch.randn(1, 4, 1024, device="cuda", dtype=torch.float16)
            got = compiled(x, kc, vc, ks, vs).clone()
            want = block(x, kc, vc, ks, vs)
            assert not torch.isnan(got).any()
            assert rel(got, want) < 1e-2, i
            ks.mul_(1.3)  # written in place: the next replay reads the new values
            vs.mul_(0.8)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, no break, no recompile


@pytest.mark.parametrize("form", [pytest.param("fp8", marks=needs_fp8), "q8_0"])
def test_compiled_op_matches_float64_on_dequantized_kv(form):
    # the op alone in a CUDA graph (reduce-overhead) vs float64 on the dequantized K/V,
    # replayed on fresh q and K/V values copied into the same cache tensors
    torch._dynamo.reset()
    q, k, v = cuda_qkv(2, 4, 5000, 32, 8, 128, seed=1)
    if form == "fp8":
        (kq, ks), (vq, vs) = quant.fp8(k, per_head=True), quant.fp8(v)
        kw = dict(k_scale=ks, v_scale=vs)
    else:
        kq, vq, kw = quant.q8_0(k), quant.q8_0(v), {}

    def step(q, kq, vq, **kw):
        return skattn.ops.attention(q, kq, vq, causal=True, **kw)

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for i in range(3):
        got = compiled(q, kq, vq, **kw).clone()
        ref = reference.attention(q, kq, vq, causal=True, **kw)
        kd, vd = quant.dequantize_kv(kq, vq, kw.get("k_scale"), kw.get("v_scale"), q.dtype)
        assert not torch.isnan(got).any()
        assert rel_err(got, ref) <= bound(q, kd, vd, causal=True), i
        q2, k2, v2 = cuda_qkv(2, 4, 5000, 32, 8, 128, seed=10 + i)
        q = q2
        if form == "fp8":
            (k8, ks2), (v8, vs2) = quant.fp8(k2, per_head=True), quant.fp8(v2)
            kq.copy_(k8), vq.copy_(v8), ks.copy_(ks2), vs.copy_(vs2)
        else:
            k8, v8 = quant.q8_0(k2), quant.q8_0(v2)
            for dst, src in ((kq, k8), (vq, v8)):
                dst.values.copy_(src.values), dst.scales.copy_(src.scales)
