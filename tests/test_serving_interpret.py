"""Ragged and paged attention under TRITON_INTERPRET=1 on tiny batches (docs/serving.md)."""
import pytest
import torch
import triton
import triton.language as tl

import skattn
from skattn import reference, serving, serving_launch, serving_recipe
from skattn.kernels.ragged import share_start
from skattn.kernels.worklist import (HEADER, TAIL_CHUNK, TAIL_CHUNKS, TAIL_NEXT, TAIL_START,
                                     WHOLE_FLAG, WHOLE_NEXT, wl_offsets)
from skattn.serving_worklist import host_work_list
from serving_inputs import (paged_cache, ragged_bound, randn, sequences_kvcache,
                            sequences_varlen, varlen_inputs)
from tolerance import rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

SMS, OCC = 4, 2  # a pretend GPU of 8 programs, so tiny batches still cut tiles
NAN = float("nan")


def kv_plan(B, Lq, cap, Hq, Hkv, D, *, page_size=None, block_n=16, **kw):
    pages = dict(page_size=page_size, max_pages=cap // page_size) if page_size else {}
    return skattn.serving_plan(q_split=None, batch=B, q_len=Lq, max_kv_len=cap, q_heads=Hq, kv_heads=Hkv,
                               head_dim=D, head_dim_v=kw.pop("Dv", None), sms=SMS,
                               occupancy=OCC, block_n=block_n, **pages, **kw)


def dense_inputs(B, Lq, L, Hq, Hkv, D, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (randn((B, Lq, Hq, D), g, dtype, "cpu"), randn((B, L, Hkv, D), g, dtype, "cpu"),
            randn((B, L, Hkv, D), g, dtype, "cpu"))


def check_lse(lse, ref_lse, tol):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 20 * tol


def check_kvcache(q, k, v, lens, p, block_table=None, **kw):
    """Kernel vs float64 reference; out poisoned first, inputs untouched."""
    inputs = [x.clone() for x in (q, k, v)]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((*q.shape[:3], v.shape[-1]), NAN, dtype=q.dtype)
    out, lse = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=block_table,
                                             plan=p, out=out, return_lse=True, **kw)
    ref, ref_lse = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t,
                                                    block_table=block_table, return_lse=True, **kw)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "an input was modified"
    tol = ragged_bound(sequences_kvcache(q, k, v, lens, block_table), causal=kw.get("causal", True))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    check_lse(lse, ref_lse, tol)
    return out


# -- the work list: the device builds what the host mirror computes
def device_list(p, **seqs):
    wl = serving.work_list(p, **seqs).tolist()
    B, R = p.batch, p.rb_max
    at = HEADER + 5 * B
    return {"work": wl[0], "programs": wl[1], "whole": wl[WHOLE_FLAG.value], "lens_q": wl[HEADER:HEADER + B],
            "lens_k": wl[HEADER + B:HEADER + 2 * B], "q_start": wl[HEADER + 2 * B:HEADER + 3 * B],
            "k_start": wl[HEADER + 3 * B:HEADER + 4 * B], "rb_start": wl[at:at + R + 1],
            "rb_count": wl[at + R + 1:at + 2 * R + 1], "rb_seq": wl[at + 2 * R + 1:at + 3 * R + 1],
            "rb_qblock": wl[at + 3 * R + 1:at + 4 * R + 1], "rb_first": wl[at + 4 * R + 1:at + 5 * R + 1],
            "tail": [wl[TAIL_START.value], wl[TAIL_CHUNK.value], wl[TAIL_CHUNKS.value],
                     wl[TAIL_NEXT.value]]}


def assert_same_list(p, dev, host):
    n = len(host.rb_count)
    assert dev["work"] == host.work and dev["programs"] == host.programs
    assert dev["whole"] == int(host.whole)
    assert dev["tail"] == [host.tail_start, host.tail_chunk, host.tail_chunks, 0]
    for name in ("lens_q", "lens_k", "q_start", "k_start", "rb_start"):
        assert dev[name] == getattr(host, name), name
    for name in ("rb_count", "rb_seq", "rb_qblock", "rb_first"):
        assert dev[name][:n] == getattr(host, name), name
    assert all(c == 0 for c in dev["rb_count"][n:]), "padding row blocks own work"


