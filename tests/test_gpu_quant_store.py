"""`skattn.quant_store` on a CUDA GPU: the hardware's float8 conversion and the q8_0 blocks
bit for bit as the torch quantizers write them, at serving sizes, and inside a CUDA graph
whose cache length changes between replays."""
import pytest
import torch

from skattn import quant, quant_store
from skattn.transformers_fp8 import quantize as fp8_quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FP8 = torch.float8_e4m3fn


def _states(B, n, H, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, H, n, D, device="cuda", generator=g) * 4
    x[:, 0, :, :32] = 0  # zero blocks (and -0 through the transpose's sign)
    x[:, 1] *= 300  # saturates FP8 at a small scale
    return x.to(dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype, n, D", [(torch.float16, 1, 128), (torch.bfloat16, 16, 128),
                                         (torch.float16, 333, 64), (torch.float32, 7, 96)])
def test_bits_match_the_torch_quantizers(dtype, n, D):
    B, L, H, start = 3, 1024, 8, 517
    k_new, v_new = _states(B, n, H, D, dtype, 1), _states(B, n, H, D, dtype, 2)
    pos = torch.tensor(start, device="cuda")
    # q8_0
    caches = [quant.q8_0(torch.zeros(B, L, H, D, device="cuda")) for _ in range(2)]
    quant_store.store_q8_0(*caches, k_new, v_new, pos)
    for cache, new in zip(caches, (k_new, v_new)):
        want = quant.q8_0(new)
        assert torch.equal(cache.values[:, start:start + n], want.values)
        assert torch.equal(cache.scales[:, start:start + n], want.scales)
        assert not cache.values[:, :start].any() and not cache.values[:, start + n:].any()
    # FP8, per-head and per-tensor scales
    if torch.cuda.get_device_capability() < quant.FP8_MIN_CAPABILITY:
        return
    k_scale = torch.rand(H, device="cuda") + 0.01
    v_scale = torch.tensor([0.05], device="cuda")
    kc = torch.zeros(B, L, H, D, device="cuda", dtype=torch.uint8).view(FP8)
    vc = torch.zeros_like(kc)
    quant_store.store_fp8(kc, vc, k_scale, v_scale, k_new, v_new, pos)
    for cache, new, scale in ((kc, k_new, k_scale), (vc, v_new, v_scale.expand(H))):
        want = fp8_quantize(new.transpose(1, 2), scale).transpose(1, 2)
        assert torch.equal(cache[:, start:start + n].view(torch.uint8), want.view(torch.uint8))


def test_graph_replay_follows_the_length_on_the_device():
    B, L, H, D = 2, 64, 8, 128
    length = torch.zeros((), dtype=torch.int64, device="cuda")
    k_new = torch.zeros(B, 1, H, D, device="cuda", dtype=torch.float16)
    v_new = torch.zeros_like(k_new)
    caches = [quant.q8_0(torch.zeros(B, L, H, D, device="cuda")) for _ in range(2)]
    step = lambda: (quant_store.store_q8_0(*caches, k_new, v_new, length), length.add_(1))
    step()  # compile outside the capture
    length.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    length.zero_()
    rows = []
    for t in range(5):
        k_new.copy_(torch.randn_like(k_new) * (t + 1))
        v_new.copy_(torch.randn_like(v_new))
        rows.append((k_new.clone(), v_new.clone()))
        graph.replay()
    torch.cuda.synchronize()
    assert int(length) == 5
    for t, (k, v) in enumerate(rows):
        for cache, new in zip(caches, (k, v)):
            want = quant.q8_0(new)
            assert torch.equal(cache.values[:, t:t + 1], want.values)
            assert torch.equal(cache.scales[:, t:t + 1], want.scales)
    assert not caches[0].values[:, 5:].any()


def test_q8_0_on_the_gpu_is_the_cpu_bits():
    # quant.q8_0 on a GPU gives the CPU's (llama.cpp's) bits: d = amax / 127 as a division
    # (torch's CUDA division by a Python number multiplies by a rounded reciprocal instead)
    x = _states(4, 64, 8, 128, torch.float16, 3)
    gpu, cpu = quant.q8_0(x), quant.q8_0(x.cpu())
    assert torch.equal(gpu.scales.cpu(), cpu.scales) and torch.equal(gpu.values.cpu(), cpu.values)


def test_nan_and_infinities():
    # FP8: NaN stays NaN, infinities saturate at +-448; q8_0: a block with a NaN gets a NaN
    # scale and values 0, as quant.q8_0 on the GPU gives
    x = torch.randn(1, 2, 1, 64, device="cuda")
    x[0, 0, 0, :4] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    x[0, 1, 0, 40] = float("nan")
    start = torch.zeros((), dtype=torch.int64, device="cuda")
    if torch.cuda.get_device_capability() >= quant.FP8_MIN_CAPABILITY:
        kc = torch.zeros(1, 2, 1, 64, dtype=torch.uint8, device="cuda").view(FP8)
        one = torch.ones(1, device="cuda")
        quant_store.store_fp8(kc, kc.clone(), one, one, x, x, start)
        got, want = kc.float(), x.clamp(-448, 448).to(FP8).float()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    caches = [quant.q8_0(torch.zeros(1, 2, 1, 64, device="cuda")) for _ in range(2)]
    quant_store.store_q8_0(*caches, x, x, start)
    want = quant.q8_0(x)
    assert torch.equal(caches[0].values, want.values)
    assert torch.equal(caches[0].scales.isnan(), want.scales.isnan())
    assert torch.equal(caches[0].scales.nan_to_num(), want.scales.nan_to_num())


def test_slots_into_a_paged_cache_match_the_torch_quantizers():
    # a serving step's tokens at vLLM-style slots of a paged cache (pages of 16; a padding
    # token at -1 is not written), against the torch quantizers at those rows
    pages, page, H, D, T = 64, 16, 8, 128, 40
    g = torch.Generator(device="cuda").manual_seed(7)
    k_new = torch.randn(T, H, D, device="cuda", generator=g).half() * 3
    v_new = torch.randn(T, H, D, device="cuda", generator=g).half()
    slots = torch.randperm(pages * page, device="cuda", generator=g)[:T]
    slots[5] = -1
    keep = slots >= 0
    caches = [quant.q8_0(torch.zeros(pages, page, H, D, device="cuda")) for _ in range(2)]
    quant_store.store_q8_0_slots(*caches, k_new, v_new, slots)
    for cache, new in zip(caches, (k_new, v_new)):
        want = quant.q8_0(new[keep])
        assert torch.equal(cache.values.flatten(0, 1)[slots[keep]], want.values)
        assert torch.equal(cache.scales.flatten(0, 1)[slots[keep]], want.scales)
        assert int((cache.values.flatten(0, 1).abs().sum(dim=(1, 2)) > 0).sum()) <= T - 1
    if torch.cuda.get_device_capability() < quant.FP8_MIN_CAPABILITY:
        return
    scale = torch.rand(H, device="cuda") + 0.01
    kc = torch.zeros(pages, page, H, D, device="cuda", dtype=torch.uint8).view(FP8)
    vc = torch.zeros_like(kc)
    quant_store.store_fp8_slots(kc, vc, scale, scale, k_new, v_new, slots)
    for cache, new in ((kc, k_new), (vc, v_new)):
        want = fp8_quantize(new[keep][None].transpose(1, 2), scale).transpose(1, 2)[0]
        assert torch.equal(cache.flatten(0, 1)[slots[keep]].view(torch.uint8),
                           want.view(torch.uint8))
