"""`skattn bench --e2e`: tokens/s of a whole transformers model, skattn vs SDPA.

A random-initialised model of llama-8b's shape (32 layers, 32/8 heads of 128, f16; no weights
are downloaded) runs one step of `n` new tokens over a KV cache of `depth` tokens, as
llama-bench's `-d depth` does: tokens/s = n / step time. The step leaves the cache as it
found it (it writes its n tokens after the depth ones each time), so every repeat, and a
CUDA graph of it, does the same work. Providers: transformers' "sdpa", skattn registered
per policy ("skattn-llamacpp-before", ...), and skattn over a quantized KV cache:
"skattn-fp8:<policy>" (skattn.bench.e2e_fp8: 1-byte K/V with per-KV-head scales) and
"skattn-q8_0:<policy>" (skattn.bench.e2e_q8_0: llama.cpp's q8_0 blocks). Modes:
"eager" calls the model as transformers users do (the mask built each step); "graph" replays
a CUDA graph of the same step (the model's layers, embedding, norm and LM head, the mask
built once before capture).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from skattn.bench.e2e_model import (FP8, Q8_0, FixedDepthCache, Step, build_model,
                                     implementation, reference, rel_err)

NS = (1, 2, 4, 8, 16, 512)
DEPTHS = (8192, 16384, 32768)
QUICK_NS, QUICK_DEPTHS = (1, 16, 512), (16384,)
PROVIDERS = ("sdpa", "skattn:llamacpp-before", "skattn:llamacpp", "skattn:auto", "skattn-fp8:auto",
             "skattn-q8_0:auto")
MODES = ("eager", "graph")
# llama-3.1-8b's shape (the seed grid's llama-8b attention: 32/8 heads, head size 128)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
COLUMNS = ("provider", "policy", "mode", "model", "layers", "dtype", "n", "depth", "status",
           "err", "tol", "p20_ms", "p50_ms", "p80_ms", "tokens_per_s", "reps", "gpu", "sms",
           "torch", "triton", "transformers", "commit", "timestamp")
# relative error of the last token's logits vs SDPA's above which a row is marked wrong
# (a random 32-layer model in f16: rounding alone stays far below it); quantized rows add the
# effect of their rounding of K/V, measured per cell (skattn.bench.e2e_quant.QuantizedDepth.bound)
WRONG_ABOVE = 0.1
# the quantized K/V provider kinds: their caches at one depth (a QuantizedDepth subclass),
# as (module, class), imported when a run has the kind (they need transformers)
QUANTIZED_DEPTHS = {FP8: ("skattn.bench.e2e_fp8", "FP8Depth"),
                    Q8_0: ("skattn.bench.e2e_q8_0", "Q8_0Depth")}


@dataclass(frozen=True)
class E2EOptions:
    """What to run: the grid, the providers and modes, the model's shape and the repeats."""

    ns: tuple[int, ...] = NS
    depths: tuple[int, ...] = DEPTHS
    providers: tuple[str, ...] = PROVIDERS
    modes: tuple[str, ...] = MODES
    dtype: str = "float16"
    shape: dict = field(default_factory=lambda: dict(LLAMA_8B))
    model: str = "llama-8b"
    warmup: int = 3
    reps: int = 20
    seed: int = 0
    progress: bool = True
    time_limit_s: float | None = None