@pytest.mark.parametrize("policy", ["auto", "llamacpp", "llamacpp-before", "split"])
def test_work_list_kvcache(policy):
    lens = [0, 1, 37, 5, 16]
    p = kv_plan(5, 3, 40, 4, 2, 16, policy=policy, causal=True, window=None)
    t = torch.tensor(lens, dtype=torch.int32)
    assert_same_list(p, device_list(p, cache_seqlens=t), host_work_list(p, lens_k=lens))


@pytest.mark.parametrize("window", [None, 7])
def test_work_list_varlen(window):
    # prompt chunks longer than a tile (several row blocks), decode rows, an empty sequence
    lq, lk = [40, 1, 0, 12, 3], [40, 30, 3, 50, 2]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=8, hkv=2, d=16)
    p = skattn.serving_plan(q_split=None, batch=5, max_q_len=40, total_q=q.shape[0], max_kv_len=50,
                            total_k=k.shape[0], q_heads=8, kv_heads=2, head_dim=16,
                            causal=True, window=window, sms=SMS, occupancy=OCC, block_n=16)
    assert p.rb_max > 5
    assert_same_list(p, device_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                     host_work_list(p, cu_k=cu_k.tolist(), cu_q=cu_q.tolist()))


def test_work_list_many_sequences():
    # more row blocks than one chunk of the work-list kernel (256): the prefix sum carries
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 200, (300,), generator=g, dtype=torch.int32)
    p = kv_plan(300, 1, 200, 8, 2, 16, policy="auto")
    assert p.rb_max == 300
    assert_same_list(p, device_list(p, cache_seqlens=lens), host_work_list(p, lens_k=lens.tolist()))


# -- every fixup kind on a ragged batch: empty, one-key and long sequences
@pytest.mark.parametrize("policy,fixup,programs", [
    ("llamacpp-before", None, 8),   # general: stream-K cuts through tiles of every length
    ("llamacpp-before", "fused", 7),
    ("llamacpp-before", None, 1),   # one program walks every tile: nothing to merge
    ("llamacpp-before", None, 64),  # more programs than work items: the surplus exits
    ("auto", None, None),
    ("llamacpp", None, None),
    ("split", None, 24),            # uniform, 3 pieces a tile: short tiles leave empty pieces
])
def test_kvcache_fixups(policy, fixup, programs):
    lens = [0, 1, 45, 9]
    q, k, v = dense_inputs(4, 1, 48, 4, 2, 16, seed=1)
    p = kv_plan(4, 1, 48, 4, 2, 16, policy=policy, fixup=fixup, programs=programs)
    if policy == "split":
        assert p.fixup == "uniform" and p.split == 3
    check_kvcache(q, k, v, lens, p)


@triton.jit
def _share_starts(WL, OUT, batch, rb_max, hz, TAU: tl.constexpr, SEARCH: tl.constexpr):
    p = tl.program_id(0)
    work = tl.load(WL + 0)
    programs = tl.load(WL + 1)
    _, _, _, _, _, o_start, o_count, _, _, _ = wl_offsets(batch, rb_max)
    positions = work + TAU * tl.load(WL + 2) * hz
    _, _, _, _, start = share_start(WL, o_start, o_count, rb_max, hz, tl.minimum(p, programs),
                                    work, programs, positions, TAU, SEARCH)
    tl.store(OUT + p, start)


