"""Decode kernel geometry for quantized K/V on a GPU: time f16, fp8, q8_0 and q4_0 K/V under
several (block_n, num_stages, num_warps[, programs]) overrides, graph timer, cold L2.

    PYTHONPATH=src python3 tools/quant_sweep.py [--cells llama-8b:1:32768,...] [--geos 64/4/4,...]
        [--formats f16,fp8,q8_0,q4_0] [--reps 20]
        # a geometry: default or block_n/stages/warps[/programs], then optionally
        # :key=value+... of skattn.Tuning or the plan (default:fp8_v_pairs=0+occupancy=3)

Each (cell, format, geometry) is planned with the overrides (the policy picks the programs),
checked against float64 on the dequantized K/V (output poisoned with NaN; above 5e-3 relative
error it is not timed), then timed as one CUDA graph of 16 layers (`skattn.bench.graph`).
`default` is the planner's own geometry. Writes $OUT/quant_sweep.csv (default
benchmarks/results/latest/quant_sweep) and prints one line per row.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch

import skattn
from skattn import reference
from skattn.bench import graph
from skattn.bench.grid import Cell
from skattn.bench.models import MODELS
from skattn.bench.quant import KV_BYTES, parse_geo, quantize
from skattn.bench.run import layer_inputs
from skattn.bench.timing import ColdTimer, measure_ceilings

DTYPES = {"f16": torch.float16, "fp8": torch.float8_e4m3fn, "q8_0": "q8_0", "q4_0": "q4_0"}
LAYERS = 16


def parse_cells(text: str) -> list[Cell]:
    out = []
    for item in text.split(","):
        model, n, depth = item.split(":")
        hq, hkv, d = MODELS[model][:3]
        out.append(Cell(model, hq, hkv, d, int(n), int(depth)))
    return out


def checked(fns: list, layer: tuple, row: dict, tol: float = 5e-3) -> bool:
    """Layer 0's output (poisoned with NaN first) against float64 on its dequantized K/V:
    sets row's err, and its status "wrong" above `tol`."""
    q, k, v, kw = layer
    fns[0]().fill_(float("nan"))
    out = fns[0]()
    ref = reference.attention(q, k, v, causal=True, **kw)
    err = float((out.double() - ref).norm() / ref.norm())
    row["err"] = f"{err:.2e}"
    if not err <= tol:
        row["status"] = "wrong"
    return err <= tol


def timed(fns: list, timer, reps: int):
    """Per-layer graph-timer quantiles of `fns` captured as one CUDA graph."""
    gr, _ = graph.capture(fns)
    t = graph.time_graph(gr, len(fns), timer, warmup=3, reps=reps)
    del gr
    return t


def results_dir(name: str) -> Path:
    """$OUT, or benchmarks/results/latest/<name>, made if missing."""
    out = Path(os.environ.get("OUT", f"benchmarks/results/latest/{name}"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """rows as a CSV, the union of their keys as columns (sorted)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="llama-8b:1:32768,llama-8b:16:32768,llama-8b:1:8192")
    ap.add_argument("--geos", default="default,64/4/4,128/4/4,128/3/4,256/3/4,128/4/8,256/2/8")
    ap.add_argument("--formats", default="f16,fp8,q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    out_dir = results_dir("quant_sweep")
    timer = ColdTimer()
    copy_bw = measure_ceilings(timer, quick=True).copy_bytes_per_s
    rows = []
    for ci, cell in enumerate(parse_cells(args.cells)):
        base = layer_inputs(cell, 1000 + ci, LAYERS)
        for fmt in args.formats.split(","):
            layers = [quantize(fmt, *x) for x in base]
            kv = 2 * cell.depth * cell.hkv * cell.d * KV_BYTES[fmt]
            floor = (kv + 4 * cell.n * cell.hq * cell.d) / copy_bw * 1e6
            for geo in args.geos.split(","):
                row = dict(model=cell.model, n=cell.n, L=cell.depth, format=fmt, geo=geo)
                try:
                    p = skattn.plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                                    kv_heads=cell.hkv, head_dim=cell.d, dtype=DTYPES[fmt],
                                    causal=True, **parse_geo(geo))
                    g = p.geometry
                    row.update(programs=p.programs, fixup=p.fixup,
                               actual=f"{g.block_m}x{g.block_n}/{g.num_stages}/{g.num_warps}")
                    ws = skattn.workspace(p, device="cuda")
                    fns = []
                    for q, k, v, kw in layers:
                        out = torch.empty_like(q)
                        fns.append(lambda q=q, k=k, v=v, kw=kw, out=out: skattn.attention(
                            q, k, v, causal=True, plan=p, out=out, workspace=ws, **kw))
                    if checked(fns, layers[0], row):
                        t = timed(fns, timer, args.reps)
                        row.update(status="ok", p50_us=f"{t.p50:.2f}",
                                   pct_floor=f"{100 * floor / t.p50:.0f}")
                except Exception as exc:  # a geometry that does not compile or fit
                    row["status"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del layers
        del base
        torch.cuda.empty_cache()
    write_rows(out_dir / "quant_sweep.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
