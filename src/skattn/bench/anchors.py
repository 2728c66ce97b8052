"""Anchors: other systems' times on the seed grid, measured elsewhere (docs/benchmarks.md).

The CSV lives in the repository (`benchmarks/anchors-h100.csv`), not in the package: an installed
skattn without the repository next to it has no anchors, and `load_anchors()` returns [].
"""
from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["ANCHORS_CSV", "COLUMNS", "TIMES", "load_anchors", "anchor_index", "pct_of_floor"]

# src/skattn/bench/anchors.py -> <repo>/benchmarks/anchors-h100.csv
ANCHORS_CSV = Path(__file__).resolve().parents[3] / "benchmarks" / "anchors-h100.csv"

COLUMNS = ("model", "hq", "hkv", "d", "n", "depth", "floor_us", "llamacpp_us", "sdpa_flash_us",
           "sdpa_cudnn_us", "gpu", "date", "source")
_INTS = ("hq", "hkv", "d", "n", "depth")
# The anchor systems' time columns, with the names the report prints.
TIMES = {"llamacpp_us": "llama.cpp", "sdpa_flash_us": "SDPA flash", "sdpa_cudnn_us": "SDPA cuDNN"}


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load_anchors(path=None) -> list[dict]:
    """The anchor rows, typed: ints for the shape, floats (or None where blank) for the times.

    Parameters
    ----------
    path : str or Path, optional
        The CSV; `ANCHORS_CSV` by default.

    Returns
    -------
    list of dict
        One dict per cell with the keys of `COLUMNS`; [] where the file does not exist.
    """
    path = Path(path) if path is not None else ANCHORS_CSV
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: raw.get(k, "") for k in COLUMNS}
            row.update({k: int(raw[k]) for k in _INTS})
            row.update({k: _float(raw.get(k)) for k in ("floor_us", *TIMES)})
            rows.append(row)
    return rows


def anchor_index(anchors: list[dict]) -> dict[tuple, dict]:
    """Anchors by cell shape (hq, hkv, d, n, depth): model names are not needed to match."""
    return {(a["hq"], a["hkv"], a["d"], a["n"], a["depth"]): a for a in anchors}


def pct_of_floor(anchor: dict, key: str) -> float | None:
    """The anchor system's time `key` as % of its own GPU's floor: floor_us / time * 100."""
    floor, t = anchor.get("floor_us"), anchor.get(key)
    if floor is None or not t:
        return None
    return 100.0 * floor / t
