"""Which plans and calls run a prompt-chunk kernel (`kernels/prefill.py`, "tma", or
`kernels/prefill_ws.py`, "ws"), and their arguments.

`bind` decides once per (plan, device) whether the plan may run one: `plan.tuning.prefill`,
tiles of 64 or 128 rows (Hopper's warpgroup MMA; "ws": 128 and no fused fixup), head size 64
or 128 with Dk = Dv, no window and no mask planned, and a GPU of compute capability 9.0 or
newer (or, "tma" only, the interpreter). `usable` adds what only a call knows: no mask, ALiBi
or softcap, and K/V whose base and strides suit the copy engine (16-byte multiples).
Everything else runs the base kernel.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from triton.runtime import _allocation

from skattn.device import interpreting

HEAD_DIMS = (64, 128)
# what `Plan.describe` says of a plan that names a prompt-chunk kernel
KERNEL_NOTES = {
    "ws": "the warp-specialised prompt kernel on a Hopper (Gluon: a TMA loader warp, two consumer "
          "warpgroups); the base kernel where a call's mask, ALiBi, softcap or GPU rule it out",
    "tma": "the TMA prompt kernel on a Hopper; the base kernel where a call rules it out",
}
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
    kind: str = "tma"      # "tma" or "ws"
    tables: tuple = ()     # "ws": its segments and their per-program offsets (int32, device)


def refusal(plan) -> str | None:
    """Why `plan` cannot run the prompt-chunk kernel, or None when it can (on sm_90+)."""
    g = plan.geometry
    if plan.tuning.prefill not in ("tma", "ws"):
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
    if plan.tuning.prefill == "ws" and g.block_m != 128:
        return f"{g.block_m}-row tiles (the warp-specialised kernel takes 128 rows)"
    if plan.tuning.prefill == "ws" and plan.fixup == "fused":
        return "a fused fixup (the warp-specialised kernel leaves cut tiles to a separate one)"
    return None


def bind(plan, device: torch.device, main_const: dict) -> PrefillBound | None:
    """The prompt-chunk kernel's part of a bound plan, or None where the base kernel runs."""
    if refusal(plan) is not None:
        return None
    if plan.tuning.prefill == "ws":
        return None if interpreting() else _bind_ws(plan, device)
    if not interpreting():
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            return None  # no tensor memory accelerator before Hopper
    t, g = plan.tuning, plan.geometry
    const = {name: main_const[name] for name in _SHARED_CONSTS}
    const.update(DEVICE_DESC=t.prefill_device_desc,
                 XBLOCKS=max(2, 1 << plan.ntiles_x.bit_length()))  # a power of 2 > ntiles_x
    return PrefillBound(const, (1, g.block_n, 1, plan.head_dim), t.prefill_device_desc)


# the warp-specialised kernel: 4 + 4 + 1 warps (12 with the loader's warpgroup). Registers a
# thread (cap, each consumer warpgroup's): the loader's warpgroup takes 24, so 168 x 384 =
# 240 x 256 + 24 x 128, one program an SM; 64 x 64 blocks (head size 64) fit two programs an
# SM, 84 x 384 x 2 registers with 112 a consumer thread (ptxas wants 90 for 128-key blocks)
_WS_WARPS = 4
_WS_SMEM = 227 * 1024  # shared memory of an SM's programs on sm_90


def ws_registers(head_dim: int, block_n: int) -> tuple[int, int, int]:
    """(programs an SM, register cap, a consumer thread's registers) of the "ws" kernel."""
    return (2, 84, 112) if head_dim * block_n <= 64 * 64 else (1, 168, 240)