@pytest.mark.parametrize("tile_cost,programs,search", [(1, 5, 2), (3, 7, 4), (7, 12, 256)])
def test_device_shares_match_the_host(tile_cost, programs, search):
    # each program's first item as the kernel finds it (share_start over the device's work
    # list, padding row blocks included) equals WorkList.program_range's
    lens = [0, 1, 45, 9, 0, 33]
    p = kv_plan(6, 1, 48, 4, 2, 16, policy="llamacpp-before", fixup="fused", programs=programs,
                tile_cost=tile_cost)
    t = torch.tensor(lens, dtype=torch.int32)
    wl = serving.work_list(p, cache_seqlens=t)
    host = host_work_list(p, lens_k=lens)
    out = torch.full((programs + 1,), -1, dtype=torch.int32)
    _share_starts[(programs + 1,)](wl, out, p.batch, p.rb_max, p.hz, TAU=tile_cost,
                                   SEARCH=search)
    want = [host.program_range(i)[0] for i in range(host.programs)] + [host.work]
    assert out.tolist()[:host.programs + 1] == want


@pytest.mark.parametrize("tile_cost,programs,lens", [
    (1, 5, [0, 1, 45, 9]), (3, 7, [0, 1, 45, 9]), (3, None, [0, 1, 45, 9]),
    (7, 12, [0, 1, 45, 9]),   # 12 programs over 12 items: empty shares
    (1, 10, [0, 0, 0, 33]),   # the last tile cut: its last piece's program by position
])
def test_shares_that_count_tiles(tile_cost, programs, lens):
    # shares of W + tile_cost x tiles positions (the fused merge finds each tile's pieces
    # by position): every tile written once, as float64, paged and not
    q, k, v = dense_inputs(4, 1, 48, 4, 2, 16, seed=4)
    policy = "llamacpp-before" if programs else "auto"
    p = kv_plan(4, 1, 48, 4, 2, 16, policy=policy, fixup="fused", programs=programs,
                tile_cost=tile_cost)
    assert p.tile_cost == tile_cost
    host = host_work_list(p, lens_k=lens)
    spans = [host.program_range(i) for i in range(host.programs)]
    assert spans[-1][1] == host.work and all(a <= b for a, b in spans)
    if programs == 12:
        assert any(a == b for a, b in spans), "the case meant to leave programs empty"
    check_kvcache(q, k, v, lens, p)
    kp, vp, table = paged_cache(lens, page_size=16, hkv=2, d=16, seed=5)
    pp = kv_plan(4, 1, 48, 4, 2, 16, policy=policy, fixup="fused", programs=programs,
                 tile_cost=tile_cost, page_size=16)
    check_kvcache(q, kp, vp, lens, pp, block_table=table)


@pytest.mark.parametrize("page_size,block_n,fixup", [
    (16, 16, None),     # a block is a page
    (32, 16, None),     # two blocks a page (one scalar page id a block)
    (48, 32, None),     # blocks straddle pages: one page id per key
    (16, 32, "fused"),  # a block spans two pages (their ids as a vector)
    (16, 64, None),     # four pages
    (256, 32, None),
])
def test_paged(page_size, block_n, fixup):
    # random page order, a shared prefix page, Lq = 2 bottom-right causal per sequence (the
    # one-key sequence's first query sees nothing), GQA ratio 3
    lens = [1, 70, 20, 0] if page_size < 256 else [300, 3, 1, 0]
    k, v, table = paged_cache(lens, page_size=page_size, hkv=2, d=16, seed=page_size, share=1)
    B, Lq, Hq = len(lens), 2, 6
    q = randn((B, Lq, Hq, 16), torch.Generator().manual_seed(5), torch.float16, "cpu")
    p = kv_plan(B, Lq, table.shape[1] * page_size, Hq, 2, 16, page_size=page_size,
                block_n=block_n, policy="llamacpp-before", programs=8, fixup=fixup)
    check_kvcache(q, k, v, lens, p, block_table=table)


