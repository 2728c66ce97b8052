"""Per-program GPU time stamps of decode calls: where a call's fixed cost goes.

    PYTHONPATH=src python3 tools/timeline.py [stream] [attention] [--reps 30] [--plan-only]

`stream`: a kernel that only streams K/V with the decode kernel's grid and loads (llama-8b
n = 1: a 16-row query tile, 64-row K/V blocks, 4 stages, the two dots, no softmax, no
fixup) at N = 128, 132, 264 programs and L = 8192, 32768, and an empty kernel of the same
grid (the launch alone). Each program stamps %globaltimer when it starts and ends
(`skattn.kernels.stamps`). One row per (kernel, L, N): the event time (cold L2), the span
from the first start to the last end, how far apart the starts and the ends are, and the
programs' durations, in microseconds.

`attention`: skattn's own decode call, auto's plan, stamped through
`launch.run(..., stamps=...)`, for 8 cells, with the separate fixup's merge waiting for all
loads of a step at once or not (`Tuning.merge_loads_first`). One row per (cell, choice):
when the main programs start, finish their first tile's KV loop and end, and when the
uniform fixup's programs start, see the partials and end, relative to the first start.

Both by default. Writes stream.csv, attention.csv and provenance.json to $OUT (default
benchmarks/results/latest/timeline); `--plan-only` prints the cells and auto's plans for an
H200 (132 SMs) without a GPU. benchmarks/results/timeline/ holds an H200 run (its
stream.csv also has a cycles_med column, %clock64 cycles, that this tool does not write).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import triton
import triton.language as tl

import skattn
from skattn import launch
from skattn.bench.models import MODELS
from skattn.bench.records import gpu_tool_dir, tool_meta, write_meta, write_rows
from skattn.kernels.stamps import stamp

STREAM_DEPTHS = (8192, 32768)
STREAM_PROGRAMS = (128, 132, 264)
ATTENTION_CELLS = [(model, n, L) for model, n in (("llama-8b", 1), ("qwen3-14b", 4),
                                                  ("qwen3moe-30b-a3b", 2), ("gpt-oss", 16))
                   for L in (8192, 32768)]


@triton.jit
def empty_kernel(STAMPS):
    """Only the start and end stamps: what a launch costs without work."""
    p = tl.program_id(0)
    stamp(STAMPS, p, 0)
    stamp(STAMPS, p, 2)


@triton.jit
def stream_kernel(Q, K, V, OUT, STAMPS, total, nprog, blocks_per_head, stride_kn, stride_kh,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  STAGES: tl.constexpr):
    """Program p reads K/V blocks [p * total // nprog, (p + 1) * total // nprog) of the
    (KV head, block) list and multiplies them with a query tile, as the decode kernel's
    KV loop does without the softmax; stamps its start and end."""
    p = tl.program_id(0)
    stamp(STAMPS, p, 0)
    start = (p * total) // nprog
    end = ((p + 1) * total) // nprog
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + m[:, None] * D + d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i in tl.range(start, end, num_stages=STAGES):
        h = i // blocks_per_head
        base = h * stride_kh + ((i - h * blocks_per_head) * BLOCK_N) * stride_kn
        kt = tl.load(K + base + n[None, :] * stride_kn + d[:, None])
        s = tl.dot(q, kt)
        v = tl.load(V + base + n[:, None] * stride_kn + d[None, :])
        acc += tl.dot(s.to(tl.float16), v)
    tl.store(OUT + p * BLOCK_M * D + m[:, None] * D + d[None, :], acc)
    stamp(STAMPS, p, 2)


def inputs(model: str, n: int, L: int, seed: int = 0):
    """Seeded f16 q [1, n, Hq, D], k and v [1, L, Hkv, D] of a seed-grid cell, on the GPU."""
    Hq, Hkv, D = MODELS[model][:3]
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, rows, h, D, device="cuda", generator=g, dtype=torch.float16)
                 for rows, h in ((n, Hq), (L, Hkv), (L, Hkv)))


def plan_for(model: str, n: int, L: int, loads_first: bool, **kw):
    Hq, Hkv, D = MODELS[model][:3]
    return skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                       causal=True, tuning=skattn.Tuning(merge_loads_first=loads_first), **kw)


def _summary(stamps: torch.Tensor) -> dict:
    """Microseconds: span (first start to last end), start and end spreads, durations."""
    s = stamps.cpu().tolist()
    starts, ends = [r[0] for r in s], [r[2] for r in s]
    t0 = min(starts)
    dur = sorted((e - b) / 1e3 for b, e in zip(starts, ends))
    return dict(span_us=(max(ends) - t0) / 1e3, start_spread_us=(max(starts) - t0) / 1e3,
                end_spread_us=(max(ends) - min(ends)) / 1e3, dur_min_us=dur[0],
                dur_med_us=statistics.median(dur), dur_max_us=dur[-1],
                sms=len({r[3] for r in s}))


def stream(timer, reps: int) -> list[dict]:
    rows = []
    for L in STREAM_DEPTHS:
        _, k, v = inputs("llama-8b", 1, L)
        Hkv, D = k.shape[2], k.shape[3]
        qs = torch.randn(16, D, device="cuda", dtype=torch.float16)
        for N in STREAM_PROGRAMS:
            for work in (False, True):
                if not work and L != STREAM_DEPTHS[0]:
                    continue  # the empty kernel does not depend on L
                out = torch.empty(N, 16, D, device="cuda", dtype=torch.float32)
                stamps = torch.zeros(N, 4, device="cuda", dtype=torch.int64)
                if work:
                    def call(N=N, out=out, stamps=stamps):
                        stream_kernel[(N,)](qs, k, v, out, stamps, Hkv * (L // 64), N, L // 64,
                                            k.stride(1), k.stride(2), D=D, BLOCK_N=64,
                                            BLOCK_M=16, STAGES=4, num_warps=4)
                else:
                    def call(N=N, stamps=stamps):
                        empty_kernel[(N,)](stamps)
                call()
                t = timer.time(call, reps=reps)  # the stamps now hold the last timed call's
                rows.append(dict(depth=L, programs=N, kernel="stream" if work else "empty",
                                 event_p50_us=t.p50, **_summary(stamps)))
                print(_line(rows[-1]), flush=True)
    return rows


def attention(timer, reps: int) -> list[dict]:
    def med(values):
        return sorted(values)[(len(values) - 1) // 2]

    rows = []
    for model, n, L in ATTENTION_CELLS:
        q, k, v = inputs(model, n, L)
        out = torch.empty_like(q)
        scale = q.shape[-1] ** -0.5
        for loads_first in (False, True):
            p = plan_for(model, n, L, loads_first)
            nfix = math.prod(launch.fixup_grid(p)) if p.fixup == "uniform" else 0  # stamped
            main = torch.zeros(p.programs, 4, device="cuda", dtype=torch.int64)
            fix = torch.zeros(max(1, nfix), 4, device="cuda", dtype=torch.int64)
            plain = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=scale), reps=reps)
            t = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=scale,
                                              stamps=(main, fix)), reps=reps)
            m = main.cpu().tolist()
            t0 = min(r[0] for r in m)

            def us(col, table):
                return [(r[col] - t0) / 1e3 for r in table]

            row = dict(model=model, n=n, depth=L, programs=p.programs, fixup=p.fixup,
                       loads_first=loads_first, event_p50_us=plain.p50,
                       event_stamped_p50_us=t.p50, main_start_max=max(us(0, m)),
                       loop_med=med(us(1, m)), loop_max=max(us(1, m)),
                       main_end_med=med(us(2, m)), main_end_max=max(us(2, m)))
            if nfix:
                f = fix[:nfix].cpu().tolist()
                row.update(fix_start_min=min(us(0, f)), fix_start_max=max(us(0, f)),
                           fix_ready_min=min(us(1, f)), fix_ready_max=max(us(1, f)),
                           fix_end_max=max(us(2, f)))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def table(tables: dict) -> str:
    """A short summary, microseconds: per stream row the event time, span and median
    duration; per attention row the event time, median KV loop, last main end, fixup end."""
    lines = []
    for r in tables.get("stream", []):
        lines.append(f"{r['kernel']:6s} L={r['depth']:<6d} N={r['programs']:<4d} event "
                     f"{r['event_p50_us']:6.1f}  span {r['span_us']:6.2f}  "
                     f"duration med {r['dur_med_us']:6.2f}")
    for r in tables.get("attention", []):
        fix = f"{r['fix_end_max']:6.2f}" if "fix_end_max" in r else "     -"
        lines.append(f"{r['model']:17s} n={r['n']:<3d} L={r['depth']:<6d} N={r['programs']:<4d} "
                     f"{r['fixup']:8s} loads_first={r['loads_first']!s:5s} event "
                     f"{r['event_p50_us']:6.1f}  loop {r['loop_med']:6.2f}  main end "
                     f"{r['main_end_max']:6.2f}  fixup end {fix}")
    return "\n".join(lines)


def plan_only(parts) -> None:
    """The cells of each part and, for `attention`, auto's plan on an H200 (132 SMs)."""
    if "stream" in parts:
        print(f"stream: llama-8b n=1, L in {STREAM_DEPTHS}, N in {STREAM_PROGRAMS}, "
              f"and the empty kernel at each N")
    if "attention" in parts:
        for model, n, L in ATTENTION_CELLS:
            p = plan_for(model, n, L, True, sms=132, occupancy=2)
            stamped = p.fixup == "uniform"
            print(f"attention: {model:17s} n={n:<3d} L={L:<6d} N={p.programs:<4d} "
                  f"{p.fixup:8s} fixup programs {math.prod(launch.fixup_grid(p))}"
                  f"{' (stamped)' if stamped else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", metavar="{stream,attention}",
                    help="what to stamp (default: both)")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per row")
    ap.add_argument("--plan-only", action="store_true", help="print the cells and plans, no GPU")
    args = ap.parse_args(argv)
    parts = args.parts or ["stream", "attention"]
    for part in parts:
        if part not in ("stream", "attention"):
            ap.error(f"unknown part {part!r}: stream or attention")
    if args.plan_only:
        plan_only(parts)
        return 0
    out_dir = gpu_tool_dir("benchmarks/results/latest/timeline")
    if out_dir is None:
        return 2
    from skattn.bench.timing import ColdTimer

    timer = ColdTimer(flush="read")
    files, tables = {}, {}
    for part in parts:
        rows = stream(timer, args.reps) if part == "stream" else attention(timer, args.reps)
        write_rows(out_dir / f"{part}.csv", rows)
        files[f"{part}.csv"] = dict(rows=len(rows))
        tables[part] = rows
    write_meta(out_dir, "provenance.json", tool_meta(reps=args.reps, files=files), files)
    print(table(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
