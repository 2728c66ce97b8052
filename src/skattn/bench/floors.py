"""Roofline floors of a cell from the ceilings measured in the same run (docs/benchmarks.md)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ceilings:
    """What the GPU can do: device-to-device copy bandwidth and f16 matmul peak."""

    copy_bytes_per_s: float  # read + write bytes per second
    matmul_flops_per_s: float


def cell_bytes(hq: int, hkv: int, d: int, n: int, depth: int, *, kv_itemsize: int = 2,
               q_itemsize: int = 2) -> int:
    """K and V read once, q read once, out written once (batch 1, Dk = Dv = d).

    Parameters
    ----------
    hq, hkv, d, n, depth : int
        Query heads, KV heads, head size, query tokens, KV length.
    kv_itemsize, q_itemsize : int
        Bytes per element of K/V and of q/out.

    Returns
    -------
    int
    """
    return 2 * depth * hkv * d * kv_itemsize + 2 * n * hq * d * q_itemsize


def cell_flops(hq: int, d: int, n: int, depth: int) -> int:
    """4 * Hq * n * Lk * D: the two matmuls over every key (the causal triangle not subtracted)."""
    return 4 * hq * n * depth * d


def floor_us(nbytes: float, flops: float, ceilings: Ceilings) -> float:
    """max(bytes / copy bandwidth, flops / matmul peak), in microseconds.

    Parameters
    ----------
    nbytes, flops : float
        The cell's traffic and arithmetic (see `cell_bytes`, `cell_flops`).
    ceilings : Ceilings

    Returns
    -------
    float
    """
    return 1e6 * max(nbytes / ceilings.copy_bytes_per_s, flops / ceilings.matmul_flops_per_s)


def pct_floor(floor: float, p50: float) -> float:
    """100 * floor / measured median (100 = at the floor)."""
    return 100.0 * floor / p50 if p50 > 0 else float("nan")
