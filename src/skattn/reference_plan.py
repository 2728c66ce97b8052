"""Replay a Plan's stream-K decomposition in float64 PyTorch, as the Triton kernels run it.

Every program walks its work items tile by tile, keeps partial states (O, m, l) of the tiles
it cuts in two workspace slots, and the plan's fixup merges them (docs/design.md). Wrong
indices, a missed or doubled piece, or a sink counted twice show up as a mismatch with
`skattn.reference.attention` on a CPU.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import torch

from skattn import checks
from skattn.reference_math import (F64, Inputs, State, empty_state, finalise, merge,
                                   online_update, prepare, scores)

__all__ = ["run_plan"]


@dataclass(frozen=True)
class _Rows:
    """The valid rows of one tile: their slots r in the tile and their (token, head)."""

    b: int
    g: int
    r: torch.Tensor    # [R] row index in [0, block_m)
    qi: torch.Tensor   # [R] query token
    h: torch.Tensor    # [R] query head


def _tile_rows(plan, t: int, device) -> _Rows:
    geo = plan.geometry
    rest, qblock = divmod(t, plan.ntiles_x)
    rest, z = divmod(rest, plan.ntiles_z)
    b, g = divmod(rest, plan.kv_heads)
    r = torch.arange(geo.block_m, device=device)
    j, c = r // geo.heads_per_tile, r % geo.heads_per_tile    # token, head-in-group
    qi = qblock * geo.tokens_per_tile + j
    head_in_kv = z * geo.heads_per_tile + c
    ok = (j < geo.tokens_per_tile) & (qi < plan.q_len) & (head_in_kv < plan.gqa_ratio)
    return _Rows(b, g, r[ok], qi[ok], (g * plan.gqa_ratio + head_in_kv)[ok])


class _Executor:
    """One replay: outputs, workspace, and the bookkeeping that checks the protocol."""

    def __init__(self, plan, x: Inputs):
        bsz, lq, _, hq, _ = x.shape
        dv, dev = x.v.shape[-1], x.q.device
        self.plan, self.x, self.dv = plan, x, dv
        self.rows = [_tile_rows(plan, t, dev) for t in range(plan.ntiles_dst)]
        nan = float("nan")  # poison: every element must be written exactly where expected
        self.out = torch.full((bsz, lq, hq, dv), nan, dtype=F64, device=dev)
        self.lse = torch.full((bsz, hq, lq), nan, dtype=F64, device=dev)
        self.written = torch.zeros((bsz, lq, hq), dtype=torch.bool, device=dev)
        shape = (plan.programs, 2, plan.geometry.block_m)
        self.o_ws = torch.full(shape + (dv,), nan, dtype=F64, device=dev)
        self.m_ws = torch.full(shape, nan, dtype=F64, device=dev)
        self.l_ws = torch.full(shape, nan, dtype=F64, device=dev)
        if plan.fixup != "none":
            floats = self.o_ws.numel() + self.m_ws.numel() + self.l_ws.numel()
            assert floats == plan.workspace_floats, (floats, plan.workspace_floats)
        self.ranges = plan.ranges()
        self.starts = [a for a, _ in self.ranges]
        self.slots: dict[tuple[int, int], int] = {}     # (program, slot) -> tile stored there
        self.finished: set[int] = set()
        self.counters = [0] * plan.ntiles_dst           # fused: pieces arrived per tile

    # -- one program
    def partial(self, t: int, a: int, e: int) -> State:
        """Online softmax of tile t over its work items [a, e)."""
        plan, x, rows = self.plan, self.x, self.rows[t]
        first, _ = plan.tile_range(t)
        kv0 = plan.kv_first[t % plan.ntiles_x]
        state = empty_state(len(rows.r), self.dv, x.q.device)
        for blk in range(kv0 + a - first, kv0 + e - first):
            k0, k1 = blk * plan.geometry.block_n, min(plan.kv_len, (blk + 1) * plan.geometry.block_n)
            assert k0 < k1, f"KV block {blk} of tile {t} is past Lk={plan.kv_len}"
            s = scores(x, rows.b, rows.g, rows.h, rows.qi, k0, k1)
            state = online_update(state, s, x.v[rows.b, k0:k1, rows.g])
        return state

    def program(self, p: int) -> None:
        start, stop = self.ranges[p]
        w = start
        while w < stop:
            t = self.plan.tile_of(w)
            first, end = self.plan.tile_range(t)
            e = min(stop, end)
            state = self.partial(t, w, e)
            if start <= first and stop >= end:
                self.write(t, state)
            else:
                self.store(p, 0 if start >= first else 1, t, state)
                if self.plan.fixup == "fused":
                    self.arrive(p, t)
            w = e

    # -- workspace and outputs
    def store(self, p: int, slot: int, t: int, state: State) -> None:
        assert (p, slot) not in self.slots, f"program {p} stores twice in slot {slot}"
        self.slots[(p, slot)] = t
        r = self.rows[t].r
        self.o_ws[p, slot, r], self.m_ws[p, slot, r], self.l_ws[p, slot, r] = state

    def load(self, p: int, t: int) -> State:
        slot = 0 if self.starts[p] >= self.plan.tile_range(t)[0] else 1
        assert self.slots.get((p, slot)) == t, f"program {p} slot {slot} holds no piece of tile {t}"
        r = self.rows[t].r
        return self.o_ws[p, slot, r], self.m_ws[p, slot, r], self.l_ws[p, slot, r]

    def write(self, t: int, state: State) -> None:
        assert t not in self.finished, f"tile {t} finalised twice"
        self.finished.add(t)
        rows = self.rows[t]
        sinks = None if self.x.sinks is None else self.x.sinks[rows.h]
        out, lse = finalise(state, sinks)
        self.out[rows.b, rows.qi, rows.h] = out
        self.written[rows.b, rows.qi, rows.h] = True
        self.lse[rows.b, rows.h, rows.qi] = lse

    def owners(self, t: int) -> range:
        """Programs holding work items of tile t, in order."""
        first, end = self.plan.tile_range(t)
        return range(bisect_right(self.starts, first) - 1, bisect_right(self.starts, end - 1))

    # -- fixups (docs/design.md, "Fixups")
    def arrive(self, p: int, t: int) -> None:
        """fused: count the piece; the last program to arrive merges in program order."""
        owners = self.owners(t)
        self.counters[t] += 1
        if self.counters[t] < len(owners):
            return
        assert p == owners[-1], f"program {p} arrived last at tile {t}, expected {owners[-1]}"
        state = self.load(owners[0], t)
        for q in owners[1:]:
            state = merge(state, self.load(q, t))
        self.write(t, state)
        self.counters[t] = 0

    def uniform(self) -> None:
        k = self.plan.split
        for t in range(self.plan.ntiles_dst):
            progs = range(t * k, (t + 1) * k)
            assert list(progs) == list(self.owners(t))
            state = self.load(progs[-1], t)                  # llama.cpp: from the last piece back
            for p in reversed(progs[:-1]):
                state = merge(state, self.load(p, t))
            self.write(t, state)

    def general(self) -> None:
        for p0, (start, stop) in enumerate(self.ranges):
            t = self.plan.tile_of(start)
            first, end = self.plan.tile_range(t)
            if not (start > first and stop >= end):
                continue                                     # p0 does not finish a tile it joined
            state, p, merged = self.load(p0, t), p0, [p0]
            while self.starts[p] > first:
                p -= 1
                state = merge(state, self.load(p, t))
                merged.append(p)
            assert merged[::-1] == list(self.owners(t))
            self.write(t, state)


def _finite_inputs(x: Inputs) -> bool:
    """No NaN or inf that could reach an output (-inf in mask and sinks hides, +inf not)."""
    if not all(torch.isfinite(t).all() for t in (x.q, x.k, x.v)):
        return False
    return all(t is None or not (torch.isnan(t).any() or torch.isposinf(t).any())
               for t in (x.mask, x.sinks, x.slopes))


def run_plan(plan, q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
             softcap=0.0, alibi_slopes=None, return_lse=False):
    """Run attention through `plan`'s stream-K decomposition in float64.

    Each program of the plan computes the partial softmax states of its work items, tiles it
    cuts go through the workspace (two slots per program) and the plan's fixup
    ("none", "uniform", "general" or "fused") merges them, exactly as the Triton kernels do.
    The protocol is checked as it runs (no slot written twice, every piece merged once,
    every output row written once, workspace size equal to ``plan.workspace_floats``).

    Parameters
    ----------
    plan : skattn.Plan
        A plan for these shapes, with the same ``causal`` and ``window`` (one that dequantizes
        K/V first runs its 16-bit ``plan.dequant``).
    q, k, v, scale, causal, window, mask, sinks, softcap, alibi_slopes, return_lse
        As in `skattn.reference.attention`.

    Returns
    -------
    out : torch.Tensor
        ``[B, Lq, Hq, Dv]`` float64.
    lse : torch.Tensor
        ``[B, Hq, Lq]`` float64, when ``return_lse``.

    Raises
    ------
    TypeError, ValueError
        For arguments that break `skattn.checks`' rules, or a plan made for other shapes or
        other causal/window options.
    AssertionError
        If the plan breaks the decomposition's protocol.
    """
    x = prepare(q, k, v, scale=scale, causal=causal, window=window, mask=mask, sinks=sinks,
                softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse, plan=plan)
    if plan is None:
        raise TypeError("plan must be a skattn.Plan (from skattn.plan), got None")
    checks.plan_matches(plan, q, k, v, causal=causal, window=window, dtype=False)
    if plan.dequant is not None:  # K/V written in 16 bits first: the 16-bit plan runs
        plan = plan.dequant
    ex = _Executor(plan, x)
    for p in range(plan.programs):
        ex.program(p)
    split = plan.pieces()
    if plan.fixup == "none":
        assert not split and not ex.slots, f"fixup 'none' but tiles {sorted(split)} are split"
    elif plan.fixup == "uniform":
        ex.uniform()
    elif plan.fixup == "general":
        ex.general()
    else:
        assert not any(ex.counters), "fused: a tile is still waiting for pieces"
    assert ex.finished == set(range(plan.ntiles_dst)), "some tiles were never finalised"
    assert len(ex.slots) == sum(len(v) for v in split.values()), (ex.slots, split)
    assert set(ex.slots.values()) == set(split), "stored pieces disagree with plan.pieces()"
    assert ex.written.all(), "unwritten output rows"
    if _finite_inputs(x):  # a NaN then comes from a poisoned workspace slot
        assert not torch.isnan(ex.out).any() and not torch.isnan(ex.lse).any(), "NaN output"
    return (ex.out, ex.lse) if return_lse else ex.out
