"""`skattn bench`: time the seed grid on a GPU, or show its plans and check correctness on a CPU.

Modes: the grid (default), `--seed-table` (llamacpp vs llamacpp-before and their fixup times),
`--host` (host time of one call), `--quant` (quantized K/V against f16), `--report` (tables
from CSVs, no run).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from skattn.bench import grid
from skattn.bench.graph import DEFAULT_LAYERS, TIMERS
from skattn.bench.providers import ALL_PROVIDERS, QUICK_PROVIDERS

CPU_SMS, CPU_BLOCKS_PER_SM = 132, 2  # plans shown without a GPU: an H100 SXM / H200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to `parser` (the `skattn bench` subcommand)."""
    parser.add_argument("--models",
                        help=f"comma-separated subset of {', '.join(grid.MODELS)} (aliases too)")
    parser.add_argument("--n", help="query tokens per cell, e.g. 1,4 (default 1,2,4,8,16,512)")
    parser.add_argument("--depth", help="KV depths, e.g. 8192 (default 8192,16384,32768)")
    parser.add_argument("--providers", help=f"comma-separated from {', '.join(ALL_PROVIDERS)} or "
                        f"skattn:<{'|'.join(grid.SKATTN_VARIANTS)}>, each optionally with "
                        "skattn.Tuning fields, e.g. skattn:auto/pdl_wait=false (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="about 4 minutes on an H100/H200: 2 models x n 1,4,16,512 x depth 16384, "
                             "skattn + SDPA, fewer repeats (explicit options still win)")
    parser.add_argument("--out", help="results folder (default $OUT when set, else benchmarks/results)")
    parser.add_argument("--tag", help="file-name tag: bench-<tag>.csv (default: a UTC time stamp)")
    parser.add_argument("--report", nargs="+", metavar="CSV",
                        help="no run: rebuild the tables and plots from these CSVs (merged, later wins)")
    parser.add_argument("--plans", action="store_true",
                        help="only print the plans of the grid (no GPU needed)")
    parser.add_argument("--sms", type=int, help="SMs to plan for (default: the GPU's, or 132 without one)")
    parser.add_argument("--occupancy", "--blocks-per-sm", type=int, help="programs per SM to plan for")
    parser.add_argument("--reps", type=int, help="timed runs per measurement (default 100, quick 30)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 10, quick 5)")
    parser.add_argument("--seed", type=int, default=0, help="random inputs' seed")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="start no new cell after S seconds (tables are still written)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--flush", choices=("read", "write"), default="read",
                        help="how L2 is emptied before each timed run: read a 256 MB buffer "
                             "(default) or overwrite it as do_bench does (L2 left dirty)")
    parser.add_argument("--timer", choices=TIMERS, default="graph",
                        help="graph (default): per-layer time = replay time of one CUDA graph of "
                             "--layers calls, each layer with its own Q/K/V/out, / layers; event: "
                             "one call between CUDA events (with --serving: a step's calls "
                             "launched one by one from an idle GPU, host time included)")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                        help=f"calls (layers) per CUDA graph for --timer graph (default {DEFAULT_LAYERS})")
    parser.add_argument("--seed-table", action="store_true",
                        help="the seed's experiment: llamacpp (rounding + uniform fixup) vs "
                             "llamacpp-before (general fixup) on every cell, and each fixup's own time")
    parser.add_argument("--host", action="store_true",
                        help="host time of one call (wall clock, tiny GPU work: B=1, n=1, Lk=256, "
                             "32/8/128; the first --n and --depth value replace n and Lk): skattn "
                             "planned, unplanned, its custom op, SDPA plain and inside sdpa_kernel")
    parser.add_argument("--host-calls", type=int, default=200,
                        help="back-to-back calls per timed batch for --host (default 200)")
    parser.add_argument("--serving", action="store_true",
                        help="ragged decode batches in a paged cache (skattn.bench.serving_run): "
                             "length mixes x page sizes 16, 64 x the grid's models; skattn auto, the "
                             "fixed-split anchor, SDPA padded, FlexAttention paged, flash-attn")
    parser.add_argument("--quant", action="store_true",
                        help="quantized K/V: decode cells with K/V in f16, fp8 and q8_0, prompt "
                             "chunks (n=512) in f16 and fp8, graph timer, byte floors "
                             "(skattn.bench.quant; default llama-8b, qwen3-14b, gpt-oss x n "
                             "1,4,16,512 x the seed depths, 20 reps, a 220 s time limit)")
    parser.add_argument("--e2e", action="store_true",
                        help="end to end: tokens/s of a random llama-8b-shaped transformers model, "
                             "skattn per policy vs sdpa, eager and CUDA graphs (skattn.bench.e2e); "
                             "--providers from sdpa, skattn:<policy>, skattn-fp8:<policy> (an "
                             "FP8 KV cache), skattn-q8_0:<policy> (a q8_0 KV cache)")


def _out_dir(args) -> Path:
    return Path(args.out or os.environ.get("OUT") or "benchmarks/results")


