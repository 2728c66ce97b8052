"""Turn a ServingPlan into launches: the work-list step, the main kernel, the fixup.

As in `skattn.launch`: what depends only on the plan is bound once per device, a call packs
its tensors and launches the compiled kernels directly (keyed by what changes their code),
never synchronises and allocates nothing, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from skattn import buffers as ws
from skattn import serving_ws
from skattn.config import _pow2, register_cap
from skattn.device import interpreting
from skattn.kernels import ragged as _ragged
from skattn.kernels import ragged_ws as _ragged_ws
from skattn.kernels import ragged_fixup as _fix
from skattn.kernels import worklist as _wl
from skattn.launch import (KV_FORMATS, _launch, _no_hooks, _pdl_wait, _spec, cached_bind,
                           check_stamps, constants, device_table, score_scales, v_pairs)
from skattn.serving_plan import POLICY_CODE, ServingPlan, n_sat

INT32_MAX = 2**31 - 1
RB_CHUNK = 256
_KEYS: dict = {}


@dataclass
class Bound:
    """A serving plan bound to one device."""

    plan: ServingPlan
    device: torch.device
    cost: torch.Tensor     # f64 [us_per_item, us_per_piece, us_launch, shared_round, cut_share]
    wl_const: dict
    main_const: dict
    fix_kernel: str | None
    fix_const: dict
    fix_grid: tuple
    layout: tuple          # partials (f32 of O, f32 of m), counters
    kid: int
    consts: dict
    cuda: bool
    wl_ints: tuple         # the work-list kernel's integers that depend only on the plan
    pool_bytes: int        # bytes of the stream's pool the plan's views take
    ws: serving_ws.WsBound | None = None  # whole tiles on the Hopper kernel


def bind(plan: ServingPlan, device) -> Bound:
    """The plan bound to `device`, made once and kept on the plan object."""
    return cached_bind(plan, device, _bind)


def _bind(plan: ServingPlan, device: torch.device) -> Bound:
    g = plan.geometry
    m = plan.cost_model
    cost = device_table(device, (m.us_per_item, m.us_per_piece, m.us_launch, m.shared_round,
                                 m.cut_share), torch.float64)
    # vector widths in coarse buckets, so that a serving loop whose batch changes every step
    # reuses its kernels (docs/serving.md "Planning from upper bounds"): up to 64 sequences
    # share one work-list build, row blocks go in chunks of RB_CHUNK, and a program looks
    # for its first row block 256 (up to 256 row blocks) or 1024 prefix sums at a time;
    # wider vectors only add masked lanes
    block_b = _pow2(max(64, plan.batch))
    wsb = serving_ws.bind(plan, device)
    wl_const = dict(VARLEN_Q=plan.varlen, CAUSAL=plan.causal or plan.window is not None,
                    HAS_WINDOW=plan.window is not None, POLICY=POLICY_CODE[plan.policy],
                    FUSED=plan.fixup == "fused", TOKENS=g.tokens_per_tile, BLOCK_N=g.block_n,
                    BLOCK_B=block_b, LOG_B=block_b.bit_length() - 1, RB_CHUNK=RB_CHUNK,
                    NB=_pow2(max(2, plan.programs)), Q_RANGE=plan.q_range is not None,
                    WHOLE=plan.whole_tiles, LQ_MIN=plan.whole_q_min, TAIL=plan.tail,
                    WS=serving_ws.WS_SPEED_X10 if wsb is not None else 0, num_warps=4)
    main_const, fix_const, fix_grid, _ = constants(plan, device, plan.tiles_max)
    search = 256 if plan.rb_max <= 256 else 1024
    main_const.update(PAGED=plan.layout == "paged", PAGE_SIZE=plan.page_size or 16,
                      SEARCH=search, KV_FORMAT=KV_FORMATS.get(plan.dtype, 0), WHOLE=False,
                      WAIT_PDL=_pdl_wait(plan, device),
                      # FP8 V: rows at multiples of 4 bytes (checks); q8_0 keeps its loads
                      V_PAIRS=v_pairs(plan), TAIL=plan.tail > 0, TILE_COST=plan.tile_cost,
                      PAIR_D=plan.head_dim // 2 if plan.head_pairs else 0)
    if main_const["WAIT_PDL"]:  # Tuning(pdl_wait=True): launched early, waits on the GPU
        main_const["launch_pdl"] = True
    # decode tiles three or more an SM: the build must fit them (prompt-sized tiles, whose
    # shared memory holds one or two an SM, are left to ptxas)
    cap = register_cap(plan.occupancy, g.num_warps) if g.block_m < 64 else None
    if cap is not None:
        main_const["maxnreg"] = cap
    fix_kernel = plan.fixup if plan.fixup in ("uniform", "general") else None
    fix_const["PAIR_D"] = main_const["PAIR_D"]
    if fix_kernel == "general":
        fix_const["SEARCH"] = search
    # the integers the kernels specialise on (not the batch's shape: kernels/worklist.py)
    ints = (plan.gqa_ratio, plan.ntiles_z, plan.hz, plan.split, plan.window or 0)
    key = (device, tuple(sorted(wl_const.items())), tuple(sorted(main_const.items())),
           tuple(sorted(fix_const.items())), fix_kernel, tuple(_spec(x) for x in ints),
           tuple(sorted(wsb.const.items())) if wsb is not None else None)
    kid = _KEYS.setdefault(key, len(_KEYS))
    wl_ints = (plan.programs, plan.split, n_sat(plan), plan.per_sm,
               *(plan.q_range or (0, INT32_MAX)), plan.resident, wsb.grid if wsb else 0)
    cuda = device.type == "cuda" and not interpreting()
    layout = ws.layout(plan, plan.tiles_max)
    pool_bytes = (layout[0] + 2 * layout[1] + layout[2]) * 4
    return Bound(plan, device, cost, wl_const, main_const, fix_kernel, fix_const, fix_grid,
                 layout, kid, {}, cuda, wl_ints, pool_bytes, wsb)


def workspace_bytes(plan: ServingPlan) -> int:
    """Bytes of a caller's workspace for `plan`: partials, the work list, counters."""
    return plan.workspace_bytes + plan.work_list_words * 4


