"""Turn a Plan into kernel launches: per-plan device buffers, constants and grids."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from skattn.device import interpreting
from skattn.fastdiv import magic
from skattn.planner import Plan

LOG2E = 1.4426950408889634
FIXUP_DV = 32  # Dv columns per fixup program
FIXUP_ROWS = 16  # tile rows per fixup program
MERGE_ELEMENTS_PER_THREAD = 64  # f32 values of partials one merge step loads per thread
# the same in the fused merge, whose registers are free after the KV loop (16 pieces a step:
# qwen3moe n=2 N=264 28.5 vs 32.5 us with 4, PERF.md)
FUSED_MERGE_ELEMENTS = 256
# Dv columns per merge step in the fused fixup (None: all of Dv at once; 32-column steps were
# 1.1-1.2x slower at decode, PERF.md)
FUSED_DV = None
# Programmatic dependent launch (sm_90+): the separate fixup kernel is launched while the main
# kernel runs and waits in the GPU for its partials, hiding the second launch's latency
USE_PDL = True
# where the main kernel lets the fixup launch: "end" (after its last store) measured 0.4-2.8 us
# faster than "start" in every decode cell of the probe (PERF.md)
PDL_TRIGGER = "end"
# the separate fixups wait for all loads of a merge step at once (one memory latency a step
# instead of two): fixup 2.1-4.1 -> 1.4-2.4 us a call (scripts/probe_timeline.py attention)
MERGE_LOADS_FIRST = True


def _many_pieces(plan: Plan) -> bool:
    """Tiles cut into several pieces each (decode). Prompt chunks have 1-2 pieces a tile:
    there PDL and 16-row fixup programs cost time (llama-8b n=512 L=32768: 550 -> 563 us
    with both, PERF.md), so they keep whole-tile fixup programs and a plain launch."""
    return plan.nblocks >= 4 * plan.ntiles_dst


def _pdl(plan: Plan, device: torch.device) -> bool:
    if not USE_PDL or interpreting() or plan.fixup not in ("uniform", "general"):
        return False
    if not _many_pieces(plan):
        return False
    device = torch.device(device)
    return device.type == "cuda" and _sm90_or_newer(device.index)


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(index: int | None) -> bool:
    """Asked of the driver once per device, not on every launch."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def pieces_per_step(block_m: int, block_dv: int, num_warps: int,
                    elements: int = MERGE_ELEMENTS_PER_THREAD) -> int:
    """Partials merged per step: as many as fit `elements` f32 per thread (a power of 2)."""
    budget = num_warps * 32 * elements // (block_m * block_dv)
    return max(1, min(16, 1 << max(0, budget.bit_length() - 1)))


@dataclass(frozen=True)
class Buffers:
    """Allocated once per (plan, device) and reused by every call with that plan."""

    ws_o: torch.Tensor      # [nblocks * 2, BLOCK_M, Dv] f32 partial outputs
    ws_m: torch.Tensor      # [nblocks * 2, BLOCK_M] f32 partial maxima (log2 units)
    ws_l: torch.Tensor      # [nblocks * 2, BLOCK_M] f32 partial sums
    counters: torch.Tensor  # [ntiles_dst] int32, fused fixup only; reset by the kernel
    jt_off: torch.Tensor    # [ntiles_x + 1] int32: token block offsets in a group's work
    kv_first: torch.Tensor  # [ntiles_x] int32: first visible KV block per token block
    fastdiv: tuple[int, ...]  # (mp, shift) for ntiles_x, ntiles_z, kv_heads, group_work


_BUFFERS: dict[tuple[Plan, torch.device], Buffers] = {}


