"""On a GPU: repeat calls of the serving functions replay their recipes
(`skattn.serving_recipe`) through skattn's C launcher. Each replayed output equals the
checked path's (recipes switched off) bit for bit and matches float64, as lengths and page
tables change in place, with fresh inputs, a mixed plan, the custom op and a CUDA graph of
a replayed call."""
import pytest
import torch

import skattn
import skattn.ops
from skattn import reference, serving, serving_recipe
from serving_inputs import paged_cache, ragged_bound, sequences_kvcache, sequences_varlen
from serving_inputs import varlen_inputs
from tolerance import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HQ, HKV, D = 32, 8, 128
LENS = [4000, 1, 0, 700, 2048, 33]


def served() -> bool:
    return any(r.serves and r.by_align and all(spec is not None for spec, _ in r.by_align.values())
               for r in serving_recipe.CHECKED.values())


def checked(call):
    """`call()` with every recipe switched off (the checked path), then switched back."""
    recipes = list(serving_recipe.CHECKED.values())
    for r in recipes:
        r.serves = False
    try:
        return call()
    finally:
        for r in recipes:
            r.serves = True


def kv_case(seed, lq=1, page_size=16):
    k, v, table = paged_cache(LENS, page_size=page_size, hkv=HKV, d=D, seed=seed, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = torch.randn(len(LENS), lq, HQ, D, device="cuda", generator=g).half()
    return q, k, v, table


@pytest.mark.parametrize("planned", [True, False])
def test_replays_follow_lengths_and_pages_in_place(planned):
    serving_recipe.CHECKED.clear()
    q, k, v, table = kv_case(0, lq=2)
    lens = torch.tensor(LENS, dtype=torch.int32, device="cuda")
    p = (skattn.serving_plan(batch=len(LENS), q_len=2, max_kv_len=16 * table.shape[1],
                             page_size=16, max_pages=table.shape[1], q_heads=HQ, kv_heads=HKV,
                             head_dim=D) if planned else None)
    wsb = serving.workspace(p) if planned else None
    out = torch.full_like(q, float("nan"))

    def call():
        return skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                             plan=p, out=out if planned else None,
                                             workspace=wsb, return_lse=True)

    call()
    assert served()
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        new = [int(torch.randint(0, n + 1, (1,), generator=gen)) if n else 0 for n in LENS]
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        if step % 2:  # pages swapped between two sequences' first entries, in place
            table[[0, 3], 0] = table[[3, 0], 0].clone()
        got_o, got_l = (x.clone() for x in call())
        want_o, want_l = checked(call)
        assert torch.equal(got_o, want_o) and torch.equal(got_l, want_l), step
        seqs = sequences_kvcache(q, k, v, new, table)
        ref = reference.attention_with_kvcache(q.cpu(), k.cpu(), v.cpu(), cache_seqlens=lens.cpu(),
                                               block_table=table.cpu())
        rows = [b for b, n in enumerate(new) if n]
        assert rel_err(got_o[rows], ref[rows].to(got_o.device)) < ragged_bound(seqs)
        assert torch.equal(got_o[[b for b, n in enumerate(new) if not n]],
                           torch.zeros_like(got_o[[b for b, n in enumerate(new) if not n]]))


def test_fresh_inputs_mixed_plan_and_the_op():
    serving_recipe.CHECKED.clear()
    lq, lk = [300, 1, 3, 0, 1, 40], [1200, 900, 3, 5, 4000, 40]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=HQ, hkv=HKV, d=D, device="cuda", pad_q=3)
    p = skattn.serving_plan(batch=len(lq), max_q_len=max(lq), total_q=q.shape[0],
                            max_kv_len=max(lk), total_k=k.shape[0], q_heads=HQ, kv_heads=HKV,
                            head_dim=D)
    assert isinstance(p, skattn.MixedPlan)
    n = sum(lq)
    for seed in range(3):  # new tensors each time: the same signature, other addresses
        q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=HQ, hkv=HKV, d=D, device="cuda",
                                            pad_q=3, seed=seed)
        got = skattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), plan=p)
        op = skattn.ops.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk))
        want = checked(lambda: skattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                       plan=p))
        assert torch.equal(got[:n], want[:n]), seed
        ref = reference.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(),
                                         max(lq), max(lk))
        seqs = sequences_varlen(q, k, v, cu_q, cu_k)
        assert rel_err(got[:n], ref[:n].to(got.device)) < ragged_bound(seqs)
        assert rel_err(op[:n], ref[:n].to(op.device)) < ragged_bound(seqs)
    assert served()


def test_cuda_graph_of_a_replayed_call():
    serving_recipe.CHECKED.clear()
    q, k, v, table = kv_case(5)
    lens = torch.tensor(LENS, dtype=torch.int32, device="cuda")
    p = skattn.serving_plan(batch=len(LENS), q_len=1, max_kv_len=16 * table.shape[1],
                            page_size=16, max_pages=table.shape[1], q_heads=HQ, kv_heads=HKV,
                            head_dim=D)
    wsb, out = serving.workspace(p), torch.empty_like(q)

    def call():
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, plan=p,
                                      out=out, workspace=wsb)

    call()  # learns
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # a call on a side stream first, as warm-ups before a capture do
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    assert served()
    for step in range(4):
        lens.copy_(torch.tensor([max(0, n - 7 * step) for n in LENS], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        got = out.clone()
        checked(call)
        assert torch.equal(got, out), step


def test_planned_serving_call_host_time():
    # a repeat planned decode step replays its recipe: the signature, the addresses, one
    # call of skattn's C launcher for the work-list step and the main kernel (and a fixup);
    # against the checked path (recipes off) in the same run
    from skattn.bench.host import per_call_us

    serving_recipe.CHECKED.clear()
    B, L = 64, 64  # ~17 MB of K/V a call: the host, not the GPU, sets the pace
    k = torch.randn(B * L // 16, 16, HKV, D, device="cuda").half()
    v = torch.randn_like(k)
    table = torch.arange(B * L // 16, dtype=torch.int32, device="cuda").view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, 1, HQ, D, device="cuda").half()
    p = skattn.serving_plan(batch=B, q_len=1, max_kv_len=L, page_size=16, max_pages=L // 16,
                            q_heads=HQ, kv_heads=HKV, head_dim=D)
    wsb, out = serving.workspace(p), torch.empty_like(q)

    def call():
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, plan=p,
                                      out=out, workspace=wsb)

    us = per_call_us(call)
    assert served()
    checked_us = per_call_us(lambda: checked(call))
    print(f"planned serving call host time: {us:.1f} us (checked path {checked_us:.1f} us)")
    assert us <= 40.0  # a regression bound: the checked path costs several times more
    assert us < checked_us
