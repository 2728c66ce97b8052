"""Tables and a plot from `skattn bench --e2e` CSVs: tokens/s per cell, skattn vs SDPA."""
from __future__ import annotations

from typing import NamedTuple

from skattn.bench.records import (have_matplotlib, merge_rows, not_timed, ok_number,
                                  provenance_text, report_files, save_figure, write_markdown)
from skattn.policy import POLICY_ALIASES

SKATTN_POLICIES = ("llamacpp-before", "llamacpp", "auto")
FP8 = "skattn-fp8"  # rows of skattn over an FP8 KV cache (skattn.bench.e2e_fp8)
Q8_0 = "skattn-q8_0"  # rows of skattn over a q8_0 KV cache (skattn.bench.e2e_q8_0)


class Quantized(NamedTuple):
    """How the report names a quantized provider kind's rows."""

    plot: str  # the plot's label prefix
    rounding: str  # the rounding whose effect the rows' bound adds
    cache: str  # what the rows run over, after "skattn over " in the report's note


# the quantized providers' kinds, in the report's order
QUANTIZED = {
    FP8: Quantized(
        "fp8 K/V", "e4m3",
        "an FP8 KV cache (`skattn.transformers.FP8Cache`'s layers at a fixed depth, "
        "float8_e4m3fn with per-KV-head scales amax / 448 of the depth tokens): each step reads "
        "1-byte K/V, half the K/V bytes of the other rows"),
    Q8_0: Quantized(
        "q8_0 K/V", "q8_0",
        "a q8_0 KV cache (`skattn.transformers.Q8_0Cache`'s layers at a fixed depth, llama.cpp's "
        "q8_0 blocks: int8 values with one f16 scale, amax / 127, per 32 values of each token's "
        "K or V head): each step reads 1.0625 bytes a K/V value, 0.53x the K/V bytes of the "
        "other rows"),
}


def read_rows(csv_paths) -> list[dict]:
    """Rows of every CSV; a later file's row replaces an earlier one for the same
    (provider, policy, mode, model, n, depth)."""
    return merge_rows(csv_paths, lambda row: (row["provider"], row["policy"], row["mode"],
                                              row["model"], int(row["n"]), int(row["depth"])),
                      _old_spellings)


def _old_spellings(row: dict) -> None:
    # files written before the policies' plain names use their aliases
    row["policy"] = POLICY_ALIASES.get(row["policy"], row["policy"])
    row["provider"] = row["provider"].replace("llamacpp-master", POLICY_ALIASES["llamacpp-master"])


def _tps(row: dict | None) -> float | None:
    value = ok_number(row, "tokens_per_s")
    return value if value is not None and value > 0 else None


def _label(row: dict) -> str:
    return f"{row['provider']}:{row['policy']}" if row["policy"] else row["provider"]


def quantized_labels(rows, kind: str | None = None) -> list[str]:
    """The quantized providers in `rows` ("skattn-fp8:<policy>", "skattn-q8_0:<policy>"), or
    those of one `kind`: kind by kind in `QUANTIZED`'s order, each in the policies' order."""
    labels = []
    for k in ([kind] if kind else QUANTIZED):
        policies = {r["policy"] for r in rows if r["provider"] == k}
        order = [p for p in SKATTN_POLICIES if p in policies]
        labels += [f"{k}:{p}" for p in order + sorted(policies - set(SKATTN_POLICIES))]
    return labels


def _index(rows):
    return {(r["mode"], int(r["n"]), int(r["depth"]), _label(r)): r for r in rows}


def _cells(rows) -> list[tuple[str, int, int]]:
    modes = [m for m in ("eager", "graph") if any(r["mode"] == m for r in rows)]
    cells = {(int(r["n"]), int(r["depth"])) for r in rows}
    return [(m, n, d) for m in modes for n, d in sorted(cells)]


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    value = _tps(row)
    return f"{value:,.1f}" if value is not None else row.get("status", "?").split(":")[0]


