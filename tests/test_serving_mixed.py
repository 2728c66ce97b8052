"""Mixed batches in two halves (MixedPlan, docs/serving.md "Mixed batches"): plans, the
device work lists, the kernels under TRITON_INTERPRET=1 and the float64 replay."""
import numpy as np
import pytest
import torch

import skattn
from skattn import reference, serving, serving_recipe
from skattn.reference_serving_plan import run_serving_plan
from skattn.serving_mixed import MixedPlan, decode_q_split
from skattn.serving_worklist import host_work_list
from serving_inputs import paged_cache, ragged_bound, sequences_varlen, varlen_inputs
from test_serving_interpret import NAN, OCC, SMS, assert_same_list, check_lse, device_list
from tolerance import rel_err

# a prompt chunk of several row blocks, decode rows, a sequence at the split (3 queries),
# one just above it (4), an empty sequence, and two rows of q that belong to no sequence
LQ, LK = [19, 1, 3, 0, 4, 1], [30, 33, 9, 0, 40, 1]


def mixed_plan(q, k, *, q_split=3, table=None, **kw):
    bounds = (dict(page_size=16, max_pages=table.shape[1]) if table is not None
              else dict(total_k=k.shape[0]))
    return skattn.serving_plan(batch=len(LQ), max_q_len=max(LQ), total_q=q.shape[0],
                               max_kv_len=48, q_heads=8, kv_heads=2, head_dim=16, sms=SMS,
                               occupancy=OCC, block_n=16, q_split=q_split, **bounds, **kw)


def test_halves_and_their_tiles():
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, pad_q=2)
    p = mixed_plan(q, k, q_split=3)
    assert isinstance(p, MixedPlan) and p.q_split == 3
    assert p.short.max_q_len == 3 and p.long.max_q_len == 19
    assert p.short.q_range == (0, 3) and p.long.q_range[0] == 3
    # decode tiles for the short half, bigger ones for the long half
    assert p.short.geometry.tokens_per_tile >= 3
    assert p.short.geometry.block_m < p.long.geometry.block_m
    assert p.work_list_offsets[1] % 4 == 0 and p.work_list_offsets[1] >= p.short.work_list_words
    assert "short half" in p.describe() and "long half" in p.describe()


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
def test_work_lists_split_the_sequences():
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, pad_q=2)
    p = mixed_plan(q, k)
    both = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert both.numel() == p.work_list_words
    seen = []
    for half, at in zip(p.halves, p.work_list_offsets):
        host = host_work_list(half, cu_k=cu_k.tolist(), cu_q=cu_q.tolist())
        dev = device_list(half, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        assert_same_list(half, dev, host)
        assert both[at:at + half.work_list_words].tolist()[:2] == [host.work, host.programs]
        seen.append(sorted(set(host.rb_seq)))
    # each sequence with queries in exactly one half: <= 3 queries short, more long
    assert seen == [[1, 2, 5], [0, 4]]


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
@pytest.mark.parametrize("cu", [
    [0, 25, 26, 29, 29, 33, 34],   # a sequence longer than max_q_len (25 > 19): clamped, long
    [0, 19, 18, 21, 21, 25, 26],   # a negative length (18 - 19): empty in both halves
    [0, 19, 20, 23, 23, 27, 99],   # the last sequence runs past total_q
])
def test_work_lists_on_bad_lengths(cu):
    # what the device does with values the host cannot check matches the host mirror, and no
    # sequence has queries in both halves
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, pad_q=2)
    p = mixed_plan(q, k)
    cq = torch.tensor(cu, dtype=torch.int32)
    owners = []
    for half in p.halves:
        host = host_work_list(half, cu_k=cu_k.tolist(), cu_q=cu)
        assert_same_list(half, device_list(half, cu_seqlens_q=cq, cu_seqlens_k=cu_k), host)
        owners += sorted(set(host.rb_seq))
    assert len(owners) == len(set(owners))


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
@pytest.mark.parametrize("paged,fixup,own_ws", [(False, None, True), (True, None, True),
                                                (False, "fused", True), (True, "fused", False)])
