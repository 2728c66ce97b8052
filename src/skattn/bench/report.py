"""Tables and plots drawn from the bench's long-format CSV files (one or several parts)."""
from __future__ import annotations

import math

from skattn.bench.anchors import TIMES, anchor_index, load_anchors, pct_of_floor
from skattn.bench.grid import SKATTN_VARIANTS
from skattn.bench.providers import NOMASK, NOMASK_NOTE
from skattn.bench.records import (have_matplotlib, merge_rows, not_timed, provenance_text,
                                  report_files, write_markdown)
from skattn.bench.records import number as _num
from skattn.policy import POLICY_ALIASES

_OTHER_ORDER = ("sdpa-flash", "sdpa-cudnn", "sdpa-flash-nomask", "sdpa-cudnn-nomask", "flex", "flashinfer",
                "flash-attn")
TIMER_TEXT = {
    "event": "one call between CUDA events after an L2 flush (it includes the ~3.5 µs launch "
             "latency a CUDA graph pays once per step)",
    "graph": "per layer: replay time of one CUDA graph of NL calls (NL in the `layers` column), "
             "each layer with its own Q/K/V and output, / NL, after an L2 flush",
}
_SPEEDUP_VARIANTS = ("llamacpp", "round-4x", "auto", "fused")  # each against llamacpp-before


def read_rows(csv_paths) -> list[dict]:
    """Rows of every CSV, merged: a later file's row replaces an earlier one for the same
    (provider, variant, model, n, depth, timer). Rows without a timer (older files) get "event"."""
    return merge_rows(csv_paths, lambda row: (row["provider"], row.get("variant", ""),
                                              row["model"], int(row["n"]), int(row["depth"]),
                                              row["timer"]), _old_spellings)


def _old_spellings(row: dict) -> None:
    row["timer"] = row.get("timer") or "event"
    # files written before the policies' plain names use their aliases
    row["variant"] = POLICY_ALIASES.get(row.get("variant", ""), row.get("variant", ""))


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok" and _num(row, "p50_us") is not None


def label(row: dict) -> str:
    """'skattn:llamacpp', 'sdpa-flash', ..."""
    return f"{row['provider']}:{row['variant']}" if row.get("variant") else row["provider"]


def header(lab: str) -> str:
    """A provider label as a table header: the unmasked SDPA anchors say what they are."""
    return f"{lab} ({NOMASK_NOTE})" if lab in NOMASK else lab


def by_timer(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their timer, graph first."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("timer") or "event", []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != "graph", kv[0])))


def _cells(rows: list[dict]) -> list[tuple]:
    """(model, hq, hkv, d, n, depth) in model order of first appearance, then n, depth."""
    order: dict[str, int] = {}
    cells = set()
    for r in rows:
        order.setdefault(r["model"], len(order))
        cells.add((r["model"], int(r["hq"]), int(r["hkv"]), int(r["d"]), int(r["n"]), int(r["depth"])))
    return sorted(cells, key=lambda c: (order[c[0]], c[4], c[5]))


def _index(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["model"], int(r["n"]), int(r["depth"]), label(r)): r for r in rows}


def _labels(rows: list[dict]) -> list[str]:
    present = {label(r) for r in rows}
    ordered = [f"skattn:{v}" for v in SKATTN_VARIANTS] + list(_OTHER_ORDER)
    return [x for x in ordered if x in present] + sorted(present - set(ordered))


def _floor(idx: dict, cell: tuple, labels: list[str]) -> float | None:
    for lab in labels:
        value = _num(idx.get((cell[0], cell[4], cell[5], lab)), "floor_us")
        if value is not None:
            return value
    return None


def _entry(row: dict | None) -> str:
    if row is None:
        return "—"
    if not _ok(row):
        return row.get("status", "?").split(":")[0]
    return f"{_num(row, 'p50_us'):.1f}"


