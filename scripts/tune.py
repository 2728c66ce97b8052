"""Kernel tuning on a GPU: configs (BLOCK_N, warps, stages) and an exhaustive programs sweep.

    python3 scripts/tune.py [host] [breakdown] [configs [--prefill | --prefill-only | --prefill-bm]]
        [sweep [--quick | --coarse [--all [--n=4,8]]]] [prefill-fixup]

Writes CSVs to $OUT (or benchmarks/results): tune_configs.csv with each config's time and
compiled resources, sweep_programs.csv with the time of every N for some cells and what each
policy chose (`skattn calibrate --from-csv` fits `auto`'s cost model to it),
breakdown.csv with where decode time goes, prefill_fixup.csv (n = 512: the separate fixup
vs the fused one). `host` prints the host time of a planned call. Default: configs, sweep.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
import triton.testing

import skattn
from skattn.bench.models import MODELS
from skattn.planner import COMPUTE_BOUND_INTENSITY

OUT = Path(os.environ.get("OUT") or "benchmarks/results")
DECODE_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3),
                  (64, 8, 4)]
PREFILL_CONFIGS = [(64, 8, 2), (64, 8, 3), (128, 8, 2), (128, 8, 3), (128, 4, 2), (128, 4, 3),
                   (64, 4, 3), (64, 4, 4)]
DECODE_CELLS = [("llama-8b", 1, 32768), ("llama-8b", 16, 32768), ("qwen3-14b", 4, 16384),
                ("gpt-oss", 2, 16384)]
NBLOCKS = {1: 128, 2: 128, 4: 128, 16: 128}  # near the sweep's best N for decode cells
PREFILL_CELLS = [("gpt-oss", 512, 16384), ("llama-8b", 512, 8192), ("qwen3-14b", 512, 8192)]
# --prefill-bm: (BLOCK_M, BLOCK_N, warps, stages) per head size, the default first
PREFILL_BM_CONFIGS = {
    64: [(128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
}
PREFILL_BM_CELLS = [("gpt-oss", 512, 8192), ("llama-8b", 512, 8192), ("qwen3-14b", 512, 8192)]


def inputs(model, n, L, seed=0):
    Hq, Hkv, D = MODELS[model][:3]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n, Hq, D, device="cuda", generator=g, dtype=torch.float16)
    k = torch.randn(1, L, Hkv, D, device="cuda", generator=g, dtype=torch.float16)
    v = torch.randn(1, L, Hkv, D, device="cuda", generator=g, dtype=torch.float16)
    return q, k, v


_TIMER = None


def bench(fn, rep=60):
    """Cold-L2 device time (the bench's timer: the GPU is kept busy while launches queue)."""
    global _TIMER
    from skattn.bench.timing import ColdTimer

    _TIMER = _TIMER or ColdTimer()
    t = _TIMER.time(fn, warmup=5, reps=max(10, rep // 2))
    return t.p20, t.p50, t.p80


def host_overhead():
    """Host time of one planned call (validation + launches), launches not waited for."""
    q, k, v = inputs("llama-8b", 1, 16384)
    for policy, fixup in (("llamacpp", None), ("llamacpp-before", "fused")):
        p = skattn.plan(batch=1, q_len=1, kv_len=16384, q_heads=32, kv_heads=8, head_dim=128,
                        causal=True, policy=policy, fixup=fixup)
        out = skattn.attention(q, k, v, causal=True, plan=p)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            skattn.attention(q, k, v, causal=True, plan=p, out=out)
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"host time per planned call ({p.fixup}): {host:.1f} us", flush=True)


def floor_us(q, k, v, bw=4.3e12):
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * 2
    return nbytes / bw * 1e6


def configs(prefill=False, prefill_only=False, prefill_bm=False):
    rows = []
    cells = [] if prefill_only else [(c, DECODE_CONFIGS) for c in DECODE_CELLS]
    if prefill or prefill_only:
        cells += [(c, PREFILL_CONFIGS) for c in PREFILL_CELLS]
    if prefill_bm:
        cells = [(c, PREFILL_BM_CONFIGS[MODELS[c[0]][2]]) for c in PREFILL_BM_CELLS]
    for (model, n, L), cfgs in cells:
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        for cfg in cfgs:
            bm, bn, warps, stages = cfg if len(cfg) == 4 else (None, *cfg)
            p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                            causal=True, policy="llamacpp", block_m=bm, block_n=bn,
                            num_warps=warps, num_stages=stages, programs=NBLOCKS.get(n))
            t0 = time.time()
            try:
                out = skattn.attention(q, k, v, causal=True, plan=p)
                torch.cuda.synchronize()
                res = _resources()
                t = bench(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out))
                err = ""
            except Exception as e:  # noqa: BLE001 (a config the compiler refuses is a result)
                t, res, err = (float("nan"),) * 3, {}, repr(e)[:200]
            rows.append(dict(model=model, n=n, depth=L, block_n=bn, num_warps=warps,
                             num_stages=stages, block_m=p.geometry.block_m, programs=p.programs,
                             fixup=p.fixup, p20_us=t[0], p50_us=t[1], p80_us=t[2],
                             compile_s=round(time.time() - t0, 1), err=err, **res))
            print(f"{model:18s} n={n:<4d} L={L:<6d} bn={bn:<3d} w={warps} s={stages} "
                  f"{t[1]:8.1f} us  {res}  {err}", flush=True)
    _write("tune_configs.csv", rows)