def ratio(idx: dict, cell: tuple, num: str, den: str) -> float | None:
    """tokens/s of `num` / tokens/s of `den` in one (mode, n, depth) cell."""
    a, b = _tps(idx.get((*cell, num))), _tps(idx.get((*cell, den)))
    return a / b if a is not None and b is not None else None


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def table(rows: list[dict]) -> str:
    """Markdown: per (mode, n, depth) tokens/s of SDPA, each skattn policy and each quantized
    (FP8, q8_0) provider, with the speed-ups of llamacpp over llamacpp-before (the seed's
    experiment), of auto and of each quantized provider over SDPA, and of the best f16 skattn
    policy over SDPA."""
    idx, quantized = _index(rows), quantized_labels(rows)
    labels = ["sdpa"] + [f"skattn:{p}" for p in SKATTN_POLICIES] + quantized
    head = ["mode", "n", "depth", "sdpa tok/s"] + [f"{p} tok/s" for p in SKATTN_POLICIES]
    names = [lab.replace(":", " ") for lab in quantized]
    head += [f"{name} tok/s" for name in names]
    head += ["llamacpp vs before", "auto vs sdpa"] + [f"{name} vs sdpa" for name in names]
    head += ["best skattn vs sdpa"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in _cells(rows):
        mode, n, depth = cell
        entries = [_cell(idx.get((*cell, lab))) for lab in labels]
        best = max((r for p in SKATTN_POLICIES if (r := ratio(idx, cell, f"skattn:{p}", "sdpa"))),
                   default=None)
        lines.append("| " + " | ".join(
            [mode, str(n), str(depth)] + entries
            + [_x(ratio(idx, cell, "skattn:llamacpp", "skattn:llamacpp-before")),
               _x(ratio(idx, cell, "skattn:auto", "sdpa"))]
            + [_x(ratio(idx, cell, lab, "sdpa")) for lab in quantized] + [_x(best)]) + " |")
    return "\n".join(lines)


def _provenance(rows) -> str:
    return provenance_text(rows, ("model", "layers", "dtype", "gpu", "torch", "triton",
                                  "transformers", "commit"))


def plot(rows: list[dict], path) -> None:
    """PNG: per mode, each skattn policy's speed-up over SDPA per (n, depth) cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx, cells = _index(rows), _cells(rows)
    labels = [f"skattn:{p}" for p in SKATTN_POLICIES] + quantized_labels(rows)
    modes = list(dict.fromkeys(c[0] for c in cells))
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(8.0, 0.5 * len(cells) / max(1, len(modes)) + 3), 3.0 * len(modes) + 0.6))
    fig.suptitle("end to end: skattn tokens/s over SDPA's (transformers model, one step of n "
                 "tokens at depth)", fontsize=10)
    width = 0.8 / len(labels)
    for ax, mode in zip(axes[:, 0], modes):
        mc = [c for c in cells if c[0] == mode]
        for i, label in enumerate(labels):
            ys = [ratio(idx, c, label, "sdpa") or 0.0 for c in mc]
            name = label.removeprefix("skattn:")
            for kind, q in QUANTIZED.items():
                name = name.replace(f"{kind}:", f"{q.plot} ")
            xs = [j - 0.4 + (i + 0.5) * width for j in range(len(mc))]
            ax.bar(xs, ys, width=width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(mc)), [f"n={c[1]}\n{c[2] // 1024}k" for c in mc], fontsize=7)
        ax.set_title(mode, fontsize=9)
        ax.set_ylabel("speed-up over sdpa", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, axes, path)


def e2e_report(csv_paths, out_dir=None, stem: str | None = None, plots: bool = True) -> str:
    """Markdown from e2e CSVs; writes `<stem>.md` and `<stem>.png` next to the first CSV
    (or into `out_dir`) and returns the markdown."""
    paths, out_dir, stem = report_files(csv_paths, out_dir, stem, "e2e_report")
    rows = read_rows(paths)
    md = [f"# skattn bench --e2e: {', '.join(p.name for p in paths)}", "",
          f"Provenance: {_provenance(rows)}.", "",
          "One step of n new tokens over a KV cache of `depth` tokens (it attends to depth + n "
          "keys; llama-bench's `-d`), random weights, batch 1; tokens/s = n / median step time "
          "(CUDA events around each step, back to back, so host time counts where the host is "
          "slower than the GPU); logits of the last token only. eager: `model(...)` as "
          "transformers runs it (mask built each step). graph: a CUDA graph of the same layers "
          "with the mask built before capture. sdpa is transformers' own: for n > 1 at a depth "
          "it passes a materialised bool mask (so PyTorch runs its memory-efficient kernel, "
          "with K/V repeated per query head), for n = 1 no mask. skattn runs bottom-right causal "
          "with no mask, under each planner policy."]
    for kind, q in QUANTIZED.items():
        if quantized_labels(rows, kind):
            md += ["", f"{kind}:<policy> rows: skattn over {q.cache}. They are compared with "
                   "f16 sdpa (2-byte K/V, not rounded): the bound (the CSV's `tol`) is the f16 "
                   f"rows' 0.1 plus the relative error that {q.rounding} rounding of K/V alone "
                   "causes in sdpa's logits on that cell; `best skattn` is over the f16 "
                   "policies."]
    md += ["", table(rows)]
    if plots and not have_matplotlib():
        plots = False
        md += ["", "Plot skipped: matplotlib is not installed here."]
    md += not_timed(rows, lambda r: f"{_label(r)} {r['mode']} n={r['n']} L={r['depth']}")
    text = write_markdown(md, out_dir, stem)
    if plots and rows:
        plot(rows, out_dir / f"{stem}.png")
    return text