def ws_stages(head_dim: int, block_n: int, elem: int = 2) -> int:
    """K/V blocks in flight: as many as fit beside the two 64-row query buffers (at most 4)."""
    per_sm = ws_registers(head_dim, block_n)[0]
    stage = 2 * block_n * head_dim * elem
    return max(1, min(4, (_WS_SMEM // per_sm - 1024 - 128 * head_dim * elem) // stage))


def _bind_ws(plan, device: torch.device) -> PrefillBound | None:
    from skattn.launch import device_table  # (launch imports this module)

    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    rows, offsets = segments(plan)
    tables = (device_table(device, tuple(v for r in rows for v in r) or (0,)),
              device_table(device, tuple(offsets)))
    return PrefillBound(ws_constants(plan), (1, plan.geometry.block_n, 1, plan.head_dim), False,
                        "ws", tables)


def ws_constants(plan) -> dict:
    """The "ws" kernel's compile-time constants that depend only on the plan."""
    g = plan.geometry
    _, cap, consumer = ws_registers(plan.head_dim, g.block_n)
    return dict(HEAD_DIM=plan.head_dim, BLOCK_N=g.block_n, HEADS_PER_TILE=g.heads_per_tile,
                TOKENS_PER_TILE=g.tokens_per_tile, CAUSAL=plan.causal,
                STAGES=ws_stages(plan.head_dim, g.block_n), CONSUMER_REGS=consumer,
                PINGPONG=plan.tuning.prefill_pingpong, SUM_MMA=sum_mma(plan),
                num_warps=_WS_WARPS, maxnreg=cap)


def sum_mma(plan) -> bool:
    """Whether the "ws" kernel sums P's rows by MMA (`Tuning.prefill_sum_mma`; by default at
    head size 64, where the softmax, not the tensor cores, bounds the loop: PERF.md)."""
    choice = plan.tuning.prefill_sum_mma
    return plan.head_dim <= 64 if choice is None else bool(choice)


def segments(plan) -> tuple[list[tuple], list[int]]:
    """The warp-specialised kernel's work: for each program (in launch order), its pieces of
    tiles as (sequence, KV head, head group, token block, first KV block, first block that
    needs a mask, end, partial slot or -1 for a whole tile), and each program's offset into
    that list (programs + 1 values). The same walk as `attention_kernel`'s: program p's range
    of the work list, tile by tile; slot 2p for the piece the range starts with, 2p + 1 for
    the one it ends with; one whole tile a program runs the longest first where the plan says so."""
    geo, n = plan.geometry, plan.geometry.block_n
    order = plan.longest_first_order() if plan.longest_first else range(plan.programs)
    rows, offsets = [], [0]
    for p in order:
        start, end = plan.program_range(p)
        tiles = range(plan.tile_of(start), plan.tile_of(end - 1) + 1) if end > start else ()
        for tile in tiles:
            first, stop = plan.tile_range(tile)
            group, qblock = divmod(tile, plan.ntiles_x)
            rest, z = divmod(group, plan.ntiles_z)
            b, kvh = divmod(rest, plan.kv_heads)
            item, stop_here = max(start, first), min(end, stop)
            kv0 = plan.kv_first[qblock] - first
            lo, hi = kv0 + item, kv0 + stop_here
            full_end = plan.kv_len // n  # unmasked_end: blocks every row sees whole
            if plan.causal:
                first_token = qblock * geo.tokens_per_tile
                full_end = min(full_end, (plan.kv_len - plan.q_len + first_token + 1) // n)
            mid = max(lo, min(hi, full_end))
            whole = item == first and stop_here == stop
            rows.append((b, kvh, z, qblock, lo, mid, hi,
                         -1 if whole else 2 * p + int(item != start)))
        offsets.append(len(rows))
    return rows, offsets


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
    if pb.kind == "ws":
        return dict(pb.const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse)
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


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple, dtype: torch.dtype):
    """The shared-memory layout of the ws kernel's K/V blocks, made once per block and dtype."""
    from triton.experimental.gluon import language as gl

    elem = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), elem)


def descriptors(pb: PrefillBound, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """K and V as the kernel takes them: host tensor descriptors over [B, Lk, Hkv, D], or,
    with `device_desc`, the tensors the kernel makes its descriptors of."""
    if pb.kind == "ws":
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

        layout = _shared_layout(tuple(pb.block), k.dtype)
        return tuple(GluonDescriptor(x, list(x.shape), list(x.stride()), list(pb.block), layout)
                     for x in (k, v))
    from triton.tools.tensor_descriptor import TensorDescriptor

    if pb.device_desc:
        return k, v
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), list(pb.block))
                 for x in (k, v))
