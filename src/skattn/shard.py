"""A contiguous shard of one sequence's keys as bottom-right attention calls (pure Python).

`skattn.attention` places query i of Lq at position ``Lk - Lq + i`` of the keys it is given
(bottom-right causal). A rank that holds keys ``[start, stop)`` of a sequence of ``kv_len``
keys sees query i at global position ``t_i = kv_len - q_len + i``. `shard_calls` splits the
query rows into at most three groups whose masks the dense API expresses exactly on the
shard's keys (docs/distributed.md):

- rows with ``start <= t_i < stop`` (the queries that sit inside the shard): one causal call
  on the query slice ``[a, b)`` with ``b = stop - (kv_len - q_len)``, since bottom-right
  alignment puts the slice's last row at the shard's last key, which is where it is;
- rows past the shard (``t_i >= stop``) that see every key of it (no window, or the window
  reaches back past ``start``): one call without causal mask;
- rows past the shard whose window starts inside it: for one row, a call without mask on the
  keys from the window's start; for several rows (a diagonal band) a call with an additive
  mask on the keys from the first row's window start (the fallback: the dense API has no
  query offset);

and rows before the shard (``t_i < start``) or whose window ends before it see none of its
keys: no call, partial output 0 and lse -inf.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardCall:
    """One attention call on a shard: query rows ``[rows[0], rows[1])`` against shard-local
    keys ``[keys[0], keys[1])``, bottom-right `causal` and `window` as in `skattn.attention`;
    `band` asks for an additive mask that keeps key j of row i where ``start + j > t_i - window``
    (`band_mask`)."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    causal: bool
    window: int | None = None
    band: bool = False


def _clip(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def shard_calls(*, q_len: int, kv_len: int, start: int, stop: int, causal: bool,
                window: int | None) -> list[ShardCall]:
    """The calls that compute a shard's partial attention for every query row that sees one
    of its keys.

    Parameters
    ----------
    q_len : int
        Query tokens Lq (the last Lq positions of the sequence, bottom-right).
    kv_len : int
        Keys of the whole sequence.
    start, stop : int
        This shard's keys ``[start, stop)``, ``0 <= start <= stop <= kv_len``.
    causal, window : bool, int or None
        The sequence's mask, as in `skattn.attention` (window needs causal).

    Returns
    -------
    list of ShardCall
        Disjoint row ranges; rows in none of them see no key of the shard.
    """
    if not 0 <= start <= stop <= kv_len:
        raise ValueError(f"shard [{start}, {stop}) must lie in [0, kv_len={kv_len}]")
    n = stop - start
    if n == 0 or q_len == 0:
        return []
    if not causal:
        return [ShardCall((0, q_len), (0, n), False)]
    first = kv_len - q_len  # position of query row 0
    calls = []
    a, b = _clip(start - first, 0, q_len), _clip(stop - first, 0, q_len)
    if a < b:  # queries inside the shard: their own bottom-right causal call
        calls.append(ShardCall((a, b), (0, n), True, window))
    if window is None:
        c1 = c2 = q_len
    else:
        c1 = _clip(start + window - first, b, q_len)     # t_i - window < start: whole shard
        c2 = _clip(stop + window - 1 - first, c1, q_len)  # t_i - window >= stop - 1: nothing
    if b < c1:
        calls.append(ShardCall((b, c1), (0, n), False))
    if c1 < c2:
        k0 = first + c1 - window + 1 - start  # the first row's first visible key, local
        calls.append(ShardCall((c1, c2), (k0, n), False, band=c2 - c1 > 1))
    return calls


def band_mask_rows(call: ShardCall, *, q_len: int, kv_len: int, start: int, window: int):
    """For a band call: per row of the call, the first visible key relative to the call's
    first key (keys before it are hidden); a list of ints, one per row."""
    first = kv_len - q_len
    return [first + i - window + 1 - start - call.keys[0] for i in range(*call.rows)]


def even_shards(kv_len: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards ``[start, stop)`` of `kv_len` keys over `world` ranks, sizes differing
    by at most one (the first ``kv_len % world`` ranks one key longer)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if not isinstance(kv_len, int) or kv_len < 0:
        raise ValueError(f"kv_len must be a non-negative int, got {kv_len!r}")
    base, extra = divmod(kv_len, world)
    bounds, pos = [], 0
    for r in range(world):
        size = base + (r < extra)
        bounds.append((pos, pos + size))
        pos += size
    return bounds
