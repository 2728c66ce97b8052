"""Which plans and calls run the prompt-chunk kernel (`kernels/prefill.py`), and its arguments.

`bind` decides once per (plan, device) whether the plan may run the kernel: `plan.tuning.prefill
== "tma"`, tiles of 64 or 128 rows (Hopper's warpgroup MMA), head size 64 or 128 with Dk = Dv,
no window and no mask planned, and a GPU of compute capability 9.0 or newer (or the
interpreter). `usable` adds what only a call knows: no mask, ALiBi or softcap, and K/V whose
base and strides suit the copy engine (16-byte multiples). Everything else runs the base kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skattn.device import interpreting

HEAD_DIMS = (64, 128)
# the main kernel's compile-time constants that the prompt-chunk kernel takes as they are
_SHARED_CONSTS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "HEADS_PER_TILE", "TOKENS_PER_TILE", "CAUSAL",
                  "FUSED", "PER_TILE_RANGES", "USE_FASTDIV", "ONE_TOKEN_BLOCK", "FIXUP_COLS",
                  "FIXUP_ROWS", "MERGE_PIECES", "USE_PDL", "num_warps", "num_stages")


@dataclass(frozen=True)
class PrefillBound:
    """What the prompt-chunk kernel needs of a bound plan besides the base kernel's part."""

    const: dict            # compile-time constants that depend only on the plan
    block: tuple           # K/V descriptor block: [1, BLOCK_N, 1, D] of [B, Lk, Hkv, D]
    device_desc: bool      # descriptors made in the kernel (K and V passed as tensors)


def refusal(plan) -> str | None:
    """Why `plan` cannot run the prompt-chunk kernel, or None when it can (on sm_90+)."""
    g = plan.geometry
    if plan.tuning.prefill != "tma":
        return f"tuning.prefill is {plan.tuning.prefill!r}"
    if plan.head_dim != plan.head_dim_v or plan.head_dim not in HEAD_DIMS:
        return f"head sizes {plan.head_dim}/{plan.head_dim_v} (it takes 64/64 and 128/128)"
    if g.block_m < 64 or g.dk_chunks != 1:
        return f"{g.block_m}-row tiles (it takes 64 or 128 rows: prompt chunks)"
    if plan.window is not None:
        return "a sliding window"
    if plan.has_mask:
        return "a plan for a mask"
    return None


def bind(plan, device: torch.device, main_const: dict) -> PrefillBound | None:
    """The prompt-chunk kernel's part of a bound plan, or None where the base kernel runs."""
    if refusal(plan) is not None:
        return None
    if not interpreting():
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            return None  # no tensor memory accelerator before Hopper
    t = plan.tuning
    const = {name: main_const[name] for name in _SHARED_CONSTS}
    const.update(DEVICE_DESC=t.prefill_device_desc, WARP_SPECIALIZE=t.prefill_ws)
    return PrefillBound(const, (1, plan.geometry.block_n, 1, plan.head_dim),
                        t.prefill_device_desc)


def _aligned(x: torch.Tensor) -> bool:
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:3])


def usable(pb: PrefillBound, features: tuple, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this call runs the prompt-chunk kernel: no mask, ALiBi, softcap or time
    stamps, and K/V addresses and strides in 16-byte multiples (the copy engine's rule)."""
    has_mask, _, has_alibi, softcap, _, _, stamps = features
    return not (has_mask or has_alibi or softcap or stamps) and _aligned(k) and _aligned(v)


def constants(pb: PrefillBound, features: tuple) -> dict:
    """Compile-time constants of one call's feature set."""
    _, has_sinks, _, _, has_lse, dot_f32, _ = features
    return dict(pb.const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse, DOT_F32=dot_f32)


def descriptors(pb: PrefillBound, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """K and V as the kernel takes them: host tensor descriptors over [B, Lk, Hkv, D], or the
    tensors themselves when the kernel makes its own."""
    if pb.device_desc:
        return k, v
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), list(pb.block))
                 for x in (k, v))