def buffers(plan: Plan, device: torch.device) -> Buffers:
    key = (plan, torch.device(device))
    if key not in _BUFFERS:
        rows = plan.nblocks * 2 if plan.fixup != "none" else 1
        bm = plan.geometry.block_m
        f32 = dict(device=device, dtype=torch.float32)
        _BUFFERS[key] = Buffers(
            ws_o=torch.empty(rows, bm, plan.head_dim_v, **f32),
            ws_m=torch.empty(rows, bm, **f32),
            ws_l=torch.empty(rows, bm, **f32),
            counters=torch.zeros(max(1, plan.ntiles_dst) if plan.fixup == "fused" else 1,
                                 device=device, dtype=torch.int32),
            jt_off=torch.tensor(plan.jt_offsets, device=device, dtype=torch.int32),
            kv_first=torch.tensor(plan.kv_first, device=device, dtype=torch.int32),
            fastdiv=tuple(x for d in (plan.ntiles_x, plan.ntiles_z, plan.kv_heads, plan.group_work)
                          for x in magic(max(1, d))),
        )
    return _BUFFERS[key]


def run(plan: Plan, q, k, v, out, lse, *, scale: float, mask=None, sinks=None, softcap=0.0,
        alibi_slopes=None, main_only: bool = False, stamps=None) -> None:
    """Launch the main kernel and, for uniform/general plans, the fixup kernel.

    `main_only` skips the separate fixup (a diagnostic: the output is then incomplete).
    `stamps` (a diagnostic, GPU only): int64 tensors (main [nblocks, 4], fixup
    [prod(fixup_grid(plan)), 4])
    that receive each program's %globaltimer stamps (main: start, first tile's KV loop done,
    end; uniform fixup: start, partials ready, end) and its SM in column 3.
    """
    from skattn.kernels.attention import attention_kernel
    from skattn.kernels.fixup import general_fixup_kernel, uniform_fixup_kernel

    g = plan.geometry
    if stamps is not None:
        _check_stamps(plan, stamps, q.device)
    buf = buffers(plan, q.device)
    placeholder = out
    mask_t = mask if mask is not None else placeholder
    smb, smm = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1)) if mask is not None else (0, 0)
    lse_t = lse if lse is not None else placeholder
    slb, slh = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    if softcap:
        qk_scale, softcap_scale = softcap * LOG2E, scale / softcap
    else:
        qk_scale, softcap_scale = scale * LOG2E, 1.0
    ratio = plan.gqa_ratio
    fused_dv = min(g.block_dv, FUSED_DV or g.block_dv)  # Dv columns per fused merge step
    # the fused merge reads only the rows the tile's heads and tokens fill (n = 1, ratio 4:
    # 4 of 16), so a step holds 4x the pieces' values in flight
    fused_rows = min(g.block_m, 1 << (g.heads_per_tile * g.tokens_per_tile - 1).bit_length())
    fd_x, fd_z, fd_h, fd_w = (buf.fastdiv[i:i + 2] for i in (0, 2, 4, 6))
    pdl = _pdl(plan, q.device) and not main_only
    launch_kw = dict(launch_pdl=True) if pdl else {}
    pdl_mode = (1 if PDL_TRIGGER == "start" else 2) if pdl else 0
    common = dict(
        HEAD_DIM_V=plan.head_dim_v, BLOCK_M=g.block_m, BLOCK_DV=g.block_dv,
        HEADS_PER_TILE=g.heads_per_tile, TOKENS_PER_TILE=g.tokens_per_tile,
        HAS_SINKS=sinks is not None, RETURN_LSE=lse is not None, USE_FASTDIV=plan.fastdiv,
    )
    out_args = (out, out.stride(0), out.stride(1), out.stride(2), lse_t, slb, slh,
                sinks if sinks is not None else placeholder)
    attention_kernel[(plan.nblocks,)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2),
        lse_t, slb, slh,
        mask_t, smb, smm,
        sinks if sinks is not None else placeholder,
        alibi_slopes if alibi_slopes is not None else placeholder,
        buf.ws_o, buf.ws_m, buf.ws_l, buf.counters, buf.jt_off, buf.kv_first,
        plan.q_len, plan.kv_len, ratio, plan.kv_heads, plan.ntiles_x, plan.ntiles_z,
        plan.group_work, plan.work, plan.nblocks, plan.split, plan.kv_first[0],
        qk_scale, softcap_scale, plan.window or 0,
        *fd_x, *fd_z, *fd_h, *fd_w,
        HEAD_DIM=plan.head_dim, BLOCK_N=g.block_n, BLOCK_DK=g.block_dk, DK_CHUNKS=g.dk_chunks,
        CAUSAL=plan.causal or plan.window is not None, HAS_WINDOW=plan.window is not None,
        HAS_MASK=mask is not None, HAS_ALIBI=alibi_slopes is not None, SOFTCAP=bool(softcap),
        FUSED=plan.fixup == "fused", PER_TILE_RANGES=plan.per_tile_ranges,
        DOT_F32=interpreting() and k.dtype == torch.bfloat16,
        ONE_TOKEN_BLOCK=plan.ntiles_x == 1, FIX_DV=fused_dv, FIX_ROWS=fused_rows,
        MERGE_PIECES=pieces_per_step(fused_rows, fused_dv, g.num_warps, FUSED_MERGE_ELEMENTS),
        USE_PDL=pdl_mode, **_timeline(stamps, 0),
        num_warps=g.num_warps, num_stages=g.num_stages, **common,
    )
    # -- fixups: one program per (tile, FIXUP_DV columns of Dv, FIXUP_ROWS rows)
    grid = fixup_grid(plan)
    fix_dv, fix_m = g.block_dv // grid[1], g.block_m // grid[2]
    common.update(BLOCK_DV=fix_dv, ROWS=fix_m, USE_PDL=pdl,
                  MERGE_PIECES=pieces_per_step(fix_m, fix_dv, 4), LOADS_FIRST=MERGE_LOADS_FIRST)
    if main_only:
        return
    if plan.fixup == "uniform":
        uniform_fixup_kernel[grid](
            *out_args, buf.ws_o, buf.ws_m, buf.ws_l,
            plan.q_len, ratio, plan.kv_heads, plan.ntiles_x, plan.ntiles_z, plan.split,
            *fd_x, *fd_z, *fd_h, num_warps=4, **_timeline(stamps, 1), **launch_kw, **common)
    elif plan.fixup == "general":
        general_fixup_kernel[grid](
            *out_args, buf.ws_o, buf.ws_m, buf.ws_l, buf.jt_off,
            plan.q_len, ratio, plan.kv_heads, plan.ntiles_x, plan.ntiles_z, plan.group_work,
            plan.work, plan.nblocks, *fd_z, *fd_h, *fd_w, num_warps=4, **launch_kw, **common)


