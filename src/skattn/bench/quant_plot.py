"""The quantized-K/V benchmark's plot (`skattn bench --quant`, and `--report quant.csv`):
per cell, each quantized form's speed-up over the f16 path of the same run, with the
decode target (1.7x at L >= 16384) and parity drawn."""
from __future__ import annotations

from skattn.bench.records import (finish_report, grouped_bars, merge_rows, report_files,
                                  save_figure, style_panel)

DECODE_TARGET = 1.7


def plot(rows: list[dict], path) -> None:
    """PNG: speed-up over f16 per cell (model, n, L), a bar per quantized form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skattn.bench.quant import QUANTIZED, _by_cell, _num

    cells = list(_by_cell(rows).items())
    fig, ax = plt.subplots(figsize=(max(8.0, 0.5 * len(cells) + 3), 4.2))
    grouped_bars(ax, [(form, [_num(by.get(form), "speedup_vs_f16") or 0.0 for _, by in cells])
                      for form in QUANTIZED])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(DECODE_TARGET, color="black", linewidth=0.8, linestyle="--",
               label=f"decode target ({DECODE_TARGET}x at L >= 16384)")
    ax.set_xticks(range(len(cells)), [f"{k[0]} n={k[4]} {k[5] // 1024}k" for k, _ in cells],
                  fontsize=7, rotation=60, ha="right")
    style_panel(ax, "quantized K/V: per-layer speed over the f16 path (CUDA graph, cold L2)",
                "speed-up over skattn f16")
    save_figure(fig, [[ax]], path)


def report(paths, out_dir=None, stem: str | None = None) -> str:
    """The table (`quant.markdown_table`) and the plot from quant CSVs (a later file's
    (cell, form) replacing an earlier one's): `<stem>.md` and `<stem>.png` next to the first
    CSV (or in `out_dir`); returns the markdown."""
    from skattn.bench.quant import markdown_table

    paths, out_dir, stem = report_files(paths, out_dir, stem, "a quant report", "-report")
    rows = merge_rows(paths, lambda r: (r["model"], r["n"], r["depth"], r["format"]))
    md = [f"# skattn quantized K/V: {', '.join(p.name for p in paths)}", "",
          "p50 µs per layer (% of each form's own floor) and speed-up over f16, same run.", "",
          markdown_table(rows)]
    return finish_report(md, rows, plot, out_dir, stem)
