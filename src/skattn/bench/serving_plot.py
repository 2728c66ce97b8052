"""The serving benchmark's plot and its `--report` mode: from `serving-<tag>.csv` rows, one
panel per model, each cell (mix, page size) a group of bars, one per provider: the share of
the copy floor it reached (visible K/V bytes over the copy bandwidth; the floor of a
quantized provider counts the bytes it reads)."""
from __future__ import annotations

from skattn.bench.records import (finish_report, grouped_bars, merge_rows, report_files,
                                  save_figure, style_panel)


def read_rows(paths) -> list[dict]:
    """Rows of serving CSVs, a later file's cell and provider replacing an earlier one's."""
    return merge_rows(paths, lambda r: (r["model"], r["mix"], r["page_size"], r["provider"]))


def plot(rows: list[dict], path) -> None:
    """PNG: % of the floor per provider and cell, a panel per model; none where no row was
    timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skattn.bench.serving_run import ordered_cells, provider_order

    ok = [r for r in rows if r.get("status") == "ok" and r.get("pct_floor")]
    if not ok:  # nothing timed: no plot (the table says why)
        return
    models = list(dict.fromkeys(r["model"] for r in ok))
    names = provider_order(ok)
    pct = {(r["model"], r["mix"], str(r["page_size"]), r["provider"]): float(r["pct_floor"])
           for r in ok}
    fig, axes = plt.subplots(len(models), 1, squeeze=False,
                             figsize=(11.0, 2.8 * len(models) + 0.8))
    fig.suptitle("skattn bench --serving: % of the copy floor per layer (CUDA graph, cold L2)",
                 fontsize=10)
    for ax, model in zip(axes[:, 0], models):
        cells = [c for c in ordered_cells(ok) if c[0] == model]
        grouped_bars(ax, [(name, [pct.get((*c, name), 0.0) for c in cells]) for name in names])
        ax.set_xticks(range(len(cells)), [f"{c[1]}\npage {c[2]}" for c in cells], fontsize=7)
        style_panel(ax, model, "% of floor", (0, 105))
    save_figure(fig, axes, path)


def report(paths, out_dir=None, stem: str | None = None) -> str:
    """Markdown (`serving_run.markdown`) and the plot from serving CSVs, written as
    `<stem>.md` and `<stem>.png` next to the first CSV (or into `out_dir`); returns the
    markdown."""
    from skattn.bench.serving_mixes import MIX_NOTES, MIXES, PARTS
    from skattn.bench.serving_run import markdown

    paths, out_dir, stem = report_files(paths, out_dir, stem, "a serving report", "-report")
    rows = read_rows(paths)
    timers = {r.get("timer") or "graph" for r in rows}  # (CSVs before the column: graphs)
    if len(timers) > 1:
        raise ValueError("these CSVs mix the graph and the eager timer: report them apart")
    commits = ", ".join(dict.fromkeys(r.get("commit", "") for r in rows))
    gpus = ", ".join(dict.fromkeys(r.get("gpu", "") for r in rows))
    seen = {r["mix"] for r in rows}
    mixes = [m for m in MIXES + PARTS if m in seen] + sorted(seen - set(MIXES + PARTS))
    meta = dict(gpu=gpus, commit=commits, layers=rows[0].get("layers") if rows else None,
                mixes={m: MIX_NOTES.get(m, m) for m in mixes},
                timer=timers.pop() if timers else None)
    md = markdown(rows, meta).replace(" / 0 GB/s copy bandwidth",
                                      " / the copy bandwidth measured in each run")
    return finish_report([md], rows, plot, out_dir, stem)
