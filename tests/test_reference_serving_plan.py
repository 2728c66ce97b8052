"""The ragged replay (skattn.reference.run_serving_plan) against the float64 serving references."""
import pytest
import torch

import skattn
from skattn import reference, reference_serving_plan
from skattn.reference import run_serving_plan
from serving_inputs import paged_cache, varlen_inputs

TOL = dict(rtol=1e-10, atol=1e-10, equal_nan=True)
PLANS = [  # (policy, fixup, programs): every fixup kind and several program counts
    ("llamacpp-before", None, 8), ("llamacpp-before", "fused", 7), ("llamacpp-before", None, 1),
    ("llamacpp-before", None, 64), ("llamacpp-before", "fused", 13), ("auto", None, None),
    ("llamacpp", None, None), ("split", None, None), ("split", None, "x1"),
    ("auto", "tail", None), ("llamacpp-before", "tail", 5),  # a dynamic tail of 40% of W
]


def kv_plan(B, Lq, cap, Hq, Hkv, D, *, policy, fixup, programs, **kw):
    if fixup == "tail":
        fixup, kw["tail"] = "fused", 40
    kw.update(batch=B, q_len=Lq, max_kv_len=cap, q_heads=Hq, kv_heads=Hkv, head_dim=D, sms=4,
              occupancy=2, block_n=16, policy=policy, fixup=fixup)
    if programs == "x1":
        programs = skattn.serving_plan(q_split=None, **kw).tiles_max
    return skattn.serving_plan(q_split=None, programs=programs, **kw)


def features(g, hq):
    return dict(sinks=torch.randn(hq, generator=g) * 2, softcap=5.0,
                alibi_slopes=torch.rand(hq, generator=g) * 0.3)


def check(p, run, ref):
    out, lse = run(p)
    ref_out, ref_lse = ref()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


@pytest.mark.parametrize("policy,fixup,programs", PLANS)
@pytest.mark.parametrize("lq", [1, 3])
def test_kvcache_dense(policy, fixup, programs, lq):
    # an empty, a one-key and a long sequence; Lq = 3 leaves the one-key sequence's first rows blind
    lens, g = [0, 1, 45, 9], torch.Generator().manual_seed(lq)
    q = torch.randn(4, lq, 4, 16, generator=g).half()
    k, v = (torch.randn(4, 48, 2, 16, generator=g).half() for _ in range(2))
    p = kv_plan(4, lq, 48, 4, 2, 16, policy=policy, fixup=fixup, programs=programs)
    if programs == "x1":
        assert p.fixup == "none"
    kw = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32), return_lse=True)
    check(p, lambda p: run_serving_plan(p, q, k, v, **kw),
          lambda: reference.attention_with_kvcache(q, k, v, **kw))


@pytest.mark.parametrize("policy,fixup,programs", PLANS[:3] + PLANS[5:8])
@pytest.mark.parametrize("window", [None, 7])
def test_kvcache_paged_features(policy, fixup, programs, window):
    # random page order, a shared prefix, GQA 3, Lq = 2, sinks, softcap, ALiBi
    lens = [33, 0, 1, 70, 16]
    k, v, table = paged_cache(lens, page_size=16, hkv=2, d=16, seed=2, share=1, max_pages=5)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(5, 2, 6, 16, generator=g).half()
    p = kv_plan(5, 2, 80, 6, 2, 16, policy=policy, fixup=fixup, programs=programs,
                page_size=16, max_pages=5, window=window)
    kw = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32), block_table=table,
              window=window, return_lse=True, **features(g, 6))
    check(p, lambda p: run_serving_plan(p, q, k, v, **kw),
          lambda: reference.attention_with_kvcache(q, k, v, **kw))


def varlen_case(paged, window, seed=0):
    lq, lk = [40, 1, 0, 12, 3, 1], [40, 30, 3, 50, 2, 0]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=8, hkv=2, d=16, seed=seed, pad_q=2)
    table = None
    if paged:
        k, v, table = paged_cache(lk, page_size=16, hkv=2, d=16, seed=seed, max_pages=4)
    kw = dict(block_table=table, window=window, return_lse=True,
              **features(torch.Generator().manual_seed(seed), 8))
    return q, k, v, (cu_q, cu_k, 40, 64 if paged else 50), kw