def allocate(plan: ServingPlan, device) -> torch.Tensor:
    """A zeroed workspace for `plan` (its fused counters must start at 0)."""
    return torch.zeros(max(16, workspace_bytes(plan)), dtype=torch.uint8, device=device)


def _views(plan: ServingPlan, b: Bound, workspace, device, stream):
    """(ws_o, ws_m, ws_l, counters, work list) from a caller's buffer or the pools."""
    if workspace is not None:
        need = workspace_bytes(plan)
        if (not isinstance(workspace, torch.Tensor) or not workspace.is_contiguous()
                or workspace.device != device):
            raise ValueError(f"workspace must be a contiguous tensor on {device}")
        raw = workspace.view(-1).view(torch.uint8)
        if raw.numel() < need or raw.data_ptr() % 16:
            raise ValueError(f"workspace must hold {need} bytes, 16-byte aligned "
                             f"(skattn.serving.workspace(plan) allocates one)")
        ws_o, ws_m, ws_l, counters = ws.views(raw, b.layout)
        o, m, _ = b.layout
        at = (o + 2 * m) * 4
        wl = raw[at:at + plan.work_list_words * 4].view(torch.int32)
        return ws_o, ws_m, ws_l, counters, wl
    ws_o, ws_m, ws_l, counters = ws.pooled(b.layout, b.pool_bytes, device, stream)
    wl = ws.work_list(plan.work_list_words, device, stream)
    return ws_o, ws_m, ws_l, counters, wl[:plan.work_list_words]


def pooled_addresses(plan: ServingPlan, b: Bound, device, stream) -> tuple[int, ...]:
    """The addresses of `_views`' pooled views (ws_o, ws_m, ws_l, counters, work list)."""
    found = ws.pooled_addresses(b.layout, b.pool_bytes, device, stream)
    return (*found, ws.work_list(plan.work_list_words, device, stream).data_ptr())


def _stream(b: Bound, device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index) if b.cuda else 0


def build(plan: ServingPlan, wl: torch.Tensor, *, seq_k: torch.Tensor, cu_k: bool,
          seq_q: torch.Tensor | None, counters: torch.Tensor | None = None,
          record: list | None = None) -> None:
    """Launch the work-list step into `wl` (plan.work_list_words int32); a fused plan's step
    also zeroes `counters` (the workspace's, int32) where given. `record` as `run`'s."""
    device = wl.device
    cap_k = plan.key_capacity
    total_k = plan.total_k if plan.layout == "packed" else INT32_MAX
    b = bind(plan, device)
    stream = _stream(b, device)
    n_counters = b.layout[2] if counters is not None else 0
    counters = counters if counters is not None else wl
    args = (seq_k, seq_q if seq_q is not None else seq_k, wl, b.cost, counters, n_counters,
            plan.batch,
            plan.q_len or 0, plan.max_q_len, plan.total_q, cap_k, total_k, plan.hz, plan.rb_max,
            plan.window or 0, *b.wl_ints)
    const = dict(b.wl_const, CU_K=cu_k)
    key = None
    if b.cuda and _no_hooks():
        key = (b.kid, "wl", cu_k,
               *(x.data_ptr() % 16 == 0 for x in (seq_k, args[1], wl, counters)))
    _launch(_wl.work_list_kernel, key, args, const, (1, 1, 1), stream, record)