def test_mixed_batch_against_float64(paged, fixup, own_ws):
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, seed=11, pad_q=2)
    table = None
    if paged:
        k, v, table = paged_cache(LK, page_size=16, hkv=2, d=16, seed=12, max_pages=3)
    p = mixed_plan(q, k, table=table, fixup=fixup, policy="llamacpp-before")
    inputs = [x.clone() for x in (q, k, v)]
    out = torch.full((q.shape[0], 8, 16), NAN, dtype=q.dtype)
    ws = serving.workspace(p, device="cpu") if own_ws else None  # else the pools
    out, lse = skattn.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), 48, block_table=table,
                                       plan=p, out=out, workspace=ws, return_lse=True)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), 48,
                                              block_table=table, return_lse=True)
    rows = ~torch.isnan(ref[:, 0, 0])
    assert torch.isnan(out[~rows]).all(), "rows outside every sequence were written"
    assert not torch.isnan(out[rows]).any(), "a half left rows unwritten"
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "an input was modified"
    tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, table))
    assert rel_err(out[rows], ref[rows]) <= tol, (rel_err(out[rows], ref[rows]), tol)
    check_lse(lse[:, rows], ref_lse[:, rows], tol)
    if fixup == "fused" and own_ws:
        for half, at in zip(p.halves, serving_recipe.workspace_offsets(p)):
            own = ws[at:at + serving.sl.workspace_bytes(half)]
            assert not own[-half.tiles_max * 4:].any(), "fused counters must return to zero"
    # the float64 replay of the same plan agrees with the one-shot reference
    rep = run_serving_plan(p, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(LQ),
                           max_seqlen_k=48, block_table=table)
    assert torch.isnan(rep[~rows]).all()
    assert (rep[rows] - ref[rows]).abs().max() <= 1e-12


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
def test_shared_work_list_and_changed_lengths():
    # one work list for both halves, rebuilt when the lengths change (as inside a graph)
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, seed=3, pad_q=2)
    p = mixed_plan(q, k)
    wl = torch.empty(p.work_list_words, dtype=torch.int32)
    ws = serving.workspace(p, device="cpu")
    out = torch.empty(q.shape[0], 8, 16, dtype=q.dtype)
    for lq in (LQ, [1, 19, 0, 3, 1, 4], [4, 3, 19, 1, 0, 1]):  # sequences move between halves
        cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
        serving.work_list(p, cu_seqlens_q=cq, cu_seqlens_k=cu_k, out=wl)
        out.fill_(NAN)
        skattn.attention_varlen(q, k, v, cq, cu_k, max(LQ), 48, plan=p, work_list=wl,
                                workspace=ws, out=out)
        ref = reference.attention_varlen(q, k, v, cq, cu_k, max(LQ), 48)
        rows = ~torch.isnan(ref[:, 0, 0])
        assert not torch.isnan(out[rows]).any(), f"{lq}: rows left unwritten"
        tol = ragged_bound(sequences_varlen(q, k, v, cq, cu_k))
        assert rel_err(out[rows], ref[rows]) <= tol


def test_default_plan_of_a_varlen_batch_answers_its_bounds():
    # q_split="auto" is serving_plan's default: a varlen batch beyond the split gets a
    # MixedPlan, which answers the batch's bounds as a ServingPlan does
    from skattn.serving_mixed import BOUNDS

    common = dict(batch=4, total_q=600, max_kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
                  page_size=16, max_pages=256, sms=132, occupancy=2)
    p = skattn.serving_plan(max_q_len=512, **common)
    one = skattn.serving_plan(max_q_len=512, q_split=None, **common)
    assert isinstance(p, MixedPlan) and isinstance(one, skattn.ServingPlan)
    for name in BOUNDS:
        assert getattr(p, name) == getattr(one, name), name
        if name != "max_q_len":
            assert getattr(p.short, name) == getattr(one, name), name
    assert p.max_q_len == 512 and p.short.max_q_len == p.q_split == 4
    with pytest.raises(AttributeError, match=r"\.short or \.long"):
        p.geometry  # differs by half
    import copy
    import pickle
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p) == p
    assert "short half" in p.describe()