def fixup_grid(plan: Plan) -> tuple[int, int, int]:
    """Grid of the separate fixup: (tiles for uniform, programs for general) x chunks of
    FIXUP_DV columns x chunks of FIXUP_ROWS rows (whole tiles for few-piece plans)."""
    g = plan.geometry
    fix_dv = min(g.block_dv, FIXUP_DV)
    fix_m = min(g.block_m, FIXUP_ROWS) if _many_pieces(plan) else g.block_m
    first = plan.ntiles_dst if plan.fixup == "uniform" else plan.nblocks
    return first, g.block_dv // fix_dv, g.block_m // fix_m


def _timeline(stamps, i: int) -> dict:
    return dict(STAMPS=stamps[i], TIMELINE=True) if stamps is not None else {}


def _check_stamps(plan: Plan, stamps, device) -> None:
    """The kernels write 4 int64 a program: wrong buffers would be written out of bounds."""
    if interpreting() or torch.device(device).type != "cuda":
        raise ValueError("stamps read the GPU clock: they need CUDA tensors and no interpreter")
    rows = (plan.nblocks, math.prod(fixup_grid(plan)) if plan.fixup == "uniform" else 0)
    for name, x, n in zip(("main", "fixup"), stamps, rows):
        if (not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or not x.is_contiguous()
                or x.numel() < 4 * n or x.device != torch.device(device)):
            raise ValueError(f"stamps[{name}] must be a contiguous int64 tensor of at least "
                             f"[{n}, 4] on {device}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