def test_paged_features():
    # window, sinks, softcap and ALiBi per sequence; Dv != Dk
    lens = [33, 5, 64]
    k, v, table = paged_cache(lens, page_size=32, hkv=1, d=16, dv=32, seed=2)
    g = torch.Generator().manual_seed(6)
    q = randn((3, 3, 4, 16), g, torch.float16, "cpu")
    p = kv_plan(3, 3, table.shape[1] * 32, 4, 1, 16, Dv=32, page_size=32, window=9,
                policy="llamacpp-before", programs=8)
    check_kvcache(q, k, v, lens, p, block_table=table, window=9,
                  sinks=torch.randn(4, generator=g), softcap=5.0,
                  alibi_slopes=skattn.alibi_slopes(4, 8.0))


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_query_dtypes(qdtype):
    lens = [17, 3]
    q, k, v = dense_inputs(2, 1, 20, 8, 2, 16, dtype=torch.bfloat16, seed=4)
    check_kvcache(q.to(qdtype), k, v, lens, kv_plan(2, 1, 20, 8, 2, 16, dtype=torch.bfloat16))


def check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, p, block_table=None, **kw):
    out = torch.full((q.shape[0], q.shape[1], v.shape[-1]), NAN, dtype=q.dtype)
    out, lse = skattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, block_table=block_table,
                                       plan=p, out=out, return_lse=True, **kw)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k,
                                              block_table=block_table, return_lse=True, **kw)
    rows = ~torch.isnan(ref[:, 0, 0])
    assert torch.isnan(out[~rows]).all(), "rows outside every sequence were written"
    assert not torch.isnan(out[rows]).any(), "unwritten or NaN output"
    tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, block_table))
    assert rel_err(out[rows], ref[rows]) <= tol, (rel_err(out[rows], ref[rows]), tol)
    check_lse(lse[:, rows], ref_lse[:, rows], tol)


@pytest.mark.parametrize("paged,fixup", [(False, None), (False, "fused"), (True, None)])
def test_varlen_mixed_batch(paged, fixup):
    # a prompt chunk of several tiles, decode rows, an empty sequence, more queries than keys,
    # and two rows of q that belong to no sequence
    lq, lk = [19, 1, 1, 0, 3], [30, 33, 1, 0, 2]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=8, hkv=1, d=16, seed=7, pad_q=2)
    table = None
    bounds = dict(total_k=k.shape[0])
    if paged:
        k, v, table = paged_cache(lk, page_size=16, hkv=1, d=16, seed=8)
        bounds = dict(page_size=16, max_pages=table.shape[1])
    p = skattn.serving_plan(q_split=None, batch=5, max_q_len=19, total_q=q.shape[0], max_kv_len=40,
                            q_heads=8, kv_heads=1, head_dim=16, sms=SMS, occupancy=OCC,
                            block_n=16, policy="llamacpp-before", fixup=fixup, **bounds)
    assert p.geometry.tokens_per_tile < 19  # the prompt chunk spans several row blocks
    check_varlen(q, k, v, cu_q, cu_k, 19, 40, p, block_table=table)


