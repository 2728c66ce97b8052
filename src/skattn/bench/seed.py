"""The seed's experiment, kernel-level: llama.cpp's rule after the change (`llamacpp`: N rounded
to a multiple of ntiles_dst, uniform fixup) against before it (`llamacpp-before`: N unrounded,
general fixup whenever N does not divide ntiles_dst), in the same run, per cell of the seed
grid; plus each plan's fixup time, measured as (full call) - (main kernel only).

`skattn bench --seed-table` writes `seed-<tag>.csv` (one row per cell x policy x part, part
"call" or "main"), `seed-<tag>.md` (the speed-up laid out like the seed's table: rows model x n,
columns depth), `seed-<tag>.png` (a heat map, where matplotlib is installed), and prints a
short table last.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from skattn.bench.grid import Cell
from skattn.bench.records import (have_matplotlib, merge_rows, not_timed, ok_number,
                                  provenance_text, record, report_files, write_markdown)

# label -> the policy name given to `skattn.plan` ("llamacpp-before" is the older name of
# "llamacpp-before" and is accepted by every planner version)
SEED_POLICIES = {"llamacpp-before": "llamacpp-before", "llamacpp": "llamacpp"}
BEFORE, AFTER = SEED_POLICIES
PARTS = ("call", "main")  # the full call; the main kernel alone (no fixup launched)
COLUMNS = ("model", "hq", "hkv", "d", "n", "depth", "policy", "part", "programs", "fixup", "ntiles_dst",
           "status", "err", "p20_us", "p50_us", "p80_us", "reps", "timer", "layers", "gpu", "sms",
           "torch", "triton", "commit", "flush", "timestamp")


# -- the measurement (GPU; the CPU tests replace the timer and the inputs)
def plan_cell(cell: Cell, policy: str, *, sms: int | None, occupancy: int | None,
              dtype=torch.float16):
    """The `skattn.Plan` of `cell` under `policy` (a key of SEED_POLICIES)."""
    import skattn

    return skattn.plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq, kv_heads=cell.hkv,
                       head_dim=cell.d, dtype=dtype, causal=True, sms=sms, occupancy=occupancy,
                       policy=SEED_POLICIES[policy])


def layer_call(plan, q, k, v, part: str, workspace):
    """One layer's call with its own output buffer: the full call, or the main kernel alone
    (`launch.run(main_only=True)`, which launches no fixup; the output is then incomplete).
    `workspace` (`skattn.workspace(plan)`) is shared by the layers, as in a model."""
    import skattn
    from skattn import launch

    out = torch.empty(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)
    if part == "call":
        return lambda: skattn.attention(q, k, v, causal=True, plan=plan, out=out, workspace=workspace)
    scale = launch.default_scale(q.shape[3])

    def main_only():
        launch.run(plan, q, k, v, out, None, scale=scale, workspace=workspace, main_only=True)
        return out

    return main_only


def measure_part(cell: Cell, policy: str, part: str, layers, refs, timer, opts) -> dict:
    """Time one (policy, part) on one cell with `opts.timer`; never raises.

    The full call is checked against float64 (eagerly, and after a graph replay on the first
    and last layer); the main kernel alone is only run, its output being incomplete.
    """
    import skattn
    from skattn.bench import graph
    from skattn.bench.providers import relative_error
    from skattn.bench.run import TOLERANCE, eager_check, failure_status, timed

    row = {"policy": policy, "part": part, "status": "ok"}
    try:
        dtype = layers[0][1].dtype
        p = plan_cell(cell, policy, sms=opts.sms, occupancy=opts.occupancy, dtype=dtype)
        row.update(programs=p.programs, fixup=p.fixup, ntiles_dst=p.ntiles_dst)
        ws = skattn.workspace(p, device=layers[0][0].device)
        fns = [layer_call(p, q, k, v, part, ws) for q, k, v in layers]
        if part == "call":
            if not eager_check(fns[0], refs.get(0), dtype, row):
                return row
        else:
            fns[0]()  # compiles and allocates before timing or capture
        if opts.timer == "graph":
            g, outs = graph.capture(fns)
            if part == "call":
                err = graph.check_replay(g, outs, refs.checked(), TOLERANCE[dtype], relative_error)
                row["err"] = f"{max(err, float(row['err'])):.3e}"
            t = graph.time_graph(g, len(fns), timer, warmup=opts.warmup, reps=opts.reps)
        else:
            t = timer.time(fns[0], warmup=opts.warmup, reps=opts.reps)
        timed(row, t)
    except Exception as exc:  # an unsupported config must not stop the run
        row["status"] = failure_status(exc)
    return row


def run_seed_table(cells: list[Cell], *, out_dir, tag: str, opts) -> tuple[Path, list[dict]]:
    """Time both policies, full call and main kernel, on every cell; write `seed-<tag>.csv`.

    Parameters
    ----------
    cells : list of Cell
    out_dir : str or Path
    tag : str
        File-name tag.
    opts : RunOptions
        Timer ("graph": per-layer time of one CUDA graph of `layers` calls), repeats, grid
        size, seed, time limit, progress bar, L2 flush.

    Returns
    -------
    (Path, list of dict)
        The CSV and its rows.
    """
    from dataclasses import asdict

    from skattn.bench import run, timing
    from skattn.bench.graph import References
    from skattn.bench.providers import reference

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"seed-{tag}.csv"
    timer = timing.ColdTimer(flush=opts.flush)
    sms = opts.sms or torch.cuda.get_device_properties(0).multi_processor_count
    opts = run.RunOptions(**{**asdict(opts), "sms": sms})
    prov = {**run.provenance(sms), "flush": opts.flush, "timer": opts.timer, "layers": opts.n_layers}
    start, rows = time.monotonic(), []
    bar = run.progress_bar(len(cells) * len(SEED_POLICIES) * len(PARTS), opts.progress)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for i, cell in enumerate(cells):
            if opts.time_limit_s and time.monotonic() - start > opts.time_limit_s:
                break
            layers = run.layer_inputs(cell, opts.seed + i, opts.n_layers)
            refs = References(layers, reference)
            for policy in SEED_POLICIES:
                for part in PARTS:
                    bar.set_description(f"{cell.model} n={cell.n} L={cell.depth} {policy} {part}")
                    row = measure_part(cell, policy, part, layers, refs, timer, opts)
                    record(row, cell, prov, writer, f, rows, bar)
            del layers, refs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bar.close()
    return csv_path, rows


# -- tables from rows (CPU)
def read_seed_rows(csv_paths) -> list[dict]:
    """Rows of seed-table CSVs; a later file's row replaces an earlier one for the same
    (model, n, depth, policy, part, timer)."""
    return merge_rows(csv_paths, lambda row: (row["model"], int(row["n"]), int(row["depth"]),
                                              row["policy"], row["part"], row.get("timer", "")))


def _p50(row: dict | None) -> float | None:
    return ok_number(row, "p50_us")


def cell_results(rows: list[dict]) -> list[dict]:
    """Per cell, in the seed table's order (model as first seen, then n, then depth): the rows
    of both policies, the speed-up (before p50 / after p50, full calls) and each fixup time
    (full call p50 - main kernel p50), None where a part is missing or not timed."""
    order: dict[str, int] = {}
    cells: dict[tuple, dict] = {}
    for r in rows:
        order.setdefault(r["model"], len(order))
        key = (r["model"], int(r["hq"]), int(r["hkv"]), int(r["d"]), int(r["n"]), int(r["depth"]))
        cells.setdefault(key, {})[(r["policy"], r["part"])] = r
    out = []
    for key in sorted(cells, key=lambda c: (order[c[0]], c[4], c[5])):
        parts = cells[key]
        res = dict(zip(("model", "hq", "hkv", "d", "n", "depth"), key))
        for policy in SEED_POLICIES:
            call, main = parts.get((policy, "call")), parts.get((policy, "main"))
            t_call, t_main = _p50(call), _p50(main)
            res[policy] = dict(call=call, main=main, p50=t_call,
                               fixup_us=t_call - t_main if t_call is not None and t_main is not None
                               else None)
        before, after = res[BEFORE]["p50"], res[AFTER]["p50"]
        res["speedup"] = before / after if before and after else None
        out.append(res)
    return out


def _status(row: dict | None) -> str:
    if row is None:
        return "—"
    return row.get("status", "?").split(":")[0]


def _speedup_entry(res: dict) -> str:
    if res["speedup"] is not None:
        return f"{res['speedup']:.2f}x"
    bad = [res[p]["call"] for p in SEED_POLICIES if res[p]["p50"] is None]
    return _status(bad[0]) if bad else "—"


def _fixup_entry(res: dict, policy: str) -> str:
    value = res[policy]["fixup_us"]
    return "—" if value is None else f"{value:.1f}"


def _planned(res: dict, policy: str) -> str:
    call = res[policy]["call"]
    if res[policy]["p50"] is None:
        return _status(call)
    return f"{res[policy]['p50']:.1f} ({call.get('programs', '')} {call.get('fixup', '')})"


def _by_model_n(results: list[dict], entry) -> str:
    """Rows model x n, columns depth; `entry(res)` fills a cell."""
    depths = sorted({r["depth"] for r in results})
    head = ["model (Hq/Hkv/D)", "n"] + [f"L = {d}" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[tuple, dict[int, str]] = {}
    for res in results:
        key = (f"{res['model']} ({res['hq']}/{res['hkv']}/{res['d']})", res["n"])
        rows.setdefault(key, {})[res["depth"]] = entry(res)
    for (name, n), by_depth in rows.items():
        lines.append("| " + " | ".join([name, str(n)] + [by_depth.get(d, "—") for d in depths]) + " |")
    return "\n".join(lines)


def speedup_table(results: list[dict]) -> str:
    """The seed's layout: speed-up of llamacpp over llamacpp-before, rows model x n, columns depth."""
    return _by_model_n(results, _speedup_entry)


