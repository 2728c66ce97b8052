"""A/B of skattn's prompt-chunk kernels on a Hopper GPU, in one run.

    PYTHONPATH=src python3 tools/prefill_ab.py [--quick] [--dtypes f16,bf16] [--models M,...]
        [--layers 4] [--reps 10] [--workers N] [--plan-only]

Cells: the seed grid's n = 512 cells (five model shapes x L = 8192, 16384, 32768) and chunks
of n = 128, 1024, 2048 at L = 32768, in f16 and bf16 (`--quick`: 3 cells). Per cell and dtype:

1. Check (in parallel worker processes, which also compile every kernel into Triton's cache):
   every skattn variant once on seeded inputs, output poisoned with NaN, against attention
   in float32 (torch SDPA, math back end); a variant that fails is not timed. Each worker
   is its own process, so a compiler crash costs one cell's row, not the run.
2. Time (this process): per provider a CUDA graph of `--layers` calls, each layer with its
   own q/K/V/out (cold), replayed after an L2 flush (`skattn.bench.graph`); per-layer time =
   replay / layers. The replay is first checked against the direct call. The providers'
   replays are interleaved, `--reps` rounds of one each (`interleaved`).
   Also timed: SDPA cuDNN *without* a mask (attention over every key: a lower bound on its
   causal time, labelled so) and the matmul peak (torch.mm, 8192^3, same dtype), which
   gives % of peak = 4 Hq n L D / time / peak (the causal triangle not subtracted, as in
   `skattn bench`).

Variants: `base` (the stream-K kernel where a Tuning names no other), `auto` (no Tuning:
what a call without a plan runs), `tma` (kernels/prefill.py:
K/V through tensor descriptors, the plan's default geometry), `tma-alt` (another block
size), `ws` (kernels/prefill_ws.py: Gluon, a TMA loader warp and two consumer
warpgroups), `ws-alt` (128-key blocks at head size 64), `ws-pp` (`ws-alt` with the consumer
warpgroups' ping-pong); `--variants` picks some. Timed only where named: `ws-sum` and
`ws-nosum` (`ws-alt` with the rows' sums of P by MMA, or by additions) and `ws@N`, `ws` on N
programs (`auto` still picks the fixup; at head size 64 in 128-key blocks), and
`KERNEL/D:key=value:...`, a kernel with plan overrides at head size D (`prefill_variants.custom`: e.g.
`base/128:block_n=128:num_stages=3`). `--cells model:n:L,...` picks cells.

Writes $OUT/prefill_ab.csv and $OUT/prefill_ab.json (provenance, ceilings, compile counts),
prefill_ab-report.md and .png (`skattn bench --report prefill_ab.csv` redraws them: % of peak
per cell, the targets met) and prints a compact table last. `--plan-only` (no GPU) prints every plan and the number of
distinct kernels the run compiles.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import skattn
from skattn import launch, prefill_launch
from skattn.bench.models import MODELS
from skattn.device import interpreting

from prefill_variants import VARIANTS, Variant, chosen

DEPTHS = (8192, 16384, 32768)
CHUNKS = (128, 1024, 2048)  # at L = 32768
QUICK = (("llama-8b", 512, 16384), ("gpt-oss", 512, 32768), ("qwen3-14b", 2048, 32768))
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative error vs float32
SEED = 1234
LAYER_SEED = 1_000_003
COLUMNS = ("model", "hq", "hkv", "d", "n", "L", "dtype", "provider", "variant", "kernel",
           "policy", "programs", "fixup", "block_n", "warps", "stages", "occupancy", "status",
           "err", "p20_us", "p50_us", "p80_us", "tflops", "pct_peak", "cudnn_nomask_over",
           "timer", "layers")


def cells(models=None, quick=False, picked: str = "") -> list[tuple[str, int, int]]:
    """The cells of a run: `picked` ("model:n:L,..."), --quick's, or the grid's."""
    if picked:
        out = []
        for item in picked.split(","):
            model, n, L = item.split(":")
            if model not in MODELS:
                raise SystemExit(f"unknown model {model!r}; known: {list(MODELS)}")
            out.append((model, int(n), int(L)))
        return out
    if quick:
        return [c for c in QUICK if not models or c[0] in models]
    names = models or tuple(MODELS)
    out = [(m, 512, L) for m in names for L in DEPTHS]
    return out + [(m, n, 32768) for m in names for n in CHUNKS]


def shape_of(model) -> tuple[int, int, int]:
    """(Hq, Hkv, D) of a model name, or of an (Hq, Hkv, D) tuple (tests)."""
    return tuple(model) if isinstance(model, (tuple, list)) else MODELS[model][:3]


def make_plan(model, n: int, L: int, dtype, variant: Variant, sms=None, occupancy=None,
              block_n=None):
    """The plan of one variant on one cell (policy auto, causal, batch 1); `sms`,
    `occupancy` and `block_n` for planning without that GPU (tests, --plan-only)."""
    Hq, Hkv, D = shape_of(model)
    kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=dtype,
              causal=True, sms=sms, occupancy=occupancy,
              tuning=(None if variant.prefill is None
                      else skattn.Tuning(prefill=variant.prefill, **variant.tuning)))
    geo = dict(variant.geometry.get(D, {}))
    if block_n:
        geo["block_n"] = block_n
    return skattn.plan(**kw, **geo)


def kernel_of(p) -> tuple[str, str]:
    """(kernel the plan runs on sm_90, why not the variant's kernel or '')."""
    why = prefill_launch.refusal(p)
    if why is not None:
        return "base", ("" if p.tuning.prefill == "base" else why)
    if p.tuning.prefill == "ws" and interpreting():
        return "base", "Gluon kernels do not run under the interpreter"
    return p.tuning.prefill, ""


def inputs(model, n, L, dtype, seed, device="cuda"):
    Hq, Hkv, D = shape_of(model)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, n, Hq, D, device=device, generator=g).to(dtype)
    k = torch.randn(1, L, Hkv, D, device=device, generator=g).to(dtype)
    v = torch.randn(1, L, Hkv, D, device=device, generator=g).to(dtype)
    return q, k, v


