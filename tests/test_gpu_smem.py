"""On a GPU: the shapes that overflowed shared memory on an H200 now fit and are right.

Prompt-sized query blocks (75 tokens x 4 query heads per KV head) with an additive mask for
every head size, and head size 256 at 16 new tokens x 8 query heads per KV head; they raised
`OutOfResources: shared memory` before the planner counted the mask's tile. One kernel per
head size (compile-bound file: 14 distinct kernels).
"""
import pytest
import torch

import skattn
from skattn import reference
from skattn.config import shared_bytes
from skattn.device import shared_memory_limit
from tolerance import bounds, rel_err, row_rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HEADS = [(32, 32), (64, 64), (72, 72), (80, 80), (96, 96), (128, 128), (160, 160), (192, 128),
         (256, 256), (512, 512), (576, 512), (1024, 1024)]  # 1024: accepted, 32-row tiles


def make(Lq, Lk, Hq, Hkv, D, Dv, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Lq, Hq, D, device="cuda", generator=g).half()
    k = torch.randn(1, Lk, Hkv, D, device="cuda", generator=g).half()
    v = torch.randn(1, Lk, Hkv, Dv, device="cuda", generator=g).half()
    return q, k, v, g


def random_mask(Lq, Lk, g):
    """An f32 additive mask (the widest tile in shared memory): random biases, a fifth of the
    keys hidden, and every row keeps its last key."""
    mask = torch.randn(1, Lq, Lk, device="cuda", generator=g)
    mask[torch.rand(1, Lq, Lk, device="cuda", generator=g) < 0.2] = float("-inf")
    mask[..., -1] = 0.0
    return mask


def check(q, k, v, out, *, causal=False, **kw):
    ref = reference.attention(q, k, v, causal=causal, **kw)
    assert not torch.isnan(out).any(), "unwritten output elements"
    whole, row = bounds(q, k, v, causal=causal, ref=ref)
    assert rel_err(out, ref) <= whole
    assert row_rel_err(out, ref).max().item() <= row


@pytest.mark.parametrize("D,Dv", HEADS)
def test_prompt_block_with_mask(D, Dv):
    Lq, ratio, Hkv, Lk = 75, 4, 2, 1024
    q, k, v, g = make(Lq, Lk, ratio * Hkv, Hkv, D, Dv, seed=D + Dv)
    mask = random_mask(Lq, Lk, g)
    out = torch.full((1, Lq, ratio * Hkv, Dv), float("nan"), device="cuda", dtype=q.dtype)
    skattn.attention(q, k, v, mask=mask, out=out)  # unplanned: planned for its mask
    check(q, k, v, out, mask=mask)
    p = skattn.plan(batch=1, q_len=Lq, kv_len=Lk, q_heads=ratio * Hkv, kv_heads=Hkv,
                    head_dim=D, head_dim_v=Dv, has_mask=True)
    assert shared_bytes(p.geometry, has_mask=True) <= shared_memory_limit()
    out.fill_(float("nan"))
    skattn.attention(q, k, v, mask=mask, out=out, plan=p)  # planned: the same kernel
    check(q, k, v, out, mask=mask)


@pytest.mark.parametrize("with_mask", [False, True])
def test_head_size_256_sixteen_tokens(with_mask):
    # decode of 16 new tokens of a 16/2/256 shape: 128-row tiles, with sinks (enough alone
    # to overflow before) or a mask
    Lq, Hq, Hkv, Lk, D = 16, 16, 2, 4096, 256
    q, k, v, g = make(Lq, Lk, Hq, Hkv, D, D, seed=256 + with_mask)
    kw = dict(mask=random_mask(Lq, Lk, g)) if with_mask else dict(
        causal=True, sinks=torch.randn(Hq, device="cuda", generator=g))
    p = skattn.plan(batch=1, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=kw.get("causal", False), has_mask=with_mask)
    assert p.geometry.block_m == 128
    out = torch.full((1, Lq, Hq, D), float("nan"), device="cuda", dtype=q.dtype)
    skattn.attention(q, k, v, out=out, plan=p, **kw)
    check(q, k, v, out, **kw)
