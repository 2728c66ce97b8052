"""Per-program GPU time stamps of a serving decode step: where a ragged batch's time goes.

    PYTHONPATH=src python3 tools/serving_timeline.py [--models llama-8b,gpt-oss]
        [--mixes equal,one-long,lognormal] [--pages 16,64] [--fixups auto,fused]
        [--reps 20] [--plan-only]

Each cell (a model shape, a length mix of `skattn bench --serving`, a page size) runs
`auto`'s serving plan (with its own fixup, or `--fixups` `fused`: the merge inside the main
kernel) on the benchmark's paged batch: the work list, then the main kernel
and its fixup stamped through `serving_launch.run(..., stamps=...)` (%globaltimer per
program, kernels/stamps.py). One row per cell, in microseconds from the main kernel's first
start: the main programs' last start, the end of their first piece's KV loop (median), their
ends (median, max), the fixup's first start, the end of its wait (max) and its end; the
step's event time (cold L2) with and without stamps; the floor (visible K/V bytes over the
copy bandwidth measured in the run); and a least-squares fit of each program's duration to
its KV blocks and the tiles it touches: µs a block, µs a tile beyond its blocks, intercept.
The output is checked against float64 first. Writes serving.csv, serving_programs.csv (each
program's SM, stamps, KV blocks and tiles) and serving.json to $OUT (default
benchmarks/results/latest/timeline).

`--tiles T` stamps each program's first T tiles too (a third run of the step; kernels/stamps.py
`tile_stamp`): per tile, µs from its start until its sequence's numbers are in (`meta`), then
q (`q`), its first KV block done (`first`), its other blocks (`rest`), its output or piece
written (`store`) and the next tile's start (`next`); serving_tiles.csv holds every tile, the
cell's row their medians and a fit of the KV loop (q in to loop done) to the tile's blocks.
"""
from __future__ import annotations

import argparse
import bisect
import statistics
import sys

import torch

from skattn import serving, serving_launch
from skattn.bench.models import MODELS
from skattn.bench.records import gpu_tool_dir, tool_meta, write_meta, write_rows
from skattn.bench.serving_mixes import mix
from skattn.serving_worklist import host_work_list

MIXES = ("equal", "one-long", "lognormal")