def reference_f32(q, k, v, rows: int = 512) -> torch.Tensor:
    """Bottom-right causal attention in float32 by torch SDPA's math back end, per KV head and
    `rows` query tokens at a time (the scores of a whole cell would not fit), [1, n, Hq, D]."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, Hq, L, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    r = Hq // Hkv
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    with sdpa_kernel([SDPBackend.MATH]):
        for g in range(Hkv):
            kg = k[0, :, g].float()[None, None].expand(1, r, L, -1)
            vg = v[0, :, g].float()[None, None].expand(1, r, L, -1)
            for i0 in range(0, n, rows):
                i1 = min(n, i0 + rows)
                qg = q[0, i0:i1, g * r:(g + 1) * r].float().permute(1, 0, 2)[None]
                pos = torch.arange(i0, i1, device=q.device)[:, None] + (L - n)
                mask = torch.arange(L, device=q.device)[None, :] <= pos
                o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
                out[0, i0:i1, g * r:(g + 1) * r] = o[0].permute(1, 0, 2)
    return out


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


# -- phase 1: a worker process checks (and so compiles) every variant of one cell and dtype
def worker(job: dict) -> list[dict]:
    """Check every variant on one cell and dtype. `job`: model, n, L, dtype; for tests also
    device, sms, occupancy, block_n."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, n, L, dname = job["model"], job["n"], job["L"], job["dtype"]
    dtype = DTYPES[dname]
    q, k, v = inputs(model, n, L, dtype, SEED, job.get("device", "cuda"))
    ref = reference_f32(q, k, v)
    rows = []
    for var in chosen(job.get("variants")):
        row = dict(variant=var.name, status="ok")
        try:
            p = make_plan(model, n, L, dtype, var, job.get("sms"), job.get("occupancy"),
                          job.get("block_n"))
            row["kernel"], _ = kernel_of(p)
            ws = skattn.workspace(p, device=q.device)
            out = torch.full_like(q, float("nan"))
            t0 = time.time()
            skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=ws)
            if out.is_cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.time() - t0, 2)
            row["err"] = rel_err(out, ref)
            if not row["err"] <= TOLERANCE[dtype]:
                row["status"] = (f"wrong: relative error {row['err']:.3e} > "
                                 f"{TOLERANCE[dtype]:g}")
        except Exception as exc:  # a variant that cannot run must not stop the others
            text = str(exc).strip().splitlines()
            row["status"] = f"error: {type(exc).__name__}: {text[0][:200] if text else ''}"
        rows.append(row)
        if job.get("stream"):  # one line a variant: a crash later keeps the rows before it
            print("ROW " + json.dumps(row), flush=True)
    return rows


