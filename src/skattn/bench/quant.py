"""Quantized K/V against f16, kernel level: `skattn bench --quant`.

Decode cells of the seed grid with K/V in f16, fp8 (float8_e4m3fn, per-KV-head scales), q8_0
and q4_0, and prompt chunks (n = 512) in f16, fp8 and q8_0 (by default dequantized to f16
first: the `route` column, `Tuning.quant_route`), side by side in one run: per-layer time
with the CUDA-graph timer (16 layers, each with its own inputs, cold L2), the byte floor of
each format (K/V at 2, 1, 34/32 and 18/32 bytes a value, from the copy bandwidth measured in the
same run), the speed-up over f16, and two errors: against float64 on the dequantized K/V
(checked, as every bench row) and against float64 on the unquantized f16 K/V (reported only:
what the quantization itself costs). Writes `quant-<tag>.csv` (one row per cell x format),
`quant-<tag>.json` (provenance), `quant-<tag>.md`, and prints a short table last.
"""
from __future__ import annotations

import csv
import json
import time
import dataclasses
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from skattn.bench.grid import SEED_DEPTHS, Cell
from skattn.bench.records import not_timed, record
from skattn.planner import VALUE_BYTES
from skattn.tuning import Tuning

FORMATS = ("f16", "fp8", "q8_0", "q4_0")  # decode
QUANTIZED = FORMATS[1:]
PROMPT_FORMATS = ("f16", "fp8", "q8_0")
PROMPT_N = 512
# the default run: three shapes (D 128 ratio 4, D 128 ratio 5, D 64 ratio 8) x n 1, 4, 16 x
# the seed depths, and their prompt chunks; about 3 minutes on an H200 (compiles included)
DEFAULT_MODELS = ("llama-8b", "qwen3-14b", "gpt-oss")
DEFAULT_N = (1, 4, 16)
# per K/V value (the planner's; q8_0: 32 int8 + an f16 scale a block; q4_0: 16 bytes + an f16 scale)
KV_BYTES = {name: float(VALUE_BYTES[form]) for name, form in
            (("f16", "float16"), ("fp8", "float8_e4m3fn"), ("q8_0", "q8_0"), ("q4_0", "q4_0"))}
COLUMNS = ("model", "hq", "hkv", "d", "n", "depth", "format", "policy", "programs", "fixup", "route",
           "status", "err", "err_unquantized", "p20_us", "p50_us", "p80_us", "floor_us",
           "pct_floor", "bytes", "speedup_vs_f16", "reps", "timer", "layers", "gpu", "sms",
           "torch", "triton", "commit", "flush", "timestamp")


def parse_geo(text: str) -> dict:
    """Plan keywords of a geometry `default` or `block_n/stages/warps[/programs]`, optionally
    followed by `:key=value+...`: fields of `skattn.Tuning` (0 and 1 for booleans) or plan
    keywords such as occupancy (integers)."""
    geo, _, tune = text.partition(":")
    kw = {}
    if geo != "default":
        bn, st, w, *n = (int(x) for x in geo.split("/"))
        kw = dict(block_n=bn, num_stages=st, num_warps=w, **({"programs": n[0]} if n else {}))
    if tune:
        fields = {f.name: f.type for f in dataclasses.fields(Tuning)}
        vals = dict(item.split("=") for item in tune.split("+"))
        tuning = {k: (v != "0") if fields[k] in (bool, "bool") else int(v)
                  for k, v in vals.items() if k in fields}
        kw.update({k: int(v) for k, v in vals.items() if k not in fields})  # plan keywords
        if tuning:
            kw["tuning"] = Tuning(**tuning)
    return kw


def cells(models=None, ns=None, depths=None) -> tuple[list[Cell], list[Cell]]:
    """(decode cells, prompt cells) of the benchmark; prompt cells only where n = 512 is
    asked for (by default: the decode models at every depth)."""
    from skattn.bench.grid import select

    ns = ns or (*DEFAULT_N, PROMPT_N)
    all_cells = select(models or DEFAULT_MODELS, ns, depths or SEED_DEPTHS)
    return [c for c in all_cells if c.n != PROMPT_N], [c for c in all_cells if c.n == PROMPT_N]


def cell_bytes(cell: Cell, fmt: str) -> int:
    """K and V read once in `fmt`, q read and out written once in f16 (batch 1)."""
    kv = 2 * cell.depth * cell.hkv * cell.d * KV_BYTES[fmt]
    return int(kv + 2 * cell.n * cell.hq * cell.d * 2)