def plan_for(model: str, mix_name: str, page: int, **kw):
    """`auto`'s serving plan of a decode mix of the benchmark: (plan, Mix)."""
    hq, hkv, d = MODELS[model][:3]
    m = mix(mix_name)
    max_pages = -(-max(m.kv_lens) // page)
    return serving.serving_plan(batch=m.batch, q_len=1, max_kv_len=max_pages * page,
                                page_size=page, max_pages=max_pages, q_heads=hq, kv_heads=hkv,
                                head_dim=d, **kw), m


def program_work(plan, lens: list[int]) -> tuple[list[int], list[int], int, int]:
    """Per program of the grid: KV blocks and tiles of its static share (host work list; a
    plan's dynamic tail is not in them); W and N."""
    wl = host_work_list(plan, lens_k=lens)
    starts = []
    for rb, count in enumerate(wl.rb_count):
        for h in range(plan.hz):
            starts.append(wl.rb_start[rb] + h * count)
    starts.sort()
    items, tiles = [], []
    for p in range(plan.programs):  # static shares (tail chunks go to any program)
        a, b = wl.program_range(p) if p < wl.programs else (0, 0)
        items.append(b - a)
        # tiles whose range meets [a, b): those starting in (a, b), plus the one holding a
        tiles.append(0 if b <= a else bisect.bisect_left(starts, b) - bisect.bisect_right(starts, a) + 1)
    return items, tiles, wl.work, wl.programs


def fit(durations: list[float], items: list[int], tiles: list[int]) -> dict:
    """duration = a x blocks + b x tiles + c over the programs with work (least squares)."""
    import numpy as np

    rows = [(d, i, t) for d, i, t in zip(durations, items, tiles) if i > 0]
    if len(rows) < 3:
        return {}
    y = np.array([r[0] for r in rows])
    x = np.array([[r[1], r[2], 1.0] for r in rows], dtype=float)
    if np.linalg.matrix_rank(x) < 3:
        return {}
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return dict(us_per_block=float(coef[0]), us_per_tile=float(coef[1]), us_fixed=float(coef[2]),
                fit_rms_us=float(np.sqrt((resid ** 2).mean())))


PHASES = ("meta", "q", "first", "rest", "store")


def tile_rows(ts: list, model: str, mix_name: str, page: int) -> list[dict]:
    """Rows of tile stamps [programs][T][8] (ns): phases in µs, with the next tile's start."""
    rows = []
    for p, tiles in enumerate(ts):
        for k, t in enumerate(tiles):
            if t[0] == 0:
                break
            nxt = tiles[k + 1][0] if k + 1 < len(tiles) and tiles[k + 1][0] else None
            row = dict(model=model, mix=mix_name, page_size=page, program=p, k=k, tile=t[7],
                       blocks=t[6])
            for i, name in enumerate(PHASES):
                row[name] = (t[i + 1] - t[i]) / 1e3 if t[i + 1] and t[i] else None
            row["next"] = (nxt - t[5]) / 1e3 if nxt else None
            rows.append(row)
    return rows


def tile_summary(rows: list[dict]) -> dict:
    """Medians of each phase over the tiles, and loop time (q in to loop done) = a + b x blocks."""
    import numpy as np

    out = {}
    for name in (*PHASES, "next"):
        vals = [r[name] for r in rows if r[name] is not None]
        out[f"tile_{name}_med"] = statistics.median(vals) if vals else None
    pts = [(r["blocks"], r["first"] + r["rest"]) for r in rows
           if r["first"] is not None and r["rest"] is not None]
    if len({b for b, _ in pts}) >= 2:
        x = np.array([[b, 1.0] for b, _ in pts], dtype=float)
        coef, *_ = np.linalg.lstsq(x, np.array([y for _, y in pts]), rcond=None)
        out.update(loop_us_per_block=float(coef[0]), loop_us_fixed=float(coef[1]))
    out["tiles_stamped"] = len(rows)
    out["stamps_ordered"] = sum(all(r[n] is None or r[n] >= 0 for n in PHASES) for r in rows)
    return out


def cell(model: str, mix_name: str, page: int, fixup: str, timer, bandwidth: float,
         reps: int, tile_stamps: int = 0) -> dict:
    from skattn.bench.serving import make_batch, reference_rows

    hq, hkv, d = MODELS[model][:3]
    plan, m = plan_for(model, mix_name, page, **_fixup(fixup))
    batch = make_batch(m, hq, hkv, d, page)
    dev = batch.q.device
    q = batch.q.view(m.batch, 1, hq, d)
    out = torch.empty_like(q)
    ws = serving.workspace(plan, device=dev)
    b = serving_launch.bind(plan, dev)
    stream = serving_launch._stream(b, dev)
    ws_o, ws_m, ws_l, counters, wl = serving_launch._views(plan, b, ws, dev, stream)
    rows_main, rows_fix = serving_launch.stamp_rows(plan, dev)
    st_main = torch.zeros(rows_main, 4, dtype=torch.int64, device=dev)
    st_fix = torch.zeros(max(1, rows_fix), 4, dtype=torch.int64, device=dev)
    scale = d ** -0.5

    def call(stamps=None):
        serving_launch.build(plan, wl, seq_k=batch.lens, cu_k=False, seq_q=None)
        serving_launch.run(plan, q, batch.k, batch.v, out, None, wl=wl, block_table=batch.table,
                           scale=scale, ws_views=(ws_o, ws_m, ws_l, counters), stamps=stamps)

    refs = reference_rows(batch, list(range(0, m.batch, 9)))
    call((st_main, st_fix))
    torch.cuda.synchronize()
    got = out.view(m.batch, hq, d)
    err = max(((got[i].double() - r.view(hq, d)).norm() / r.norm()).item() for i, r in refs.items())
    plain = timer.time(call, reps=reps)
    stamped = timer.time(lambda: call((st_main, st_fix)), reps=reps)
    items, tiles, work, programs = program_work(plan, list(m.kv_lens))
    dev_wl = wl[:2].tolist()
    s = st_main.cpu().tolist()
    t0 = min(r[0] for r in s)
    us = [[(r[c] - t0) / 1e3 if r[c] else None for c in range(3)] for r in s]
    busy = [i for i in range(rows_main) if items[i] > 0]
    dur = [us[i][2] - us[i][0] for i in range(rows_main)]
    row = dict(model=model, mix=mix_name, page_size=page, programs=plan.programs,
               programs_used=programs, fixup=plan.fixup, work_blocks=work,
               err=f"{err:.2e}", worklist_matches=dev_wl == [work, programs],
               event_p50_us=plain.p50, event_stamped_p50_us=stamped.p50,
               floor_us=batch.kv_bytes() / bandwidth * 1e6,
               main_start_max=max(us[i][0] for i in range(rows_main)),
               first_loop_med=statistics.median(us[i][1] for i in busy if us[i][1] is not None),
               main_end_med=statistics.median(us[i][2] for i in busy),
               main_end_max=max(us[i][2] for i in range(rows_main)),
               dur_min=min(dur[i] for i in busy), dur_med=statistics.median(dur[i] for i in busy),
               dur_max=max(dur[i] for i in busy),
               blocks_max=max(items), tiles_med=statistics.median(tiles[i] for i in busy),
               tiles_max=max(tiles))
    if rows_fix:
        f = [[(r[c] - t0) / 1e3 if r[c] else None for c in range(3)]
             for r in st_fix.cpu().tolist()]
        row.update(fix_start_min=min(r[0] for r in f),
                   fix_ready_max=max((r[1] for r in f if r[1] is not None), default=None),
                   fix_end_max=max(r[2] for r in f))
    if row["worklist_matches"]:
        row.update(fit([dur[i] for i in range(rows_main)], items, tiles))
    tiles_rows = []
    if tile_stamps:
        ts = torch.zeros(rows_main, tile_stamps, 8, dtype=torch.int64, device=dev)
        row["event_tiles_p50_us"] = timer.time(lambda: call((st_main, st_fix, ts)), reps=reps).p50
        tiles_rows = tile_rows(ts.cpu().tolist(), model, mix_name, page)
        row.update(tile_summary(tiles_rows))
    programs_rows = [dict(model=model, mix=mix_name, page_size=page, fixup=plan.fixup,
                          program=i, sm=s[i][3], start=us[i][0], first_loop=us[i][1],
                          end=us[i][2], blocks=items[i], tiles=tiles[i])
                     for i in range(rows_main)]
    return row, programs_rows, tiles_rows


def _fixup(name: str) -> dict:
    return {} if name == "auto" else dict(fixup=name)


def _line(row: dict) -> str:
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def table(rows: list[dict]) -> str:
    lines = ["model     mix        page  N   fixup   event  floor  main end med/max  fixup end"
             "  us/block us/tile"]
    for r in rows:
        fix = f"{r['fix_end_max']:7.1f}" if r.get("fix_end_max") is not None else "      -"
        per = (f"{r['us_per_block']:7.3f} {r['us_per_tile']:7.2f}" if "us_per_block" in r
               else "      -       -")
        lines.append(f"{r['model']:9s} {r['mix']:10s} {r['page_size']:4d} {r['programs']:4d} "
                     f"{r['fixup']:7s} {r['event_p50_us']:6.1f} {r['floor_us']:6.1f} "
                     f"{r['main_end_med']:7.1f} {r['main_end_max']:7.1f}   {fix}  {per}")
    return "\n".join(lines)


def tile_table(rows: list[dict]) -> str:
    """Median µs of each tile phase per cell, and the KV loop's fit."""
    lines = ["model     mix        page   meta     q  first   rest  store   next  "
             "loop µs/block fixed  tiles"]
    for r in rows:
        med = [r.get(f"tile_{n}_med") for n in (*PHASES, "next")]
        cols = " ".join(f"{v:6.2f}" if v is not None else "     -" for v in med)
        fit_ = (f"{r['loop_us_per_block']:8.3f} {r['loop_us_fixed']:6.2f}"
                if "loop_us_per_block" in r else "       -      -")
        lines.append(f"{r['model']:9s} {r['mix']:10s} {r['page_size']:4d} {cols}  {fit_} "
                     f"{r.get('tiles_stamped', 0):6d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-8b,gpt-oss")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--pages", default="16,64")
    ap.add_argument("--fixups", default="auto",
                    help="auto (the plan's own) and/or fused, comma-separated")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per row")
    ap.add_argument("--tiles", type=int, default=0,
                    help="stamp each program's first TILES tiles too (serving_tiles.csv)")
    ap.add_argument("--plan-only", action="store_true",
                    help="print each cell's plan and per-program work on an H200's grid, no GPU")
    args = ap.parse_args(argv)
    cells = [(mo, mx, int(p), f) for mo in args.models.split(",")
             for mx in args.mixes.split(",") for p in args.pages.split(",")
             for f in args.fixups.split(",")]
    for mo, mx, _, f in cells:
        if mo not in MODELS or mx not in MIXES or f not in ("auto", "fused"):
            ap.error(f"unknown model, mix or fixup: {mo}, {mx}, {f} (mixes: {', '.join(MIXES)})")
    if args.plan_only:
        for mo, mx, p, f in cells:
            plan, m = plan_for(mo, mx, p, sms=132, occupancy=2, **_fixup(f))
            items, tiles, work, n = program_work(plan, list(m.kv_lens))
            print(f"{mo:9s} {mx:10s} page {p:3d}: grid {plan.programs}, fixup {plan.fixup}, "
                  f"W {work}, N {n}, blocks a program {min(items)}-{max(items)}, tiles "
                  f"{min(tiles)}-{max(tiles)}")
        return 0
    out_dir = gpu_tool_dir("benchmarks/results/latest/timeline")
    if out_dir is None:
        return 2
    from skattn.bench.timing import ColdTimer, measure_copy_bandwidth

    timer = ColdTimer(flush="read")
    bandwidth = measure_copy_bandwidth(timer)
    rows, programs, tiles = [], [], []
    for mo, mx, p, f in cells:
        row, per_program, per_tile = cell(mo, mx, p, f, timer, bandwidth, args.reps, args.tiles)
        rows.append(row)
        programs += per_program
        tiles += per_tile
        print(_line(row), flush=True)
    write_rows(out_dir / "serving.csv", rows)
    write_rows(out_dir / "serving_programs.csv", programs)
    files = ["serving.csv", "serving_programs.csv"]
    if tiles:
        write_rows(out_dir / "serving_tiles.csv", tiles)
        files.append("serving_tiles.csv")
    write_meta(out_dir, "serving.json", tool_meta(reps=args.reps, timer="event, cold L2 (read "
               "flush)", copy_bandwidth_gbs=bandwidth / 1e9, tiles=args.tiles), files)
    print(table(rows))
    if tiles:
        print(tile_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
