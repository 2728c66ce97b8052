"""ALiBi slopes from a maximum bias, with llama.cpp's rule (ggml_soft_max / ggml_alibi)."""
from __future__ import annotations

import torch

__all__ = ["alibi_slopes"]


def alibi_slopes(n_heads: int, max_bias: float) -> torch.Tensor:
    """Per-head ALiBi slopes as llama.cpp computes them.

    With ``n_head_log2 = 2 ** floor(log2(n_heads))``, ``m0 = 2 ** (-max_bias / n_head_log2)``
    and ``m1 = 2 ** (-(max_bias / 2) / n_head_log2)``, head ``h`` gets ``m0 ** (h + 1)`` when
    ``h < n_head_log2`` and ``m1 ** (2 * (h - n_head_log2) + 1)`` otherwise.

    Parameters
    ----------
    n_heads : int
        Number of query heads (>= 1).
    max_bias : float
        llama.cpp's ``max_bias``; ``max_bias <= 0`` gives all slopes 1 (llama.cpp then skips
        ALiBi altogether: pass ``alibi_slopes=None`` to get that).

    Returns
    -------
    torch.Tensor
        ``[n_heads]`` float32 slopes, on the CPU.

    Raises
    ------
    ValueError
        If ``n_heads < 1``.
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive integer, got {n_heads!r}")
    if max_bias <= 0:
        return torch.ones(n_heads, dtype=torch.float32)
    n_head_log2 = 1 << (n_heads.bit_length() - 1)  # exact floor(log2) for any int
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    slopes = [m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1)
              for h in range(n_heads)]
    return torch.tensor(slopes, dtype=torch.float32)