def quantize(fmt: str, q, k, v):
    """One layer's (q, k, v, attention kwargs) with K/V in `fmt` (fp8: per-KV-head scales)."""
    from skattn import quant

    if fmt == "f16":
        return q, k, v, {}
    if fmt in ("q8_0", "q4_0"):
        pack = getattr(quant, fmt)
        return q, pack(k), pack(v), {}
    (kq, ks), (vq, vs) = quant.fp8(k, per_head=True), quant.fp8(v, per_head=True)
    return q, kq, vq, dict(k_scale=ks, v_scale=vs)


def _plan(cell: Cell, fmt: str, opts):
    import skattn

    dtype = {"f16": torch.float16, "fp8": torch.float8_e4m3fn, "q8_0": "q8_0", "q4_0": "q4_0"}[fmt]
    return skattn.plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                       kv_heads=cell.hkv, head_dim=cell.d, dtype=dtype, causal=True,
                       sms=opts.sms, occupancy=opts.occupancy)


def _reference(q, k, v, kw, causal=True):
    from skattn import reference

    return reference.attention(q, k, v, causal=causal, **kw)


def measure(cell: Cell, fmt: str, layers: list, unquantized_ref, timer, opts) -> dict:
    """Plan, check (eagerly and after a graph replay, against float64 on the dequantized K/V),
    then time one format on one cell with the graph timer; never raises."""
    import skattn
    from skattn.bench import graph
    from skattn.bench.providers import relative_error
    from skattn.bench.run import TOLERANCE, failure_status, timed

    row = {"format": fmt, "status": "ok"}
    try:
        p = _plan(cell, fmt, opts)
        row.update(policy=p.policy, programs=p.programs, fixup=p.fixup,
                   route="dequant" if p.dequant else "native")  # `Tuning.quant_route`
        ws = skattn.workspace(p, device=layers[0][0].device)
        fns = []
        for q, k, v, kw in layers:
            out = torch.empty(*q.shape[:3], q.shape[3], device=q.device, dtype=q.dtype)
            fns.append(lambda q=q, k=k, v=v, kw=kw, out=out: skattn.attention(
                q, k, v, causal=True, plan=p, out=out, workspace=ws, **kw))
        refs = graph.References(layers, _reference)
        out0 = fns[0]()
        if out0.is_cuda:
            torch.cuda.synchronize()
        err = relative_error(out0, refs.get(0))
        row.update(err=f"{err:.3e}", err_unquantized=f"{relative_error(out0, unquantized_ref):.3e}")
        if err > TOLERANCE[torch.float16]:
            row["status"] = f"wrong: relative error {err:.3e} > {TOLERANCE[torch.float16]:g}"
            return row
        g, outs = graph.capture(fns)
        err = graph.check_replay(g, outs, refs.checked(), TOLERANCE[torch.float16], relative_error)
        row["err"] = f"{max(err, float(row['err'])):.3e}"
        t = graph.time_graph(g, len(fns), timer, warmup=opts.warmup, reps=opts.reps)
        timed(row, t)
        del g, outs
    except Exception as exc:  # an unsupported config must not stop the run
        row["status"] = failure_status(exc)
    return row


