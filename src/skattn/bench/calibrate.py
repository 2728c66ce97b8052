"""Calibrate the `auto` policy's cost model from a program-count sweep measured on this GPU.

`skattn calibrate` times every N for a few seed-grid cells (or reads such a sweep from
`--from-csv`), fits `CostModel` for the least regret of `auto` (see `fit`) and writes it
where the planner reads it (`$SKATTN_COST_MODEL`, else ~/.cache/skattn/cost_model.json).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

from skattn.bench.models import MODELS
from skattn.planner import COMPUTE_BOUND_INTENSITY, plan, shared_programs
from skattn.policy import CostModel, cost_model_path, predict_us

SWEEP_CELLS = [("llama-8b", 1, 16384), ("qwen3moe-30b-a3b", 2, 8192), ("qwen3-14b", 4, 32768),
               ("llama-70b", 16, 16384), ("gpt-oss", 1, 8192)]
SATURATIONS = [0.2 + 0.005 * i for i in range(161)]  # 0.2 .. 1.0
SHARED_ROUNDS = [0.5 + 0.05 * i for i in range(11)]  # 0.5 .. 1.0


def _plan_for(row, sms, occupancy):
    hq, hkv, d = MODELS[row["model"]][:3]
    fixup = "fused" if row["fixup"] == "fused" else None
    return plan(batch=1, q_len=int(row["n"]), kv_len=int(row["depth"]), q_heads=hq, kv_heads=hkv,
                head_dim=d, causal=True, sms=sms, occupancy=occupancy,
                programs=int(row["programs"]), fixup=fixup)


def _features(p, saturation):
    """(longest x slowdown, pieces, extra launch) of a plan: predict_us's terms, unit weights."""
    unit = CostModel(us_per_item=1.0, saturation=saturation, us_per_piece=0.0, us_launch=0.0)
    items = predict_us(unit, programs=p.programs, ntiles_dst=p.ntiles_dst, work=p.work,
                       max_tile_work=max(p.kv_count), fixup=p.fixup, max_programs=p.max_programs,
                       per_sm=shared_programs(p.geometry, p.occupancy))
    piece = CostModel(us_per_item=0.0, saturation=saturation, us_per_piece=1.0, us_launch=0.0)
    pieces = predict_us(piece, programs=p.programs, ntiles_dst=p.ntiles_dst, work=p.work,
                        max_tile_work=max(p.kv_count), fixup=p.fixup, max_programs=p.max_programs)
    return items, pieces, 1.0 if p.fixup in ("uniform", "general") else 0.0


PIECE_RATIOS = (0.0, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)  # us_per_piece / us_per_item
LAUNCH_RATIOS = (0.0, 2.0, 4.0, 8.0, 16.0)  # us_launch / us_per_item