@pytest.mark.parametrize("policy,fixup,programs", PLANS)
@pytest.mark.parametrize("paged,window", [(False, None), (True, 9)])
def test_varlen(policy, fixup, programs, paged, window):
    # prompt chunks of several row blocks, decode rows, empty sequences, padding rows of q
    q, k, v, args, kw = varlen_case(paged, window)
    bounds = dict(page_size=16, max_pages=4) if paged else dict(total_k=k.shape[0])
    kw_plan = dict(batch=6, max_q_len=40, total_q=q.shape[0], max_kv_len=args[3], q_heads=8,
                   kv_heads=2, head_dim=16, causal=True, window=window, sms=4, occupancy=2,
                   block_n=16, policy=policy, fixup=fixup, **bounds)
    if fixup == "tail":
        kw_plan.update(fixup="fused", tail=40)
    if programs == "x1":
        programs = skattn.serving_plan(q_split=None, **kw_plan).tiles_max
    p = skattn.serving_plan(q_split=None, programs=programs, **kw_plan)
    assert p.rb_max > 6
    names = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    check(p, lambda p: run_serving_plan(p, q, k, v, **dict(zip(names, args)), **kw),
          lambda: reference.attention_varlen(q, k, v, *args, **kw))


@pytest.mark.parametrize("window", [None, 40])
def test_varlen_whole_tiles(window):
    # a step of policy auto in whole tiles (a long causal prompt on a pretend GPU of 2
    # resident programs), sinks, softcap and ALiBi
    q, k, v, cu_q, cu_k = varlen_inputs([200, 1, 30], [200, 40, 60], hq=8, hkv=2, d=16, seed=4)
    p = skattn.serving_plan(q_split=None, batch=3, max_q_len=200, total_q=q.shape[0], max_kv_len=200,
                            total_k=k.shape[0], q_heads=8, kv_heads=2, head_dim=16, window=window,
                            sms=1, occupancy=2, block_n=16)
    assert reference_serving_plan.host_work_list(p, cu_k=cu_k.tolist(), cu_q=cu_q.tolist()).whole
    args = (cu_q, cu_k, 200, 200)
    kw = dict(window=window, return_lse=True, **features(torch.Generator().manual_seed(1), 8))
    names = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    check(p, lambda p: run_serving_plan(p, q, k, v, **dict(zip(names, args)), **kw),
          lambda: reference.attention_varlen(q, k, v, *args, **kw))


@pytest.mark.parametrize("shift", [+1, -1])
@pytest.mark.parametrize("fixup", ["general", "fused"])
def test_a_wrong_split_is_caught(monkeypatch, shift, fixup):
    # move one program boundary inside a cut tile: +1 drops a work item, -1 runs it twice
    lens = [40, 1, 45]
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, 1, 4, 16, generator=g).half()
    k, v = (torch.randn(3, 48, 2, 16, generator=g).half() for _ in range(2))
    p = kv_plan(3, 1, 48, 4, 2, 16, policy="llamacpp-before", fixup=fixup, programs=7)
    kw = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32), return_lse=True)
    ref = reference.attention_with_kvcache(q, k, v, **kw)
    torch.testing.assert_close(run_serving_plan(p, q, k, v, **kw), ref, **TOL)  # the true split
    true_ranges = reference_serving_plan.program_ranges

    def moved(plan, wl):  # program 1 starts one item later (+1) or program 0 ends one later (-1)
        r = true_ranges(plan, wl)
        assert r[0][1] % 3, "the boundary must cut a tile"
        return [(r[0][0], r[0][1] - min(shift, 0)), (r[1][0] + max(shift, 0), r[1][1])] + r[2:]

    monkeypatch.setattr(reference_serving_plan, "program_ranges", moved)
    try:
        out, lse = run_serving_plan(p, q, k, v, **kw)
    except AssertionError:
        return  # the protocol check caught it
    assert (out - ref[0]).abs().max() > 1e-3 or (lse - ref[1]).abs().max() > 1e-3


def test_bad_arguments():
    q = torch.randn(2, 1, 4, 16).half()
    k = v = torch.randn(2, 32, 2, 16).half()
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="ServingPlan"):
        run_serving_plan(None, q, k, v, cache_seqlens=lens)
    p = kv_plan(2, 1, 32, 4, 2, 16, policy="auto", fixup=None, programs=None, causal=False)
    with pytest.raises(ValueError, match="causal"):
        run_serving_plan(p, q, k, v, cache_seqlens=lens, causal=True)
    with pytest.raises(ValueError, match="cache_seqlens"):
        run_serving_plan(p, q, k, v, cache_seqlens=torch.tensor([3, 40], dtype=torch.int32),
                         causal=False)
