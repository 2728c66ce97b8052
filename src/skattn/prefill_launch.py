"""Which plans and calls run the prompt-chunk kernel (`kernels/prefill.py`), and its arguments.

`bind` decides once per (plan, device) whether the plan may run the kernel: `plan.tuning.prefill
== "tma"`, tiles of 64 or 128 rows (Hopper's warpgroup MMA), head size 64 or 128 with Dk = Dv,
no window and no mask planned, and a GPU of compute capability 9.0 or newer (or the
interpreter). `usable` adds what only a call knows: no mask, ALiBi or softcap, and K/V whose
base and strides suit the copy engine (16-byte multiples). Everything else runs the base kernel.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from triton.runtime import _allocation

from skattn.device import interpreting

HEAD_DIMS = (64, 128)
# the main kernel's compile-time constants that the prompt-chunk kernel takes as they are
_SHARED_CONSTS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "HEADS_PER_TILE", "TOKENS_PER_TILE", "CAUSAL",
                  "FUSED", "PER_TILE_RANGES", "USE_FASTDIV", "ONE_TOKEN_BLOCK", "FIXUP_COLS",
                  "FIXUP_ROWS", "MERGE_PIECES", "USE_PDL", "LONGEST_FIRST", "num_warps", "num_stages")


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
    if plan.dtype not in ("float16", "bfloat16"):
        return f"K/V in {plan.dtype} (it reads f16 or bf16)"
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
    t, g = plan.tuning, plan.geometry
    const = {name: main_const[name] for name in _SHARED_CONSTS}
    const.update(DEVICE_DESC=t.prefill_device_desc,
                 XBLOCKS=max(2, 1 << plan.ntiles_x.bit_length()))  # a power of 2 > ntiles_x
    return PrefillBound(const, (1, g.block_n, 1, plan.head_dim), t.prefill_device_desc)


def _aligned(x: torch.Tensor) -> bool:
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:3])


def usable(pb: PrefillBound, features: tuple, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this call runs the prompt-chunk kernel: no mask, ALiBi, softcap or time
    stamps, and K/V addresses and strides in 16-byte multiples (the copy engine's rule)."""
    has_mask, _, has_alibi, softcap, _, _, stamps, *_ = features
    return not (has_mask or has_alibi or softcap or stamps) and _aligned(k) and _aligned(v)


def constants(pb: PrefillBound, features: tuple) -> dict:
    """Compile-time constants of one call's feature set."""
    _, has_sinks, _, _, has_lse, interpret, *_ = features
    return dict(pb.const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse, INTERPRET=interpret)


def scratch(pb: PrefillBound):
    """A context for the launch in which Triton finds global memory for the descriptors the
    kernel makes (with `device_desc`, 128 bytes a program each): a torch allocation on the
    launch's device, unless the caller gave Triton an allocator."""
    if not pb.device_desc or _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
        return contextlib.nullcontext()
    return _TorchScratch()


class _TorchScratch:
    def __enter__(self):
        self.token = _allocation._allocator.set(_torch_alloc)

    def __exit__(self, *exc):
        _allocation._allocator.reset(self.token)


def _torch_alloc(size: int, alignment: int, stream):
    # torch's blocks are 512-byte aligned (a descriptor needs 128); the current device is the
    # launch's (launch.run switches to q's device)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def descriptors(pb: PrefillBound, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """K and V as the kernel takes them: host tensor descriptors over [B, Lk, Hkv, D], or,
    with `device_desc`, the tensors the kernel makes its descriptors of."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if pb.device_desc:
        return k, v
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), list(pb.block))
                 for x in (k, v))
