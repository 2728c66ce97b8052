"""Replay a ServingPlan's ragged stream-K decomposition in float64 (docs/serving.md).

The work list is built in Python exactly as the device builds it (`host_work_list`), split
among the programs by the plan's effective program count (stream-K shares of W, `split`
pieces a tile, or whole tiles in a whole-tile step), and each program's items run tile by
tile with the online softmax; pieces of cut tiles go to two workspace slots per program
and the plan's fixup (general, fused, uniform or none) merges them: checked against the one-shot references on a CPU.
"""
from __future__ import annotations

from bisect import bisect_right

import torch

from skattn import serving_checks as sc
from skattn.reference_math import F64, empty_state, finalise, merge, online_update, prepare, scores
from skattn.reference_serving import gather_keys
from skattn.serving_mixed import MixedPlan
from skattn.serving_plan import ServingPlan
from skattn.serving_worklist import host_work_list

__all__ = ["run_serving_plan"]


def program_ranges(plan: ServingPlan, wl) -> list[tuple[int, int]]:
    """[start, end) of every program of the grid (empty past the effective count N), then of
    every chunk of a dynamic tail (virtual programs N .. N + K - 1: whichever program takes
    chunk k on the GPU runs it as program N + k)."""
    if plan.policy != "split":
        return [wl.program_range(p) for p in range(max(plan.programs, wl.ranges))]
    ranges, real = [], len(wl.rb_count) * plan.hz
    for p in range(plan.programs):
        t, i = divmod(p, plan.split)
        if t >= real:
            ranges.append((wl.work, wl.work))
            continue
        first, stop = wl.tile_range(plan, t)
        c = stop - first
        ranges.append((first + i * c // plan.split, first + (i + 1) * c // plan.split))
    return ranges


class _Replay:
    """One replay: per-sequence inputs, outputs, workspace and the protocol's bookkeeping."""

    def __init__(self, plan, wl, seqs, sinks, out, lse):
        self.plan, self.wl, self.seqs, self.sinks = plan, wl, seqs, sinks
        self.out, self.lse = out, lse
        self.ranges = program_ranges(plan, wl)
        self.starts = [a for a, _ in self.ranges]
        self.slots: dict[tuple[int, int], tuple[int, tuple]] = {}   # (p, slot) -> (tile, state)
        self.merged: set[tuple[int, int]] = set()       # slots merged so far
        self.finished: set[int] = set()
        self.counters: dict[int, int] = {}              # fused: pieces arrived per tile

    def rows(self, t: int):
        """(sequence, KV head, query tokens, query heads) of tile t's valid rows."""
        plan, wl, geo = self.plan, self.wl, self.plan.geometry
        rb, h = divmod(t, plan.hz)
        b, qblock = wl.rb_seq[rb], wl.rb_qblock[rb]
        g, z = divmod(h, plan.ntiles_z)
        r = torch.arange(geo.block_m)
        j, c = r // geo.heads_per_tile, r % geo.heads_per_tile
        qi = qblock * geo.tokens_per_tile + j
        hk = z * geo.heads_per_tile + c
        ok = (j < geo.tokens_per_tile) & (qi < wl.lens_q[b]) & (hk < plan.gqa_ratio)
        return b, g, qi[ok], (g * plan.gqa_ratio + hk)[ok]

    def partial(self, t: int, a: int, e: int):
        """Online softmax of tile t over its work items [a, e)."""
        b, g, qi, heads = self.rows(t)
        x, bn = self.seqs.get(b), self.plan.geometry.block_n
        first, _ = self.wl.tile_range(self.plan, t)
        state = empty_state(len(qi), self.out.shape[-1], self.out.device)
        kv0 = self.wl.rb_first[t // self.plan.hz] - first
        for blk in range(kv0 + a, kv0 + e):
            k0, k1 = blk * bn, min(self.wl.lens_k[b], (blk + 1) * bn)
            if k0 >= k1:      # a sequence with no key: its one block is fully masked
                assert self.wl.lens_k[b] == 0, f"KV block {blk} of tile {t} is past the keys"
                continue
            state = online_update(state, scores(x, 0, g, heads, qi, k0, k1), x.v[0, k0:k1, g])
        return state

    def program(self, p: int) -> None:
        start, end = self.ranges[p]
        split = self.plan.policy == "split" and self.plan.split > 1
        if split and start == end and p // self.plan.split < len(self.wl.rb_count) * self.plan.hz:
            self.store(p, 0, p // self.plan.split, empty_state(0, 0, self.out.device))  # empty piece
        w = start
        while w < end:
            rb = bisect_right(self.wl.rb_start, w, 1) - 1
            t = rb * self.plan.hz + (w - self.wl.rb_start[rb]) // self.wl.rb_count[rb]
            first, stop = self.wl.tile_range(self.plan, t)
            e = min(end, stop)
            state = self.partial(t, w, e)
            if w == first and e == stop and not split:
                self.write(t, state)
            else:
                self.store(p, int(w != start), t, state)
                if self.plan.fixup == "fused":
                    self.arrive(p, t)
            w = e

    def store(self, p: int, slot: int, t: int, state) -> None:
        assert (p, slot) not in self.slots, f"program {p} stores twice in slot {slot}"
        self.slots[(p, slot)] = (t, state)

    def load(self, p: int, t: int, first: int):
        slot = int(self.plan.policy != "split" and self.starts[p] < first)
        assert (p, slot) not in self.merged, f"piece of program {p}, slot {slot} merged twice"
        assert self.slots.get((p, slot), (None,))[0] == t, f"program {p} holds no piece of tile {t}"
        self.merged.add((p, slot))
        state = self.slots[(p, slot)][1]
        if state[0].shape[0] == 0:    # an empty piece of the split policy: m = -inf, l = 0
            _, _, qi, _ = self.rows(t)
            return empty_state(len(qi), self.out.shape[-1], self.out.device)
        return state

    def merge_write(self, p_lo: int, p_hi: int, t: int) -> None:
        first, _ = self.wl.tile_range(self.plan, t)
        state = self.load(p_lo, t, first)
        for p in range(p_lo + 1, p_hi + 1):
            state = merge(state, self.load(p, t, first))
        self.write(t, state)

    def write(self, t: int, state) -> None:
        assert t not in self.finished, f"tile {t} finalised twice"
        self.finished.add(t)
        b, _, qi, heads = self.rows(t)
        out, lse = finalise(state, None if self.sinks is None else self.sinks[heads])
        q0 = self.wl.q_start[b]
        rows = (b, qi, heads) if self.out.dim() == 4 else (q0 + qi, heads)
        # every row once, also across the halves of a MixedPlan (the output starts as NaN)
        assert torch.isnan(self.out[rows]).all(), f"rows of tile {t} written before"
        if self.out.dim() == 4:     # [B, Lq, Hq, Dv], lse [B, Hq, Lq]
            self.out[b, qi, heads], self.lse[b, heads, qi] = out, lse
        else:                       # packed: [total_q, Hq, Dv], lse [Hq, total_q]
            self.out[q0 + qi, heads], self.lse[heads, q0 + qi] = out, lse

    def program_of(self, item: int) -> int:
        return self.wl.program_of(item)

    # -- fixups (docs/serving.md, "Fixups in a ragged list")
    def arrive(self, p: int, t: int) -> None:
        first, stop = self.wl.tile_range(self.plan, t)
        lo, hi = self.program_of(first), self.program_of(stop - 1)
        self.counters[t] = self.counters.get(t, 0) + 1
        if self.counters[t] == hi - lo + 1:
            assert p == hi, f"program {p} arrived last at tile {t}, expected {hi}"
            self.merge_write(lo, hi, t)

    def general(self) -> None:
        for p0 in range(self.wl.programs):
            start, end = self.ranges[p0]
            rb = bisect_right(self.wl.rb_start, start, 1) - 1
            if rb >= len(self.wl.rb_count):
                continue
            t = rb * self.plan.hz + (start - self.wl.rb_start[rb]) // self.wl.rb_count[rb]
            first, stop = self.wl.tile_range(self.plan, t)
            if start > first and end >= stop:
                self.merge_write(self.program_of(first), p0, t)

    def uniform(self) -> None:
        k = self.plan.split
        for t in range(len(self.wl.rb_count) * self.plan.hz):
            self.merge_write(t * k, t * k + k - 1, t)


def run_serving_plan(plan, q, k, v, *, cache_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q=None, max_seqlen_k=None, block_table=None, causal=True,
                     window=None, sinks=None, softcap=0.0, alibi_slopes=None, scale=None,
                     return_lse=False):
    """Run serving attention through `plan`'s ragged stream-K decomposition in float64.

    Give `cache_seqlens` for the inputs of `skattn.attention_with_kvcache` (dense or paged
    cache), or `cu_seqlens_q`, `cu_seqlens_k`, `max_seqlen_q`, `max_seqlen_k` for those of
    `skattn.attention_varlen` (packed or paged). The work list is the device's
    (`skattn.serving_worklist.host_work_list`), the programs and fixup the plan's; the protocol
    is checked as it runs (no slot written twice, every piece merged once, every tile
    written once).

    Parameters
    ----------
    plan : skattn.ServingPlan
        Made for these bounds, with the same causal and window.
    q, k, v, cache_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    block_table, causal, window, sinks, softcap, alibi_slopes, scale, return_lse
        As in `skattn.reference.attention_with_kvcache` / `attention_varlen`.

    Returns
    -------
    out : torch.Tensor
        float64, q's layout with Dv (rows of a packed q outside every sequence are NaN).
    lse : torch.Tensor
        float64 ``[B, Hq, Lq]`` or ``[Hq, total_q]``, when ``return_lse``.

    Raises
    ------
    TypeError, ValueError
        Bad arguments or lengths (`skattn.serving_checks`), or a plan for other bounds.
    AssertionError
        If the decomposition breaks its protocol.
    """
    if not isinstance(plan, (ServingPlan, MixedPlan)):
        raise TypeError(f"plan must be a skattn.ServingPlan or MixedPlan, got {type(plan).__name__}")
    kw = dict(block_table=block_table, scale=scale, causal=causal, window=window, sinks=sinks,
              softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse, out=None,
              kernel=False)
    if cache_seqlens is not None:
        sc.kvcache_args(q, k, v, cache_seqlens=cache_seqlens, **kw)
    else:
        sc.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw)
    paged = block_table is not None
    have = dict(q_heads=q.shape[-2], kv_heads=k.shape[-2], head_dim=q.shape[-1],
                head_dim_v=v.shape[-1], causal=causal, window=window,
                page_size=k.shape[1] if paged else None,
                max_pages=block_table.shape[1] if paged else None)
    if cache_seqlens is not None:
        sc.kvcache_values(k, cache_seqlens, block_table)
        have.update(batch=q.shape[0], q_len=q.shape[1],
                    max_kv_len=block_table.shape[1] * k.shape[1] if paged else k.shape[1])
        lists = dict(lens_k=cache_seqlens.tolist())
        out = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=F64)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=F64)
    else:
        sc.varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
        have.update(batch=len(cu_seqlens_q) - 1, q_len=None, max_q_len=max_seqlen_q,
                    total_q=q.shape[0], max_kv_len=max_seqlen_k)
        if not paged:
            have.update(total_k=k.shape[0])
        lists = dict(cu_k=cu_seqlens_k.tolist(), cu_q=cu_seqlens_q.tolist())
        out = torch.full((*q.shape[:2], v.shape[-1]), float("nan"), dtype=F64)
        lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=F64)
    halves = plan.halves if isinstance(plan, MixedPlan) else (plan,)
    if isinstance(plan, MixedPlan):  # the short half is bounded by q_split
        if cache_seqlens is not None:
            raise ValueError("a MixedPlan splits a varlen batch")
        sc.plan_matches(plan.short, **dict(have, max_q_len=plan.q_split))
    sc.plan_matches(halves[-1], **have)
    kw = dict(block_table=block_table, scale=q.shape[-1] ** -0.5 if scale is None else scale,
              causal=causal, window=window, sinks=sinks, softcap=softcap,
              alibi_slopes=alibi_slopes)
    for half in halves:  # each writes its own sequences' rows
        wl = host_work_list(half, **lists)
        if not half.head_pairs:
            _replay(half, wl, q, k, v, out, lse, **kw)
            continue
        # two KV heads as one (ServingPlan.head_pairs): the kernel's problem, then each query
        # head's half of its pair's output
        wide = torch.full((*out.shape[:-1], 2 * out.shape[-1]), float("nan"), dtype=F64)
        _replay(half, wl, pair_queries(q, k.shape[-2]), pair_heads(k), pair_heads(v), wide,
                lse, **kw)
        got = pair_outputs(wide, k.shape[-2])
        written = ~torch.isnan(got)
        out[written] = got[written]
    return (out, lse) if return_lse else out


