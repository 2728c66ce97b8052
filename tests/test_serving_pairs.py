"""Two KV heads of 64 read as one of 128 (`serving_plan(head_pairs=)`, docs/serving.md "Two KV
heads as one"): plans, bad layouts, and the kernels under TRITON_INTERPRET=1 against float64."""
import pytest
import torch

import skattn
from skattn import reference
from skattn.reference_serving_plan import pair_outputs, pair_queries, run_serving_plan
from serving_inputs import paged_cache, varlen_inputs
from test_serving_interpret import (OCC, SMS, check_kvcache, check_varlen, dense_inputs,
                                    kv_plan)

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]


def plan(**kw):
    args = dict(q_split=None, batch=2, q_len=1, max_kv_len=256, q_heads=16, kv_heads=2,
                head_dim=64, sms=132, occupancy=2, page_size=16)
    return skattn.serving_plan(**dict(args, **kw))


def test_which_plans_read_heads_in_pairs():
    p = plan()
    assert p.head_pairs and (p.kv_heads, p.head_dim, p.head_dim_v) == (1, 128, 128)
    assert p.geometry.block_m == 16 and p.gqa_ratio == 16  # the 16 rows of the pair
    assert plan(dtype=torch.bfloat16).head_pairs
    # what stays one KV head a row: 128 values, FP8 K/V, an odd head count, rows past 16
    assert not plan(head_dim=128).head_pairs
    assert not plan(dtype=torch.float8_e4m3fn).head_pairs
    assert not plan(kv_heads=1, q_heads=8).head_pairs
    assert not plan(q_len=2).head_pairs  # 2 tokens x 2 x 8 query heads = 32 rows
    assert not plan(head_pairs=False).head_pairs
    # by default with pages of 16 alone (measured faster there), on request elsewhere
    assert not plan(page_size=64).head_pairs and not plan(page_size=None).head_pairs
    assert plan(page_size=64, head_pairs=True).head_pairs
    assert plan(page_size=None, head_pairs=True).head_pairs
    with pytest.raises(ValueError, match="head_pairs=True needs"):
        plan(head_dim=128, head_pairs=True)
    with pytest.raises(ValueError, match="head_pairs must be"):
        plan(head_pairs=1)


def test_pairs_as_the_caller_sees_them():
    # the plan is matched against the caller's K/V (2 heads of 64), not the kernel's
    lens = torch.tensor([30, 5], dtype=torch.int32)
    q, k, v = dense_inputs(2, 1, 64, 16, 2, 64, seed=1)
    p = kv_plan(2, 1, 64, 16, 2, 64, head_pairs=True)
    assert p.head_pairs
    skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, plan=p)
    q4, k4, v4 = dense_inputs(2, 1, 64, 16, 4, 64, seed=1)
    with pytest.raises(ValueError, match="kv_heads=2, inputs have 4"):
        skattn.attention_with_kvcache(q4, k4, v4, cache_seqlens=lens, plan=p)
    # pre-widened tensors (the kernel's view) are not the caller's
    q2, k2, v2 = dense_inputs(2, 1, 64, 16, 1, 128, seed=1)
    with pytest.raises(ValueError, match="reads KV heads in pairs"):
        skattn.attention_with_kvcache(q2, k2, v2, cache_seqlens=lens, plan=p)
    # heads not adjacent in a row (a head-major cache seen as [B, L, Hkv, D]): refused before
    # any launch (out untouched), k or v
    kh = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((2, 1, 16, 64), float("nan"), dtype=torch.float16)
    for bad in ((kh, v), (k, kh.clone())):
        with pytest.raises(ValueError, match="heads must be adjacent"):
            skattn.attention_with_kvcache(q, *bad, cache_seqlens=lens, plan=p, out=out)
        assert torch.isnan(out).all()
    # the same call planned without pairs reads it
    skattn.attention_with_kvcache(q, kh, v, cache_seqlens=lens,
                                  plan=kv_plan(2, 1, 64, 16, 2, 64, head_pairs=False))


