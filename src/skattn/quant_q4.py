"""llama.cpp's q4_0 blocks for K/V caches (docs/quant.md): `Q4_0` and its packer `q4_0`.

Both are reached as `skattn.quant.Q4_0` and `skattn.quant.q4_0`. A block holds 32 values along
the head dimension: one f16 scale `d` and 16 bytes, byte j holding value j in its low nibble
and value j + 16 in its high nibble; the value of a nibble is `(nibble - 8) * d`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skattn.quant_block import BlockCache, inverse_scale, packed_in_slices, scaled_blocks

__all__ = ["Q4_0", "q4_0", "QK4_0"]

QK4_0 = 32  # values per q4_0 block (llama.cpp's QK4_0)
PACKED = QK4_0 // 2  # bytes of nibbles a block


@dataclass(frozen=True)
class Q4_0(BlockCache):
    """A K or V cache in q4_0 blocks: 32 4-bit values along the head dimension share one f16 scale.

    Parameters
    ----------
    values : Tensor [B, Lk, Hkv, D / 2] uint8
        The packed nibbles, 16 bytes a block: byte `16 c + j` (j < 16) of a row holds value
        `32 c + j` in its low nibble and value `32 c + j + 16` in its high nibble, each as
        `round(x / d) + 8` in [0, 15]; D a multiple of 32; contiguous in its last dimension.
    scales : Tensor [B, Lk, Hkv, D / 32] float16
        The block scales `d`; contiguous in its last dimension and laid out like `values`
        (each of its leading strides is 1/16 of `values`'): two views of caches of the same
        shape, as `q4_0` makes them or as slices `[:, :L]` of such caches keep them.

    Notes
    -----
    The logical shape (`shape`) is `[B, Lk, Hkv, D]`. Memory: D / 2 bytes of nibbles and
    2 D / 32 of scales a row, 18 bytes per 32 values (0.5625 a value), as llama.cpp's 18-byte
    `block_q4_0`. The two parts are kept apart, not interleaved, so that the kernels read both
    with aligned vector loads; `to_ggml` and `from_ggml` convert to and from llama.cpp's
    interleaved blocks, bit for bit.
    """

    values: torch.Tensor
    scales: torch.Tensor

    format = "q4_0"
    VALUES_DTYPE = torch.uint8
    BLOCK_BYTES = PACKED
    VALUES_KIND = "a uint8 tensor (two 4-bit values a byte)"
    BLOCK_NOTE = f" (values of {PACKED} bytes a block)"
    SCALES_NOTE = f", {PACKED} bytes"

    # -- conversions
    def nibbles(self) -> torch.Tensor:
        """The 4-bit codes in [0, 15] as uint8 `[..., D]`, in value order."""
        return _nibbles(self.values)

    def dequantize(self, dtype=torch.float16) -> torch.Tensor:
        """`(nibble - 8) * d` per block, as `dtype` (computed in float32, or float64 for it):
        exact in float32, one rounding to `dtype`."""
        return scaled_blocks(self.values, self.scales, QK4_0, dtype,
                             decode=lambda packed: _nibbles(packed).to(torch.int8) - 8)


def _nibbles(values: torch.Tensor) -> torch.Tensor:
    b = values.unflatten(-1, (-1, PACKED))
    return torch.cat([b & 15, b >> 4], dim=-1).flatten(-2)


def q4_0(x: torch.Tensor) -> Q4_0:
    """Quantize a K or V cache to q4_0 blocks, as llama.cpp's `quantize_row_q4_0_ref`.

    Per block of 32 values along the last dimension: `max` is the value of largest magnitude
    (signed; the first of equal magnitudes), `d = max / -8` (so `max` maps to nibble 0, and
    values of the other sign reach nibble 15 at most, clamped), `nibble = min(15,
    floor(x * (1 / d) + 8.5))` computed in float32 (C's `(int8_t)` cast of a non-negative
    float), `scales = float16(d)`. An all-zero block gets d = 0 and nibbles 8.

    Parameters
    ----------
    x : Tensor [..., D]
        float16, bfloat16 or float32; D a multiple of 32.

    Returns
    -------
    Q4_0
        Contiguous values and scales on x's device.
    """
    def pack(b):
        first = b.abs().argmax(dim=-1, keepdim=True)  # argmax gives the first of equal maxima
        d = b.gather(-1, first).squeeze(-1) / -8.0
        y = b * inverse_scale(d)[..., None] + 8.5
        nib = torch.floor(y).clamp(0, 15).to(torch.uint8)
        packed = nib[..., :PACKED] | (nib[..., PACKED:] << 4)
        return packed.flatten(-2).contiguous(), d.to(torch.float16).contiguous()
    return Q4_0(*packed_in_slices(pack, x, "q4_0"))
