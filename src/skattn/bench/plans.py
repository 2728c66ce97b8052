"""The plans of a grid per skattn variant, as a table (what the bench shows without a GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skattn.bench.grid import SKATTN_VARIANTS, Cell


@dataclass(frozen=True)
class PlanSummary:
    """The numbers of one plan that decide its speed."""

    ntiles_dst: int
    work: int
    programs: int
    fixup: str
    pieces: int  # most pieces any split tile is cut into (1: no tile is split)
    idle: int  # programs idle in the tail: sum over programs of (longest - own items)


def summarize_plan(p) -> PlanSummary:
    """A `PlanSummary` of a `skattn.Plan`."""
    lengths = [b - a for a, b in p.ranges()]
    longest = max(lengths)
    pieces = max((len(v) for v in p.pieces().values()), default=1)
    return PlanSummary(p.ntiles_dst, p.work, p.programs, p.fixup, pieces,
                       sum(longest - n for n in lengths))


def plan_cell(cell: Cell, variant: str, *, sms: int, occupancy: int,
              dtype=torch.float16) -> PlanSummary:
    """Plan `cell` as the bench does for skattn `variant`, on a pretend GPU of `sms` SMs."""
    from skattn.planner import plan

    policy, fixup = SKATTN_VARIANTS[variant]
    return summarize_plan(plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                               kv_heads=cell.hkv, head_dim=cell.d, dtype=dtype, causal=True,
                               sms=sms, occupancy=occupancy, policy=policy, fixup=fixup))


def plan_table(cells: list[Cell], *, sms: int = 132, occupancy: int = 2,
               variants: tuple[str, ...] | None = None) -> str:
    """Markdown table of every cell's plan per skattn variant.

    Parameters
    ----------
    cells : list of Cell
    sms, occupancy : int
        The GPU to plan for (an H100 SXM / H200 has 132 SMs).
    variants : tuple of str, optional
        Keys of `SKATTN_VARIANTS`; all of them by default.

    Returns
    -------
    str
        One row per cell: ntiles_dst, W, and per variant "N fixup pieces idle", where pieces is
        the most pieces a split tile is cut into and idle the programs' idle items in the tail.
    """
    variants = variants or tuple(SKATTN_VARIANTS)
    head = ["model (Hq/Hkv/D)", "n", "L", "ntiles_dst", "W"]
    head += [f"{v}: N fixup pieces idle" for v in variants]
    lines = [f"Plans for {sms} SMs x {occupancy} programs per SM (max_programs {sms * occupancy}).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        entries, first = [], None
        for v in variants:
            try:
                s = plan_cell(cell, v, sms=sms, occupancy=occupancy)
            except ValueError as exc:
                entries.append(f"error: {exc}")
                continue
            first = first or s
            entries.append(f"{s.programs} {s.fixup} {s.pieces} {s.idle}")
        tiles = [str(first.ntiles_dst), str(first.work)] if first else ["?", "?"]
        row = [f"{cell.model} ({cell.shape})", str(cell.n), str(cell.depth)] + tiles + entries
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
