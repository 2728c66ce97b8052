"""64-bit pointer offsets: caches whose batch or row offsets pass 2**31 bytes or elements."""
import pytest
import torch

import skattn
from skattn import reference
from tolerance import bound, rel_err

pytestmark = pytest.mark.interpret


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case; test_gpu_reliability covers the GPU")
def test_batch_stride_past_two_gigabytes():
    # batch b of k and v starts b * (2**30 + 4096) elements into the storage: for b = 2 that
    # passes 2**31, where an int32 offset wraps (the untouched storage pages cost no memory)
    B, Lk, H, D = 3, 40, 1, 16
    stride_b = 2**30 + 4096
    g = torch.Generator().manual_seed(0)
    store = torch.empty((B - 1) * stride_b + Lk * H * D, dtype=torch.float16)
    kv = store.as_strided((B, Lk, H, D), (stride_b, H * D, D, 1))
    for b in range(B):
        kv[b].copy_(torch.randn(Lk, H, D, generator=g))
    q = torch.randn(B, 3, 2, D, generator=g).half()
    k = kv.clone()  # a dense copy for the reference
    p = skattn.plan(batch=B, q_len=3, kv_len=Lk, q_heads=2, kv_heads=H, head_dim=D, causal=True,
                    sms=2, occupancy=2)
    out = torch.full((B, 3, 2, D), float("nan"), dtype=torch.float16)
    skattn.attention(q, kv, kv, causal=True, plan=p, out=out)
    ref = reference.attention(q, k, k, causal=True)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= bound(q, k, k, causal=True)


def test_one_sequence_past_two_to_the_31_is_refused():
    # offsets inside one sequence's keys are 32-bit: Lk x row stride >= 2**31 is refused
    # before any launch (meta tensors hold no memory; the check needs only the layout)
    k = torch.empty(1, 2**20, 1, 16, dtype=torch.float16, device="meta")
    k = k.as_strided((1, 2**20, 1, 16), (0, 2**11, 16, 1))
    k = torch.empty_strided(k.shape, k.stride(), dtype=torch.float16, device="meta")
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        skattn.attention(q, k, k)
