"""The bench's long-format CSV rows: writing one per measurement, reading parts back merged."""
from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path


def record(row: dict, cell, prov: dict, writer, f, rows: list, bar) -> None:
    """Complete `row` with the cell's shape, a UTC time stamp and the provenance `prov`, write
    it (flushed, so a crash keeps the rows before it), keep it in `rows`, advance `bar`."""
    row.update(model=cell.model, hq=cell.hq, hkv=cell.hkv, d=cell.d, n=cell.n, depth=cell.depth,
               timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), **prov)
    writer.writerow(row)
    f.flush()
    rows.append(row)
    bar.update()


def merge_rows(csv_paths, key, fix=None) -> list[dict]:
    """The rows of every CSV, in order; a later row with the same `key(row)` replaces an earlier
    one (and takes its place at the end). `fix(row)`, when given, first rewrites a row in
    place (older files' spellings)."""
    merged: dict[tuple, dict] = {}
    for path in csv_paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if fix is not None:
                    fix(row)
                k = key(row)
                merged.pop(k, None)
                merged[k] = row
    return list(merged.values())


def number(row: dict | None, key: str) -> float | None:
    """`row[key]` as a finite float; None for no row, an empty field or not a number."""
    if row is None:
        return None
    try:
        value = float(row.get(key, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def ok_number(row: dict | None, key: str) -> float | None:
    """`number(row, key)` of a row whose status is "ok"; else None."""
    return number(row, key) if row is not None and row.get("status") == "ok" else None


def provenance_text(rows: list[dict], keys) -> str:
    """'gpu H200; torch 2.x; ...': the distinct values of each key that the rows have."""
    parts = []
    for key in keys:
        values = sorted({str(r[key]) for r in rows if r.get(key)})
        if values:
            parts.append(f"{key} {', '.join(values)}")
    return "; ".join(parts)


def report_files(csv_paths, out_dir, stem, what: str,
                 suffix: str = "") -> tuple[list[Path], Path, str]:
    """(CSV paths, output folder, output stem) of a report made from one CSV or several: by
    default next to the first CSV and named after it (+ `suffix`, where the run itself
    writes a markdown of the CSV's own name)."""
    paths = [Path(p) for p in ([csv_paths] if isinstance(csv_paths, (str, Path)) else csv_paths)]
    if not paths:
        raise ValueError(f"{what} needs at least one CSV file")
    return (paths, Path(out_dir) if out_dir is not None else paths[0].parent,
            stem or paths[0].stem + suffix)


def not_timed(rows: list[dict], describe) -> list[str]:
    """Markdown lines naming the rows whose status is not "ok" ('- <describe(row)>: <status>'),
    or none."""
    bad = [r for r in rows if r.get("status") != "ok"]
    if not bad:
        return []
    return ["", "## Not timed", ""] + [f"- {describe(r)}: {r.get('status', '')}" for r in bad]


def write_markdown(md: list[str], out_dir: Path, stem: str) -> str:
    """Write the lines `md` to `<out_dir>/<stem>.md` (the folder made if needed); returns the text."""
    text = "\n".join(md) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text)
    return text


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_table(rows: list[dict], out_dir, stem: str, meta: dict) -> Path:
    """A tool's rows as `out_dir/stem.csv` and its provenance `meta` as `stem.json` (the
    directory made if new); returns the CSV's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path



def write_rows(path, rows: list[dict]) -> None:
    """`rows` as a CSV at `path`, with every key any row has (in first-seen order)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def gpu_tool_dir(default: str) -> Path | None:
    """A GPU tool's output folder, made: $OUT, else `default`; None (saying so on stderr)
    where no CUDA GPU is present."""
    import os
    import sys

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --plan-only)", file=sys.stderr)
        return None
    out_dir = Path(os.environ.get("OUT") or default)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def tool_meta(**extra) -> dict:
    """Provenance of a GPU tool's run: GPU, versions, commit, its command line, and `extra`."""
    import sys

    import torch

    from skattn.bench.run import provenance

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return dict(provenance(sms), command=" ".join([sys.executable, *sys.argv]), **extra)


def write_meta(out_dir: Path, name: str, meta: dict, files) -> None:
    """A GPU tool's provenance as JSON `out_dir/name`, and a line naming what it wrote."""
    (out_dir / name).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {', '.join(files)} and {name} to {out_dir}")


def save_figure(fig, axes, path) -> None:
    """A report's figure to `path` (PNG): the legend of the first panel to its right."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_plot(plot, rows: list[dict], path: Path) -> bool:
    """`plot(rows, path)` where there are rows and matplotlib is installed; an older file at
    `path` (an earlier run under the same name) is removed either way. Whether it drew."""
    path.unlink(missing_ok=True)
    if not rows or not have_matplotlib():
        return False
    plot(rows, path)
    return True


def finish_report(md: list[str], rows: list[dict], plot, out_dir: Path, stem: str) -> str:
    """Draw `plot(rows, <out_dir>/<stem>.png)` (`draw_plot`; a line says why not where it
    does not), write the markdown lines `md` to `<stem>.md`; returns the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not draw_plot(plot, rows, out_dir / f"{stem}.png"):
        md = md + ["", "Plot skipped: " + ("no rows" if not rows
                                            else "matplotlib is not installed here.")]
    return write_markdown(md, out_dir, stem)


def style_panel(ax, title: str, ylabel: str, ylim: tuple | None = None) -> None:
    """A report panel's title, y label, y range and horizontal grid."""
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def grouped_bars(ax, series: list[tuple[str, list[float]]]) -> None:
    """One bar per series at each x = 0, 1, ... (a group per cell), labelled for the legend."""
    width = 0.8 / max(1, len(series))
    for i, (label, ys) in enumerate(series):
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(ys))], ys, width=width,
               label=label)

