"""A/B of launch choices (`skattn.Tuning` fields) on a GPU: each variant's time and error.

    PYTHONPATH=src python3 tools/tuning_ab.py [--variants "default;pdl=0;..."] [--cells decode]
        [--programs 128,264] [--reps 40] [--plan-only]

A variant is a comma-separated list of key=value: `skattn.Tuning` fields (pdl=0,
pdl_trigger=start, merge_loads_first=0, fixup_rows=128, fused_merge_elements=64, ...) and
the plan's `fixup` and `policy`; `default` is the cell's plan with `Tuning()`. The default
variants are the choices PERF.md measures for the separate fixup (launched early with PDL,
triggered at the main kernel's end, its merge waiting for all loads of a step at once) and
for the fused merge (16 pieces a step).

Cells: `decode` (six decode cells of the seed grid, auto's plans), `prefill` (llama-8b
n = 512 at L = 8192 and 32768 with llama.cpp's N: tiles of 1-2 pieces), or `all`.
`--programs` forces N (a variant whose plan refuses that N is skipped); by default each
variant's own plan decides.
Per (cell, N, variant): the output, poisoned with NaN first, is checked against float64
attention (`skattn.reference`); a variant above 1e-2 relative error is not timed. Then the
main kernel alone and the whole call are timed with a cold L2 (p50 of `--reps` runs).

Writes tuning_ab.csv (one row per measurement) and tuning_ab.json (provenance) to $OUT
(default benchmarks/results/latest/tuning); prints a short table last.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

import skattn
from skattn import launch, reference
from skattn.bench.models import MODELS

DEFAULT_VARIANTS = ("default;pdl=0;pdl_trigger=start;merge_loads_first=0;fixup=fused;"
                    "fixup=fused,fused_merge_elements=64")
CELLS = {  # (model, n, L, policy)
    "decode": [("llama-8b", 1, 8192, "auto"), ("llama-8b", 1, 32768, "auto"),
               ("qwen3moe-30b-a3b", 2, 8192, "auto"), ("qwen3-14b", 4, 16384, "auto"),
               ("gpt-oss", 1, 8192, "auto"), ("gpt-oss", 16, 32768, "auto")],
    # auto gives prompt chunks whole tiles (no fixup); llama.cpp's N cuts them
    "prefill": [("llama-8b", 512, 8192, "llamacpp"), ("llama-8b", 512, 32768, "llamacpp")],
}
PLAN_KEYS = ("fixup", "policy")
MAX_REL_ERR = 1e-2


def _value(name: str, text: str, default):
    """`text` as the type of the Tuning field `name` (whose default is `default`)."""
    if isinstance(default, bool):
        if text.lower() not in ("0", "1", "true", "false"):
            raise ValueError(f"{name} takes 0/1 or true/false, got {text!r}")
        return text.lower() in ("1", "true")
    if isinstance(default, int) or (default is None and text.lower() != "none"):
        return int(text)
    return None if text.lower() == "none" else text


def parse_variant(text: str) -> tuple[dict, skattn.Tuning]:
    """'fixup=fused,fused_merge_elements=64' -> (plan keywords, Tuning);
    'default' -> ({}, Tuning())."""
    defaults = {f.name: f.default for f in dataclasses.fields(skattn.Tuning)}
    plan_kw, tuning_kw = {}, {}
    for item in (x.strip() for x in text.split(",")):
        if item in ("", "default"):
            continue
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"variant item {item!r} is not key=value")
        if key in PLAN_KEYS:
            plan_kw[key] = val
        elif key in defaults:
            tuning_kw[key] = _value(key, val, defaults[key])
        else:
            raise ValueError(f"unknown variant key {key!r}: a Tuning field "
                             f"({', '.join(defaults)}) or one of {PLAN_KEYS}")
    return plan_kw, skattn.Tuning(**tuning_kw)


def plan_for(model: str, n: int, L: int, policy: str, plan_kw: dict, tuning, programs=None,
             **hw):
    Hq, Hkv, D = MODELS[model][:3]
    kw = dict(dict(policy=policy), **plan_kw)
    return skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                       causal=True, programs=programs, tuning=tuning, **kw, **hw)


def points(cells, variants, programs, **hw):
    """(cell, N or None, variant text, plan) for every combination whose plan is valid."""
    for model, n, L, policy in cells:
        for N in programs:
            for text in variants:
                plan_kw, tuning = parse_variant(text)
                try:
                    p = plan_for(model, n, L, policy, plan_kw, tuning, N, **hw)
                except ValueError as err:  # N above the work items, or a fixup N cannot take
                    print(f"skip {model} n={n} L={L} N={N} {text}: {err}", file=sys.stderr)
                    continue
                yield (model, n, L), N, text, p


def measure(args, cells, variants, programs) -> list[dict]:
    from skattn.bench.timing import ColdTimer

    timer = ColdTimer(flush="read")
    rows, inputs = [], None
    for (model, n, L), N, text, p in points(cells, variants, programs):
        if inputs is None or inputs[0] != (model, n, L):
            Hq, Hkv, D = MODELS[model][:3]
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, length, h, D, device="cuda", generator=g,
                                   dtype=torch.float16)
                       for length, h in ((n, Hq), (L, Hkv), (L, Hkv)))
            ref = reference.attention(q, k, v, causal=True)
            inputs = ((model, n, L), q, k, v, torch.empty_like(q), ref)
        _, q, k, v, out, ref = inputs
        scale = q.shape[-1] ** -0.5
        out.fill_(float("nan"))
        launch.run(p, q, k, v, out, None, scale=scale)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        row = dict(model=model, n=n, depth=L, variant=text, programs=p.programs, fixup=p.fixup,
                   max_rel_err=err)
        if err == err and err <= MAX_REL_ERR:  # (NaN fails)
            main = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=scale,
                                                 main_only=True), reps=args.reps)
            whole = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=scale),
                               reps=args.reps)
            row.update(main_p50_us=main.p50, p20_us=whole.p20, p50_us=whole.p50,
                       p80_us=whole.p80)
        rows.append(row)
        print(" ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                       for key, val in row.items()), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per row: the cell, N, fixup, variant, main and whole-call p50 (us), error."""
    lines = [f"{'model':17s} {'n':>4s} {'L':>6s} {'N':>4s} {'fixup':8s} {'variant':38s} "
             f"{'main':>7s} {'call':>7s}  err"]
    for r in rows:
        main = f"{r['main_p50_us']:7.1f}" if "main_p50_us" in r else "      -"
        call = f"{r['p50_us']:7.1f}" if "p50_us" in r else " FAILED"
        lines.append(f"{r['model']:17s} {r['n']:4d} {r['depth']:6d} {r['programs']:4d} "
                     f"{r['fixup']:8s} {r['variant']:38s} {main} {call}  {r['max_rel_err']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated variants")
    ap.add_argument("--cells", choices=("decode", "prefill", "all"), default="all")
    ap.add_argument("--programs", default="", help="comma-separated N to force (default: auto's)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--plan-only", action="store_true",
                    help="print the plans for an H200 (132 SMs), no GPU")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    for text in variants:  # bad names fail here, before any GPU work
        try:
            parse_variant(text)
        except (TypeError, ValueError) as err:
            ap.error(f"--variants: {err}")
    cells = CELLS["decode"] + CELLS["prefill"] if args.cells == "all" else CELLS[args.cells]
    programs = [int(x) for x in args.programs.split(",") if x] or [None]
    if args.plan_only:
        for cell, _, text, p in points(cells, variants, programs, sms=132, occupancy=2):
            changed = {k: v for k, v in dataclasses.asdict(p.tuning).items()
                       if v != getattr(skattn.Tuning(), k)}
            print(f"{cell[0]:17s} n={cell[1]:<4d} L={cell[2]:<6d} N={p.programs:<4d} "
                  f"{p.fixup:8s} {text:38s} {changed or ''}")
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --plan-only)", file=sys.stderr)
        return 2
    from skattn.bench.run import provenance

    out_dir = Path(os.environ.get("OUT") or "benchmarks/results/latest/tuning")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = measure(args, cells, variants, programs)
    with open(out_dir / "tuning_ab.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prov = dict(provenance(sms), command=" ".join([sys.executable, *sys.argv]), variants=variants,
                reps=args.reps, max_rel_err=MAX_REL_ERR, time_s=round(time.time() - t0, 1))
    (out_dir / "tuning_ab.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
