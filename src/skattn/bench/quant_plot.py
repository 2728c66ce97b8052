"""The quantized-K/V benchmark's plot (`skattn bench --quant`, and `--report quant.csv`):
per cell, each quantized form's speed-up over the f16 path of the same run, with the
decode target (1.7x at L >= 16384) and parity drawn."""
from __future__ import annotations

import csv
from pathlib import Path

from skattn.bench.records import have_matplotlib

DECODE_TARGET = 1.7


def plot(rows: list[dict], path) -> None:
    """PNG: speed-up over f16 per cell (model, n, L), a bar per quantized form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skattn.bench.quant import QUANTIZED, _by_cell, _num

    cells = list(_by_cell(rows).items())
    fig, ax = plt.subplots(figsize=(max(8.0, 0.5 * len(cells) + 3), 4.2))
    width = 0.8 / len(QUANTIZED)
    for i, form in enumerate(QUANTIZED):
        ys = [_num(by.get(form), "speedup_vs_f16") or 0.0 for _, by in cells]
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(cells))], ys, width=width,
               label=form)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(DECODE_TARGET, color="black", linewidth=0.8, linestyle="--",
               label=f"decode target ({DECODE_TARGET}x at L >= 16384)")
    ax.set_xticks(range(len(cells)), [f"{k[0]} n={k[4]} {k[5] // 1024}k" for k, _ in cells],
                  fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("speed-up over skattn f16", fontsize=8)
    ax.set_title("quantized K/V: per-layer speed over the f16 path (CUDA graph, cold L2)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths, out_dir=None, stem: str | None = None) -> str:
    """The table (`quant.markdown_table`) and the plot from quant CSVs (a later file's
    (cell, form) replacing an earlier one's): `<stem>.md` and `<stem>.png` next to the first
    CSV (or in `out_dir`); returns the markdown."""
    from skattn.bench.quant import markdown_table

    paths = [Path(p) for p in paths]
    merged: dict = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                merged[(r["model"], r["n"], r["depth"], r["format"])] = r
    rows = list(merged.values())
    out_dir = Path(out_dir) if out_dir else paths[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{paths[0].stem}-report"
    md = [f"# skattn quantized K/V: {', '.join(p.name for p in paths)}", "",
          "p50 µs per layer (% of each form's own floor) and speed-up over f16, same run.", "",
          markdown_table(rows)]
    if rows and have_matplotlib():
        plot(rows, out_dir / f"{stem}.png")
    else:
        md += ["", "Plot skipped: " + ("no rows" if not rows else "matplotlib is not installed here.")]
    text = "\n".join(md)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    return text
