"""Plan choices of the ragged kernel on a GPU: `skattn bench --serving` cells with skattn
variants `POLICY/key=int,...` (serving_plan overrides: programs, occupancy, block_n, ...).

    PYTHONPATH=src python3 tools/serving_sweep.py [--mixes equal,one-long] [--pages 16]
        [--variants "auto;split;auto/programs=256;skattn-fp8:auto/occupancy=3;..."]
        [--models llama-8b]

A variant with a colon, or one of the benchmark's providers, is a whole provider name
(`skattn-fp8:auto/occupancy=3`: over FP8 K/V; `sdpa-padded`). Each variant is checked
against float64 before it is timed (graph timer, 8 layers, cold L2), as in the benchmark.
Writes $OUT/serving-sweep.{csv,json,md} (default benchmarks/results/latest/serving_sweep)
and prints one line per row.
"""
from __future__ import annotations

import argparse
import os

from skattn.bench.serving import PROVIDERS
from skattn.bench.serving_run import run_serving


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-8b")
    ap.add_argument("--mixes", default="equal,one-long,lognormal")
    ap.add_argument("--pages", default="16")
    ap.add_argument("--variants", default="auto;split;auto/programs=264;auto/programs=256")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    names = [v if ":" in v or v in PROVIDERS else f"skattn:{v}" for v in args.variants.split(";")]
    out = os.environ.get("OUT", "benchmarks/results/latest/serving_sweep")
    _, rows = run_serving(models=args.models.split(","), mixes=args.mixes.split(","),
                          page_sizes=[int(x) for x in args.pages.split(",")], names=names,
                          out_dir=out, tag="sweep", reps=args.reps, warmup=3,
                          time_limit_s=400, progress=False)
    for r in rows:
        print(f"{r['mix']:10} page {r['page_size']:>3} {r['provider']:40} {r['status'][:50]:10} "
              f"{r.get('p50_us', ''):>10} us {r.get('pct_floor', ''):>6}% {r.get('note', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
