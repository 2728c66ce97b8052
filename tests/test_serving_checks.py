"""Bad input to the serving entry points: a clear error before any launch (docs/serving.md)."""
import pytest
import torch

import skattn
from skattn import serving

I32 = torch.int32


def kv(B=2, Lq=1, L=32, Hq=4, Hkv=2, D=16, dtype=torch.float16):
    return (torch.randn(B, Lq, Hq, D).to(dtype), torch.randn(B, L, Hkv, D).to(dtype),
            torch.randn(B, L, Hkv, D).to(dtype))


def paged(num_pages=4, ps=16, B=2, pages=2):
    q = torch.randn(B, 1, 4, 16).half()
    k = torch.randn(num_pages, ps, 2, 16).half()
    table = torch.arange(B * pages, dtype=I32).reshape(B, pages) % num_pages
    return q, k, k.clone(), table


def call(q, k, v, lens, **kw):
    return skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, **kw)


@pytest.mark.parametrize("change,error,match", [
    (dict(cache_seqlens=torch.tensor([3, 4])), TypeError, "cache_seqlens must have dtype torch.int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=I32)), ValueError, r"cache_seqlens must have shape \[2\]"),
    (dict(cache_seqlens=[3, 4]), TypeError, "cache_seqlens must be a torch.Tensor"),
    (dict(cache_seqlens=torch.tensor([-1, 4], dtype=I32)), ValueError, r"cache_seqlens\[0\] = -1 is negative"),
    (dict(cache_seqlens=torch.tensor([3, 33], dtype=I32)), ValueError, r"cache_seqlens\[1\] = 33 exceeds"),
    (dict(window=4, causal=False), ValueError, "window"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks"),
    (dict(out=torch.empty(2, 1, 4, 8).half()), ValueError, "out must be"),
    (dict(plan="p"), TypeError, "plan must be a skattn.ServingPlan"),
])
def test_kvcache_rules(change, error, match):
    q, k, v = kv()
    args = dict(cache_seqlens=torch.tensor([3, 4], dtype=I32))
    args.update(change)
    with pytest.raises(error, match=match):
        skattn.attention_with_kvcache(q, k, v, **args)


def test_kvcache_dtypes_and_shapes():
    q, k, v = kv()
    lens = torch.tensor([3, 4], dtype=I32)
    with pytest.raises(TypeError, match="k must have dtype"):
        call(q, k.float(), v.float(), lens)
    with pytest.raises(TypeError, match="v must have k's dtype"):
        call(q, k, v.bfloat16(), lens)
    with pytest.raises(ValueError, match="batch mismatch"):
        call(q, k[:1], v[:1], lens)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        call(torch.randn(2, 1, 3, 16).half(), k, v, lens)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        call(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lens)


def test_paged_rules():
    q, k, v, table = paged()
    lens = torch.tensor([20, 32], dtype=I32)
    call(q, k, v, lens, block_table=table)  # a valid call first: the rules below are the cause
    with pytest.raises(TypeError, match="block_table must have dtype torch.int32"):
        call(q, k, v, lens, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table must have shape \[2, max_pages\]"):
        call(q, k, v, lens, block_table=table[:1])
    with pytest.raises(ValueError, match="more than its block table row holds"):
        call(q, k, v, torch.tensor([20, 33], dtype=I32), block_table=table)
    bad = table.clone()
    bad[1, 1] = 4
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 4 is not a page"):
        call(q, k, v, lens, block_table=bad)
    bad[1, 1] = -2
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = -2"):
        call(q, k, v, lens, block_table=bad)
    k24 = torch.randn(4, 24, 2, 16).half()
    with pytest.raises(ValueError, match="multiple of 16"):
        call(q, k24, k24, lens, block_table=table)


def test_unused_page_ids_are_not_checked():
    q, k, v, table = paged()
    table[0, 1] = 99  # sequence 0 has 16 keys: its second page is never read
    call(q, k, v, torch.tensor([16, 32], dtype=I32), block_table=table)


def varlen(lq=(3, 1), lk=(5, 9)):
    q = torch.randn(sum(lq), 4, 16).half()
    k = torch.randn(sum(lk), 2, 16).half()
    cu_q = torch.tensor([0, lq[0], sum(lq)], dtype=I32)
    cu_k = torch.tensor([0, lk[0], sum(lk)], dtype=I32)
    return q, k, k.clone(), cu_q, cu_k


def test_varlen_rules():
    q, k, v, cu_q, cu_k = varlen()
    skattn.attention_varlen(q, k, v, cu_q, cu_k, 3, 9)
    with pytest.raises(ValueError, match="must be non-decreasing"):
        skattn.attention_varlen(q, k, v, torch.tensor([0, 3, 2], dtype=I32), cu_k, 3, 9)
    with pytest.raises(ValueError, match="passes the 4 packed rows"):
        skattn.attention_varlen(q, k, v, torch.tensor([0, 3, 5], dtype=I32), cu_k, 3, 9)
    with pytest.raises(ValueError, match="more than max_seqlen_k = 8"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 3, 8)
    with pytest.raises(ValueError, match="max_seqlen_q must be a positive int"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 3.0, 9)
    with pytest.raises(TypeError, match="cu_seqlens_k must have dtype torch.int32"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k.long(), 3, 9)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must have shape \[3\]"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k[:2], 3, 9)
    with pytest.raises(ValueError, match="plan was made for attention_with_kvcache"):
        p = skattn.serving_plan(batch=2, q_len=1, max_kv_len=9, q_heads=4, kv_heads=2,
                                head_dim=16, sms=4, occupancy=2)
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 3, 9, plan=p)


def test_plan_bounds_must_match():
    q, k, v = kv()
    lens = torch.tensor([3, 4], dtype=I32)
    p = skattn.serving_plan(batch=2, q_len=1, max_kv_len=64, q_heads=4, kv_heads=2, head_dim=16,
                            sms=4, occupancy=2)
    with pytest.raises(ValueError, match="plan was made for max_kv_len=64, inputs have 32"):
        call(q, k, v, lens, plan=p)


def test_plan_arguments():
    base = dict(batch=2, max_kv_len=64, q_heads=4, kv_heads=2, head_dim=16, sms=4, occupancy=2)
    with pytest.raises(ValueError, match="give q_len"):
        skattn.serving_plan(**base)
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 16"):
        skattn.serving_plan(q_len=1, page_size=40, **base)
    with pytest.raises(ValueError, match="policy must be one of"):
        skattn.serving_plan(q_len=1, policy="round-4x", **base)
    with pytest.raises(ValueError, match="must be a multiple of the most tiles"):
        skattn.serving_plan(q_len=1, policy="split", programs=5, **base)


def test_check_values_on_request():
    # the same value checks for tensors anywhere (they read them: a sync on a GPU)
    q, k, v, table = paged()
    with pytest.raises(ValueError, match="is negative"):
        serving.check_values(k=k, block_table=table, cache_seqlens=torch.tensor([-1, 2], dtype=I32))
    q, k, v, cu_q, cu_k = varlen()
    serving.check_values(q=q, k=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3,
                         max_seqlen_k=9)
    with pytest.raises(ValueError, match="non-decreasing"):
        serving.check_values(q=q, k=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k.flip(0),
                             max_seqlen_q=3, max_seqlen_k=9)