def run(plan: ServingPlan, q, k, v, out, lse, *, wl, block_table, scale: float, sinks=None,
        softcap=0.0, alibi_slopes=None, ws_views=None, k_scale=None, v_scale=None,
        stamps=None, record: list | None = None) -> None:
    """Launch the main kernel and the plan's separate fixup over the work list `wl`.
    fp8 K/V (a plan of dtype float8_e4m3fn): `k_scale`, `v_scale` f32 [1] or [Hkv]; q8_0,
    q4_0: `k`, `v` the block caches' values, `k_scale`, `v_scale` their block scales.
    `stamps` (a diagnostic, GPU only; `tools/serving_timeline.py`): contiguous int64 CUDA
    tensors (main [plan.programs, 4], fixup [prod(fixup grid), 4]) that receive each
    program's %globaltimer stamps: the main kernel's start (after its PDL wait), the end of
    its first piece's KV loop and its end; the fixup's start, the end of its PDL wait and its
    end; column 3 the SM. The stream-K build only (not a whole-tile step's). A third tensor
    [plan.programs, T, 8] adds tile stamps for each program's first T tiles (kernels/stamps.py
    `tile_stamp`): the tile's start, its sequence's numbers in, q in, its first KV block done,
    its KV loop done, its output's or piece's stores issued (a cut piece's after the fused
    merge's atomic); its KV blocks and its tile index. `record`: a list that receives (key,
    args, grid) of every launch (`skattn.serving_recipe`)."""
    device = q.device
    b = bind(plan, device)
    stream = _stream(b, device)
    ws_o, ws_m, ws_l, counters = ws_views
    qk_scale, softcap_scale = score_scales(scale, softcap)
    fp8 = b.main_const["KV_FORMAT"] == 1
    # fp8 scales per KV head: bit 0 K's, bit 1 V's
    head_scales = int(k_scale.numel() > 1) + 2 * int(v_scale.numel() > 1) if fp8 else 0
    features = (sinks is not None, alibi_slopes is not None, bool(softcap), lse is not None,
                not b.cuda, head_scales)
    consts = b.consts.get(features)
    if consts is None:
        has_sinks, has_alibi, soft, has_lse, interpret, _ = features
        main = dict(b.main_const, HAS_SINKS=has_sinks, HAS_ALIBI=has_alibi, SOFTCAP=soft,
                    RETURN_LSE=has_lse, INTERPRET=interpret, HEAD_SCALES=head_scales)
        fix = dict(b.fix_const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse)
        # the whole-tile build (kernels/ragged.py WHOLE), launched first where the plan allows it
        whole = dict(main, WHOLE=True, USE_PDL=0) if b.wl_const["WHOLE"] else None
        # the Hopper kernel's whole-tile build, where the plan takes it (serving_ws)
        hopper = (dict(b.ws.const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse)
                  if b.ws is not None else None)
        consts = b.consts[features] = (main, fix, whole, hopper)
    main_const, fix_const, whole_const, ws_const = consts
    if stamps is not None:
        check_stamps(stamps, stamp_rows(plan, device), device)
        main_const = dict(main_const, STAMPS=stamps[0], TIMELINE=True)
        fix_const = dict(fix_const, STAMPS=stamps[1], TIMELINE=True)
        if len(stamps) > 2:
            _check_tile_stamps(stamps[2], plan.programs, device)
            main_const = dict(main_const, TSTAMPS=stamps[2], TILE_STAMPS=stamps[2].shape[1])
    if plan.varlen:  # packed q and out [total_q, H, D]; lse [Hq, total_q]
        qs = (0, q.stride(0), q.stride(1))
        os_ = (0, out.stride(0), out.stride(1))
        ls = (0, lse.stride(0)) if lse is not None else (0, 0)
    else:
        qs = q.stride()[:3]
        os_ = out.stride()[:3]
        ls = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    if plan.layout == "packed":
        ks, vs = (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1))
    else:
        ks, vs = k.stride()[:3], v.stride()[:3]
    if plan.head_pairs:  # KV heads 2j and 2j + 1 as head j, one row of twice the values
        ks, vs = (*ks[:2], 2 * ks[2]), (*vs[:2], 2 * vs[2])
    paged = plan.layout == "paged"
    bt = block_table if paged else wl
    sbt = block_table.stride(0) if paged else 0
    num_pages = k.shape[0] if paged else 0
    lse_t = lse if lse is not None else out
    sinks_t = sinks if sinks is not None else out
    slopes_t = alibi_slopes if alibi_slopes is not None else out
    ks_t = k_scale if k_scale is not None else out
    vs_t = v_scale if v_scale is not None else out
    args = (q, *qs, k, *ks, v, *vs, out, *os_, lse_t, *ls, bt, sbt, sinks_t, slopes_t, ks_t, vs_t,
            ws_o, ws_m, ws_l, counters, wl,
            plan.batch, plan.rb_max, plan.gqa_ratio, plan.ntiles_z, plan.hz, num_pages, plan.split,
            qk_scale, softcap_scale, plan.window or 0)
    key = None
    if b.cuda and _no_hooks() and stamps is None:
        key = (b.kid, features, q.dtype, out.dtype, k.dtype, qs, ks, vs, os_, ls,
               *(x.data_ptr() % 16 == 0 for x in (q, k, v, out, lse_t, sinks_t, slopes_t, ks_t,
                                                  vs_t, bt, ws_o, ws_m, ws_l, counters, wl)))
    grid = (plan.programs, 1, 1)
    if b.ws is not None and stamps is None and serving_ws.usable(k, v, softcap, alibi_slopes):
        _launch_ws(plan, b, q, qs, k, v, out, os_, lse_t, ls, sinks_t, ws_o, ws_m, ws_l, bt, sbt,
                   wl, num_pages, qk_scale, ws_const, key, stream, record)
    elif whole_const is not None:  # it works where the step is whole tiles, else exits at once
        _launch(_ragged.ragged_attention_kernel, key and (*key, "whole"), args, whole_const, grid,
                stream, record)
    _launch(_ragged.ragged_attention_kernel, key, args, main_const, grid, stream, record)
    if b.fix_kernel is None:
        return
    out_args = (out, *os_, lse_t, *ls, sinks_t, ws_o, ws_m, ws_l, wl,
                plan.batch, plan.rb_max, plan.gqa_ratio, plan.ntiles_z, plan.hz)
    if b.fix_kernel == "uniform":
        kernel, fargs = _fix.ragged_uniform_fixup_kernel, (*out_args, plan.split)
    else:
        kernel, fargs = _fix.ragged_general_fixup_kernel, out_args
    _launch(kernel, key and (*key, "fixup"), fargs, fix_const, b.fix_grid, stream, record)


