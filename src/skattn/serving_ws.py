"""Which serving plans and calls run whole prompt tiles on the Hopper kernel
(`kernels/ragged_ws.py`), and its arguments (docs/serving.md, "Whole tiles on the Hopper
kernel").

`bind` decides once per (plan, device): `plan.tuning.prefill == "ws"`, a plan whose steps
may run in whole tiles (`ServingPlan.whole_tiles`), 16-bit K/V at head size 64 or 128 with
Dk = Dv, 128-row tiles of 64- or 128-key blocks, no window, KV heads not read in pairs, a
dense or paged cache (packed K/V run the base kernel), pages that hold whole blocks or fill
one in several copies, and a GPU of compute capability 9.x (its warpgroup MMAs are sm_90a's;
not the interpreter: Gluon kernels do not run there). The work list of a
bound plan then weighs whole tiles on this kernel (`WS_SPEED_X10`) against one cut wave of
the stream-K build. `usable` adds what only a call knows: no ALiBi or softcap and K/V whose
base and strides suit the copy engine; other calls run the same whole tiles on the base
kernel's whole-tile build.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from skattn import prefill_launch
from skattn.device import interpreting

HEAD_DIMS = (64, 128)
# a KV block of a prompt tile on this kernel against one on the base kernel's stream-K
# build, per resident program: x10 as fast. From (d)'s 512-token chunk alone (llama-8b, pages
# of 16, H200): one cut wave of the base kernel, 30 blocks a resident program at x 1.5, took
# 147.0 us; whole tiles here, 32 blocks a program, 70.5 us: 1.49x (PERF.md, "Serving batches")
WS_SPEED_X10 = 15


@dataclass(frozen=True)
class WsBound:
    """What the Hopper kernel needs of a bound serving plan."""

    const: dict   # compile-time constants that depend only on the plan
    block: tuple  # the descriptors' block: [1, rows, 1, D]
    grid: int     # programs: the SMs times the kernel's programs an SM


def refusal(plan) -> str | None:
    """Why `plan`'s whole tiles cannot run the Hopper kernel, or None when they can (sm_90+)."""
    g = plan.geometry
    if plan.tuning.prefill != "ws":
        return f"tuning.prefill is {plan.tuning.prefill!r}"
    if not plan.whole_tiles:
        return "no step of the plan runs in whole tiles (policy auto and prompt-sized bounds)"
    if plan.dtype not in ("float16", "bfloat16"):
        return f"K/V in {plan.dtype} (it reads f16 or bf16)"
    if plan.head_dim != plan.head_dim_v or plan.head_dim not in HEAD_DIMS:
        return f"head sizes {plan.head_dim}/{plan.head_dim_v} (it takes 64/64 and 128/128)"
    if g.block_m != 128 or g.dk_chunks != 1 or g.block_n not in (64, 128):
        return (f"{g.block_m}-row tiles of {g.block_n}-key blocks (it takes 128 rows, 64 or 128 "
                f"keys)")
    if plan.window is not None:
        return "a sliding window"
    if plan.head_pairs:
        return "KV heads read in pairs"
    if plan.layout == "packed":
        return "packed K/V (the base kernel reads them)"
    ps = plan.page_size
    if plan.layout == "paged" and ps % g.block_n and g.block_n % ps:
        return f"pages of {ps} keys (blocks of {g.block_n} must hold whole pages or lie in one)"
    return None


def bind(plan, device: torch.device) -> WsBound | None:
    """The Hopper kernel's part of a bound serving plan, or None where the base kernel runs."""
    if refusal(plan) is not None or interpreting() or device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    return bound(plan)


def bound(plan) -> WsBound:
    """The kernel's compile-time constants, descriptor block and grid for `plan` (taken)."""
    g = plan.geometry
    per_sm, cap, consumer = prefill_launch.ws_registers(plan.head_dim, g.block_n)
    paged = plan.layout == "paged"
    const = dict(HEAD_DIM=plan.head_dim, BLOCK_N=g.block_n, HEADS_PER_TILE=g.heads_per_tile,
                 TOKENS_PER_TILE=g.tokens_per_tile, CAUSAL=plan.causal,
                 STAGES=prefill_launch.ws_stages(plan.head_dim, g.block_n),
                 CONSUMER_REGS=consumer, LAYOUT=int(paged), PAGE_SIZE=plan.page_size or 0,
                 SUM_MMA=prefill_launch.sum_mma(plan), num_warps=4, maxnreg=cap)
    rows = min(plan.page_size, g.block_n) if paged else g.block_n
    return WsBound(const, (1, rows, 1, plan.head_dim), plan.sms * per_sm)


def usable(k: torch.Tensor, v: torch.Tensor, softcap: float, alibi_slopes) -> bool:
    """Whether this call's whole tiles run the Hopper kernel: no ALiBi or softcap, and K/V
    addresses and strides in 16-byte multiples (the copy engine's rule)."""
    return (not softcap and alibi_slopes is None and prefill_launch._aligned(k)
            and prefill_launch._aligned(v))


@functools.lru_cache(maxsize=None)
def _layout(head_dim: int, block_n: int, dtype: torch.dtype):
    """The shared layout of a [1, block_n, 1, head_dim] stage buffer, which every copy into
    it (a page's rows, for pages smaller than a block) shares."""
    from triton.experimental.gluon import language as gl

    elem = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]
    return gl.NVMMASharedLayout.get_default_for([1, block_n, 1, head_dim], elem)


def descriptors(wb: WsBound, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Host tensor descriptors over the caches as they are ([B, Lk, Hkv, D] or [pages,
    page_size, Hkv, D])."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    smem = _layout(wb.const["HEAD_DIM"], wb.const["BLOCK_N"], k.dtype)
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), list(wb.block), smem)
                 for x in (k, v))
