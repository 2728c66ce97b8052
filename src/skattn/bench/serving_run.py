"""`skattn bench --serving`: time ragged decode batches in a paged cache, one CSV row each.

Per cell (model shape x length mix x page size) and provider: build, check the outputs of a
few sequences (the first, the second, the last and the longest) against float64, capture
the decode step in one CUDA graph (skattn's work list once, then `layers` layers' calls on
the same batch, whose K/V are far larger than L2) and time replays after an L2 flush:
per-layer time = replay / layers; or, eager (`--timer event`), the same calls launched one
by one from an idle GPU, host time included. Floor = visible K/V bytes (+ q and out) / copy
bandwidth (or the matmul time where larger), measured in the same run. Quantized providers
(`skattn-fp8:auto`, ...) read the batch's K/V quantized, are checked against float64 on
those K/V dequantized, and their floor counts the bytes they read.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from skattn.bench import serving as sb
from skattn.bench.floors import floor_us, pct_floor
from skattn.bench.graph import capture, time_eager, time_graph
from skattn.bench.providers import importable
from skattn.bench.records import draw_plot
from skattn.bench.run import error_status, progress_bar, provenance, timed
from skattn.bench.serving_mixes import MIX_NOTES, MIXES, PARTS, mix
from skattn.bench.models import MODELS

COLUMNS = ("provider", "model", "hq", "hkv", "d", "mix", "page_size", "batch", "q_tokens",
           "kv_tokens", "status", "err", "p20_us", "p50_us", "p80_us", "floor_us", "pct_floor",
           "bytes", "flops", "note", "reps", "layers", "timer", "gpu", "sms", "torch", "triton",
           "commit", "timestamp")
TIMERS = ("graph", "eager")  # a step's calls in one CUDA graph, or launched one by one
TOLERANCE = 2e-2
ANCHOR = "skattn:split"
DEFAULT_PAGE_SIZES = (16, 64)
FLEX_MODELS = ("llama-8b",)  # FlexAttention compiles per shape: one model keeps the run short


def cells(models, mixes, page_sizes) -> list[tuple]:
    return [(m, x, ps) for m in models for x in mixes for ps in page_sizes]


def _check(built, batch, refs) -> float:
    if built.step:  # skattn's work list is built from the lengths before any layer reads it
        built.step()
    out = built.canonical(built.layer())
    if out.is_cuda:
        torch.cuda.synchronize()
    cq = batch.cu_q.tolist()
    worst = 0.0
    for b, ref in refs.items():
        got = out[cq[b]:cq[b + 1]].double()
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst


def measure(name, batch, refs, timer, *, layers, warmup, reps, mode: str = "graph") -> dict:
    """Build, check, capture and time one provider on one batch (`mode` "eager": the step's
    calls launched one by one, `graph.time_eager`, after the graph's replay is checked);
    never raises."""
    row = {"provider": name, "status": "ok", "timer": mode}
    try:
        built = sb.build(name, batch)
        row["note"] = built.note
        if built.dequantized is not None:  # quantized K/V: checked against their dequantized
            refs = sb.reference_rows(built.dequantized, sorted(refs))
            row["kv_bytes"] = built.read.kv_bytes()
        err = _check(built, batch, refs)
        row["err"] = f"{err:.3e}"
        if err > TOLERANCE:
            row["status"] = f"wrong: relative error {err:.3e}"
            return row
        fns = ([built.step] if built.step else []) + [built.layer] * layers
        graph, outs = capture(fns)
        graph.replay()
        torch.cuda.synchronize()
        err = _check(sb.Built(lambda: outs[-1], built.canonical), batch, refs)
        if err > TOLERANCE:
            row["status"] = f"wrong after replay: relative error {err:.3e}"
            return row
        if mode == "eager":
            t = time_eager(fns, layers, timer, warmup=warmup, reps=reps)
        else:
            t = time_graph(graph, layers, timer, warmup=warmup, reps=reps)
        timed(row, t)
    except Exception as exc:  # an unsupported provider or shape must not stop the run
        row["status"] = error_status(exc)
    return row


def providers_for(names, model, decode: bool = False) -> list[str]:
    """The providers of a cell: FlexAttention on FLEX_MODELS only, skattn:one-plan (and variants
    with a q_split) on varlen mixes only (a decode batch has one query count)."""
    out = []
    for name in names:
        if name == "flex-paged" and model not in FLEX_MODELS:
            continue
        if decode and (name == "skattn:one-plan" or "q_split=" in name):
            continue
        if name == "flash-attn" and importable("flash_attn"):
            continue
        out.append(name)
    return out


def run_serving(*, models, mixes, page_sizes, names, out_dir, tag, layers=8, warmup=5, reps=20,
                time_limit_s=220.0, seed=0, progress=True,
                mode: str = "graph") -> tuple[Path, list[dict]]:
    """Run every cell; writes serving-<tag>.csv (row by row), .json and .md under `out_dir`.
    `mode`: "graph" (a step in one CUDA graph) or "eager" (its calls launched one by one,
    host time included)."""
    if mode not in TIMERS:
        raise ValueError(f"mode must be one of {TIMERS}, got {mode!r}")
    from skattn.bench.timing import ColdTimer, measure_ceilings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"serving-{tag}.csv"
    start = time.monotonic()
    timer = ColdTimer()
    ceilings = measure_ceilings(timer, quick=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prov = provenance(sms)
    todo = cells(models, mixes, page_sizes)
    skipped = [f"{n}: skipped, it does not import ({importable('flash_attn')})"
               for n in names if n == "flash-attn" and importable("flash_attn")]
    meta = {**prov, "copy_GBps": ceilings.copy_bytes_per_s / 1e9,
            "matmul_TFLOPs": ceilings.matmul_flops_per_s / 1e12, "layers": layers,
            "reps": reps, "warmup": warmup, "cells": len(todo), "providers": list(names),
            "timer": mode,
            "mixes": {m: MIX_NOTES[m] for m in mixes}, "flex_models": list(FLEX_MODELS),
            "notes": skipped, "cuda": torch.version.cuda, "csv": csv_path.name,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows, done = [], 0
    bar = progress_bar(len(todo), progress)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for model, mix_name, ps in todo:
            if time.monotonic() - start > time_limit_s:
                meta["stopped_early"] = f"time limit {time_limit_s:g} s: {done} of {len(todo)} cells"
                break
            hq, hkv, d = MODELS[model][:3]
            m = mix(mix_name, seed=seed)
            bar.set_description(f"{model} {mix_name} page {ps}")
            batch = sb.make_batch(m, hq, hkv, d, ps, seed=seed + done)
            longest = max(range(m.batch), key=lambda b: m.kv_lens[b])
            refs = sb.reference_rows(batch, sorted({0, min(1, m.batch - 1), m.batch - 1, longest}))
            q_bytes = 2 * batch.q.numel() * batch.q.element_size()
            flops = 4 * hq * d * sum(a * b for a, b in zip(m.q_lens, m.kv_lens))
            for name in providers_for(names, model, m.decode):
                row = measure(name, batch, refs, timer, layers=layers, warmup=warmup, reps=reps,
                              mode=mode)
                # a quantized provider's floor: the bytes it reads
                nbytes = row.pop("kv_bytes", batch.kv_bytes()) + q_bytes
                floor = floor_us(nbytes, flops, ceilings)
                p50 = float(row["p50_us"]) if "p50_us" in row else None
                row.update(model=model, hq=hq, hkv=hkv, d=d, mix=mix_name, page_size=ps,
                           batch=m.batch, q_tokens=sum(m.q_lens), kv_tokens=sum(m.kv_lens),
                           floor_us=f"{floor:.4f}", bytes=nbytes, flops=flops,
                           pct_floor=f"{pct_floor(floor, p50):.4g}" if p50 else "", layers=layers,
                           timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), **prov)
                writer.writerow(row)
                f.flush()
                rows.append(row)
            del batch, refs
            torch.cuda.empty_cache()
            done += 1
            bar.update()
            if not progress:  # a line a cell, so a log shows where the time goes
                print(f"{model} {mix_name} page {ps}: {time.monotonic() - start:.0f} s", file=sys.stderr,
                      flush=True)
    bar.close()
    meta.update(elapsed_s=round(time.monotonic() - start, 1), cells_done=done)
    csv_path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    csv_path.with_suffix(".md").write_text(markdown(rows, meta) + "\n")
    from skattn.bench.serving_plot import plot

    draw_plot(plot, rows, csv_path.with_suffix(".png"))
    return csv_path, rows


def _p50(row):
    return float(row["p50_us"]) if row and row.get("status") == "ok" and row.get("p50_us") else None


def provider_order(rows: list[dict]) -> list[str]:
    """The providers of `rows`, in the benchmark's order (unknown names last)."""
    seen = list(dict.fromkeys(r["provider"] for r in rows))
    return ([n for n in PROVIDERS_ORDER if n in seen]
            + [n for n in seen if n not in PROVIDERS_ORDER])


def ordered_cells(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(model, mix, page size) of `rows`, by model, then mix in the benchmark's order."""
    order = MIXES + PARTS
    return sorted({(r["model"], r["mix"], str(r["page_size"])) for r in rows},
                  key=lambda k: (k[0], order.index(k[1]) if k[1] in order else len(order),
                                 int(k[2])))


def markdown(rows: list[dict], meta: dict) -> str:
    """Per cell: each provider's per-layer µs (% of floor), and skattn auto's speed-up over the
    split anchor and over the best other provider."""
    names = provider_order(rows)
    idx = {(r["model"], r["mix"], str(r["page_size"]), r["provider"]): r for r in rows}
    keys = ordered_cells(rows)
    how = (f"launched one by one from an idle GPU ({meta.get('layers')} layers a step, eager: "
           f"the host's launch time included)" if meta.get("timer") == "eager" else
           f"in a CUDA graph of {meta.get('layers')} layers")
    lines = [f"# skattn bench --serving ({meta.get('gpu')}, {meta.get('commit')})", "",
             f"Per-layer µs (p50) {how}, cold L2, "
             f"(% of floor: visible K/V bytes / {meta.get('copy_GBps', 0):.0f} GB/s copy "
             f"bandwidth). `auto/split`: speed-up of skattn auto over the fixed-split anchor; "
             f"`auto/best other`: over the fastest non-skattn provider.", "",
             "| model | mix | page | " + " | ".join(names) + " | auto/split | auto/best other |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    for key in keys:
        cells = []
        for n in names:
            r = idx.get((*key, n))
            p = _p50(r)
            cells.append(f"{p:.1f} ({float(r['pct_floor']):.0f}%)" if p else
                         (r["status"][:40] if r else "-"))
        auto, anchor = _p50(idx.get((*key, "skattn:auto"))), _p50(idx.get((*key, ANCHOR)))
        others = [_p50(idx.get((*key, n))) for n in names if not n.startswith("skattn")]
        others = [x for x in others if x]
        cells.append(f"{anchor / auto:.2f}x" if auto and anchor else "-")
        cells.append(f"{min(others) / auto:.2f}x" if auto and others else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines += ["", "Mixes: " + "; ".join(f"{k}: {v}" for k, v in meta.get("mixes", {}).items())]
    if meta.get("stopped_early"):
        lines.append(f"Stopped early: {meta['stopped_early']}.")
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines)


PROVIDERS_ORDER = sb.PROVIDERS + sb.QUANT_PROVIDERS
