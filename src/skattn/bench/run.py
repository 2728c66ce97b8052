"""The timed loop over cells and providers: check against float64, time, one CSV row each.

Two timers (`RunOptions.timer`): "graph" (default) times one CUDA graph of NL layers' calls,
each layer with its own inputs, and reports replay time / NL (`skattn.bench.graph`); "event"
times one call between CUDA events. Both flush L2 before each timed run.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from skattn.bench.floors import cell_bytes, cell_flops, floor_us, pct_floor
from skattn.bench.graph import DEFAULT_LAYERS, TIMERS, References
from skattn.bench.grid import Cell
from skattn.bench.providers import BuildOptions, Provider, reference, relative_error
from skattn.bench.records import record

COLUMNS = ("provider", "variant", "policy", "fixup", "model", "hq", "hkv", "d", "n", "depth",
           "programs", "status", "err", "p20_us", "p50_us", "p80_us", "floor_us", "pct_floor",
           "bytes", "flops", "reps", "timer", "layers", "gpu", "sms", "torch", "triton", "commit",
           "flush", "timestamp")
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2}
LAYER_SEED_STRIDE = 1_000_003  # layer i of a cell draws its inputs from seed + i * stride


@dataclass(frozen=True)
class RunOptions:
    """How to measure: timer, repeats, the plans' grid size, the seed and a wall-clock budget.

    `timer` is "graph" (replay of one CUDA graph of `layers` calls / `layers`) or "event"
    (one call between CUDA events); `layers` is used by the graph timer only.
    """

    warmup: int = 10
    reps: int = 100
    sms: int | None = None
    occupancy: int | None = None
    seed: int = 0
    time_limit_s: float | None = None
    quick: bool = False
    progress: bool = True
    flush: str = "read"
    timer: str = "graph"
    layers: int = DEFAULT_LAYERS

    def __post_init__(self):
        if self.timer not in TIMERS:
            raise ValueError(f"timer must be one of {TIMERS}, got {self.timer!r}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")

    @property
    def n_layers(self) -> int:
        """Layers (each with its own inputs) a cell needs: `layers` for the graph timer, else 1."""
        return self.layers if self.timer == "graph" else 1


def commit() -> str:
    """$SKATTN_COMMIT when set (a copied tree may carry a stale .git), else `git describe
    --always --dirty` of the checkout, else 'unknown'."""
    if os.environ.get("SKATTN_COMMIT"):
        return os.environ["SKATTN_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def provenance(sms: int) -> dict:
    """GPU, versions and commit stamped on every row."""
    import triton

    return {"gpu": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit()}


class _Lines:
    """Progress as one stderr line per step, where tqdm is not installed."""

    def __init__(self, total: int, disable: bool):
        self.total, self.done, self.disable, self.desc = total, 0, disable, ""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self) -> None:
        self.done += 1
        if not self.disable:
            print(f"[{self.done}/{self.total}] {self.desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool):
    """tqdm on stderr when installed, else one stderr line per step; silent when not `enabled`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, not enabled)
    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="run", dynamic_ncols=True)


def error_status(exc: BaseException) -> str:
    """'error: <type>: <first line>' for a CSV status."""
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0][:300] if text else ''}"


def _inputs(cell: Cell, seed: int, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, cell.n, cell.hq, cell.d, generator=g, device="cuda", dtype=dtype)
    k = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g, device="cuda", dtype=dtype)
    v = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g, device="cuda", dtype=dtype)
    return q, k, v


def layer_inputs(cell: Cell, seed: int, n_layers: int, first=None) -> list[tuple]:
    """Inputs of `n_layers` layers, each drawn from its own seed; `first` replaces layer 0's."""
    first = first if first is not None else _inputs(cell, seed)
    return [first] + [_inputs(cell, seed + LAYER_SEED_STRIDE * i) for i in range(1, n_layers)]


def eager_check(fn, ref, dtype, row: dict) -> bool:
    """Run `fn` once and compare with `ref`: sets row's err, and its status when wrong."""
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    err = relative_error(out, ref)
    del out
    row["err"] = f"{err:.3e}"
    if err > TOLERANCE[dtype]:
        row["status"] = f"wrong: relative error {err:.3e} > {TOLERANCE[dtype]:g}"
        return False
    return True


def failure_status(exc: BaseException) -> str:
    """The CSV status of a measurement that raised: 'not capturable: <why>' (no CUDA graph of
    the call), 'wrong: <why>' (an output failed its check after a replay), else `error_status`."""
    from skattn.bench import graph

    if isinstance(exc, graph.NotCapturable):
        return f"not capturable: {exc}"
    if isinstance(exc, graph.WrongOutput):
        return f"wrong: {exc}"
    return error_status(exc)


def timed(row: dict, t) -> dict:
    """`row` with the quantiles of the timing `t` (µs) and its repetitions."""
    row.update(p20_us=f"{t.p20:.3f}", p50_us=f"{t.p50:.3f}", p80_us=f"{t.p80:.3f}", reps=t.reps)
    return row


def measure(provider: Provider, cell: Cell, q, k, v, ref, timer, opts: RunOptions) -> dict:
    """Build, check against `ref`, then time one call of one provider on one cell (event
    timer); never raises."""
    row = {"provider": provider.name, "variant": provider.variant, "status": "ok"}
    try:
        built = provider.build(cell, q, k, v, BuildOptions(opts.sms, opts.occupancy))
        row.update(policy=built.policy, fixup=built.fixup, programs=built.programs or "")
        if not eager_check(built.fn, ref, k.dtype, row):
            return row
        timed(row, timer.time(built.fn, warmup=opts.warmup, reps=opts.reps))
    except Exception as exc:  # an unsupported config must not stop the run
        row["status"] = error_status(exc)
    return row