def _cells(args) -> list[grid.Cell]:
    return grid.select(grid.parse_names(args.models), grid.parse_ints(args.n),
                       grid.parse_ints(args.depth), quick=args.quick)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_mode(args, cells) -> int:
    from skattn.bench.plans import plan_table

    sms, bps = args.sms or CPU_SMS, args.occupancy or CPU_BLOCKS_PER_SM
    print(plan_table(cells, sms=sms, occupancy=bps))
    print(f"\n{len(cells)} cells. Each entry: N (programs), fixup kind, most pieces a split tile is cut "
          f"into, idle items in the tail (sum over programs of longest - own).")
    if args.plans:
        return 0
    print("\nCorrectness of skattn.attention under the Triton interpreter (tiny shapes):", flush=True)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        rc = subprocess.run([sys.executable, "-m", "skattn.bench.selfcheck"], env=env,
                            timeout=110).returncode
    except subprocess.TimeoutExpired:
        print("the interpreter check ran out of time (110 s)")
        rc = 1
    print("\nNo CUDA GPU here: the plans and the correctness check above are all this machine can do; "
          "timings need a GPU (scripts/gpu_run.sh).")
    return rc


def run_options(args):
    """`RunOptions` from parsed arguments (ValueError for a bad timer or layer count)."""
    from skattn.bench.run import RunOptions

    return RunOptions(warmup=args.warmup or (5 if args.quick else 10),
                      reps=args.reps or (30 if args.quick else 100), sms=args.sms,
                      occupancy=args.occupancy, seed=args.seed, time_limit_s=args.time_limit,
                      quick=args.quick, progress=not args.no_progress, flush=args.flush,
                      timer=args.timer, layers=args.layers)


def _tag(args) -> str:
    return args.tag or time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _gpu_mode(args, cells, providers, skipped) -> int:
    from skattn.bench.report import report, summary
    from skattn.bench.run import run_grid

    for line in skipped:
        print(line)
    opts = run_options(args)
    tag = _tag(args)
    csv_path, json_path, rows = run_grid(cells, providers, out_dir=_out_dir(args), tag=tag, opts=opts,
                                         notes=skipped)
    report(csv_path)
    stem = csv_path.with_suffix("")
    written = [csv_path, json_path] + [p for p in (Path(f"{stem}.md"), Path(f"{stem}-speedup.png"),
                                                   Path(f"{stem}-floor.png")) if p.exists()]
    print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(rows)} measurements not timed (wrong or error): see the CSV's status")
    print(summary(rows))
    return 0


def _seed_mode(args) -> int:
    from skattn.bench import seed

    cells = _cells(args)
    if args.plans or not _cuda():
        sms, bps = args.sms or CPU_SMS, args.occupancy or CPU_BLOCKS_PER_SM
        print(seed.plans_table(cells, sms=sms, occupancy=bps))
        print("\nNo CUDA GPU here (or --plans): the seed table's plans above; its timings need a GPU.")
        return 0
    csv_path, rows = seed.run_seed_table(cells, out_dir=_out_dir(args), tag=_tag(args),
                                         opts=run_options(args))
    seed.seed_report([csv_path])
    stem = csv_path.with_suffix("")
    written = [p for p in (csv_path, Path(f"{stem}.md"), Path(f"{stem}.png")) if p.exists()]
    print("wrote " + ", ".join(str(p) for p in written))
    print(seed.short_table(seed.cell_results(rows)))
    return 0


def _host_mode(args) -> int:
    if not _cuda():
        print("skattn bench --host: needs a CUDA GPU (it times the host side of GPU calls)",
              file=sys.stderr)
        return 2
    from skattn.bench.host import host_markdown, run_host

    n, depth = grid.parse_ints(args.n), grid.parse_ints(args.depth)
    shape = {**({"n": n[0]} if n else {}), **({"depth": depth[0]} if depth else {})}
    csv_path, rows = run_host(_out_dir(args), _tag(args), calls=args.host_calls, reps=args.reps or 30,
                              warmup=args.warmup or 20, shape=shape, sms=args.sms,
                              occupancy=args.occupancy)
    print(host_markdown(rows, title=csv_path.name))
    print(f"wrote {csv_path}, {csv_path.with_suffix('.md')}")
    return 0


def _serving_mode(args) -> int:
    from skattn.bench import serving as sb
    from skattn.bench.serving_mixes import MIXES

    try:
        from skattn.bench.models import resolve

        models = tuple(resolve(n)[0] for n in grid.parse_names(args.models) or ()) or (
            ("llama-8b",) if args.quick else tuple(grid.MODELS))
        names = grid.parse_names(args.providers) or sb.PROVIDERS
        known = sb.PROVIDERS + sb.QUANT_PROVIDERS
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown serving providers {bad}; choose from {list(known)}")
    except ValueError as exc:
        print(f"skattn bench: {exc}", file=sys.stderr)
        return 2
    if not _cuda():
        print("skattn bench --serving: needs a CUDA GPU", file=sys.stderr)
        return 2
    from skattn.bench.serving_run import markdown, run_serving

    csv_path, rows = run_serving(models=models, mixes=MIXES, page_sizes=(16, 64), names=names,
                                 out_dir=_out_dir(args), tag=_tag(args),
                                 reps=args.reps or 20, warmup=args.warmup or 5, seed=args.seed,
                                 time_limit_s=args.time_limit or 220.0,
                                 progress=not args.no_progress,
                                 mode="eager" if args.timer == "event" else "graph")
    written = [csv_path] + [p for p in (csv_path.with_suffix(s) for s in (".json", ".md", ".png"))
                            if p.exists()]
    print("wrote " + ", ".join(map(str, written)))
    print(csv_path.with_suffix(".md").read_text())
    return 0