def test_default_plan_of_a_head_major_cache():
    # no plan given: pages of 16 would pair, but this cache's heads are not adjacent, so the
    # call's own plan reads one KV head a row (and matches float64)
    lens = [50, 3]
    k, v, table = paged_cache(lens, page_size=16, hkv=2, d=64, seed=8)
    kh = k.transpose(1, 2).contiguous().transpose(1, 2)
    vh = v.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(2, 1, 16, 64, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = skattn.attention_with_kvcache(q, kh, vh, cache_seqlens=lens_t, block_table=table)
    ref = reference.attention_with_kvcache(q, kh, vh, cache_seqlens=lens_t, block_table=table)
    assert (out.double() - ref).abs().max() < 5e-3


def test_pairs_of_several_tokens():
    # 4 query tokens x 2 x a GQA ratio of 2 = 16 rows: a tile of several tokens, causal
    lens = [40, 9]
    q, k, v = dense_inputs(2, 4, 40, 4, 2, 64, seed=10)
    p = kv_plan(2, 4, 40, 4, 2, 64, head_pairs=True)
    assert p.head_pairs and p.geometry.tokens_per_tile == 4
    check_kvcache(q, k, v, lens, p)


def test_pair_queries_and_outputs():
    # what the kernel loads and stores: each query head in its KV head's half of the pair
    q = torch.arange(2 * 8 * 2, dtype=torch.float64).view(1, 8, 4)[..., :2].reshape(1, 8, 2)
    wide = pair_queries(q, 4)  # 4 KV heads: query heads 0-1 head 0, 2-3 head 1, ...
    assert torch.equal(wide[0, 2, 2:], q[0, 2]) and torch.equal(wide[0, 2, :2], torch.zeros(2))
    assert torch.equal(wide[0, 4, :2], q[0, 4]) and torch.equal(wide[0, 4, 2:], torch.zeros(2))
    assert torch.equal(pair_outputs(wide, 4), q)


@pytest.mark.parametrize("policy,fixup", [("auto", None), ("auto", "general"),
                                          ("llamacpp", None), ("split", None)])
def test_paged_pairs_against_float64(policy, fixup):
    # random page order, an empty and a one-key sequence, pages shared read-only; every
    # policy and fixup, sinks and lse; the float64 replay of the plan agrees too
    lens = [0, 1, 70, 33, 129]
    k, v, table = paged_cache(lens, page_size=16, hkv=4, d=64, seed=2, share=1)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 1, 32, 64, generator=g).to(torch.float16)
    sinks = torch.randn(32, generator=g)
    p = kv_plan(5, 1, table.shape[1] * 16, 32, 4, 64, page_size=16, policy=policy, fixup=fixup)
    assert p.head_pairs
    check_kvcache(q, k, v, lens, p, block_table=table, sinks=sinks)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    got = run_serving_plan(p, q, k, v, cache_seqlens=lens_t, block_table=table, sinks=sinks)
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                           sinks=sinks)
    assert (got - ref).abs().max() < 1e-12


def test_dense_pairs_window_softcap_alibi_bf16():
    lens = [100, 7, 64]
    q, k, v = dense_inputs(3, 1, 100, 16, 2, 64, dtype=torch.bfloat16, seed=5)
    slopes = torch.rand(16) * 0.1
    p = kv_plan(3, 1, 100, 16, 2, 64, dtype=torch.bfloat16, window=40, head_pairs=True)
    assert p.head_pairs
    check_kvcache(q, k, v, lens, p, window=40, softcap=20.0)
    check_kvcache(q, k, v, lens, p, window=40, alibi_slopes=slopes)


def test_varlen_decode_rows_in_pairs():
    # a varlen batch of decode rows (one query a sequence), packed K/V, and a MixedPlan whose
    # short half (one query token a sequence: q_split=1) reads heads in pairs while its prompt
    # half does not (the default split, 2 tokens at this ratio, makes 32-row pairs: no pairs)
    lq, lk = [1, 1, 1, 40], [50, 1, 90, 60]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=16, hkv=2, d=64, seed=6)
    one = skattn.serving_plan(q_split=None, batch=3, max_q_len=1, total_q=3, max_kv_len=90,
                              total_k=141, q_heads=16, kv_heads=2, head_dim=64, sms=SMS,
                              occupancy=OCC, block_n=16, head_pairs=True)
    assert one.head_pairs
    check_varlen(q[:3], k[:141], v[:141], cu_q[:4], cu_k[:4], 1, 90, one)
    # paged (pages of 16: pairs by default where a half's rows fit)
    kp, vp, table = paged_cache(lk, page_size=16, hkv=2, d=64, seed=7)
    bounds = dict(batch=4, max_q_len=40, total_q=sum(lq), max_kv_len=table.shape[1] * 16,
                  page_size=16, max_pages=table.shape[1], q_heads=16, kv_heads=2, head_dim=64,
                  sms=SMS, occupancy=OCC, block_n=16)
    assert not skattn.serving_plan(q_split="auto", **bounds).short.head_pairs
    with pytest.raises(ValueError, match="q_split tokens"):  # 2 tokens: 32-row pairs
        skattn.serving_plan(q_split="auto", head_pairs=True, **bounds)
    mixed = skattn.serving_plan(q_split=1, head_pairs=True, **bounds)
    assert mixed.short.head_pairs and not mixed.long.head_pairs
    assert skattn.serving_plan(q_split=1, **bounds).short.head_pairs  # the default at pages of 16
    check_varlen(q, kp, vp, cu_q, cu_k, 40, table.shape[1] * 16, mixed, block_table=table)
    got = run_serving_plan(mixed, q, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=40, max_seqlen_k=table.shape[1] * 16, block_table=table)
    ref = reference.attention_varlen(q, kp, vp, cu_q, cu_k, 40, table.shape[1] * 16,
                                     block_table=table)
    rows = ~torch.isnan(ref[:, 0, 0])
    assert (got[rows] - ref[rows]).abs().max() < 1e-12