def measure_graph(provider: Provider, cell: Cell, layers: list[tuple], refs: References, timer,
                  opts: RunOptions) -> dict:
    """The graph timer for one provider on one cell; never raises.

    Builds one call per layer (each on its own inputs), checks layer 0 run eagerly, captures
    all layers in one CUDA graph, poisons every output and checks the first and last layer
    after a replay, then times replays (`graph.time_graph`: per-layer quantiles). A provider
    whose call cannot be captured gets the status "not capturable: <why>".
    """
    from skattn.bench import graph

    row = {"provider": provider.name, "variant": provider.variant, "status": "ok"}
    dtype = layers[0][1].dtype
    try:
        bopts = BuildOptions(opts.sms, opts.occupancy)
        built = [provider.build(cell, q, k, v, bopts) for q, k, v in layers]
        row.update(policy=built[0].policy, fixup=built[0].fixup, programs=built[0].programs or "")
        if not eager_check(built[0].fn, refs.get(0, provider.causal), dtype, row):
            return row
        try:
            g, outs = graph.capture([b.fn for b in built])
        except graph.NotCapturable as exc:
            row["status"] = f"not capturable: {exc}"
            return row
        err = graph.check_replay(g, outs, refs.checked(provider.causal), TOLERANCE[dtype],
                                 relative_error)
        row["err"] = f"{max(err, float(row['err'])):.3e}"
        timed(row, graph.time_graph(g, len(built), timer, warmup=opts.warmup, reps=opts.reps))
    except Exception as exc:  # an unsupported config must not stop the run
        row["status"] = failure_status(exc)
    return row


def _measure_cell(provider: Provider, cell: Cell, layers, refs: References, timer,
                  opts: RunOptions) -> dict:
    try:
        ref = refs.get(0, provider.causal)
    except Exception as exc:  # e.g. out of memory: nothing on this cell can be checked
        return {"provider": provider.name, "variant": provider.variant,
                "status": "error: reference: " + error_status(exc)[len("error: "):]}
    if opts.timer == "graph":
        return measure_graph(provider, cell, layers, refs, timer, opts)
    q, k, v = layers[0]
    return measure(provider, cell, q, k, v, ref, timer, opts)


def run_grid(cells: list[Cell], providers: list[Provider], *, out_dir, tag: str,
             opts: RunOptions, notes: list[str] | None = None) -> tuple[Path, Path, list[dict]]:
    """Time every provider on every cell; write `bench-<tag>.csv` row by row and `bench-<tag>.json`.

    Parameters
    ----------
    cells : list of Cell
    providers : list of Provider
    out_dir : str or Path
    tag : str
        File-name tag.
    opts : RunOptions
    notes : list of str, optional
        Lines stored in the JSON (for example skipped providers).

    Returns
    -------
    (Path, Path, list of dict)
        The CSV, the JSON and the rows written.
    """
    from skattn.bench.timing import ColdTimer, measure_ceilings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"bench-{tag}.csv", out_dir / f"bench-{tag}.json"
    sms = opts.sms or torch.cuda.get_device_properties(0).multi_processor_count
    opts = RunOptions(**{**asdict(opts), "sms": sms})
    start = time.monotonic()
    timer = ColdTimer(flush=opts.flush)
    ceilings = measure_ceilings(timer, quick=opts.quick)
    prov = {**provenance(sms), "flush": opts.flush, "timer": opts.timer, "layers": opts.n_layers}
    meta = {**prov, "copy_GBps": ceilings.copy_bytes_per_s / 1e9,
            "matmul_TFLOPs": ceilings.matmul_flops_per_s / 1e12, "flush_bytes": timer.flush_bytes,
            "cuda": torch.version.cuda, "options": asdict(opts), "cells": len(cells),
            "providers": [p.label for p in providers], "notes": notes or [],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "csv": csv_path.name}
    json_path.write_text(json.dumps(meta, indent=1) + "\n")

    rows: list[dict] = []
    done = 0
    bar = progress_bar(len(cells) * len(providers), opts.progress)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for cell in cells:
            if opts.time_limit_s and time.monotonic() - start > opts.time_limit_s:
                meta["stopped_early"] = f"time limit {opts.time_limit_s:g} s: {done} of {len(cells)} cells"
                break
            nbytes, flops = cell_bytes(cell.hq, cell.hkv, cell.d, cell.n, cell.depth), cell_flops(
                cell.hq, cell.d, cell.n, cell.depth)
            floor = floor_us(nbytes, flops, ceilings)
            layers = layer_inputs(cell, opts.seed + done, opts.n_layers)
            refs = References(layers, reference)
            for provider in providers:
                bar.set_description(f"{cell.model} n={cell.n} L={cell.depth} {provider.label}")
                row = _measure_cell(provider, cell, layers, refs, timer, opts)
                p50 = float(row["p50_us"]) if "p50_us" in row else None
                row.update(floor_us=f"{floor:.4f}", bytes=nbytes, flops=flops,
                           pct_floor=f"{pct_floor(floor, p50):.4g}" if p50 else "")
                record(row, cell, prov, writer, f, rows, bar)
            del layers, refs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            done += 1
    bar.close()
    meta.update(elapsed_s=round(time.monotonic() - start, 1), cells_done=done)
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path, json_path, rows