def speedup(master: dict | None, other: dict | None) -> float | None:
    """p50 of llamacpp-before / p50 of `other` (> 1: `other` is faster)."""
    if not (_ok(master) and _ok(other)):
        return None
    return _num(master, "p50_us") / _num(other, "p50_us")


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def seed_table(rows: list[dict]) -> str:
    """skattn per cell in the seed's form: llamacpp-before vs llamacpp, plus round-4x, auto, fused."""
    idx, labels = _index(rows), _labels(rows)
    head = ["model (Hq/Hkv/D)", "n", "L", "floor µs", "llamacpp-before µs (N fixup)",
            "llamacpp µs (N fixup)", "speed-up", "round-4x µs", "speed-up", "auto µs (N)",
            "speed-up", "fused µs", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in _cells(rows):
        model, hq, hkv, d, n, depth = cell
        get = {v: idx.get((model, n, depth, f"skattn:{v}")) for v in SKATTN_VARIANTS}
        if not any(get.values()):
            continue
        master = get["llamacpp-before"]

        def planned(r):
            return f"{_entry(r)} ({r.get('programs', '')} {r.get('fixup', '')})" if _ok(r) else _entry(r)

        auto = get["auto"]
        row = [f"{model} ({hq}/{hkv}/{d})", str(n), str(depth), _fmt(_floor(idx, cell, labels), ".1f", ""),
               planned(master), planned(get["llamacpp"]), _fmt(speedup(master, get["llamacpp"])),
               _entry(get["round-4x"]), _fmt(speedup(master, get["round-4x"])),
               f"{_entry(auto)} ({auto.get('programs', '')})" if _ok(auto) else _entry(auto),
               _fmt(speedup(master, auto)), _entry(get["fused"]), _fmt(speedup(master, get["fused"]))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def floor_table(rows: list[dict]) -> str:
    """Every provider's % of floor per cell; an entry reads '% of floor (p50 µs)'."""
    idx, labels = _index(rows), _labels(rows)
    head = ["model (Hq/Hkv/D)", "n", "L", "floor µs"] + [header(lab) for lab in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in _cells(rows):
        model, hq, hkv, d, n, depth = cell
        entries = []
        for lab in labels:
            r = idx.get((model, n, depth, lab))
            entries.append(f"{_num(r, 'pct_floor'):.0f}% ({_num(r, 'p50_us'):.1f})" if _ok(r) else _entry(r))
        row = [f"{model} ({hq}/{hkv}/{d})", str(n), str(depth), _fmt(_floor(idx, cell, labels), ".1f", "")]
        lines.append("| " + " | ".join(row + entries) + " |")
    return "\n".join(lines)


def _best_skattn(idx: dict, model: str, n: int, depth: int) -> dict | None:
    """The ok skattn row with the highest % of floor in a cell, or None."""
    found = [r for v in SKATTN_VARIANTS if _ok(r := idx.get((model, n, depth, f"skattn:{v}")))
             and _num(r, "pct_floor") is not None]
    return max(found, key=lambda r: _num(r, "pct_floor"), default=None)


def anchors_table(rows: list[dict], anchors: list[dict]) -> tuple[str, str]:
    """(intro, table): per cell in both our rows and the anchors, % of floor side by side.

    Ours: the best skattn variant's and our sdpa-flash / sdpa-cudnn pct_floor (our GPU, our floor).
    Anchors: floor_us / anchor_us * 100 on their own H100 floor. Cells without an anchor are left out.
    """
    if not anchors:
        return ("No anchors file (benchmarks/anchors-h100.csv is read from the repository): "
                "table skipped.", "")
    aidx, idx = anchor_index(anchors), _index(rows)
    where = ", ".join(sorted({f"{a['gpu']} on {a['date']}" for a in anchors}))
    ours = ", ".join(sorted({r["gpu"] for r in rows if r.get("gpu")})) or "the GPU of the CSV"
    intro = (f"The anchors were measured on an {where} (docs/benchmarks.md), ours on {ours}, so the "
             "comparison is by % of each GPU's own measured floor (their bandwidth and matmul "
             "ceilings differ), not by microseconds. Anchor % = anchor floor µs / anchor µs. The "
             "llama.cpp anchor reran on warm buffers (optimistic at L = 8192, where K/V partly fit "
             "in L2); the SDPA anchors were taken on a busy CPU (indicative only).")
    ours_labels = ["sdpa-flash", "sdpa-cudnn"] + [lab for lab in NOMASK if lab in {label(r) for r in rows}]
    head = (["model (Hq/Hkv/D)", "n", "L", "best skattn % (variant)"]
            + [f"{name} % (H100)" for name in TIMES.values()]
            + [f"{header(lab)} % (ours)" for lab in ours_labels]
            + ["skattn beats llama.cpp (as % of floor)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wins: dict[int, list[bool]] = {}
    for model, hq, hkv, d, n, depth in _cells(rows):
        anchor = aidx.get((hq, hkv, d, n, depth))
        if anchor is None:
            continue
        best = _best_skattn(idx, model, n, depth)
        mine = _num(best, "pct_floor")
        theirs = {key: pct_of_floor(anchor, key) for key in TIMES}
        sdpa = [_num(r, "pct_floor") if _ok(r := idx.get((model, n, depth, lab))) else None
                for lab in ours_labels]
        beats = "—"
        if mine is not None and theirs["llamacpp_us"] is not None:
            wins.setdefault(n, []).append(mine > theirs["llamacpp_us"])
            beats = "yes" if wins[n][-1] else "no"
        row = [f"{model} ({hq}/{hkv}/{d})", str(n), str(depth),
               f"{mine:.0f}% ({best['variant']})" if best else "—"]
        row += [_fmt(x, ".0f", "%") for x in (*theirs.values(), *sdpa)] + [beats]
        lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 2:
        return intro, "No cell of these CSVs is in the anchor grid."
    total = [w for ws in wins.values() for w in ws]
    tally = "; ".join(f"n = {n}: {sum(ws)} of {len(ws)}" for n, ws in sorted(wins.items()))
    lines += ["", f"skattn's best variant beats llama.cpp's % of floor in {sum(total)} of {len(total)} "
              f"cells ({tally})."]
    return intro, "\n".join(lines)


def _provenance(rows: list[dict]) -> str:
    return provenance_text(rows, ("gpu", "sms", "torch", "triton", "commit", "flush"))


def _cell_axes(rows, title, ylabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(rows)
    models = list(dict.fromkeys(c[0] for c in cells))
    per_model = max(sum(1 for c in cells if c[0] == m) for m in models)
    size = (max(8.0, 0.55 * per_model + 3), 2.6 * len(models) + 0.6)
    fig, axes = plt.subplots(len(models), 1, figsize=size, squeeze=False)
    fig.suptitle(title, fontsize=11)
    out = []
    for ax, m in zip(axes[:, 0], models):
        mc = [c for c in cells if c[0] == m]
        ax.set_title(f"{m} ({mc[0][1]}/{mc[0][2]}/{mc[0][3]})", fontsize=9)
        ax.set_xticks(range(len(mc)), [f"n={c[4]}\n{c[5] // 1024}k" for c in mc], fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        out.append((ax, mc))
    return fig, out


def plot_speedup(rows: list[dict], path) -> None:
    """PNG: per cell, speed-up of each skattn variant over llamacpp-before (bars)."""
    idx = _index(rows)
    fig, axes = _cell_axes(rows, "skattn: speed-up over llamacpp-before (p50, cold L2)", "speed-up")
    width = 0.8 / len(_SPEEDUP_VARIANTS)
    for ax, mc in axes:
        for i, v in enumerate(_SPEEDUP_VARIANTS):
            ys = [speedup(idx.get((c[0], c[4], c[5], "skattn:llamacpp-before")),
                          idx.get((c[0], c[4], c[5], f"skattn:{v}"))) for c in mc]
            xs = [j - 0.4 + (i + 0.5) * width for j in range(len(mc))]
            ax.bar(xs, [y or 0.0 for y in ys], width=width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_pct_floor(rows: list[dict], path, anchors: list[dict] | None = None) -> None:
    """PNG: per cell, every provider's % of floor (markers joined per provider); with `anchors`,
    llama.cpp's % of its own H100 floor as a dashed black line."""
    idx, aidx = _index(rows), anchor_index(anchors or [])
    fig, axes = _cell_axes(rows, "% of floor (100 = at the copy-bandwidth / matmul floor)", "% of floor")
    for ax, mc in axes:
        for lab in _labels(rows):
            ys = [_num(r, "pct_floor") if _ok(r := idx.get((c[0], c[4], c[5], lab))) else math.nan
                  for c in mc]
            ax.plot(range(len(mc)), ys, marker="o", markersize=3, linewidth=1, label=lab)
        ys = [pct_of_floor(a, "llamacpp_us") if (a := aidx.get((c[1], c[2], c[3], c[4], c[5]))) else None
              for c in mc]
        if any(y is not None for y in ys):
            ax.plot(range(len(mc)), [math.nan if y is None else y for y in ys], "k--", linewidth=1,
                    marker="x", markersize=3, label="llama.cpp (H100 anchor)")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def report(csv_paths, out_dir=None, stem: str | None = None, plots: bool = True,
           anchors: list[dict] | None = None) -> str:
    """Markdown with three tables from bench CSVs; writes `<stem>.md` and two PNGs to `out_dir`.

    Parameters
    ----------
    csv_paths : str, Path or list of them
        One CSV or several part files; for a repeated (provider, variant, model, n, depth)
        the later file wins.
    out_dir : str or Path, optional
        Where to write `<stem>.md`, `<stem>-speedup.png` and `<stem>-floor.png`; the first
        CSV's folder by default.
    stem : str, optional
        Output file stem; the first CSV's stem by default.
    plots : bool
        Draw the PNGs (skipped, with a note in the markdown, where matplotlib is missing).
    anchors : list of dict, optional
        Anchor rows for the "vs the anchors" table; `load_anchors()` (the repository's
        benchmarks/anchors-h100.csv, or none) by default.

    Returns
    -------
    str
        The markdown.
    """
    paths, out_dir, stem = report_files(csv_paths, out_dir, stem, "report")
    rows = read_rows(paths)
    groups = by_timer(rows)
    md = [f"# skattn bench: {', '.join(p.name for p in paths)}", "",
          f"Provenance: {_provenance(rows)}. Times are p50 µs with a cold L2; the "
          "floor is max(bytes / copy bandwidth, flops / matmul peak) measured in the same run. "
          "Plain causal shapes, batch 1, f16: gpt-oss's sinks and window layers are not applied.", ""]
    md += [f"- {timer} timer: {TIMER_TEXT.get(timer, timer)}." for timer in groups]
    if any(label(r) in NOMASK for r in rows):
        md += [f"- `sdpa-flash-nomask`, `sdpa-cudnn-nomask`: SDPA without a mask ({NOMASK_NOTE}; at "
               "n = 1 the same computation as the causal one). With `causal_lower_right` PyTorch runs "
               "cuDNN on a materialised mask, which is not cuDNN's kernel speed."]
    anchors = load_anchors() if anchors is None else anchors
    for timer, trows in groups.items():
        suffix = f" ({timer} timer)" if len(groups) > 1 else ""
        md += ["", "## skattn: llamacpp-before (general fixup) vs llamacpp (uniform fixup where it "
               f"applies){suffix}", "",
               "Speed-up = llamacpp-before p50 / variant p50. N = number of programs.", "",
               seed_table(trows), "", f"## Every provider: % of floor (p50 µs){suffix}", "",
               floor_table(trows)]
        intro, table = anchors_table(trows, anchors)
        md += ["", f"## vs the anchors: % of each GPU's own floor{suffix}", "", intro]
        md += ["", table] if table else []
    if plots and not have_matplotlib():
        plots = False
        md += ["", "PNG plots skipped: matplotlib is not installed here; run `skattn bench "
               "--report <csv>` where it is."]
    md += not_timed(rows, lambda r: f"{label(r)} {r['model']} n={r['n']} L={r['depth']}")
    text = write_markdown(md, out_dir, stem)
    for timer, trows in groups.items() if plots else ():
        part = f"-{timer}" if len(groups) > 1 else ""
        plot_speedup(trows, out_dir / f"{stem}{part}-speedup.png")
        plot_pct_floor(trows, out_dir / f"{stem}{part}-floor.png", anchors)
    return text


def _best(rows: list[dict]) -> tuple[str, str]:
    """('<variant or provider> <p50>', '<% of floor>') of the fastest row, or ('—', '')."""
    r = min(rows, key=lambda r: _num(r, "p50_us"), default=None)
    if r is None:
        return "—", ""
    return f"{r['variant'] or r['provider']} {_num(r, 'p50_us'):.1f}", f"{_num(r, 'pct_floor'):.0f}"


def summary(rows: list[dict]) -> str:
    """A short fixed-width table for the terminal: best skattn variant and best other per cell
    (rows of one timer; an unmasked SDPA anchor as best other at n > 1 is marked with *)."""
    idx, labels = _index(rows), _labels(rows)
    starred = False
    lines = [f"{'model':<18} {'n':>4} {'L':>6} {'floor':>7} {'best skattn':>24} {'%fl':>4} "
             f"{'llamacpp/master':>15} {'best other':>22} {'%fl':>4}"]
    for cell in _cells(rows):
        model, _, _, _, n, depth = cell
        found = [r for lab in labels if _ok(r := idx.get((model, n, depth, lab)))]
        m_txt, m_pct = _best([r for r in found if r["provider"] == "skattn"])
        others = [r for r in found if r["provider"] != "skattn"]
        o_txt, o_pct = _best(others)
        fastest = min(others, key=lambda r: _num(r, "p50_us"), default=None)
        if fastest is not None and label(fastest) in NOMASK and n > 1:
            o_txt, starred = o_txt + "*", True
        sp = speedup(idx.get((model, n, depth, "skattn:llamacpp-before")),
                     idx.get((model, n, depth, "skattn:llamacpp")))
        lines.append(f"{model:<18} {n:>4} {depth:>6} {_fmt(_floor(idx, cell, labels), '.1f', ''):>7} "
                     f"{m_txt:>24} {m_pct:>4} {_fmt(sp):>15} {o_txt:>22} {o_pct:>4}")
    if starred:
        lines.append(f"* {NOMASK_NOTE}")
    return "\n".join(lines)