def test_auto_split_and_bad_values():
    assert decode_q_split(32, 8) == 4 and decode_q_split(64, 8) == 2
    assert decode_q_split(40, 8) == 3 and decode_q_split(8, 8) == 16
    common = dict(batch=4, total_q=600, max_kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
                  sms=132, occupancy=2)
    p = skattn.serving_plan(max_q_len=512, q_split="auto", **common)
    assert isinstance(p, MixedPlan) and p.q_split == 4
    assert p.short.geometry.block_m == 16 < p.long.geometry.block_m
    # nothing to split: one plan
    assert not isinstance(skattn.serving_plan(max_q_len=4, q_split="auto", **common), MixedPlan)
    for bad in (0, 512, 600, True, "half", 40):  # 40 x 4 rows: prompt tiles in both halves
        with pytest.raises(ValueError, match="q_split"):
            skattn.serving_plan(max_q_len=512, q_split=bad, **common)
    assert skattn.serving_plan(max_q_len=512, q_split=np.int64(8), **common).q_split == 8
    kv = {k: v for k, v in common.items() if k != "total_q"}
    with pytest.raises(ValueError, match="varlen"):
        skattn.serving_plan(q_len=4, q_split=2, **kv)
    assert isinstance(skattn.serving_plan(q_len=4, q_split="auto", **kv), skattn.ServingPlan)


def test_step_plan_splits_only_where_the_halves_differ():
    # a serving loop's steps (serving_mixed.step_plan): two halves where the short half gets
    # smaller tiles; one plan where nothing exceeds the split or the tiles would be equal
    from skattn.serving_mixed import step_plan

    args = dict(batch=4, total_q=600, max_kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
                sms=132, occupancy=2, q_len=None)
    p = step_plan("auto", dict(args, max_q_len=512))
    assert isinstance(p, MixedPlan) and p.q_split == 4
    assert step_plan(16, dict(args, max_q_len=16)).q_range is None  # nothing to split
    one = step_plan(40, dict(args, max_q_len=512))  # 40 x 4 rows: prompt tiles in both
    assert isinstance(one, skattn.ServingPlan) and one.q_range is None
    assert one.max_q_len == 512 and one.geometry == p.long.geometry
    with pytest.raises(ValueError, match="both halves"):  # the explicit form refuses it
        skattn.serving_plan(max_q_len=512, q_split=40, **{k: v for k, v in args.items()
                                                           if k != "q_len"})


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
def test_mixed_plan_errors():
    q, k, v, cu_q, cu_k = varlen_inputs(LQ, LK, hq=8, hkv=2, d=16, pad_q=2)
    p = mixed_plan(q, k)
    with pytest.raises(ValueError, match="one half of a MixedPlan"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), 48, plan=p.long)
    with pytest.raises(ValueError, match="max_q_len"):  # made for another max_seqlen_q
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 25, 48, plan=p)
    for bad in (torch.zeros(16, dtype=torch.uint8), bytearray(1 << 16)):
        with pytest.raises(ValueError, match="MixedPlan"):
            skattn.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), 48, plan=p, workspace=bad)
    with pytest.raises(ValueError, match="work_list"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), 48, plan=p,
                                work_list=torch.zeros(p.work_list_words - 1, dtype=torch.int32))
    kq = q[:6].reshape(6, 1, 8, 16)
    with pytest.raises(ValueError, match="MixedPlan"):
        skattn.attention_with_kvcache(kq, k[None].expand(6, -1, -1, -1), v[None].expand(6, -1, -1, -1),
                                      cache_seqlens=torch.ones(6, dtype=torch.int32), plan=p)
