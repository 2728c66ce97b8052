"""Split decode times into a fixed cost and a streaming rate: time = a + bytes / B.

  python3 scripts/fixed_cost.py benchmarks/results/grid/bench-grid.csv [more.csv ...] [--n 1]

For each (provider, variant, model, n) of `skattn bench` CSVs (a later file's rows replace
an earlier one's for the same cell) with three or more depths,
a least-squares line through (K+V bytes, p50 µs) gives a (µs, the part that does not grow
with the cache) and B (TB/s, the rate at which the rest streams). With those, the best
% of the copy floor a kernel can reach at a depth follows: floor / (a + bytes / B).
Runs anywhere (no GPU): it only reads the CSV.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept µs, slope µs per byte) of the least-squares line through the points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def rows_by_series(paths: list[str], ns: set[int] | None) -> dict[tuple, list[dict]]:
    cells = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                n = int(r["n"])
                if r["status"] != "ok" or n > 16 or (ns and n not in ns):
                    continue
                cells[(r["provider"], r["variant"], r["model"], n, int(r["depth"]))] = r
    series = defaultdict(list)
    for key, r in cells.items():
        series[key[:4]].append(r)
    return series


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--n", default="", help="query tokens to keep, e.g. 1,16 (default all <= 16)")
    args = ap.parse_args(argv)
    ns = {int(x) for x in args.n.split(",") if x}
    print("| provider | model | n | fixed a (µs) | rate B (TB/s) | worst residual (µs) "
          "| % of floor at L = 8k / 16k / 32k, measured |")
    print("|---|---|---|---|---|---|---|")
    for (provider, variant, model, n), rows in sorted(rows_by_series(args.csv, ns).items()):
        if len({r["depth"] for r in rows}) < 3:
            continue
        rows.sort(key=lambda r: int(r["depth"]))
        pts = [(float(r["bytes"]), float(r["p50_us"])) for r in rows]
        a, slope = fit(pts)
        resid = max(abs(y - (a + slope * x)) for x, y in pts)
        pct = " / ".join(f"{float(r['pct_floor']):.0f}" for r in rows)
        name = provider + (f":{variant}" if variant else "")
        rate = f"{1e-6 / slope:.2f}" if slope > 0 else "—"  # flat or falling: no rate
        print(f"| {name} | {model} | {n} | {a:.1f} | {rate} | {resid:.1f} | {pct} |")


if __name__ == "__main__":
    main()