def breakdown():
    """Where decode time goes: the timer's own floor, a copy of the same bytes, the main
    kernel alone, the whole call (main + fixup), for a few N."""
    from skattn import launch

    cells = [("llama-8b", 1, 8192), ("llama-8b", 1, 32768), ("qwen3moe-30b-a3b", 2, 8192)]
    rows = []
    for model, n, L in cells:
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        kv = torch.cat([k.flatten(), v.flatten()])
        kv2 = torch.empty_like(kv)
        base = dict(model=model, n=n, depth=L, floor_us=floor_us(q, k, v))
        t = bench(lambda: None)
        rows.append(dict(base, what="empty (timer floor)", p50_us=t[1]))
        t = bench(lambda: kv2.copy_(kv))
        rows.append(dict(base, what="copy K+V once (reads+writes 2x the bytes)", p50_us=t[1]))
        out = torch.empty(1, n, Hq, D, device="cuda", dtype=q.dtype)
        for N in (64, 128, 264):
            p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                            causal=True, programs=N)
            scale = D ** -0.5
            t_main = bench(lambda: launch.run(p, q, k, v, out, None, scale=scale, main_only=True))
            t_all = bench(lambda: launch.run(p, q, k, v, out, None, scale=scale))
            rows.append(dict(base, what=f"main kernel, N={N} {p.fixup}", p50_us=t_main[1]))
            rows.append(dict(base, what=f"main + fixup, N={N} {p.fixup}", p50_us=t_all[1]))
        for r in rows[-8:]:
            print(f"{model:18s} n={n} L={L:<6d} {r['what']:45s} {r['p50_us']:8.1f} us", flush=True)
    _write("breakdown.csv", rows)


def _resources():
    """Registers, spills and shared memory of the most recently compiled main kernel."""
    from skattn.kernels.attention import attention_kernel

    dev = torch.cuda.current_device()
    cache = attention_kernel.device_caches[dev][0]
    kernel = list(cache.values())[-1]
    return dict(n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared=kernel.metadata.shared)


COARSE_N = (33, 44, 66, 88, 99, 112, 128, 132, 144, 160, 176, 198, 220, 264, 330, 396, 528)
COARSE_CELLS = [("llama-8b", 1, 8192), ("llama-8b", 1, 32768), ("qwen3moe-30b-a3b", 2, 8192),
                ("qwen3moe-30b-a3b", 1, 32768), ("qwen3-14b", 4, 32768), ("gpt-oss", 1, 32768),
                ("gpt-oss", 8, 16384), ("llama-70b", 16, 16384)]


def grid_cells(ns):
    from skattn.bench.grid import select

    return [(c.model, c.n, c.depth) for c in select(ns=ns)]