def capture(fn, warmup: int):
    """A CUDA graph of `fn` (warmed up on the capture stream first, so that every buffer a
    call allocates once, such as skattn's workspace, exists before capture); returns
    (replay, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph.replay, out, graph


def time_steps(fn, *, warmup: int, reps: int, cuda: bool) -> list[float]:
    """Seconds per call of `fn`, each call timed alone (CUDA events on a GPU, back to back:
    host time shows where the host is slower than the GPU)."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    s = sorted(times)

    def q(p):
        i = p * (len(s) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return q(0.2), q(0.5), q(0.8)


def _provenance(device) -> dict:
    import transformers
    import triton

    from skattn.bench.run import commit

    cuda = torch.device(device).type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
            "sms": torch.cuda.get_device_properties(device).multi_processor_count if cuda else "",
            "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "commit": commit()}


class _Lines:
    """Progress as one stderr line per row, where tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done, self.desc = total, 0, ""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {self.desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total)
    return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)


def _measure(step: Step, mode: str, opts: E2EOptions, cuda: bool, ref,
             bound: float | None = WRONG_ABOVE) -> dict:
    """Time one (provider, mode) on one cell, checked against `ref` within `bound` (None: not
    checked); never raises."""
    row = {"status": "ok", "tol": "" if bound is None else f"{bound:.3e}"}
    graph = None
    try:
        with torch.no_grad():
            if mode == "eager":
                fn, out = step.eager, step.eager()
            else:
                if not cuda:
                    raise RuntimeError("CUDA graphs need a GPU")
                mask = step.mask()
                fn, out, graph = capture(lambda: step.graph_step(mask), opts.warmup)
                fn()
            if cuda:
                torch.cuda.synchronize()
            err = rel_err(out[:, -1], ref) if ref is not None else math.nan
            row["err"] = f"{err:.3e}" if ref is not None else ""
            if ref is not None and bound is not None and not err <= bound:
                row["status"] = (f"wrong: last-token logits {err:.3e} from sdpa eager's "
                                 f"(bound {bound:.3g})")
                return row
            if not torch.isfinite(out).all():
                row["status"] = "wrong: logits not finite"
                return row
            times = time_steps(fn, warmup=opts.warmup, reps=opts.reps, cuda=cuda)
        p20, p50, p80 = _quantiles(times)
        row.update(p20_ms=f"{p20 * 1e3:.4f}", p50_ms=f"{p50 * 1e3:.4f}", p80_ms=f"{p80 * 1e3:.4f}",
                   tokens_per_s=f"{step.ids.shape[1] / p50:.2f}", reps=opts.reps)
    except Exception as exc:  # one failing configuration must not stop the run
        lines = str(exc).strip().splitlines()
        row["status"] = f"error: {type(exc).__name__}: {lines[0][:300] if lines else ''}"
    finally:
        del graph
    return row


def run_e2e(opts: E2EOptions, *, out_dir, tag: str, device=None) -> tuple[Path, Path, list[dict]]:
    """Run every (depth, n, provider, mode); write `e2e-<tag>.csv` row by row and `e2e-<tag>.json`.

    Parameters
    ----------
    opts : E2EOptions
    out_dir : str or Path
    tag : str
        File-name tag.
    device : torch.device, optional
        Default: the current CUDA GPU (the interpreter's CPU where there is none).

    Returns
    -------
    (Path, Path, list of dict)
        The CSV, the JSON and the rows written.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = getattr(torch, opts.dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"e2e-{tag}.csv", out_dir / f"e2e-{tag}.json"
    start = time.monotonic()
    prov = _provenance(device)
    names = {p: implementation(p) for p in opts.providers}
    quantized_names = {}  # kind -> its first provider's implementation (set to make its caches)
    for p in opts.providers:
        kind = p.partition(":")[0]
        if kind in QUANTIZED_DEPTHS:
            quantized_names.setdefault(kind, names[p])
    torch.manual_seed(opts.seed)
    model = build_model(opts.shape, dtype, device)
    meta = {**prov, "options": asdict(opts), "cuda": torch.version.cuda, "csv": csv_path.name,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "semantics": "one step of n tokens over depth cached tokens (attends to depth + n); "
                         "tokens/s = n / p50 step time; logits of the last token only"}
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    cfg = model.config
    rows: list[dict] = []
    total = len(opts.depths) * len(opts.ns) * len(opts.providers) * len(opts.modes)
    bar = _progress(total, opts.progress)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for depth in opts.depths:
            if opts.time_limit_s and time.monotonic() - start > opts.time_limit_s:
                meta["stopped_early"] = f"time limit {opts.time_limit_s:g} s before depth {depth}"
                break
            cache = FixedDepthCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                    depth, max(opts.ns), dtype=dtype, device=device,
                                    seed=opts.seed + depth)
            # kind -> its caches at this depth; its step and bound per n where they were made
            quantized = {kind: depth_class(kind)(model, cache, name)
                         for kind, name in quantized_names.items()}
            for n in opts.ns:
                step = Step(model, cache, n, opts.seed + n)
                ref = reference(model, step)
                steps = {kind: q.step(model, n, opts.seed + n)
                         for kind, q in quantized.items() if q.error is None}
                bounds = {kind: quantized[kind].bound(model, n, opts.seed + n, ref)
                          for kind in steps}
                for provider in opts.providers:
                    model.set_attn_implementation(names[provider])
                    kind, _, policy = provider.partition(":")
                    for mode in opts.modes:
                        if bar is not None:
                            bar.set_description(f"n={n} L={depth} {provider} {mode}")
                        if kind not in quantized:
                            row = _measure(step, mode, opts, cuda, ref)
                        elif kind in steps:
                            row = _measure(steps[kind], mode, opts, cuda, ref, bounds[kind])
                        else:
                            row = {"status": quantized[kind].error}
                        row.update(provider=kind, policy=policy, mode=mode, model=opts.model,
                                   layers=cfg.num_hidden_layers, dtype=opts.dtype, n=n,
                                   depth=depth, timestamp=datetime.now(timezone.utc).isoformat(
                                       timespec="seconds"), **prov)
                        writer.writerow(row)
                        f.flush()
                        rows.append(row)
                        if bar is not None:
                            bar.update()
                del step, steps
            del cache, quantized
            if cuda:
                torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    meta.update(elapsed_s=round(time.monotonic() - start, 1), rows=len(rows))
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path, json_path, rows


def depth_class(kind: str):
    """The QuantizedDepth subclass of a quantized provider kind (`QUANTIZED_DEPTHS`)."""
    module, name = QUANTIZED_DEPTHS[kind]
    return getattr(importlib.import_module(module), name)


def _ints(text, default):
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else default


def options_from_args(args, **extra) -> E2EOptions:
    """E2EOptions from `skattn bench` arguments (--quick, --n, --depth, --providers, --reps,
    --warmup, --seed, --time-limit, --no-progress)."""
    quick = getattr(args, "quick", False)
    providers = getattr(args, "providers", None)
    return E2EOptions(
        ns=_ints(getattr(args, "n", None), QUICK_NS if quick else NS),
        depths=_ints(getattr(args, "depth", None), QUICK_DEPTHS if quick else DEPTHS),
        providers=tuple(p.strip() for p in providers.split(",")) if providers else PROVIDERS,
        warmup=getattr(args, "warmup", None) or (2 if quick else 3),
        reps=getattr(args, "reps", None) or (10 if quick else 20),
        seed=getattr(args, "seed", 0) or 0, progress=not getattr(args, "no_progress", False),
        time_limit_s=getattr(args, "time_limit", None), **extra)


def run(args: argparse.Namespace, **extra) -> int:
    """`skattn bench --e2e`: run, write CSV + JSON + markdown + plot, print the table (with
    --report: only the tables and plot from earlier CSVs)."""
    from skattn.bench.e2e_report import e2e_report

    if getattr(args, "report", None):  # no run: tables and plot from these CSVs
        tag = getattr(args, "tag", None)
        print(e2e_report(args.report, out_dir=getattr(args, "out", None),
                         stem=tag and f"e2e-{tag}"))
        return 0
    if not torch.cuda.is_available() and extra.get("model") != "tiny":
        print("skattn bench --e2e: needs a CUDA GPU (a 16 GB model; `python -m skattn.bench.e2e "
              "--tiny` runs a small model under the Triton interpreter)", file=sys.stderr)
        return 2
    try:
        opts = options_from_args(args, **extra)
        for p in opts.providers:
            implementation(p)
    except (ValueError, ImportError) as exc:
        print(f"skattn bench --e2e: {exc}", file=sys.stderr)
        return 2
    out = Path(getattr(args, "out", None) or os.environ.get("OUT") or "benchmarks/results")
    tag = getattr(args, "tag", None) or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    csv_path, json_path, rows = run_e2e(opts, out_dir=out, tag=tag)
    print(e2e_report([csv_path]))
    stem = csv_path.with_suffix("")
    written = [csv_path, json_path] + [p for p in (Path(f"{stem}.md"), Path(f"{stem}.png")) if p.exists()]
    print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(rows)} rows not timed (wrong or error): see the CSV's status")
    return 0


# a model small enough for the Triton interpreter on a CPU (the harness, not a speed); heads
# of 32, the smallest a q8_0 cache holds (one block a head)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def main(argv: list[str] | None = None) -> int:
    """`python -m skattn.bench.e2e [--tiny] [--dtype bfloat16] [--layers L] [bench options]`."""
    parser = argparse.ArgumentParser(prog="python -m skattn.bench.e2e", description=__doc__)
    for name in ("--n", "--depth", "--providers", "--out", "--tag"):
        parser.add_argument(name)
    for name in ("--reps", "--warmup", "--seed", "--layers"):
        parser.add_argument(name, type=int)
    parser.add_argument("--time-limit", type=float)
    parser.add_argument("--report", nargs="+", metavar="CSV", help="no run: tables from CSVs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer toy model (runs on a CPU under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    shape = dict(TINY if args.tiny else LLAMA_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    extra = dict(dtype=args.dtype, shape=shape, model="tiny" if args.tiny else "llama-8b")
    if args.tiny and not torch.cuda.is_available():
        extra["modes"] = ("eager",)
    return run(args, **extra)


if __name__ == "__main__":
    sys.exit(main())