def memory_bound(rows: list[dict]) -> list[dict]:
    """The rows of cells `auto` plans with the cost model (compute-bound ones count waves)."""
    def intensity(r):
        hq, hkv = MODELS[r["model"]][:2]
        return int(r["n"]) * (hq // hkv)

    return [r for r in rows if intensity(r) < COMPUTE_BOUND_INTENSITY]


def fit(rows: list[dict], *, sms: int = 132, occupancy: int = 2) -> tuple[CostModel, float]:
    """Fit the cost model to measured (cell, N, fixup) -> p50 rows for what `auto` is for.

    Each cell gets its own constant (launch and fixed costs common to all its N), so only the
    terms that differ between N are fitted. For every saturation the candidates are the
    least-squares fit and models whose piece and launch costs are set multiples of the item
    cost (only these ratios change which N `auto` picks; the scale is then fitted). The one
    kept has the smallest worst-case regret (measured time at the N auto picks / best
    measured time) over the swept cells, then the smallest mean regret, then the smallest fit
    error. Returns the model and its mean relative error.
    """
    import numpy as np

    rows = [r for r in memory_bound(rows) if int(r["programs"]) > 1 and r["fixup"] != "none"]
    plans = [_plan_for(r, sms, occupancy) for r in rows]
    cells = sorted({(r["model"], r["n"], r["depth"]) for r in rows})
    y = np.array([float(r["p50_us"]) for r in rows])
    w = 1.0 / y  # relative error
    onehot = np.zeros((len(rows), len(cells)))
    for i, r in enumerate(rows):
        onehot[i, cells.index((r["model"], r["n"], r["depth"]))] = 1.0
    w2 = w * w
    cell_w2 = onehot.T @ w2

    def demean(v):  # remove each cell's weighted mean (its fitted constant)
        return v - onehot @ ((onehot.T @ (w2 * v)) / cell_w2)

    y0 = demean(y)
    best = None
    for sat in SATURATIONS:
        f = np.array([_features(p, sat) for p in plans])
        f0 = np.stack([demean(f[:, j]) for j in range(3)], axis=1)
        coef, *_ = np.linalg.lstsq(f0 * w[:, None], y0 * w, rcond=None)
        candidates = [np.maximum(coef, 0.0)]
        for pr in PIECE_RATIOS:
            for lr in LAUNCH_RATIOS:
                x0 = f0 @ np.array([1.0, pr, lr])
                scale = max(float((w2 * x0 * y0).sum() / max((w2 * x0 * x0).sum(), 1e-12)), 1e-6)
                candidates.append(np.array([scale, pr * scale, lr * scale]))
        for k in candidates:
            model = CostModel(us_per_item=float(k[0]), saturation=sat, us_per_piece=float(k[1]),
                              us_launch=float(k[2]))
            ratios = [c["ratio"] for c in check(rows, model, sms=sms, occupancy=occupancy)]
            err = float(np.mean(np.abs(y0 - f0 @ k) / y))
            key = (round(max(ratios), 3), round(float(np.mean(ratios)), 4), err)
            if best is None or key < best[0]:
                best = (key, sat, k)
    (_, _, err), sat, k = best
    model = CostModel(us_per_item=float(k[0]), saturation=round(sat, 3),
                      us_per_piece=float(k[1]), us_launch=float(k[2]), source="fit")
    # the second round of SMs holding two programs: least regret, ties to the default
    default = CostModel().shared_round

    def regret(x):
        ratios = [c["ratio"] for c in check(rows, replace(model, shared_round=x),
                                            sms=sms, occupancy=occupancy)]
        return round(max(ratios), 3), round(float(np.mean(ratios)), 4), abs(x - default)

    model = replace(model, shared_round=round(min(SHARED_ROUNDS, key=regret), 3))
    return model, err


def check(rows: list[dict], model: CostModel, *, sms: int = 132, occupancy: int = 2):
    """Per cell: the N `auto` picks with `model`, its measured time and the best measured time."""
    out = []
    rows = memory_bound(rows)
    for cell in sorted({(r["model"], r["n"], r["depth"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["n"], r["depth"]) == cell and r["fixup"] != "fused"]
        hq, hkv, d = MODELS[cell[0]][:3]
        chosen = plan(batch=1, q_len=int(cell[1]), kv_len=int(cell[2]), q_heads=hq, kv_heads=hkv,
                      head_dim=d, causal=True, sms=sms, occupancy=occupancy,
                      policy="auto", cost_model=model).programs
        by_n = {int(r["programs"]): float(r["p50_us"]) for r in mine}
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
    parser.add_argument("--from-csv", type=Path, nargs="+",
                        help="fit existing sweep CSVs (no GPU needed; prompt-chunk rows are "
                             "left out: auto counts waves there)")
    parser.add_argument("--out", type=Path, help=f"where to write the model (default {cost_model_path()})")
    parser.add_argument("--sms", type=int, default=None, help="SMs the sweep was planned for")
    parser.add_argument("--occupancy", "--blocks-per-sm", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")


def run(args) -> int:
    if args.from_csv:
        rows = [r for path in args.from_csv for r in read_csv(path)]
        sms = args.sms or 132
    else:
        from skattn.bench.calibrate_sweep import sweep

        rows, sms = sweep(SWEEP_CELLS, occupancy=args.occupancy)
    model, err = fit(rows, sms=sms, occupancy=args.occupancy)
    w = sys.stdout.write
    w(f"fitted {model} (mean relative error {100 * err:.1f}%)\n")
    for c in check(rows, model, sms=sms, occupancy=args.occupancy):
        w(f"{c['model']:18s} n={c['n']:<4} L={c['depth']:<6} auto N={c['auto_n']:<4} "
          f"{c['auto_us']:7.1f} us  best N={c['best_n']:<4} {c['best_us']:7.1f} us  "
          f"x{c['ratio']:.3f}\n")
    if not args.dry_run:
        path = args.out or cost_model_path()
        source = " ".join(str(p) for p in args.from_csv) if args.from_csv else "sweep"
        replace(model, source=source).save(path)
        w(f"wrote {path}\n")
    return 0
