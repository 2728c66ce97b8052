"""Where a decode call's fixed cost goes: per-program start and end times on the GPU clock.

  python3 scripts/probe_timeline.py [attention]

probe_decode.py's minimal kernel that streams K/V blocks with the decode kernel's grid and
loads (llama-8b n=1; 16-row tile, BLOCK_N 64, 4 stages, its dots) stamps %globaltimer when
each program starts and ends (TIMELINE). An empty kernel of the same grid shows the launch
alone. (The cycles column of benchmarks/results/timeline/stream.csv comes from a version of
that kernel that also counted %clock64 cycles.) Printed per (L, N): the call's event time, the span from the first start
to the last end, how far apart the starts and the ends are, and the programs' durations.
`attention`: skattn's own decode call instead (auto's plan, stamps from `launch.run(stamps=)`):
when its programs start, finish their KV loop and end, and when the fixup programs start,
see the partials (after gdc_wait) and end, all relative to the first program's start.
Writes probe_timeline.csv (one row per case) to $OUT (or benchmarks/results).
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from probe_decode import stream_kernel  # noqa: E402 (its TIMELINE stamps)
from tune import inputs  # noqa: E402 (scripts/tune.py: seeded q, k, v of a grid cell)

from skattn.bench.timing import ColdTimer  # noqa: E402
from skattn.kernels.stamps import stamp  # noqa: E402

OUT = Path(os.environ.get("OUT") or "benchmarks/results")


@triton.jit
def empty_kernel(STAMPS):
    """Only the start and end stamps: what a launch costs without work."""
    p = tl.program_id(0)
    stamp(STAMPS, p, 0)
    stamp(STAMPS, p, 2)


def _summary(stamps):
    """Microseconds: span (first start to last end), start and end spreads, durations."""
    s = stamps.cpu().tolist()
    starts, ends = [r[0] for r in s], [r[2] for r in s]
    t0 = min(starts)
    dur = sorted((e - b) / 1e3 for b, e in zip(starts, ends))
    return dict(span_us=(max(ends) - t0) / 1e3, start_spread_us=(max(starts) - t0) / 1e3,
                end_spread_us=(max(ends) - min(ends)) / 1e3, dur_min_us=dur[0],
                dur_med_us=statistics.median(dur), dur_max_us=dur[-1],
                sms=len({r[3] for r in s}))


def attention(timer, rows):
    import skattn
    from skattn import launch
    from skattn.bench.models import MODELS

    def q(values, f=0.5):
        return sorted(values)[int(f * (len(values) - 1))]

    cells = [(model, n, L, lf) for model, n in (("llama-8b", 1), ("qwen3-14b", 4),
                                                 ("qwen3moe-30b-a3b", 2), ("gpt-oss", 16))
             for L in (8192, 32768) for lf in (False, True)]
    for model, n, L, loads_first in cells:
        launch.MERGE_LOADS_FIRST = loads_first  # the fixup's merge: one latency a step
        qq, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                        causal=True)
        nfix = math.prod(launch.fixup_grid(p))
        main = torch.zeros(p.programs, 4, device="cuda", dtype=torch.int64)
        fix = torch.zeros(max(1, nfix), 4, device="cuda", dtype=torch.int64)
        out = torch.empty_like(qq)
        plain = timer.time(lambda: launch.run(p, qq, k, v, out, None, scale=D ** -0.5),
                           reps=30)
        t = timer.time(lambda: launch.run(p, qq, k, v, out, None, scale=D ** -0.5,
                                          stamps=(main, fix)), reps=30)
        m, f = main.cpu().tolist(), fix[:nfix].cpu().tolist()
        t0 = min(r[0] for r in m)
        us = lambda xs: [(x - t0) / 1e3 for x in xs]  # noqa: E731
        starts, loops, ends = us(r[0] for r in m), us(r[1] for r in m), us(r[2] for r in m)
        row = dict(model=model, n=n, depth=L, programs=p.programs, fixup=p.fixup,
                   loads_first=loads_first,
                   event_p50_us=plain.p50, event_stamped_p50_us=t.p50,
                   main_start_max=max(starts), loop_med=q(loops), loop_max=max(loops),
                   main_end_med=q(ends), main_end_max=max(ends))
        if p.fixup == "uniform" and nfix:
            fs, fr, fe = us(r[0] for r in f), us(r[1] for r in f), us(r[2] for r in f)
            row.update(fix_start_min=min(fs), fix_start_max=max(fs), fix_ready_min=min(fr),
                       fix_ready_max=max(fr), fix_end_max=max(fe))
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)


def main():
    timer = ColdTimer(flush="read")
    rows = []
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if "attention" in sys.argv:
        attention(timer, rows)
    for L in () if "attention" in sys.argv else (8192, 32768):
        q, k, v = inputs("llama-8b", 1, L)
        D, Hkv = k.shape[3], k.shape[2]
        qs = torch.randn(16, D, device="cuda", dtype=torch.float16)
        for N in (128, 132, 264):
            for work in (False, True):
                if not work and L != 8192:
                    continue  # the empty kernel does not depend on L
                out = torch.empty(N, 16, D, device="cuda", dtype=torch.float32)
                stamps = torch.zeros(N, 4, device="cuda", dtype=torch.int64)
                args = (qs, k, v, out, Hkv * (L // 64), N, L // 64, k.stride(1), k.stride(2))
                kw = dict(D=D, BLOCK_N=64, BLOCK_M=16, DOTS=True, STAGES=4, STAMPS=stamps,
                          TIMELINE=True, num_warps=4)
                if work:
                    call = lambda: stream_kernel[(N,)](*args, **kw)  # noqa: E731
                else:
                    call = lambda: empty_kernel[(N,)](stamps)  # noqa: E731
                call()
                t = timer.time(call, reps=30)  # the stamps now hold the last timed call's
                summ = _summary(stamps)
                row = dict(depth=L, programs=N, kernel="stream" if work else "empty",
                           event_p50_us=t.p50, **summ)
                rows.append(row)
                print(f"{row['kernel']:6s} L={L:<6d} N={N:<4d} event {t.p50:6.1f} us | span "
                      f"{summ['span_us']:6.2f} starts {summ['start_spread_us']:5.2f} ends "
                      f"{summ['end_spread_us']:5.2f} | dur min/med/max {summ['dur_min_us']:6.2f} "
                      f"{summ['dur_med_us']:6.2f} {summ['dur_max_us']:6.2f} us, "
                      f"{summ['sms']} SMs", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "probe_timeline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