def run_workers(jobs: list[dict], workers: int) -> dict:
    """{(model, n, L, dtype): rows} from one subprocess per job, `workers` at a time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])

    def one(job):
        model = job["model"] if isinstance(job["model"], str) else tuple(job["model"])
        key = (model, job["n"], job["L"], job["dtype"])
        try:
            res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                                 capture_output=True, text=True, env=env, timeout=300)
        except subprocess.TimeoutExpired:
            return key, [dict(variant=v.name, status="error: worker timed out (300 s)")
                         for v in chosen(job.get("variants"))]
        done = {}
        for line in res.stdout.splitlines():
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                done[row["variant"]] = row
        tail = " | ".join((res.stderr or "").strip().splitlines()[-3:])[:300]
        return key, [done.get(v.name) or dict(variant=v.name, status=f"error: worker exited "
                                              f"{res.returncode} before it: {tail}")
                     for v in chosen(job.get("variants"))]

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, jobs))


# -- phase 2: time in this process
def capture_variant(layers, plan):
    """A CUDA graph of one skattn call per layer, its replay checked against the direct call,
    and what it writes to (keep both alive while the graph may replay)."""
    from skattn.bench import graph

    ws = skattn.workspace(plan, device=layers[0][0].device)
    outs = [torch.empty_like(q) for q, _, _ in layers]
    fns = [(lambda q=q, k=k, v=v, o=o: skattn.attention(q, k, v, causal=True, plan=plan, out=o,
                                                        workspace=ws))
           for (q, k, v), o in zip(layers, outs)]
    direct = fns[0]().double().clone()
    g, gouts = graph.capture(fns)
    graph.check_replay(g, gouts, {0: direct}, 1e-6, lambda a, b: rel_err(a.double(), b))
    return g, (ws, outs, fns, gouts)


def capture_cudnn(model, n, L, layers):
    """A CUDA graph of SDPA's cuDNN back end without a mask, one call per layer, and what it
    writes to."""
    from skattn.bench import graph
    from skattn.bench.grid import Cell
    from skattn.bench.providers import BuildOptions, _sdpa_builder

    Hq, Hkv, D = MODELS[model][:3]
    cell = Cell(model, Hq, Hkv, D, n, L)
    build = _sdpa_builder("CUDNN_ATTENTION", masked=False)
    fns = [build(cell, q, k, v, BuildOptions()).fn for q, k, v in layers]
    g, outs = graph.capture(fns)
    g.replay()
    torch.cuda.synchronize()
    if not all(torch.isfinite(o).all() for o in outs):
        raise RuntimeError("cuDNN wrote non-finite values")
    return g, (fns, outs)


def interleaved(graphs, timer, layers: int, reps: int, warmup: int = 2) -> list:
    """Per-layer Timing of each graph: `reps` rounds of one cold replay each, every round
    starting one graph later. Every graph then sees the GPU's clocks and temperature of the
    whole run: timed one after another, the first timed ran up to 5% faster in the longest
    cells (same plan, H200)."""
    from skattn.bench.timing import summarize

    for g in graphs:
        for _ in range(warmup):
            g.replay()
    times = [[] for _ in graphs]
    for r in range(reps):
        for j in range(len(graphs)):
            i = (r + j) % len(graphs)
            times[i].append(timer.time(graphs[i].replay, warmup=0, reps=1).p50 / layers)
    return [summarize(t) for t in times]


def matmul_peak(timer, dtype, size=8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    t = timer.time(lambda: torch.mm(a, b), warmup=5, reps=20)
    return 2 * size ** 3 / (t.p50 * 1e-6)


def measure(args, cell_list, dnames, checked, out_dir: Path) -> tuple[list[dict], dict]:
    from skattn.bench.timing import ColdTimer

    timer = ColdTimer()
    peaks = {d: matmul_peak(timer, DTYPES[d]) for d in dnames}
    rows = []
    for model, n, L in cell_list:
        Hq, Hkv, D = MODELS[model][:3]
        flops = 4 * Hq * n * L * D
        for dname in dnames:
            dtype = DTYPES[dname]
            layers = [inputs(model, n, L, dtype, SEED + i * LAYER_SEED) for i in range(args.layers)]
            base = dict(model=model, hq=Hq, hkv=Hkv, d=D, n=n, L=L, dtype=dname, timer="graph",
                        layers=args.layers)
            timed, graphs = [], []  # rows; (row, (graph, its buffers)) of those to time
            cudnn = dict(base, provider="sdpa-cudnn-nomask", variant="no mask: lower bound",
                         kernel="cudnn", status="ok")
            try:
                graphs.append((cudnn, capture_cudnn(model, n, L, layers)))
            except Exception as exc:
                cudnn["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            timed.append(cudnn)
            for var, chk in zip(chosen(args.variants), checked[(model, n, L, dname)]):
                row = dict(base, provider="skattn", variant=var.name, kernel=chk.get("kernel", ""),
                           status=chk["status"], err=chk.get("err", ""))
                try:
                    p = make_plan(model, n, L, dtype, var)
                    g = p.geometry
                    row.update(policy=p.policy, programs=p.programs, fixup=p.fixup,
                               block_n=g.block_n, warps=g.num_warps, stages=g.num_stages,
                               occupancy=p.occupancy)
                    if row["status"] == "ok":
                        graphs.append((row, capture_variant(layers, p)))
                except Exception as exc:
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                timed.append(row)
            times = interleaved([g for _, (g, _) in graphs], timer, args.layers, args.reps)
            for (row, _), t in zip(graphs, times):
                row.update(p20_us=t.p20, p50_us=t.p50, p80_us=t.p80)
            del graphs
            for row in timed:
                if row.get("p50_us"):
                    row["tflops"] = flops / (row["p50_us"] * 1e-6) / 1e12
                    row["pct_peak"] = 100 * flops / (row["p50_us"] * 1e-6) / peaks[dname]
                    if cudnn.get("p50_us"):
                        row["cudnn_nomask_over"] = cudnn["p50_us"] / row["p50_us"]
            rows += timed
            del layers
            torch.cuda.empty_cache()
            _write_csv(out_dir / "prefill_ab.csv", rows)  # progress survives a timeout
            print(f"timed {model} n={n} L={L} {dname}", file=sys.stderr, flush=True)
    return rows, peaks


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def table(rows: list[dict]) -> str:
    """One line per cell and dtype: base, tma, the best skattn variant, % of peak, cuDNN."""
    lines = [f"{'cell':<28}{'dt':<5}{'base':>8}{'tma':>8}{'best':>8} {'(variant)':<10}"
             f"{'%pk b/best':>11}{'cudnn*':>8}{'best/base':>10}{'cudnn*/best':>12}"]
    keys = dict.fromkeys((r["model"], r["n"], r["L"], r["dtype"]) for r in rows)
    for key in keys:
        rs = [r for r in rows if (r["model"], r["n"], r["L"], r["dtype"]) == key]
        by = {r["variant"]: r for r in rs if r["provider"] == "skattn"}
        ok = [r for r in by.values() if r.get("p50_us")]
        cud = next((r for r in rs if r["provider"] != "skattn"), {})
        us = lambda r: f"{r['p50_us']:8.1f}" if r and r.get("p50_us") else f"{'-':>8}"
        best = min(ok, key=lambda r: r["p50_us"]) if ok else None
        b = by.get("base")
        pk = (f"{b['pct_peak']:.0f}/{best['pct_peak']:.0f}" if b and b.get("p50_us") and best
              else "-")
        ratio = (f"{b['p50_us'] / best['p50_us']:.2f}" if b and b.get("p50_us") and best else "-")
        vs = f"{cud['p50_us'] / best['p50_us']:.2f}" if cud.get("p50_us") and best else "-"
        lines.append(f"{key[0] + ' n=' + str(key[1]) + ' L=' + str(key[2]):<28}{key[3]:<5}"
                     f"{us(b)}{us(by.get('tma'))}{us(best)} {(best or {}).get('variant', '-'):<10}"
                     f"{pk:>11}{us(cud)}{ratio:>10}{vs:>12}")
    bad = [r for r in rows if r["status"] != "ok"]
    lines.append("cudnn* = SDPA cuDNN without a mask (attends to every key): a lower bound on its "
                 "causal time; times are p50 us per layer (graph timer, cold L2)")
    lines += [f"NOT OK: {r['model']} n={r['n']} L={r['L']} {r['dtype']} {r['variant']}: "
              f"{r['status']}" for r in bad]
    return "\n".join(lines)


def plan_only(cell_list, dnames, variants=VARIANTS) -> None:
    """Every plan, and the distinct kernels (compile-time constants and integer
    specialisations) the run compiles, without a GPU."""
    prefill_launch.interpreting = lambda: True  # bind as on sm_90
    keys = set()
    for model, n, L in cell_list:
        for var in variants:
            p = make_plan(model, n, L, torch.float16, var, sms=132, occupancy=2)
            kern, why = kernel_of(p)
            b = launch._bind(p, torch.device("cpu"))
            if kern == "ws":  # (not bound here: `bind` leaves it to the GPU)
                const = prefill_launch.ws_constants(p)
            else:
                const = b.prefill.const if kern != "base" and b.prefill else b.main_const
            spec = tuple(launch._spec(x) for x in (*b.main_ints, *b.fd))
            keys.add((kern, tuple(sorted(const.items())), spec))
            if b.fix_kernel:
                keys.add((b.fix_kernel, tuple(sorted(b.fix_const.items())), spec))
            g = p.geometry
            print(f"{model:<17} n={n:<5} L={L:<6} {var.name:<8} {kern:<7} N={p.programs:<4} "
                  f"{p.fixup:<8} {g.block_m}x{g.block_n} w{g.num_warps} s{g.num_stages} "
                  f"occ {p.occupancy} {why}")
    print(f"distinct kernels to compile: {len(keys)} per dtype, {len(keys) * len(dnames)} in all")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 cells")
    ap.add_argument("--models", default="", help="comma-separated model names")
    ap.add_argument("--cells", default="", help="model:n:L,... instead of the grid")
    ap.add_argument("--dtypes", default="f16,bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--variants", default="",
                    help=f"comma-separated, of {','.join(v.name for v in VARIANTS)} (default all)")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(dict(json.loads(args.worker), stream=True))
        return 0
    models = tuple(m for m in args.models.split(",") if m) or None
    cell_list = cells(models, args.quick, args.cells)
    dnames = [d for d in args.dtypes.split(",") if d]
    if args.plan_only:
        plan_only(cell_list, dnames, chosen(args.variants))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --plan-only)", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("OUT") or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = [dict(model=m, n=n, L=L, dtype=d, variants=args.variants)
            for m, n, L in cell_list for d in dnames]
    checked = run_workers(jobs, args.workers)
    t1 = time.time()
    print(f"checked {len(jobs)} cell-dtypes in {t1 - t0:.0f} s", file=sys.stderr, flush=True)
    rows, peaks = measure(args, cell_list, dnames, checked, out_dir)
    import triton

    from skattn.bench.run import commit

    prov = dict(command=" ".join([sys.executable, *sys.argv]), gpu=torch.cuda.get_device_name(),
                sms=torch.cuda.get_device_properties(0).multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, commit=commit(),
                matmul_peak_tflops={d: p / 1e12 for d, p in peaks.items()},
                check_s=round(t1 - t0, 1), time_s=round(time.time() - t1, 1),
                tolerance={str(k): v for k, v in TOLERANCE.items()}, seed=SEED,
                variants=[dict(name=v.name, prefill=v.prefill, geometry=v.geometry,
                               tuning=v.tuning)
                          for v in chosen(args.variants)],
                checks={" ".join(map(str, k)): v for k, v in checked.items()})
    _write_csv(out_dir / "prefill_ab.csv", rows)
    (out_dir / "prefill_ab.json").write_text(json.dumps(prov, indent=1, default=str))
    from skattn.bench.prefill_report import report  # prefill_ab-report.md and .png

    report([out_dir / "prefill_ab.csv"], out_dir)
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
