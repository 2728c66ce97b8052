"""Calibrate the `auto` policy's cost model from an nblocks sweep measured on this GPU.

`skattn calibrate` times every N for a few seed-grid cells (or reads such a sweep from
`--from-csv`), fits `CostModel` by least squares and writes it where the planner reads it
(`$SKATTN_COST_MODEL`, else ~/.cache/skattn/cost_model.json).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

from skattn.models import MODELS
from skattn.planner import plan
from skattn.policy import CostModel, cost_model_path, predict_us

SWEEP_CELLS = [("llama-8b", 1, 16384), ("qwen3moe-30b-a3b", 2, 8192), ("qwen3-14b", 4, 32768),
               ("llama-70b", 16, 16384), ("gpt-oss", 1, 8192)]
SATURATIONS = [0.2 + 0.005 * i for i in range(161)]  # 0.2 .. 1.0


def _plan_for(row, sms, blocks_per_sm):
    hq, hkv, d = MODELS[row["model"]][:3]
    fixup = "fused" if row["fixup"] == "fused" else None
    return plan(batch=1, q_len=int(row["n"]), kv_len=int(row["depth"]), q_heads=hq, kv_heads=hkv,
                head_dim=d, causal=True, sms=sms, blocks_per_sm=blocks_per_sm,
                nblocks=int(row["nblocks"]), fixup=fixup)


def _features(p, saturation):
    """(longest x slowdown, pieces, extra launch) of a plan: predict_us's terms, unit weights."""
    unit = CostModel(us_per_item=1.0, saturation=saturation, us_per_piece=0.0, us_launch=0.0)
    items = predict_us(unit, nblocks=p.nblocks, ntiles_dst=p.ntiles_dst, work=p.work,
                       max_tile_work=max(p.kv_count), fixup=p.fixup, max_blocks=p.max_blocks)
    piece = CostModel(us_per_item=0.0, saturation=saturation, us_per_piece=1.0, us_launch=0.0)
    pieces = predict_us(piece, nblocks=p.nblocks, ntiles_dst=p.ntiles_dst, work=p.work,
                        max_tile_work=max(p.kv_count), fixup=p.fixup, max_blocks=p.max_blocks)
    return items, pieces, 1.0 if p.fixup in ("uniform", "general") else 0.0


def fit(rows: list[dict], *, sms: int = 132, blocks_per_sm: int = 2) -> tuple[CostModel, float]:
    """Least-squares fit of the cost model to measured (cell, N, fixup) -> p50 rows.

    Each cell gets its own constant (launch and fixed costs common to all its N), so only the
    terms that differ between N are fitted. The saturation is chosen by what `auto` is for:
    the smallest worst-case regret (measured time at the N auto picks / best measured time)
    over the swept cells, then the smallest fit error. Returns the model and its mean
    relative error.
    """
    import numpy as np

    rows = [r for r in rows if int(r["nblocks"]) > 1 and r["fixup"] != "none"]
    plans = [_plan_for(r, sms, blocks_per_sm) for r in rows]
    cells = sorted({(r["model"], r["n"], r["depth"]) for r in rows})
    y = np.array([float(r["p50_us"]) for r in rows])
    best = None
    for sat in SATURATIONS:
        x = np.zeros((len(rows), 3 + len(cells)))
        for i, (r, p) in enumerate(zip(rows, plans)):
            x[i, :3] = _features(p, sat)
            x[i, 3 + cells.index((r["model"], r["n"], r["depth"]))] = 1.0
        w = 1.0 / y  # relative error
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        coef[:3] = np.maximum(coef[:3], 0.0)
        err = float(np.mean(np.abs(x @ coef - y) / y))
        model = CostModel(us_per_item=float(coef[0]), saturation=sat, us_per_piece=float(coef[1]),
                          us_launch=float(coef[2]))
        regret = max(c["ratio"] for c in check(rows, model, sms=sms, blocks_per_sm=blocks_per_sm))
        if best is None or (round(regret, 3), err) < best[0]:
            best = ((round(regret, 3), err), sat, coef)
    (_, err), sat, coef = best
    model = CostModel(us_per_item=float(coef[0]), saturation=round(sat, 3),
                      us_per_piece=float(coef[1]), us_launch=float(coef[2]), source="fit")
    return model, err


def check(rows: list[dict], model: CostModel, *, sms: int = 132, blocks_per_sm: int = 2):
    """Per cell: the N `auto` picks with `model`, its measured time and the best measured time."""
    out = []
    for cell in sorted({(r["model"], r["n"], r["depth"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["n"], r["depth"]) == cell and r["fixup"] != "fused"]
        hq, hkv, d = MODELS[cell[0]][:3]
        chosen = plan(batch=1, q_len=int(cell[1]), kv_len=int(cell[2]), q_heads=hq, kv_heads=hkv,
                      head_dim=d, causal=True, sms=sms, blocks_per_sm=blocks_per_sm,
                      policy="auto", cost_model=model).nblocks
        by_n = {int(r["nblocks"]): float(r["p50_us"]) for r in mine}
        near = min(by_n, key=lambda n: abs(n - chosen))  # sweeps may step by 2
        best_n = min(by_n, key=by_n.get)
        out.append(dict(model=cell[0], n=cell[1], depth=cell[2], auto_n=chosen,
                        auto_us=by_n[near], best_n=best_n, best_us=by_n[best_n],
                        ratio=by_n[near] / by_n[best_n]))
    return out


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def add_arguments(parser) -> None:
    parser.add_argument("--from-csv", type=Path, help="fit an existing sweep CSV (no GPU needed)")
    parser.add_argument("--out", type=Path, help=f"where to write the model (default {cost_model_path()})")
    parser.add_argument("--sms", type=int, default=None, help="SMs the sweep was planned for")
    parser.add_argument("--blocks-per-sm", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")


def run(args) -> int:
    if args.from_csv:
        rows, sms = read_csv(args.from_csv), args.sms or 132
    else:
        from skattn.calibrate_sweep import sweep

        rows, sms = sweep(SWEEP_CELLS, blocks_per_sm=args.blocks_per_sm)
    model, err = fit(rows, sms=sms, blocks_per_sm=args.blocks_per_sm)
    w = sys.stdout.write
    w(f"fitted {model} (mean relative error {100 * err:.1f}%)\n")
    for c in check(rows, model, sms=sms, blocks_per_sm=args.blocks_per_sm):
        w(f"{c['model']:18s} n={c['n']:<4} L={c['depth']:<6} auto N={c['auto_n']:<4} "
          f"{c['auto_us']:7.1f} us  best N={c['best_n']:<4} {c['best_us']:7.1f} us  "
          f"x{c['ratio']:.3f}\n")
    if not args.dry_run:
        path = args.out or cost_model_path()
        replace(model, source=str(args.from_csv or "sweep")).save(path)
        w(f"wrote {path}\n")
    return 0