QUANT_TIME_LIMIT_S = 220.0  # start no new cell after this: the run stays under 4 minutes


def _quant_mode(args) -> int:
    from skattn.bench import quant

    decode, prompt = quant.cells(grid.parse_names(args.models), grid.parse_ints(args.n),
                                 grid.parse_ints(args.depth))
    if args.plans or not _cuda():
        sms, bps = args.sms or CPU_SMS, args.occupancy or CPU_BLOCKS_PER_SM
        print(quant.plans_table(decode, prompt, sms=sms, occupancy=bps))
        print("\nNo CUDA GPU here (or --plans): the plans above; the timings need a GPU.")
        return 0
    from dataclasses import replace

    opts = replace(run_options(args), reps=args.reps or 20, warmup=args.warmup or 3,
                   time_limit_s=args.time_limit or QUANT_TIME_LIMIT_S)
    csv_path, json_path, rows = quant.run_quant(decode, prompt, out_dir=_out_dir(args),
                                                tag=_tag(args), opts=opts)
    import json

    md = quant.write_markdown(csv_path, rows, json.loads(json_path.read_text()))
    from skattn.bench.quant_plot import plot
    from skattn.bench.records import draw_plot

    png = csv_path.with_suffix(".png")
    drew = draw_plot(plot, rows, png)
    print(f"wrote {csv_path}, {json_path}, {md}" + (f", {png}" if drew else ""))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(rows)} measurements not timed (wrong or error): see the CSV's status")
    print(quant.short_table(rows))
    return 0


def _report_mode(args) -> int:
    """Tables (and plots) from CSVs: the grid's, the quantized-K/V benchmark's, the
    prompt-chunk A/B's, the serving benchmark's, the seed table's or the host time's, told
    by their columns."""
    import csv

    with open(args.report[0], newline="") as f:
        columns = set(next(csv.reader(f), []))
    out = args.out or None
    if "speedup_vs_f16" in columns:  # skattn bench --quant's
        from skattn.bench.quant_plot import report as quant_report

        print(quant_report(args.report, out_dir=out, stem=args.tag and f"quant-{args.tag}"))
    elif "cudnn_nomask_over" in columns:  # tools/prefill_ab.py's
        from skattn.bench.prefill_report import report as prefill_report

        print(prefill_report(args.report, out_dir=out, stem=args.tag and f"prefill-{args.tag}"))
    elif {"mix", "page_size"} <= columns:  # the serving benchmark's
        from skattn.bench.serving_plot import report as serving_report

        print(serving_report(args.report, out_dir=out, stem=args.tag and f"serving-{args.tag}"))
    elif "part" in columns:
        from skattn.bench.seed import seed_report

        print(seed_report(args.report, out_dir=out, stem=args.tag and f"seed-{args.tag}"))
    elif "us_per_call_p50" in columns:
        from skattn.bench.host import host_markdown, read_host_rows

        print(host_markdown(read_host_rows(args.report), title=", ".join(args.report)))
    else:
        from skattn.bench.report import report

        print(report(args.report, out_dir=out, stem=args.tag and f"bench-{args.tag}"))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `skattn bench` with parsed `args`; returns the exit status."""
    if args.e2e:
        from skattn.bench.e2e import run as run_e2e

        return run_e2e(args)
    if args.serving:
        return _serving_mode(args)
    try:
        if args.report:
            return _report_mode(args)
        if args.host:
            return _host_mode(args)
        if args.quant:
            run_options(args)  # a bad --timer / --layers fails before any work
            return _quant_mode(args)
        if args.seed_table:
            run_options(args)  # a bad --timer / --layers fails before any work
            return _seed_mode(args)
    except ValueError as exc:
        print(f"skattn bench: {exc}", file=sys.stderr)
        return 2
    from skattn.bench.providers import resolve

    names = grid.parse_names(args.providers) or (QUICK_PROVIDERS if args.quick else ALL_PROVIDERS)
    try:
        cells = _cells(args)
        providers, skipped = resolve(names)
        run_options(args)
    except ValueError as exc:
        print(f"skattn bench: {exc}", file=sys.stderr)
        return 2
    if args.plans or not _cuda():
        return _cpu_mode(args, cells)
    return _gpu_mode(args, cells, providers, skipped)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m skattn.bench.cli ...`."""
    parser = argparse.ArgumentParser(prog="skattn bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