def sweep(quick=False, coarse=False, every_cell=False, ns=(1, 2, 4, 8, 16)):
    """Every N (or COARSE_N with --coarse, uniform/general only) for a few cells (--all: the
    grid's cells, those of --n=4,8 only if given); prompt chunks also with one whole tile a
    program (N = ntiles_dst, fixup "none"). The CSV is rewritten after each
    cell, so a run stopped by a time limit keeps what it measured."""
    rows = []
    cells = [("llama-8b", 1, 16384), ("qwen3moe-30b-a3b", 2, 8192), ("qwen3-14b", 4, 32768),
             ("llama-70b", 16, 16384), ("gpt-oss", 1, 8192), ("llama-8b", 512, 8192)]
    if coarse:
        cells = grid_cells(ns) if every_cell else COARSE_CELLS
    for model, n, L in cells[: 3 if quick else None]:
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True)
        base = skattn.plan(policy="llamacpp-before", **kw)
        chosen = {pol: skattn.plan(policy=pol, **kw).programs
                  for pol in ("llamacpp-before", "llamacpp", "round-4x", "split", "auto")}
        top = min(base.work, 2 * base.max_programs)
        step = 1 if top <= 300 else 2
        out = torch.empty(1, n, Hq, D, device="cuda", dtype=q.dtype)
        ns = [x for x in COARSE_N if x <= base.work] if coarse else range(1, top + 1, step)
        points = [(N, fixup) for N in ns for fixup in ((None,) if coarse else (None, "fused"))]
        if n * Hq // Hkv >= COMPUTE_BOUND_INTENSITY:
            points.append((base.ntiles_dst, "none"))  # prompt chunks: one whole tile a program
        for N, fixup in points:
            p = skattn.plan(programs=N, fixup=fixup, **kw)
            if fixup == "fused" and p.fixup == "none":
                continue
            t = bench(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out), rep=40)
            rows.append(dict(model=model, n=n, depth=L, programs=N, fixup=p.fixup,
                             ntiles_dst=p.ntiles_dst, work=p.work, p20_us=t[0], p50_us=t[1],
                             p80_us=t[2], floor_us=floor_us(q, k, v),
                             **{f"chosen_{k}": c for k, c in chosen.items()}))
        best = min(r["p50_us"] for r in rows if r["model"] == model and r["n"] == n)
        print(f"sweep {model} n={n} L={L}: best {best:.1f} us; chosen {chosen}", flush=True)
        _write("sweep_programs.csv", rows)


def prefill_fixup():
    """n = 512 cells at auto's N: its separate fixup vs the fused one."""
    rows = []
    for model, n, L in grid_cells((512,)):
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True)
        out = torch.empty(1, n, Hq, D, device="cuda", dtype=q.dtype)
        for fixup in (None, "fused"):
            p = skattn.plan(fixup=fixup, **kw)
            t = bench(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out), rep=30)
            rows.append(dict(model=model, n=n, depth=L, programs=p.programs, fixup=p.fixup,
                             p20_us=t[0], p50_us=t[1], p80_us=t[2]))
            print(f"prefill {model} L={L} N={p.programs} {p.fixup:8s} {t[1]:7.1f} us", flush=True)
    _write("prefill_fixup.csv", rows)


def _write(name, rows):
    OUT.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(OUT / name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


STEPS = ("host", "breakdown", "configs", "sweep", "prefill-fixup")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="*", metavar="STEP", help=f"any of {', '.join(STEPS)}")
    ap.add_argument("--prefill", action="store_true", help="configs: prompt chunks too")
    ap.add_argument("--prefill-only", action="store_true", help="configs: prompt chunks only")
    ap.add_argument("--prefill-bm", action="store_true",
                    help="configs: BLOCK_M of prompt chunks per head size")
    ap.add_argument("--quick", action="store_true", help="sweep: the first 3 cells")
    ap.add_argument("--coarse", action="store_true",
                    help="sweep: 17 program counts, separate fixups only")
    ap.add_argument("--all", action="store_true", help="sweep --coarse: every grid cell")
    ap.add_argument("--n", default="1,2,4,8,16", help="sweep --all: the query counts")
    args = ap.parse_args(argv)
    steps = args.steps or ["configs", "sweep"]
    for step in steps:
        if step not in STEPS:
            ap.error(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if "host" in steps:
        host_overhead()
    if "breakdown" in steps:
        breakdown()
    if "configs" in steps:
        configs(args.prefill, args.prefill_only, args.prefill_bm)
    if "sweep" in steps:
        sweep(quick=args.quick, coarse=args.coarse, every_cell=args.all,
              ns=tuple(int(x) for x in args.n.split(",")))
    if "prefill-fixup" in steps:
        prefill_fixup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
