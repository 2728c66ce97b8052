"""fastdiv: host constants for dividing by a run-time value, and the device math emulated."""
from __future__ import annotations

import numpy as np

__all__ = ["magic", "fastdiv", "divmod", "divmod_np"]

_U32 = 0xFFFFFFFF
_LIMIT = 1 << 31  # exclusive bound on divisors and numerators


def magic(d: int) -> tuple[int, int]:
    """Host constants (mp, shift) for dividing by `d` (llama.cpp: init_fastdiv_values).

    ``shift = L = ceil(log2 d)`` and ``mp = floor(2^32 * (2^L - d) / d) + 1`` truncated to
    32 bits (Granlund-Montgomery, figure 4.1).

    Parameters
    ----------
    d : int
        The divisor, ``1 <= d < 2**31``.

    Returns
    -------
    (mp, shift) : tuple of int
        ``0 <= mp < 2**32`` (pass to a kernel as uint32) and ``0 <= shift <= 31``.

    Examples
    --------
    >>> magic(1), magic(3), magic(132)
    ((1, 0), (1431655766, 2), (4034666248, 8))
    """
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or not 1 <= d < _LIMIT:
        raise ValueError(f"d must be an integer with 1 <= d < 2**31, got {d!r}")
    d = int(d)
    shift = (d - 1).bit_length()  # smallest L with 2**L >= d
    mp = ((1 << 32) * ((1 << shift) - d) // d + 1) & _U32
    return mp, shift


def _check_n(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n < _LIMIT:
        raise ValueError(f"n must be an integer with 0 <= n < 2**31, got {n!r}")
    return int(n)


def fastdiv(n: int, mp: int, shift: int) -> int:
    """``n // d`` as the device computes it: ``((umulhi32(n, mp) + n) mod 2^32) >> shift``.

    Parameters
    ----------
    n : int
        Numerator, ``0 <= n < 2**31`` (the domain where the 32-bit add cannot overflow).
    mp, shift : int
        Constants from :func:`magic`.

    Returns
    -------
    int
    """
    n = _check_n(n)
    hi = (n * mp) >> 32
    return ((hi + n) & _U32) >> shift


def divmod(n: int, mp: int, shift: int, d: int) -> tuple[int, int]:  # noqa: A001 (like the builtin)
    """``(n // d, n % d)`` emulating the device's fastdiv / fastmodulo bit for bit.

    Parameters
    ----------
    n : int
        Numerator, ``0 <= n < 2**31``.
    mp, shift : int
        Constants from ``magic(d)``.
    d : int
        The divisor itself (the remainder is ``n - q * d``).

    Returns
    -------
    (q, r) : tuple of int
    """
    q = fastdiv(n, mp, shift)
    return q, n - q * d


def divmod_np(n, mp, shift, d) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`divmod`: broadcasts its arguments, computes in uint64 without checks.

    Parameters
    ----------
    n, mp, shift, d : array_like of int
        Numerators, constants from :func:`magic` and divisors; broadcast together.
        Results are only meaningful for ``0 <= n < 2**32`` and exact for ``n < 2**31``.

    Returns
    -------
    (q, r) : tuple of numpy.ndarray, dtype uint64
    """
    n = np.asarray(n, dtype=np.uint64)
    mp = np.asarray(mp, dtype=np.uint64)
    shift = np.asarray(shift, dtype=np.uint64)
    d = np.asarray(d, dtype=np.uint64)
    hi = (n * mp) >> np.uint64(32)                  # umulhi of two uint32: fits in uint64
    q = ((hi + n) & np.uint64(_U32)) >> shift       # the 32-bit add wraps, as on the device
    return q, n - q * d
