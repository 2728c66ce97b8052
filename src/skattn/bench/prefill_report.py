"""Table and plot of the prompt-chunk A/B (`tools/prefill_ab.py`'s CSV), for
`skattn bench --report prefill_ab.csv`: per cell and dtype, each provider's % of the
measured matmul peak, skattn's speed over SDPA cuDNN without a mask (a lower bound on
cuDNN's causal time, labelled so), and whether both of the prompt-chunk targets hold
(>= 75% of peak and faster than unmasked cuDNN)."""
from __future__ import annotations

from skattn.bench.records import (finish_report, grouped_bars, merge_rows, report_files,
                                  save_figure, style_panel)

CUDNN = "sdpa-cudnn-nomask"
PEAK_TARGET = 75.0  # % of the matmul peak


def read_rows(paths) -> list[dict]:
    """Rows of prefill_ab CSVs, a later file's (cell, dtype, provider, variant) replacing an
    earlier one's."""
    return merge_rows(paths, lambda r: (r["model"], r["n"], r["L"], r["dtype"], r["provider"],
                                        r["variant"]))


def _label(r) -> str:
    return "cuDNN, no mask (lower bound)" if r["provider"] == CUDNN else f"skattn {r['variant']}"


def _cells(rows) -> list[tuple]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted({(r["model"], int(r["n"]), int(r["L"])) for r in rows},
                  key=lambda c: (models.index(c[0]), c[1] != 512, c[1], c[2]))


def _ok(rows) -> dict:
    return {(r["model"], int(r["n"]), int(r["L"]), r["dtype"], _label(r)): r for r in rows
            if r.get("status") == "ok" and r.get("pct_peak")}


def table(rows: list[dict]) -> str:
    idx, cells = _ok(rows), _cells(rows)
    labels = list(dict.fromkeys(_label(r) for r in rows))
    skattn = [x for x in labels if x.startswith("skattn")]
    lead = "skattn auto" if "skattn auto" in skattn else (skattn[0] if skattn else "skattn")
    lines = ["| model | n | L | dtype | " + " | ".join(f"{x} (% peak)" for x in labels)
             + " | " + " | ".join(f"{x} / cuDNN" for x in skattn) + " | targets |",
             "|---|---|---|---|" + "---|" * (len(labels) + len(skattn) + 1)]
    met = total = 0
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for c in cells:
            got = {x: idx.get((*c, dtype, x)) for x in labels}
            if not any(got.values()):
                continue
            cudnn = got.get("cuDNN, no mask (lower bound)")
            cols = [f"{float(g['p50_us']):.1f} ({float(g['pct_peak']):.0f}%)" if g else "-"
                    for g in got.values()]
            speed = [float(cudnn["p50_us"]) / float(got[x]["p50_us"]) if cudnn and got[x]
                     else None for x in skattn]
            cols += [f"{s:.3f}x" if s else "-" for s in speed]
            best = got.get(lead)
            s = speed[skattn.index(lead)] if best and cudnn else None
            ok = bool(best and s and float(best["pct_peak"]) >= PEAK_TARGET and s >= 1.0)
            met, total = met + ok, total + 1
            lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {dtype} | " + " | ".join(cols)
                         + f" | {'both' if ok else '-'} |")
    lines += ["", f"Both targets (>= {PEAK_TARGET:.0f}% of the matmul peak and faster than "
              f"unmasked cuDNN) with {lead}: {met} of {total} cells."]
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """PNG: % of the matmul peak per cell, a panel per dtype, the 75% target drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx, cells = _ok(rows), _cells(rows)
    labels = list(dict.fromkeys(_label(r) for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 1, squeeze=False,
                             figsize=(max(9.0, 0.45 * len(cells) + 3), 3.6 * len(dtypes) + 0.8))
    fig.suptitle("prompt chunks: % of the measured matmul peak (graph timer, cold L2); "
                 "cuDNN without a mask is a lower bound on its causal time", fontsize=9)
    for ax, dtype in zip(axes[:, 0], dtypes):
        grouped_bars(ax, [(label, [float(idx[(*c, dtype, label)]["pct_peak"])
                                   if (*c, dtype, label) in idx else 0.0 for c in cells])
                          for label in labels])
        ax.axhline(PEAK_TARGET, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cells)), [f"{m} n={n} {L // 1024}k" for m, n, L in cells],
                      fontsize=6, rotation=60, ha="right")
        style_panel(ax, dtype, "% of peak", (0, 100))
    save_figure(fig, axes, path)


def report(paths, out_dir=None, stem: str | None = None) -> str:
    """Markdown and plot from prefill_ab CSVs: `<stem>.md`, `<stem>.png` next to the first
    CSV (or in `out_dir`); returns the markdown."""
    paths, out_dir, stem = report_files(paths, out_dir, stem, "a prefill report", "-report")
    rows = read_rows(paths)
    md = [f"# Prompt chunks: {', '.join(p.name for p in paths)}", "",
          "Per-layer µs (p50) in a CUDA graph, cold L2 (% of the matmul peak measured in the "
          "same run, the causal triangle not subtracted). cuDNN runs *without* a mask: a lower "
          "bound on its causal time.", "", table(rows)]
    return finish_report(md, rows, plot, out_dir, stem)
