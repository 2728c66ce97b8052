"""Quantized K/V caches: FP8 e4m3 with float32 scales, and llama.cpp's q8_0 and q4_0 blocks.

Three forms of K and V that `skattn.attention` reads and dequantizes in registers, halving
(8 bits) or nearly quartering (4 bits) the bytes a decode step streams (docs/quant.md):

- **FP8**: `k` and `v` are `torch.float8_e4m3fn` tensors `[B, Lk, Hkv, D]`, with `k_scale`
  and `v_scale` float32 scales per tensor (shape `[]` or `[1]`) or per KV head (`[Hkv]`):
  the value of an element is `x.float() * scale` (vLLM's convention). `fp8(x)` makes them.
- **q8_0**: a `Q8_0` holds `values` int8 `[B, Lk, Hkv, D]` and `scales` float16
  `[B, Lk, Hkv, D / 32]`: element d of a row is `values[..., d] * scales[..., d // 32]`,
  quantized as llama.cpp's `quantize_row_q8_0_ref` (same rounding, same bits). `q8_0(x)`
  makes one; `Q8_0.to_ggml()` gives llama.cpp's interleaved `block_q8_0` bytes.
- **q4_0**: a `Q4_0` holds `values` uint8 `[B, Lk, Hkv, D / 2]` (two 4-bit values a byte)
  and `scales` float16 `[B, Lk, Hkv, D / 32]`: `(nibble - 8) * d` per block, quantized as
  llama.cpp's `quantize_row_q4_0_ref`. `q4_0(x)` makes one (`skattn.quant_q4`).

`check_kv` holds the input rules of every form, shared by the kernels and the references.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch

from skattn.quant_block import BlockCache, in_slices, slices, inverse_scale, packed_in_slices, scaled_blocks
from skattn.quant_q4 import QK4_0, Q4_0, q4_0

__all__ = ["Q8_0", "q8_0", "Q4_0", "q4_0", "fp8", "FP8_DTYPES", "QK8_0", "QK4_0",
           "dequantize_kv"]

QK8_0 = 32  # values per q8_0 block (llama.cpp's QK8_0)
FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper convert float8 e4m3 in hardware; Triton needs it
FORMATS = ("float16", "bfloat16", "float8_e4m3fn", "q8_0", "q4_0")  # K/V forms a plan knows


@dataclass(frozen=True)
class Q8_0(BlockCache):
    """A K or V cache in q8_0 blocks: 32 int8 values along the head dimension share one f16 scale.

    Parameters
    ----------
    values : Tensor [B, Lk, Hkv, D] int8
        `round(x / d)` per block, in [-127, 127]; D a multiple of 32; contiguous in D.
    scales : Tensor [B, Lk, Hkv, D / 32] float16
        The block scales `d = amax / 127`; contiguous in its last dimension, and laid out
        like `values` (each of its first three strides is 1/32 of `values`'): two views of
        caches of the same shape, as `q8_0` makes them or as slices `[:, :L]` of such caches
        keep them.

    Notes
    -----
    Memory: `values` holds D bytes a row and `scales` 2 D / 32 (1.0625 bytes a value, as
    llama.cpp's 34-byte `block_q8_0`). The two are kept apart, not interleaved, so that the
    kernels read both with aligned vector loads; `to_ggml` and `from_ggml` convert to and from
    llama.cpp's interleaved blocks, bit for bit.
    """

    values: torch.Tensor
    scales: torch.Tensor

    format = "q8_0"
    WORD_LOADS = True
    VALUES_DTYPE = torch.int8
    BLOCK_BYTES = QK8_0
    VALUES_KIND = "an int8 tensor"

    # -- conversions
    def dequantize(self, dtype=torch.float16) -> torch.Tensor:
        """`values * scales` per block, as `dtype` (computed in float32, or float64 for it)."""
        return scaled_blocks(self.values, self.scales, QK8_0, dtype)


def q8_0(x: torch.Tensor) -> Q8_0:
    """Quantize a K or V cache to q8_0 blocks, as llama.cpp's `quantize_row_q8_0_ref`.

    Per block of 32 values along the last dimension: `amax = max |x|`, `d = amax / 127`,
    `values = roundf(x / d)` (half away from zero, computed as `x * (1 / d)` in float32),
    `scales = float16(d)`; an all-zero block gets d = 0 and values 0.

    Parameters
    ----------
    x : Tensor [..., D]
        float16, bfloat16 or float32; D a multiple of 32.

    Returns
    -------
    Q8_0
        Contiguous values and scales on x's device.
    """
    def pack(b):
        amax = b.abs().amax(dim=-1)
        # a divisor tensor on amax's device: torch's CUDA division by a Python number
        # multiplies by its rounded reciprocal, which rounds some d differently from C's amax / 127
        d = amax / torch.full_like(amax, 127.0)
        y = b * inverse_scale(d)[..., None]
        q = torch.sign(y) * torch.floor(y.abs() + 0.5)  # C's roundf
        return q.to(torch.int8).flatten(-2).contiguous(), d.to(torch.float16).contiguous()
    return Q8_0(*packed_in_slices(pack, x, "q8_0"))


def fp8(x: torch.Tensor, *, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a K or V cache `[B, Lk, Hkv, D]` to float8_e4m3fn with float32 scales.

    The scale is `amax / 448` over the whole tensor (`per_head=False`: shape `[1]`) or over
    each KV head (`[Hkv]`), so the largest value maps to e4m3's largest; values are rounded
    to nearest. An all-zero tensor or head gets scale 1.

    Returns
    -------
    (Tensor [B, Lk, Hkv, D] float8_e4m3fn, Tensor [1] or [Hkv] float32)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError("fp8 quantizes a floating [B, Lk, Hkv, D] tensor")
    # both passes a bounded slice at a time (`in_slices`): amax, then the values
    amax = torch.zeros(x.shape[2] if per_head else 1, device=x.device, dtype=torch.float32)
    for idx in slices(x):
        part = x[idx].float().abs()
        heads = idx[2] if per_head and len(idx) > 2 else slice(None)  # a slice may cut heads
        part = part.amax(dim=(0, 1, 3)) if per_head else part.amax().reshape(1)
        amax[heads] = torch.maximum(amax[heads], part)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    shaped = (scale[None, None, :, None] if per_head else scale.reshape(1, 1, 1, 1))
    shaped = shaped.expand(*x.shape[:3], 1)  # sliced beside x
    return in_slices(lambda part, s: (part.float() / s).clamp(-FP8_MAX, FP8_MAX)
                     .to(torch.float8_e4m3fn), x, shaped), scale


# -- input rules (shared by skattn.attention and the references)
BLOCK_FORMS = (Q8_0, Q4_0)  # llama.cpp's block types: values and block scales in one object


def is_quantized(x) -> bool:
    return isinstance(x, BLOCK_FORMS) or (isinstance(x, torch.Tensor) and x.dtype in FP8_DTYPES)


def kv_format(k) -> str:
    """The name a Plan stores for K/V in this form ('float16', 'float8_e4m3fn', 'q8_0', ...)."""
    if isinstance(k, BLOCK_FORMS):
        return k.format
    return str(k.dtype).removeprefix("torch.")


def fp8_capability(device) -> None:
    """float8_e4m3fn on `device` for the kernels: a CUDA GPU of compute capability 8.9 or
    newer (the CPU's interpreter reads it too)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise ValueError(f"float8_e4m3fn K/V need a GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper); {device} is {cap[0]}.{cap[1]}: use skattn.quant.q8_0")


def _scale(name: str, s, kv_heads: int, device) -> None:
    if s is None:
        raise ValueError(f"{name} is required with float8_e4m3fn K/V: the float32 scale of the "
                         f"cache, per tensor (shape [] or [1]) or per KV head ([{kv_heads}])")
    if isinstance(s, Real) and not isinstance(s, bool):
        if not (float(s) > 0 and float(s) < float("inf")):
            raise ValueError(f"{name} must be positive and finite, got {s}")
        return
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor or a float, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype torch.float32, got {s.dtype}")
    if s.dim() > 1 or s.numel() not in (1, kv_heads):
        raise ValueError(f"{name} must have shape [], [1] or [{kv_heads}] (per tensor or per KV "
                         f"head), got {list(s.shape)}")
    if s.dim() == 1 and s.numel() > 1 and s.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {s.stride(0)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device}, q on {device}")


def check_kv(q, k, v, k_scale, v_scale, *, kernel: bool) -> str | None:
    """The rules of quantized K/V; returns their format ('float8_e4m3fn', 'q8_0' or 'q4_0'),
    or None for plain K/V (then `k_scale` and `v_scale` must be None).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: K and V in different forms, an unsupported 8-bit dtype, missing
        or misshapen scales, q not f16/bf16 (kernels: quantized K/V are dequantized to q's
        dtype), a q8_0 head size not a multiple of 32, FP8 on a GPU below sm_89.
    """
    kq, vq = isinstance(k, BLOCK_FORMS), isinstance(v, BLOCK_FORMS)
    if (kq or vq) and type(k) is not type(v):
        form = type(k if kq else v).__name__
        raise TypeError(f"k and v must both be skattn.quant.{form} or neither, got "
                        f"{type(k).__name__} and {type(v).__name__}")
    for name, x in (("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float8_e5m2, torch.float8_e4m3fnuz,
                                                       torch.float8_e5m2fnuz, torch.int8,
                                                       torch.uint8):
            raise TypeError(f"{name}: {x.dtype} K/V are not supported: use float16, bfloat16, "
                            f"float8_e4m3fn (with k_scale, v_scale), skattn.quant.q8_0 or "
                            f"skattn.quant.q4_0")
    fp8_k = isinstance(k, torch.Tensor) and k.dtype in FP8_DTYPES
    fp8_v = isinstance(v, torch.Tensor) and v.dtype in FP8_DTYPES
    if fp8_k != fp8_v:
        raise TypeError(f"v must have k's dtype {getattr(k, 'dtype', None)}, got "
                        f"{getattr(v, 'dtype', None)} (FP8 K/V come in pairs)")
    if not (kq or fp8_k):
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name} applies to float8_e4m3fn K/V only (k is "
                                 f"{getattr(k, 'dtype', type(k).__name__)})")
        return None
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}")
    if kernel and isinstance(q, torch.Tensor) and q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16 with quantized K/V (they are dequantized "
                        f"to q's dtype), got {q.dtype}")
    device = getattr(q, "device", k.device)
    if kq:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name} must be None with {k.format} K/V (their block "
                                 f"scales are inside the {type(k).__name__})")
        return k.format
    if kernel:
        fp8_capability(device)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        _scale(name, s, k.shape[2], device)
    return "float8_e4m3fn"


def kernel_data(x):
    """What the kernels read as K or V: the int8 values of a Q8_0 (the packed uint8 of a Q4_0),
    else the tensor itself."""
    return x.values if isinstance(x, BLOCK_FORMS) else x


def kv_dtype(x):
    """What a plan is made for: K's dtype, or a block cache's format ("q8_0", "q4_0")."""
    return x.format if isinstance(x, BLOCK_FORMS) else x.dtype


def kernel_kv(k, v, k_scale, v_scale, device) -> tuple:
    """(k, v, k_scale, v_scale) as the kernels read them: a block cache's values and its block
    scales, or fp8 scales as f32 [1] or [Hkv] (`scale_tensor`); plain K/V unchanged."""
    if isinstance(k, BLOCK_FORMS):
        return k.values, v.values, k.scales, v.scales
    if k_scale is None:
        return k, v, None, None
    return k, v, scale_tensor(k_scale, device), scale_tensor(v_scale, device)


def scale_tensor(s, device) -> torch.Tensor:
    """A float scale as a [1] float32 tensor on `device` (a 4-byte fill; pass tensors in hot
    loops); a tensor scale as [1] or [Hkv] (itself where it is 1-D, else a view)."""
    if isinstance(s, torch.Tensor):
        return s if s.ndim == 1 else s.reshape(-1)  # (a view costs about 1 µs a call)
    return torch.full((1,), float(s), dtype=torch.float32, device=device)


def dequantize_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """float8_e4m3fn K or V in float64, exactly: `x.double() * scale`, the scale per tensor or
    per KV head (dimension -2 of dense `[B, L, Hkv, D]`, packed and paged caches)."""
    s = scale_tensor(scale, x.device).to(torch.float64)
    s = s[:, None] if s.numel() > 1 else s.reshape(())
    return x.to(torch.float64) * s


def dequantize_kv(k, v, k_scale=None, v_scale=None, dtype=torch.float64):
    """K and V in `dtype` from any form `skattn.attention` takes (plain tensors are cast)."""
    out = []
    for x, s in ((k, k_scale), (v, v_scale)):
        if isinstance(x, BLOCK_FORMS):
            out.append(x.dequantize(dtype))
        elif x.dtype in FP8_DTYPES:
            out.append(dequantize_fp8(x, s).to(dtype))
        else:
            out.append(x.to(dtype))
    return out[0], out[1]