@pytest.mark.parametrize("paged", [False, True])
def test_whole_tiles_step(paged):
    # a causal prompt of 16 tiles on a pretend GPU of 2 resident programs: policy auto runs
    # the step in whole tiles handed out longest first (docs/serving.md, "Whole tiles"); a
    # decode step of the same plan keeps stream-K (the kernel holds both)
    lq, lk = [256, 1, 0], [256, 40, 5]
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=8, hkv=2, d=16, seed=11)
    bounds = dict(total_k=k.shape[0])
    table = None
    if paged:
        k, v, table = paged_cache(lk, page_size=32, hkv=2, d=16, seed=12)
        bounds = dict(page_size=32, max_pages=table.shape[1])
    p = skattn.serving_plan(q_split=None, batch=3, max_q_len=256, total_q=q.shape[0], max_kv_len=256,
                            q_heads=8, kv_heads=2, head_dim=16, sms=1, occupancy=2,
                            block_n=16, **bounds)
    assert p.whole_tiles
    host = host_work_list(p, cu_k=cu_k.tolist(), cu_q=cu_q.tolist())
    assert host.whole and host.programs == 0
    assert_same_list(p, device_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), host)
    check_varlen(q, k, v, cu_q, cu_k, 256, 256, p, block_table=table)
    # one work list shared by two layers' calls: the first call's last fetch resets the
    # counter, so the second finds every tile again
    wl = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, 256, 256, block_table=table)
    for layer in range(2):
        out = torch.full((q.shape[0], 8, 16), NAN, dtype=q.dtype)
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 256, 256, block_table=table, plan=p,
                                work_list=wl, out=out)
        assert not torch.isnan(out[:257]).any(), f"layer {layer}: unwritten rows"
        assert rel_err(out[:257], ref[:257]) <= 1e-2, layer
        assert int(wl[WHOLE_NEXT.value]) == 0, layer
    # the same plan, decode rows only: stream-K and the general fixup
    lq1 = [1, 1, 1]
    q1, k1, v1, cu_q1, cu_k1 = varlen_inputs(lq1, lk, hq=8, hkv=2, d=16, seed=13,
                                             pad_q=q.shape[0] - 3)
    if paged:
        k1, v1 = k, v
    host1 = host_work_list(p, cu_k=cu_k1.tolist(), cu_q=cu_q1.tolist())
    assert not host1.whole and host1.programs > 0
    assert_same_list(p, device_list(p, cu_seqlens_q=cu_q1, cu_seqlens_k=cu_k1), host1)
    check_varlen(q1, k1, v1, cu_q1, cu_k1, 256, 256, p, block_table=table)


def test_work_list_shared_between_calls():
    # one work list per batch, several layers' calls; a caller's workspace
    lens = [12, 40, 3]
    p = kv_plan(3, 1, 40, 4, 2, 16, policy="llamacpp-before", fixup="fused", programs=7)
    t = torch.tensor(lens, dtype=torch.int32)
    wl = serving.work_list(p, cache_seqlens=t)
    ws = serving.workspace(p, device="cpu")
    for seed in (1, 2):
        q, k, v = dense_inputs(3, 1, 40, 4, 2, 16, seed=seed)
        out = skattn.attention_with_kvcache(q, k, v, cache_seqlens=t, plan=p, work_list=wl,
                                            workspace=ws)
        ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=t)
        assert rel_err(out, ref) <= ragged_bound(sequences_kvcache(q, k, v, lens))
    assert not ws[-p.tiles_max * 4:].any(), "fused counters must return to zero"


@pytest.mark.parametrize("block_n, bad", [(16, -1), (32, -1), (32, 10**6)])
def test_device_clamps_bad_lengths_and_pages(block_n, bad):
    # what the GPU does with values the host cannot check (docs/serving.md, "Bad input"):
    # a negative length counts as 0, one past the cache as the cache's capacity, and keys
    # of a page id out of range are masked, never read; blocks of one page and of two (the
    # page ids as a vector)
    lens = [-3, 100, 30]
    k, v, table = paged_cache([0, 48, 30], page_size=16, hkv=2, d=16, seed=9, max_pages=3)
    table[2, 1] = bad  # sequence 2's keys 16..29 sit in no page
    q = randn((3, 1, 4, 16), torch.Generator().manual_seed(10), torch.float16, "cpu")
    p = kv_plan(3, 1, 48, 4, 2, 16, page_size=16, policy="llamacpp-before", programs=8,
                block_n=block_n)
    out = torch.full((3, 1, 4, 16), NAN, dtype=q.dtype)
    t = torch.tensor(lens, dtype=torch.int32)
    with pytest.raises(ValueError, match="negative"):  # the host check, on CPU tensors
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=t, block_table=table, plan=p)
    serving_recipe.run_halves(p, q, k, v, out, None, seq_k=t, seq_q=None, block_table=table,
                              scale=0.25, sinks=None, softcap=0.0, alibi_slopes=None,
                              workspace=None, work_list=None)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    good = torch.tensor([0, 48, 30], dtype=torch.int32)
    ref1 = reference.attention_with_kvcache(q[1:2], k, v, cache_seqlens=good[1:2],
                                            block_table=table[1:2], scale=0.25)
    mask = torch.zeros(1, 1, 30, dtype=torch.float64)
    mask[..., 16:30] = float("-inf")
    keys = torch.zeros(30, 2, 16, dtype=k.dtype)
    vals = torch.zeros(30, 2, 16, dtype=v.dtype)
    keys[:16], vals[:16] = k[int(table[2, 0])], v[int(table[2, 0])]
    ref2 = reference.attention(q[2:3], keys[None], vals[None], scale=0.25, causal=True, mask=mask)
    tol = ragged_bound(sequences_kvcache(q, k, v, [0, 48, 0], table))
    assert rel_err(out[1:2], ref1) <= tol
    assert rel_err(out[2:3], ref2) <= tol