def _launch_ws(plan, b: Bound, q, qs, k, v, out, os_, lse_t, ls, sinks_t, ws_o, ws_m, ws_l, bt,
               sbt, wl, num_pages, qk_scale, const, key, stream, record) -> None:
    """The Hopper kernel's whole-tile build (kernels/ragged_ws.py): it works where the step is
    whole tiles, else exits at once."""
    kd, vd = serving_ws.descriptors(b.ws, k, v)
    args = (q, *qs, kd, vd, out, *os_, lse_t, *ls, sinks_t, ws_o, ws_m, ws_l, bt, sbt, wl,
            plan.batch, plan.rb_max, plan.gqa_ratio, plan.ntiles_z, plan.hz, num_pages, qk_scale)
    # the descriptors' shapes and strides are arguments; K's and V's dtypes, strides and
    # alignment are in the key with the rest
    _launch(_ragged_ws.ragged_ws_kernel, key and (*key, "ws"), args, const, (b.ws.grid, 1, 1),
            stream, record)


def _check_tile_stamps(tiles, programs: int, device) -> None:
    """Tile stamps: 8 int64 for each of T tiles of each program, so wrong buffers would be
    written out of bounds."""
    if (not isinstance(tiles, torch.Tensor) or tiles.dtype != torch.int64 or tiles.dim() != 3
            or not tiles.is_contiguous() or tiles.shape[0] != programs or tiles.shape[2] != 8
            or tiles.device != torch.device(device)):
        raise ValueError(f"stamps[2] must be a contiguous int64 [{programs}, T, 8] tensor on "
                         f"{device}")


def stamp_rows(plan: ServingPlan, device) -> tuple[int, int]:
    """Rows of `run`'s stamps: main kernel programs, fixup programs (0 without a fixup)."""
    b = bind(plan, device)
    return plan.programs, math.prod(b.fix_grid) if b.fix_kernel is not None else 0
