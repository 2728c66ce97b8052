"""The timed loop over cells and providers: check against float64, time, one CSV row each."""
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
from skattn.bench.grid import Cell
from skattn.bench.providers import BuildOptions, Provider, reference, relative_error

COLUMNS = ("provider", "variant", "policy", "fixup", "model", "hq", "hkv", "d", "n", "depth",
           "nblocks", "status", "err", "p20_us", "p50_us", "p80_us", "floor_us", "pct_floor",
           "bytes", "flops", "reps", "gpu", "sms", "torch", "triton", "commit", "flush",
           "timestamp")
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class RunOptions:
    """How to measure: repeats, the plans' grid size, the seed and a wall-clock budget."""

    warmup: int = 10
    reps: int = 100
    sms: int | None = None
    blocks_per_sm: int | None = None
    seed: int = 0
    time_limit_s: float | None = None
    quick: bool = False
    progress: bool = True
    flush: str = "read"


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


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, not enabled)
    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="run", dynamic_ncols=True)


def _error_status(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0][:300] if text else ''}"


def _inputs(cell: Cell, seed: int, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, cell.n, cell.hq, cell.d, generator=g, device="cuda", dtype=dtype)
    k = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g, device="cuda", dtype=dtype)
    v = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g, device="cuda", dtype=dtype)
    return q, k, v


def measure(provider: Provider, cell: Cell, q, k, v, ref, timer, opts: RunOptions) -> dict:
    """Build, check against `ref`, then time one provider on one cell; never raises."""
    row = {"provider": provider.name, "variant": provider.variant, "status": "ok"}
    try:
        built = provider.build(cell, q, k, v, BuildOptions(opts.sms, opts.blocks_per_sm))
        row.update(policy=built.policy, fixup=built.fixup, nblocks=built.nblocks or "")
        out = built.fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        err = relative_error(out, ref)
        del out
        row["err"] = f"{err:.3e}"
        if err > TOLERANCE[k.dtype]:
            row["status"] = f"wrong: relative error {err:.3e} > {TOLERANCE[k.dtype]:g}"
            return row
        t = timer.time(built.fn, warmup=opts.warmup, reps=opts.reps)
        row.update(p20_us=f"{t.p20:.3f}", p50_us=f"{t.p50:.3f}", p80_us=f"{t.p80:.3f}", reps=t.reps)
    except Exception as exc:  # an unsupported config must not stop the run
        row["status"] = _error_status(exc)
    return row


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
    prov = {**provenance(sms), "flush": opts.flush}
    meta = {**prov, "copy_GBps": ceilings.copy_bytes_per_s / 1e9,
            "matmul_TFLOPs": ceilings.matmul_flops_per_s / 1e12, "flush_bytes": timer.flush_bytes,
            "cuda": torch.version.cuda, "options": asdict(opts), "cells": len(cells),
            "providers": [p.label for p in providers], "notes": notes or [],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "csv": csv_path.name}
    json_path.write_text(json.dumps(meta, indent=1) + "\n")

    rows: list[dict] = []
    done = 0
    bar = _progress(len(cells) * len(providers), opts.progress)
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
            q, k, v = _inputs(cell, opts.seed + done)
            try:
                ref, ref_status = reference(q, k, v), None
            except Exception as exc:  # e.g. out of memory: nothing on this cell can be checked
                ref, ref_status = None, "error: reference: " + _error_status(exc)[len("error: "):]
            for provider in providers:
                bar.set_description(f"{cell.model} n={cell.n} L={cell.depth} {provider.label}")
                if ref is None:
                    row = {"provider": provider.name, "variant": provider.variant, "status": ref_status}
                else:
                    row = measure(provider, cell, q, k, v, ref, timer, opts)
                p50 = float(row["p50_us"]) if "p50_us" in row else None
                row.update(model=cell.model, hq=cell.hq, hkv=cell.hkv, d=cell.d, n=cell.n,
                           depth=cell.depth, floor_us=f"{floor:.4f}", bytes=nbytes, flops=flops,
                           pct_floor=f"{pct_floor(floor, p50):.4g}" if p50 else "",
                           timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), **prov)
                writer.writerow(row)
                f.flush()
                rows.append(row)
                bar.update()
            del q, k, v, ref
            torch.cuda.empty_cache()
            done += 1
    bar.close()
    meta.update(elapsed_s=round(time.monotonic() - start, 1), cells_done=done)
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path, json_path, rows