def run_quant(decode: list[Cell], prompt: list[Cell], *, out_dir, tag: str, opts):
    """Time every format on every cell; write `quant-<tag>.csv` row by row and its JSON.

    Returns
    -------
    (Path, Path, list of dict)
        The CSV, the JSON and the rows.
    """
    from skattn.bench import run
    from skattn.bench.floors import cell_flops, floor_us, pct_floor
    from skattn.bench.timing import ColdTimer, measure_ceilings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"quant-{tag}.csv", out_dir / f"quant-{tag}.json"
    sms = opts.sms or torch.cuda.get_device_properties(0).multi_processor_count
    opts = run.RunOptions(**{**asdict(opts), "sms": sms})
    start = time.monotonic()
    timer = ColdTimer(flush=opts.flush)
    ceil = measure_ceilings(timer, quick=True)
    prov = {**run.provenance(sms), "flush": opts.flush, "timer": "graph", "layers": opts.layers}
    meta = {**prov, "copy_GBps": ceil.copy_bytes_per_s / 1e9,
            "matmul_TFLOPs": ceil.matmul_flops_per_s / 1e12, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available()
            else None, "options": asdict(opts),
            "decode_cells": len(decode), "prompt_cells": len(prompt), "kv_bytes": KV_BYTES,
            "fp8_scales": "per KV head", "started": datetime.now(timezone.utc).isoformat(
                timespec="seconds"), "csv": csv_path.name}
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    # deepest first: a run cut by the time limit loses the shallowest cells (compiles are paid
    # on the first depth of each shape)
    order = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in decode + prompt))}
    jobs = sorted([(c, FORMATS) for c in decode] + [(c, PROMPT_FORMATS) for c in prompt],
                  key=lambda j: (-j[0].depth, order[j[0].model], j[0].n))
    rows: list[dict] = []
    bar = run.progress_bar(sum(len(f) for _, f in jobs), opts.progress)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for i, (cell, formats) in enumerate(jobs):
            if opts.time_limit_s and time.monotonic() - start > opts.time_limit_s:
                meta["stopped_early"] = f"time limit {opts.time_limit_s:g} s: {i} of {len(jobs)} cells"
                break
            base = run.layer_inputs(cell, opts.seed + i, opts.layers)
            unq = _reference(*base[0], {})
            f16_p50 = None
            for fmt in formats:
                bar.set_description(f"{cell.model} n={cell.n} L={cell.depth} {fmt}")
                layers = [quantize(fmt, *x) for x in base]
                row = measure(cell, fmt, layers, unq, timer, opts)
                del layers
                nbytes = cell_bytes(cell, fmt)
                floor = floor_us(nbytes, cell_flops(cell.hq, cell.d, cell.n, cell.depth), ceil)
                p50 = float(row["p50_us"]) if "p50_us" in row else None
                if fmt == "f16":
                    f16_p50 = p50
                row.update(floor_us=f"{floor:.4f}", bytes=nbytes,
                           pct_floor=f"{pct_floor(floor, p50):.4g}" if p50 else "",
                           speedup_vs_f16=f"{f16_p50 / p50:.4g}" if p50 and f16_p50 else "")
                record(row, cell, prov, writer, f, rows, bar)
            del base, unq
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bar.close()
    meta.update(elapsed_s=round(time.monotonic() - start, 1))
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path, json_path, rows