def fixup_table(results: list[dict]) -> str:
    """The fixup's own time per plan, 'before / after' µs, rows model x n, columns depth."""
    return _by_model_n(results, lambda r: f"{_fixup_entry(r, BEFORE)} / {_fixup_entry(r, AFTER)}")


def times_table(results: list[dict]) -> str:
    """Per cell: both policies' p50 with their plans, the speed-up and both fixup times."""
    head = ["model (Hq/Hkv/D)", "n", "L", f"{BEFORE} µs (N fixup)", f"{AFTER} µs (N fixup)", "speed-up",
            f"fixup {BEFORE} µs", f"fixup {AFTER} µs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        row = [f"{res['model']} ({res['hq']}/{res['hkv']}/{res['d']})", str(res["n"]), str(res["depth"]),
               _planned(res, BEFORE), _planned(res, AFTER), _speedup_entry(res),
               _fixup_entry(res, BEFORE), _fixup_entry(res, AFTER)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def short_table(results: list[dict]) -> str:
    """Fixed-width lines for the terminal: both p50s, the speed-up and both fixup times."""
    lines = [f"{'model':<18} {'n':>4} {'L':>6} {'before':>8} {'after':>8} {'speed-up':>8} "
             f"{'fix-bef':>7} {'fix-aft':>7}"]
    for res in results:
        t = [res[p]["p50"] for p in SEED_POLICIES]
        lines.append(f"{res['model']:<18} {res['n']:>4} {res['depth']:>6} "
                     + " ".join("—".rjust(8) if x is None else f"{x:8.1f}" for x in t)
                     + f" {_speedup_entry(res):>8} {_fixup_entry(res, BEFORE):>7} "
                       f"{_fixup_entry(res, AFTER):>7}")
    return "\n".join(lines)


def plot_speedups(results: list[dict], path) -> None:
    """PNG heat map of the speed-ups: rows model x n, columns depth (blank where not timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in results})
    keys = list(dict.fromkeys((r["model"], r["n"]) for r in results))
    grid = [[math.nan] * len(depths) for _ in keys]
    for r in results:
        if r["speedup"] is not None:
            grid[keys.index((r["model"], r["n"]))][depths.index(r["depth"])] = r["speedup"]
    spread = max([abs(x - 1) for row in grid for x in row if x == x] + [0.05])
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(depths), 1.2 + 0.32 * len(keys)))
    im = ax.imshow(grid, cmap="RdBu", vmin=1 - spread, vmax=1 + spread, aspect="auto")
    ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=8)
    ax.set_yticks(range(len(keys)), [f"{m} n={n}" for m, n in keys], fontsize=7)
    for i, row in enumerate(grid):
        for j, x in enumerate(row):
            if x == x:
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"speed-up of {AFTER} over {BEFORE} (p50)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_report(csv_paths, out_dir=None, stem: str | None = None, plots: bool = True) -> str:
    """Markdown of the seed table from seed-table CSVs; writes `<stem>.md` and `<stem>.png`.

    Parameters
    ----------
    csv_paths : str, Path or list of them
    out_dir : str or Path, optional
        The first CSV's folder by default.
    stem : str, optional
        The first CSV's stem by default.
    plots : bool
        Draw the heat map (skipped where matplotlib is missing).

    Returns
    -------
    str
    """
    from skattn.bench.report import TIMER_TEXT

    paths, out_dir, stem = report_files(csv_paths, out_dir, stem, "the seed table")
    rows = read_seed_rows(paths)
    results = cell_results(rows)
    prov = provenance_text(rows, ("gpu", "sms", "torch", "triton", "commit", "timer"))
    timers = sorted({r.get("timer") or "event" for r in rows})
    md = [f"# skattn seed table: {', '.join(p.name for p in paths)}", "", f"Provenance: {prov}.", "",
          f"Kernel-level, in the same run: `{AFTER}` (N rounded down to a multiple of ntiles_dst "
          f"when that loses at most 5% of the programs; uniform fixup) against `{BEFORE}` (N "
          "unrounded; general fixup whenever N does not divide ntiles_dst). Times are p50 µs with a "
          "cold L2; " + "; ".join(f"{t} timer: {TIMER_TEXT.get(t, t)}" for t in timers) + ".", "",
          f"## Speed-up of {AFTER} over {BEFORE} ({BEFORE} p50 / {AFTER} p50)", "", speedup_table(results),
          "", f"## The fixup's own time, {BEFORE} / {AFTER} (µs)", "",
          "Full call p50 - main kernel alone p50 (`launch.run(main_only=True)`: no fixup launched, "
          "and no programmatic dependent launch).", "", fixup_table(results), "",
          "## Per cell", "", times_table(results)]
    md += not_timed(rows, lambda r: f"{r['policy']} {r['part']} {r['model']} n={r['n']} "
                                    f"L={r['depth']}")
    if plots and not have_matplotlib():
        plots = False
        md += ["", "Heat map skipped: matplotlib is not installed here."]
    text = write_markdown(md, out_dir, stem)
    if plots and results:
        plot_speedups(results, out_dir / f"{stem}.png")
    return text


def plans_table(cells: list[Cell], *, sms: int, occupancy: int) -> str:
    """Markdown: per cell, both policies' N and fixup kind (what `--seed-table` shows without a GPU)."""
    head = ["model (Hq/Hkv/D)", "n", "L", "ntiles_dst", f"{BEFORE}: N fixup", f"{AFTER}: N fixup"]
    lines = [f"Plans of the seed table for {sms} SMs x {occupancy} programs per SM.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        entries, tiles = [], "?"
        for policy in SEED_POLICIES:
            try:
                p = plan_cell(cell, policy, sms=sms, occupancy=occupancy)
            except ValueError as exc:
                entries.append(f"error: {exc}")
                continue
            tiles = str(p.ntiles_dst)
            entries.append(f"{p.programs} {p.fixup}")
        lines.append("| " + " | ".join([f"{cell.model} ({cell.shape})", str(cell.n), str(cell.depth), tiles]
                                       + entries) + " |")
    return "\n".join(lines)