@pytest.mark.parametrize("bad", [-1, 10**6])
@pytest.mark.parametrize("page_size, block_n, Lq, bad_pages", [
    (16, 64, 1, ((5,), (0, 10))),  # four pages a block (ids as a vector)
    (16, 128, 3, ((9,), (3,))),    # eight pages a block (a 3-row tile)
    (64, 64, 2, ((1,), (0,))),     # a block is a page
])
def test_bad_pages_in_unmasked_blocks(page_size, block_n, Lq, bad_pages, bad):
    # keys of a page id out of range count as masked also in blocks that need no other mask
    # (inside Lk, before every row's causal edge), next to blocks whose ids are all in range
    # in the same sequence and the same program's loop
    lens = [300, 200]
    k, v, table = paged_cache(lens, page_size=page_size, hkv=2, d=16, seed=11)
    for b, pages in enumerate(bad_pages):
        table[b, list(pages)] = bad
    B, Hq = len(lens), 4
    q = randn((B, Lq, Hq, 16), torch.Generator().manual_seed(12), torch.float16, "cpu")
    p = kv_plan(B, Lq, table.shape[1] * page_size, Hq, 2, 16, page_size=page_size,
                block_n=block_n, policy="llamacpp-before", programs=8)
    out = torch.full((B, Lq, Hq, 16), NAN, dtype=q.dtype)
    serving_recipe.run_halves(p, q, k, v, out, None, seq_k=torch.tensor(lens, dtype=torch.int32),
                              seq_q=None, block_table=table, scale=0.25, sinks=None,
                              softcap=0.0, alibi_slopes=None, workspace=None, work_list=None)
    for b, (n, pages) in enumerate(zip(lens, bad_pages)):
        keys = torch.zeros(n, 2, 16, dtype=k.dtype)
        vals = torch.zeros(n, 2, 16, dtype=v.dtype)
        mask = torch.zeros(1, Lq, n, dtype=torch.float64)
        for j in range(-(-n // page_size)):
            rows = slice(j * page_size, min(n, (j + 1) * page_size))
            if j in pages:
                mask[..., rows] = float("-inf")
            else:
                keys[rows] = k[int(table[b, j]), :rows.stop - rows.start]
                vals[rows] = v[int(table[b, j]), :rows.stop - rows.start]
        # (each bad page lies in a block before the first row's causal edge: no other mask)
        assert all((j * page_size // block_n + 1) * block_n <= n - Lq + 1 for j in pages)
        ref = reference.attention(q[b:b + 1], keys[None], vals[None], scale=0.25, causal=True,
                                  mask=mask)
        tol = ragged_bound([(q[b:b + 1], keys[None], vals[None])])
        assert rel_err(out[b:b + 1], ref) <= tol, (b, rel_err(out[b:b + 1], ref), tol)


@pytest.mark.parametrize("captured", [False, True])
def test_pooled_work_list_outgrown_stays_alive_where_a_graph_saw_it(captured):
    # a CUDA graph captured with the pooled work list keeps its address: a bigger plan later
    # gets a new buffer and the old one is kept with the stream's pool, not freed; without a
    # capture it is freed
    from skattn import buffers
    from skattn import serving_launch as sl

    small, big = kv_plan(2, 1, 40, 4, 2, 16), kv_plan(300, 1, 40, 4, 2, 16)
    dev = torch.device("cpu")
    buffers.release()
    first = sl._views(small, sl.bind(small, dev), None, dev, 0)[4]
    buffers._pool(dev, 0).captured = captured
    second = sl._views(big, sl.bind(big, dev), None, dev, 0)[4]
    assert second.numel() == big.work_list_words and first.numel() == small.work_list_words
    retired = buffers._pool(dev, 0).retired
    assert any(first.data_ptr() == r.data_ptr() for r in retired) == captured
    buffers.release()
    assert not buffers._WORK_LISTS


@pytest.mark.parametrize("policy, max_kv_len, kind", [("llamacpp", 64, "general"),
                                                      ("split", 256, "uniform")])
def test_fixups_launched_by_pdl_wait_in_every_program(monkeypatch, policy, max_kv_len, kind):
    # a fixup launched by PDL: every program waits for the main kernel (griddepcontrol.wait),
    # also in a step whose tiles are all whole and where no program merges, since the next
    # kernel's own wait covers the main kernel only through the fixup grid's completion.
    # The interpreter has no PDL: the fixup is built as a Hopper GPU would build it and its
    # waits are counted.
    import math

    from skattn.kernels import ragged_fixup

    waits = []
    monkeypatch.setattr(ragged_fixup, "gdc_wait", lambda: waits.append(1))
    p = skattn.serving_plan(q_split=None, batch=2, q_len=1, max_kv_len=max_kv_len, q_heads=4, kv_heads=2,
                            head_dim=32, page_size=16, max_pages=max_kv_len // 16, sms=SMS,
                            occupancy=OCC, policy=policy)
    b = serving_launch.bind(p, torch.device("cpu"))
    assert b.fix_kernel == kind
    monkeypatch.setitem(b.fix_const, "USE_PDL", True)
    k, v, bt = paged_cache([5, 3], page_size=16, hkv=2, d=32, seed=9, max_pages=max_kv_len // 16)
    q = randn((2, 1, 4, 32), torch.Generator().manual_seed(9), torch.float16, "cpu")
    lens = torch.tensor([5, 3], dtype=torch.int32)
    built = dict(b.consts)
    try:
        out = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=bt, plan=p)
    finally:  # the constants made with USE_PDL stay with this test
        b.consts.clear()
        b.consts.update(built)
    assert len(waits) == math.prod(b.fix_grid)
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=bt)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("paged", [False, True])
def test_dynamic_tail(paged):
    # a plan with a dynamic tail (tail=40): the last 40% of the work goes out at run time in
    # chunks to whichever program asks first (the interpreter runs programs one after the
    # other, so the first takes them all: chunk pieces arrive before static pieces of the
    # same tile). Chunk k's pieces sit in the slots of virtual program N + k; the fused
    # merge finds them from the tile's first and last items. Two calls share one work list
    # and workspace: the chunk counter and the fused counters return to zero after each.
    lens = [0, 1, 45, 9, 130, 17]
    cap = 144
    table = None
    if paged:
        k0, v0, table = paged_cache(lens, page_size=16, hkv=2, d=16, seed=5, max_pages=cap // 16)
    p = kv_plan(6, 1, cap, 8, 2, 16, page_size=16 if paged else None, tail=40)
    assert p.fixup == "fused" and p.tail == 40 and p.partial_programs == 2 * p.programs
    t = torch.tensor(lens, dtype=torch.int32)
    host = host_work_list(p, lens_k=lens)
    assert host.tail_chunks >= 4 and host.tail_start < host.work
    assert host.program_range(host.ranges - 1)[1] == host.work
    assert_same_list(p, device_list(p, cache_seqlens=t), host)
    wl = serving.work_list(p, cache_seqlens=t)
    ws = serving.workspace(p, device="cpu")
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        q = randn((6, 1, 8, 16), g, torch.float16, "cpu")
        if paged:
            k, v = k0, v0
        else:
            _, k, v = dense_inputs(6, 1, cap, 8, 2, 16, seed=seed)
        out = torch.full((6, 1, 8, 16), NAN, dtype=q.dtype)
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=t, block_table=table, plan=p,
                                      work_list=wl, workspace=ws, out=out)
        ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=t, block_table=table)
        assert not torch.isnan(out).any(), "unwritten or NaN output"
        tol = ragged_bound(sequences_kvcache(q, k, v, lens, table))
        assert rel_err(out, ref) <= tol, (seed, rel_err(out, ref), tol)
        assert int(wl[TAIL_NEXT.value]) == 0, "the chunk counter must return to zero"
    assert not ws[-p.tiles_max * 4:].any(), "fused counters must return to zero"


def test_dynamic_tail_plans():
    # a dynamic tail is the caller's choice, and only fused plans take one
    assert kv_plan(2, 1, 64, 4, 2, 16).tail == 0
    assert kv_plan(2, 1, 64, 4, 2, 16, tail=20).tail == 20
    with pytest.raises(ValueError, match="fused"):
        kv_plan(2, 1, 64, 4, 2, 16, fixup="general", tail=10)
    for bad in (100, -1, 2.5, True):
        with pytest.raises(ValueError, match="tail"):
            kv_plan(2, 1, 64, 4, 2, 16, tail=bad)


def test_dynamic_tail_leaves_every_static_share_an_item():
    # a grid far larger than the work (W = 22 items, N = 22 programs on 264): the tail takes
    # at most W - N items, so no static share is empty (the fused merge counts every program
    # between a tile's first and last as one of its pieces: an empty one would never arrive,
    # the tile would stay unwritten and its counter nonzero for the next call)
    lens = [0, 1, 700, 45, 130]
    q, k, v = dense_inputs(5, 2, 700, 8, 2, 64, seed=3)
    p = skattn.serving_plan(q_split=None, batch=5, q_len=2, max_kv_len=700, q_heads=8, kv_heads=2,
                            head_dim=64, sms=132, occupancy=2, fixup="fused", tail=40,
                            head_pairs=False)
    host = host_work_list(p, lens_k=lens)
    assert host.programs == host.work == 22 and host.tail_chunks == 0
    lens_t = torch.tensor(lens, dtype=torch.int32)
    assert_same_list(p, device_list(p, cache_seqlens=lens_t), host)
    for _ in range(2):  # the second call finds the counters at zero
        check_kvcache(q, k, v, lens, p)
    # a larger W: a tail of 40% and every static share non-empty
    wide = kv_plan(5, 1, 720, 8, 2, 16, tail=40, programs=12)
    host = host_work_list(wide, lens_k=[0, 1, 700, 45, 130])
    assert host.tail_chunks > 0
    assert all(b > a for a, b in map(host.program_range, range(host.ranges)))


def test_stamps_need_the_gpu_clock():
    # serving_launch.run(stamps=...) (tools/serving_timeline.py) refuses to run without a GPU
    # (the stamps read %globaltimer), before any launch
    p = kv_plan(2, 1, 32, 4, 2, 16, fixup="general")
    q, k, v = dense_inputs(2, 1, 32, 4, 2, 16)
    lens = torch.tensor([5, 32], dtype=torch.int32)
    wl = serving.work_list(p, cache_seqlens=lens)
    b = serving_launch.bind(p, torch.device("cpu"))
    views = serving_launch._views(p, b, None, torch.device("cpu"), 0)[:4]
    rows = serving_launch.stamp_rows(p, torch.device("cpu"))
    assert rows[0] == p.programs and rows[1] > 0
    stamps = tuple(torch.zeros(max(n, 1), 4, dtype=torch.int64) for n in rows)
    out = torch.full((2, 1, 4, 16), NAN, dtype=q.dtype)
    with pytest.raises(ValueError, match="GPU clock"):
        serving_launch.run(p, q, k, v, out, None, wl=wl, block_table=None, scale=0.25,
                           ws_views=views, stamps=stamps)
    assert torch.isnan(out).all(), "nothing may run before the refusal"