# -- tables (CPU)
def plans_table(decode: list[Cell], prompt: list[Cell], *, sms: int, occupancy: int) -> str:
    """Markdown: per cell and format, the plan (programs, fixup) and its kernel configuration
    (rows x keys per KV block x stages) with the shared memory it is estimated to take."""
    from types import SimpleNamespace

    from skattn.config import shared_bytes

    opts = SimpleNamespace(sms=sms, occupancy=occupancy)
    head = ["model (Hq/Hkv/D)", "n", "L"] + [f"{f}: N fixup, M x BN x stages, KB" for f in FORMATS]
    lines = [f"Plans for {sms} SMs x {occupancy} programs per SM.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in decode + prompt:
        entries = []
        for fmt in FORMATS:
            if cell.n == PROMPT_N and fmt not in PROMPT_FORMATS:
                entries.append("—")
                continue
            try:
                p = _plan(cell, fmt, opts)
            except ValueError as exc:
                entries.append(f"error: {exc}")
                continue
            g = p.geometry
            kb = shared_bytes(g, kv_format=p.dtype) / 1024
            entries.append(f"{p.programs} {p.fixup}, {g.block_m} x {g.block_n} x {g.num_stages}, "
                           f"{kb:.0f}")
        lines.append("| " + " | ".join([f"{cell.model} ({cell.shape})", str(cell.n),
                                        str(cell.depth)] + entries) + " |")
    return "\n".join(lines)


# -- tables from rows (CPU)
def _by_cell(rows):
    """{(model, hq, hkv, d, n, depth): {format: row}}, by model (as first seen), n, depth."""
    out: dict[tuple, dict] = {}
    order: dict[str, int] = {}
    for r in rows:
        key = (r["model"], int(r["hq"]), int(r["hkv"]), int(r["d"]), int(r["n"]), int(r["depth"]))
        order.setdefault(r["model"], len(order))
        out.setdefault(key, {})[r["format"]] = r
    return {k: out[k] for k in sorted(out, key=lambda k: (order[k[0]], k[4], k[5]))}


def _num(row, name):
    try:
        return float(row.get(name, "")) if row and row.get("status") == "ok" else None
    except ValueError:
        return None


def _entry(row, f16=False) -> str:
    if row is None:
        return "—"
    p50 = _num(row, "p50_us")
    if p50 is None:
        return row.get("status", "?").split(":")[0]
    text = f"{p50:.1f} ({_num(row, 'pct_floor'):.0f}%)"
    if not f16 and _num(row, "speedup_vs_f16"):
        text += f" {_num(row, 'speedup_vs_f16'):.2f}x"
    return text


def markdown_table(rows) -> str:
    """Per cell: each format's p50 µs (% of its own byte floor) and speed-up over f16, then
    the error against float64 on the unquantized K/V."""
    head = ["model (Hq/Hkv/D)", "n", "L", "f16 µs (% floor)", "fp8 µs (% floor) speed-up",
            "q8_0 µs (% floor) speed-up", "q4_0 µs (% floor) speed-up",
            "err fp8 / q8_0 / q4_0 vs unquantized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, hq, hkv, d, n, depth), by in _by_cell(rows).items():
        errs = " / ".join(by[f].get("err_unquantized") or "—" if f in by else "—"
                          for f in QUANTIZED)
        lines.append("| " + " | ".join([f"{model} ({hq}/{hkv}/{d})", str(n), str(depth),
                                        _entry(by.get("f16"), True)]
                                       + [_entry(by.get(f)) for f in QUANTIZED] + [errs]) + " |")
    return "\n".join(lines)


def short_table(rows) -> str:
    """Fixed-width lines for the terminal: p50 µs of each format, speed-ups, % of floor."""
    lines = [f"{'model':<17}{'n':>4}{'L':>7}{'f16':>8}{'fp8':>8}{'q8_0':>8}{'q4_0':>8}"
             f"{'x fp8':>7}{'x q8_0':>7}{'x q4_0':>7}{'%fl f16':>8}{'%fl fp8':>8}{'%fl q8':>7}"
             f"{'%fl q4':>7}"]
    for (model, _, _, _, n, depth), by in _by_cell(rows).items():
        t = [_num(by.get(f), "p50_us") for f in FORMATS]
        x = [_num(by.get(f), "speedup_vs_f16") for f in QUANTIZED]
        pf = [_num(by.get(f), "pct_floor") for f in FORMATS]
        lines.append(f"{model:<17}{n:>4}{depth:>7}"
                     + "".join("—".rjust(8) if v is None else f"{v:8.1f}" for v in t)
                     + "".join("—".rjust(7) if v is None else f"{v:7.2f}" for v in x)
                     + "".join("—".rjust(8 if i < 2 else 7) if v is None
                               else f"{v:{8 if i < 2 else 7}.0f}" for i, v in enumerate(pf)))
    return "\n".join(lines)


def write_markdown(csv_path, rows, meta: dict) -> Path:
    """`<csv stem>.md`: provenance, how to read it, the per-cell table and rows not timed."""
    md = [f"# skattn quantized K/V: {Path(csv_path).name}", "",
          f"Provenance: {meta.get('gpu')}, {meta.get('sms')} SMs, torch {meta.get('torch')}, "
          f"triton {meta.get('triton')}, commit {meta.get('commit')}; copy bandwidth "
          f"{meta.get('copy_GBps', 0):.0f} GB/s, f16 matmul {meta.get('matmul_TFLOPs', 0):.0f} "
          f"TFLOP/s (measured in the run).", "",
          "Per-layer time (p50 µs) from one CUDA graph of "
          f"{meta.get('layers')} layers, each with its own inputs, after an L2 flush; causal, "
          "batch 1, q/out f16. Floors: bytes (K/V at 2 B (f16), 1 B (fp8), 34/32 B (q8_0), "
          "18/32 B (q4_0) a value, plus q and out) over the copy bandwidth, or flops over the "
          "matmul peak, whichever is larger; % floor = floor / p50. fp8: float8_e4m3fn with "
          "one f32 scale per KV head. Every row is checked against float64 on the dequantized "
          "K/V (err); the last column is the error against float64 on the unquantized f16 K/V "
          "(reported, not checked).", "", markdown_table(rows)]
    md += not_timed(rows, lambda r: f"{r['format']} {r['model']} n={r['n']} L={r['depth']}")
    if meta.get("stopped_early"):
        md += ["", f"Stopped early: {meta['stopped_early']}."]
    path = Path(csv_path).with_suffix(".md")
    path.write_text("\n".join(md) + "\n")
    return path