def pair_heads(x):
    """K or V [..., Hkv, D] as [..., Hkv / 2, 2 D]: KV heads 2j and 2j + 1 as one row."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // 2, 2 * x.shape[-1])


def _second(q_heads: int, kv_heads: int):
    """Which query heads belong to the second KV head of their pair ([Hq] bool)."""
    return (torch.arange(q_heads) // (q_heads // kv_heads)) % 2 == 1


def pair_queries(q, kv_heads: int):
    """q [..., Hq, D] as [..., Hq, 2 D]: each query head's values in the half of its own KV
    head within the pair, zeros in the other (what the kernel loads)."""
    second = _second(q.shape[-2], kv_heads)
    wide = q.new_zeros(*q.shape[:-1], 2 * q.shape[-1])
    wide[..., ~second, :q.shape[-1]] = q[..., ~second, :]
    wide[..., second, q.shape[-1]:] = q[..., second, :]
    return wide


def pair_outputs(o, kv_heads: int):
    """Each query head's half of a pair's output [..., Hq, 2 D] (what the kernel stores)."""
    d = o.shape[-1] // 2
    return torch.where(_second(o.shape[-2], kv_heads)[:, None], o[..., d:], o[..., :d])


def _replay(plan, wl, q, k, v, out, lse, *, block_table, scale, causal, window, sinks, softcap,
            alibi_slopes) -> None:
    seqs = {}
    for b in set(wl.rb_seq):
        if wl.lens_k[b]:
            n, s = wl.lens_k[b], wl.k_start[b]
            kb, vb = (gather_keys(c, n, b=b, start=s, block_table=block_table) for c in (k, v))
            qb = q[b] if q.dim() == 4 else q[wl.q_start[b]:wl.q_start[b] + wl.lens_q[b]]
            seqs[b] = prepare(qb[None], kb[None], vb[None], scale=q.shape[-1] ** -0.5
                              if scale is None else scale, causal=causal, window=window,
                              sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes)
    rp = _Replay(plan, wl, seqs, None if sinks is None else sinks.to(F64), out, lse)
    for p in range(len(rp.ranges)):  # in order: the last owner of a fused tile arrives last
        rp.program(p)
    if wl.whole:  # a whole-tile step (no stream-K program): every tile whole, longest first
        for t in reversed(range(len(wl.rb_count) * plan.hz)):
            rp.write(t, rp.partial(t, *wl.tile_range(plan, t)))
    if plan.fixup == "general":
        rp.general()
    elif plan.fixup == "uniform":
        rp.uniform()
    elif plan.fixup == "none":
        assert not rp.slots, "fixup 'none' but tiles are cut"
    assert rp.finished == set(range(len(wl.rb_count) * plan.hz)), "tiles never finalised"
    assert rp.merged == set(rp.slots), f"pieces never merged: {set(rp.slots) - rp.merged}"
