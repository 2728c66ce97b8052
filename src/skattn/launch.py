"""Turn a Plan into kernel launches.

`bind(plan, device)` computes once everything that depends only on the plan: grids, the
work list's tables on the device, fastdiv constants, PDL, merge steps and the kernels'
compile-time constants. A call then packs its tensors into the argument list and launches
the compiled kernels directly (Triton's `CompiledKernel.run`), keyed by what changes their
code: the plan's constants, the features present, the tensors' strides and 16-byte alignment.
The first call of each key goes through Triton's JIT launcher, which compiles or finds the
kernel; under the interpreter, with time stamps or with Triton launch hooks, every call does.
`skattn.attention` replays a repeat call's launches from its recipe (`skattn.recipe`) and
comes here for the first call of a signature.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import triton
from triton import knobs

from skattn import buffers as ws
from skattn import prefill_launch as _prefill
from skattn.config import Q8_0_NARROW_DECODE, fp8_pairs
from skattn.device import interpreting
from skattn.fastdiv import magic
from skattn.kernels import attention as _main
from skattn.kernels import dequant as _dequant
from skattn.kernels import fixup as _fixup
from skattn.kernels import prefill as _prefill_kernel
from skattn.kernels import prefill_ws as _prefill_ws
from skattn.kernels import tile as _tile
from skattn.planner import Plan

LOG2E = float(_tile.LOG2E.value)  # the kernels' constant, as a Python float
_COMPILED: dict = {}  # call key -> (CompiledKernel, its constant parameters in order)
_KEYS: dict = {}  # a bound plan's contribution to call keys -> a small integer
_I32 = 1 << 31
# the kernel's KV_FORMAT by Plan.dtype (else 0)
KV_FORMATS = {"float8_e4m3fn": 1, "q8_0": 2, "q4_0": 3}


def _many_pieces(plan, tiles: int) -> bool:
    """Tiles cut into several pieces each (decode). Prompt chunks have 1-2 pieces a tile:
    there PDL and 16-row fixup programs cost time (llama-8b n=512 L=32768: 550 -> 563 us
    with both, PERF.md), so they keep whole-tile fixup programs and a plain launch.
    `tiles`: the plan's output tiles (a serving plan's most)."""
    return plan.programs >= 4 * tiles


def pieces_per_step(block_m: int, block_dv: int, num_warps: int, elements: int) -> int:
    """Partials merged per step: as many as fit `elements` f32 per thread (a power of 2)."""
    budget = num_warps * 32 * elements // (block_m * block_dv)
    return max(1, min(16, 1 << max(0, budget.bit_length() - 1)))


def fixup_grid(plan: Plan) -> tuple[int, int, int]:
    """Grid of the separate fixup: (tiles for uniform, programs for general) x chunks of
    `tuning.fixup_dv` columns x chunks of `tuning.fixup_rows` rows (whole tiles for plans
    with few pieces a tile)."""
    return _fixup_grid(plan, plan.ntiles_dst)


def _fixup_grid(plan, tiles: int) -> tuple[int, int, int]:
    g, t = plan.geometry, plan.tuning
    fix_dv = min(g.block_dv, t.fixup_dv)
    fix_m = min(g.block_m, t.fixup_rows) if _many_pieces(plan, tiles) else g.block_m
    first = tiles if plan.fixup == "uniform" else plan.programs
    return first, g.block_dv // fix_dv, g.block_m // fix_m


def _spec(x: int) -> tuple[bool, bool, bool]:
    """What Triton specialises an integer argument on: == 1, divisible by 16, fits int32."""
    return x == 1, x % 16 == 0, -_I32 <= x < _I32


@dataclass
class Bound:
    """A plan bound to one device: everything a call needs besides its tensors."""

    plan: Plan
    device: torch.device
    qblock_off: torch.Tensor      # [ntiles_x + 1] int32: token block offsets in a group's work
    kv_first: torch.Tensor    # [ntiles_x] int32: first visible KV block per token block
    main_ints: tuple          # the main kernel's integer arguments after the pointers
    main_const: dict          # its compile-time constants that depend only on the plan
    main_grid: tuple
    fix_kernel: str | None    # "uniform", "general" or None
    fix_ints: tuple
    fix_const: dict
    fix_grid: tuple
    pdl: bool
    layout: tuple
    need: int
    kid: int                  # what the plan contributes to the compiled kernels' keys
    fd: tuple                 # fastdiv (multiplier, shift) of ntiles_x, ntiles_z, kv_heads, group_work
    consts: dict              # per feature set: the kernels' compile-time constants
    cuda: bool                # a CUDA device, not the interpreter: direct launches possible
    prefill: _prefill.PrefillBound | None = None  # the prompt-chunk kernel's part, if it runs


def bind(plan: Plan, device) -> Bound:
    """The plan bound to `device`, made once and kept on the plan object."""
    return cached_bind(plan, device, _bind)


def cached_bind(plan, device, make):
    """`make(plan, device)`, made once per device and kept on the plan object."""
    device = torch.device(device)
    cache = plan.__dict__.setdefault("_bound", {})
    b = cache.get(device)
    if b is None:
        b = cache[device] = make(plan, device)
    return b


def _pdl(plan, device: torch.device, tiles: int) -> bool:
    if not plan.tuning.pdl or interpreting() or plan.fixup not in ("uniform", "general"):
        return False
    if not _many_pieces(plan, tiles) or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_wait(plan, device: torch.device) -> bool:
    """The main kernel launched with PDL, waiting on the GPU (`Tuning.pdl_wait`, sm_90+)."""
    if not plan.tuning.pdl_wait or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def constants(plan, device: torch.device, tiles: int) -> tuple[dict, dict, tuple, bool]:
    """What the dense and the ragged launches share: the main kernel's and the separate
    fixup's compile-time constants, the fixup's grid and whether PDL is used; `tiles`: the
    plan's output tiles (a serving plan's most)."""
    g, t = plan.geometry, plan.tuning
    pdl = _pdl(plan, device, tiles)
    fused_dv = min(g.block_dv, t.fused_dv or g.block_dv)  # Dv columns per fused merge step
    # the fused merge reads only the rows the tile's heads and tokens fill (n = 1, ratio 4:
    # 4 of 16), so a step holds 4x the pieces' values in flight
    fused_rows = min(g.block_m, 1 << (g.heads_per_tile * g.tokens_per_tile - 1).bit_length())
    common = dict(HEAD_DIM_V=plan.head_dim_v, BLOCK_M=g.block_m, BLOCK_DV=g.block_dv,
                  HEADS_PER_TILE=g.heads_per_tile, TOKENS_PER_TILE=g.tokens_per_tile)
    main_const = dict(
        HEAD_DIM=plan.head_dim, BLOCK_N=g.block_n, BLOCK_DK=g.block_dk, DK_CHUNKS=g.dk_chunks,
        CAUSAL=plan.causal or plan.window is not None, HAS_WINDOW=plan.window is not None,
        FUSED=plan.fixup == "fused", PER_TILE_RANGES=plan.per_tile_ranges,
        FIXUP_COLS=fused_dv, FIXUP_ROWS=fused_rows,
        MERGE_PIECES=pieces_per_step(fused_rows, fused_dv, g.num_warps, t.fused_merge_elements),
        USE_PDL=(1 if t.pdl_trigger == "start" else 2) if pdl else 0,
        num_warps=g.num_warps, num_stages=g.num_stages, **common)
    fix_grid = _fixup_grid(plan, tiles)
    fix_dv, fix_m = g.block_dv // fix_grid[1], g.block_m // fix_grid[2]
    fix_const = dict(common, BLOCK_DV=fix_dv, ROWS=fix_m, USE_PDL=pdl, num_warps=4,
                     MERGE_PIECES=pieces_per_step(fix_m, fix_dv, 4, t.merge_elements),
                     LOADS_FIRST=t.merge_loads_first)
    if pdl:
        fix_const["launch_pdl"] = True
    return main_const, fix_const, fix_grid, pdl


def v_pairs(plan) -> bool:
    """Whether the plan's (a Plan's or a ServingPlan's) main kernel reads V as 16-bit pairs:
    FP8 (`config.fp8_pairs`), q8_0 (`Tuning.q8_0_v_blocks`). A dense call whose V rows are
    not at even byte offsets reads bytes instead."""
    if plan.dtype == "q8_0":  # q8_0 V as pairs with its scales on p (`Tuning.q8_0_v_blocks`)
        on = plan.tuning.q8_0_v_blocks
        if on is None:  # measured faster: Dv = 128, and D = Dv = 64 in two-warp tiles
            g = plan.geometry
            on = plan.head_dim_v == 128 or (
                plan.head_dim == plan.head_dim_v == 64
                and (g.block_n, g.num_stages, g.num_warps) == Q8_0_NARROW_DECODE[:3])
        return on and plan.geometry.block_m < 64
    return fp8_pairs(plan.geometry, plan.dtype, plan.head_dim_v, plan.tuning.fp8_v_pairs)


def dequantize(x, scales, kv_format: str, dtype, out=None, record=None,
               direct: bool | None = None) -> torch.Tensor:
    """FP8 (`scales` f32 [1] or [Hkv]) or q8_0 (`scales` its block scales) K or V written as
    `dtype` into `out` (a contiguous [B, L, Hkv, D] tensor; a new one where None), in one
    launch (`kernels/dequant.py`). `direct` (default: x on a GPU, no interpreter, no launch
    hook): the compiled kernel directly after the first call of a key, as `run` launches;
    `record` as `run`'s."""
    B, L, H, D = x.shape
    if out is None:
        out = torch.empty(B, L, H, D, device=x.device, dtype=dtype)
    rows, block_r = B * L * H, 16
    fmt = 1 if kv_format == "float8_e4m3fn" else 2
    # plain integers: triton.next_power_of_2 and triton.cdiv are Triton constexpr functions,
    # several µs of host time a call each
    const = dict(D=D, BLOCK_D=1 << (D - 1).bit_length(), FORMAT=fmt,
                 HEAD_SCALES=int(fmt == 1 and scales.numel() > 1), BLOCK_R=block_r)
    args = (x, scales, out, rows, L, H, *x.stride()[:3])
    if direct is None:
        direct = x.device.type == "cuda" and not interpreting() and _no_hooks()
    key = stream = None
    if direct:
        stream = torch._C._cuda_getCurrentRawStream(x.device.index)
        key = ("dequant", x.device, x.dtype, scales.dtype, dtype, *args[3:],
               *const.values(), *(t.data_ptr() % 16 == 0 for t in (x, scales, out)))
    _launch(_dequant.dequant_kernel, key, args, const, (-(-rows // block_r), 1, 1), stream,
            record)
    return out


def score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """The kernels' (qk_scale, softcap_scale): scores come out in log2 units, softcapped as
    softcap * tanh(qk * scale / softcap)."""
    if softcap:
        return softcap * LOG2E, scale / softcap
    return scale * LOG2E, 1.0


def _bind(plan: Plan, device: torch.device) -> Bound:
    fd = tuple(x for d in (plan.ntiles_x, plan.ntiles_z, plan.kv_heads, plan.group_work)
               for x in magic(max(1, d)))
    main_const, fix_const, fix_grid, pdl = constants(plan, device, plan.ntiles_dst)
    wait = _pdl_wait(plan, device)
    main_const.update(USE_FASTDIV=plan.fastdiv, ONE_TOKEN_BLOCK=plan.ntiles_x == 1,
                      KV_FORMAT=KV_FORMATS.get(plan.dtype, 0), WAIT_PDL=wait,
                      LONGEST_FIRST=plan.longest_first, V_PAIRS=v_pairs(plan))
    if wait:
        main_const["launch_pdl"] = True
    fix_const["USE_FASTDIV"] = plan.fastdiv
    main_ints = (plan.q_len, plan.kv_len, plan.gqa_ratio, plan.kv_heads, plan.ntiles_x,
                 plan.ntiles_z, plan.group_work, plan.work, plan.programs, plan.split,
                 plan.kv_first[0])
    fix_kernel = plan.fixup if plan.fixup in ("uniform", "general") else None
    if fix_kernel == "uniform":
        fix_ints = (plan.q_len, plan.gqa_ratio, plan.kv_heads, plan.ntiles_x, plan.ntiles_z,
                    plan.split, *fd[:6])
    else:
        fix_ints = (plan.q_len, plan.gqa_ratio, plan.kv_heads, plan.ntiles_x, plan.ntiles_z,
                    plan.group_work, plan.work, plan.programs, *fd[2:8])
    prefill = _prefill.bind(plan, device, main_const)
    key = (device, tuple(sorted(main_const.items())), tuple(sorted(fix_const.items())),
           fix_kernel, tuple(_spec(x) for x in (*main_ints, *fd, *fix_ints, plan.window or 0)),
           prefill and tuple(sorted(prefill.const.items())))
    kid = _KEYS.setdefault(key, len(_KEYS))
    qblock_off, kv_first = _tables(device, plan.qblock_offsets, plan.kv_first)
    return Bound(plan, device, qblock_off, kv_first, (*main_ints,), main_const,
                 (plan.programs, 1, 1), fix_kernel, fix_ints, fix_const, fix_grid, pdl,
                 ws.layout(plan), ws.nbytes(plan), kid, fd, {},
                 device.type == "cuda" and not interpreting(), prefill)


_MAKER: list = []  # the thread that makes bound plans' tables on a GPU (made when first needed)
# (device, dtype, values) -> tensor: a bound plan's tables, kept for the process and shared by
# every plan with the same values. A CUDA graph captured with a plan keeps their addresses,
# and the plan caches (lru) may drop the plan itself while the graph is still replayed.
_TABLES: dict = {}
_TABLES_LOCK = threading.Lock()


def device_table(device: torch.device, values: tuple, dtype=torch.int32) -> torch.Tensor:
    """`values` as a tensor on `device`, made once per process. On a GPU another thread makes
    it: torch.compile's CUDA graphs send every allocation of the calling thread to the
    graph's private pool while they warm up and record, and memory there that outlives the
    call is an error. The copy is complete when it is returned."""
    key = (device, dtype, tuple(values))
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
    if hit is not None:
        return hit

    def make():
        return torch.tensor(values, dtype=dtype, device=device)

    if device.type != "cuda":
        table = make()
    else:
        if not _MAKER:
            from concurrent.futures import ThreadPoolExecutor

            _MAKER.append(ThreadPoolExecutor(1, thread_name_prefix="skattn-tables"))
        table = _MAKER[0].submit(make).result()
    with _TABLES_LOCK:
        return _TABLES.setdefault(key, table)


def _tables(device: torch.device, *rows) -> list[torch.Tensor]:
    """int32 tensors of `rows` on `device` (`device_table`)."""
    return [device_table(device, tuple(r)) for r in rows]


def _launch(kernel, key, args: tuple, const: dict, grid: tuple, stream, record=None) -> None:
    """Launch `kernel`: the compiled kernel directly when `key` was seen (key None: always
    through Triton's launcher); append (key, args, grid) to `record` when one is given."""
    if record is not None:
        record.append((key, args, grid))
    hit = _COMPILED.get(key) if key is not None else None
    if hit is not None:
        ck, tail = hit
        ck.run(grid[0], grid[1], grid[2], stream, ck.function, ck.packed_metadata, None,
               None, None, *args, *tail)
        return
    ck = kernel[grid](*args, **const)
    if key is not None and hasattr(ck, "packed_metadata"):
        # the launcher takes every parameter in order, compile-time constants included (a
        # parameter's default where `const` leaves it out)
        tail = tuple(const[p.name] if p.name in const else p.default
                     for p in kernel.params[len(args):])
        _COMPILED[key] = (ck, tail)


def _no_hooks() -> bool:
    """No Triton launch hook is registered (a profiler's would be skipped by the direct launch);
    Triton keeps them as chains of calls, or None."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (leave is None or not getattr(leave, "calls", True)))


def run(plan: Plan, q, k, v, out, lse, *, scale: float, mask=None, sinks=None, softcap=0.0,
        alibi_slopes=None, workspace=None, main_only: bool = False, stamps=None,
        k_scale=None, v_scale=None, record: list | None = None, routed: tuple = ()) -> None:
    """Launch the main kernel and, for uniform/general plans, the fixup kernel.

    Quantized K/V (the plan's dtype says which): `k`, `v` are what the kernel reads (fp8
    tensors, a Q8_0's int8 values or a Q4_0's packed uint8) and `k_scale`, `v_scale` the
    scales (fp8: f32 [1] or [Hkv]; q8_0, q4_0: the block scales), as `skattn.attention`
    unpacks them.

    `workspace`: a caller's buffer (`skattn.workspace(plan)`) or a buffer of this call alone
    (`buffers.scratch`, or its views as a tuple), else the pool of the current stream.
    `main_only` skips the separate fixup (a diagnostic: the output is then incomplete).
    `stamps` (a diagnostic, GPU only): int64 tensors (main [programs, 4], fixup
    [prod(fixup_grid(plan)), 4]) that receive each program's %globaltimer stamps (main: start,
    first tile's KV loop done, end; uniform fixup: start, partials ready, end) and its SM in
    column 3. The main kernel's start is stamped after its PDL wait (`Tuning.pdl_wait`), and
    a whole-tile plan run longest first (`Plan.longest_first`) stamps its row p for tile p.
    `record`: a list that receives (key, args, grid) of every launch (`skattn.recipe`).
    `routed`: for a plan that dequantizes K/V first (`Plan.dequant`), the two contiguous
    [B, Lk, Hkv, D] tensors of q's dtype that receive them (new ones where empty).
    """
    device = q.device
    if device.type == "cuda" and device.index != torch._C._cuda_getDevice():
        with torch.cuda.device(device):  # Triton launches on the current device
            return run(plan, q, k, v, out, lse, scale=scale, mask=mask, sinks=sinks,
                       softcap=softcap, alibi_slopes=alibi_slopes, workspace=workspace,
                       main_only=main_only, stamps=stamps, k_scale=k_scale, v_scale=v_scale,
                       record=record, routed=routed)
    if plan.dequant is not None:  # K/V in q's dtype first, then the 16-bit plan
        direct = bind(plan.dequant, device).cuda and stamps is None and _no_hooks()
        kd, vd = (dequantize(x, s, plan.dtype, q.dtype, into, record, direct)
                  for x, s, into in zip((k, v), (k_scale, v_scale), routed or (None, None)))
        return run(plan.dequant, q, kd, vd, out, lse, scale=scale, mask=mask, sinks=sinks,
                   softcap=softcap, alibi_slopes=alibi_slopes, workspace=workspace,
                   main_only=main_only, stamps=stamps, record=record)
    b = bind(plan, device)
    if stamps is not None:
        _check_stamps(plan, stamps, device)
    cuda = b.cuda
    stream = torch._C._cuda_getCurrentRawStream(device.index) if cuda else 0
    if type(workspace) is ws.Scratch:  # a buffer of the call's own
        ws_o, ws_m, ws_l, counters = workspace.views(b.layout)
    elif type(workspace) is tuple:  # its views, made by the caller (`skattn.recipe`)
        ws_o, ws_m, ws_l, counters = workspace
    elif workspace is not None:
        ws_o, ws_m, ws_l, counters = ws.caller_views(workspace, b.layout, b.need, device)
    else:
        ws_o, ws_m, ws_l, counters = ws.pooled(b.layout, b.need, device, stream)
    fast = cuda and stamps is None and _no_hooks()
    qk_scale, softcap_scale = score_scales(scale, softcap)
    # fp8 scales per KV head: bit 0 K's, bit 1 V's
    head_scales = (int(k_scale.numel() > 1) + 2 * int(v_scale.numel() > 1)
                   if b.main_const["KV_FORMAT"] == 1 else 0)
    # V (FP8, q8_0) read as 16-bit pairs where the plan allows and v's rows sit at even bytes
    pairs = b.main_const["V_PAIRS"] and v.data_ptr() % 2 == 0 and not any(
        s % 2 for s in v.stride()[:3])
    features = (mask is not None, sinks is not None, alibi_slopes is not None, bool(softcap),
                lse is not None, not cuda, stamps is not None,
                head_scales, pairs)
    consts = b.consts.get(features)
    if consts is None:
        consts = b.consts[features] = _consts(b, features)
    main_const, fix_const = consts
    placeholder = out
    mask_t = mask if mask is not None else placeholder
    smb, smm = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1)) if mask is not None else (0, 0)
    lse_t = lse if lse is not None else placeholder
    slb, slh = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    sinks_t = sinks if sinks is not None else placeholder
    slopes_t = alibi_slopes if alibi_slopes is not None else placeholder
    ks_t = k_scale if k_scale is not None else placeholder
    vs_t = v_scale if v_scale is not None else placeholder
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    args = (q, qs[0], qs[1], qs[2], k, ks[0], ks[1], ks[2], v, vs[0], vs[1], vs[2],
            out, os_[0], os_[1], os_[2], lse_t, slb, slh, mask_t, smb, smm, sinks_t,
            slopes_t, ks_t, vs_t,
            ws_o, ws_m, ws_l, counters, b.qblock_off, b.kv_first, *b.main_ints,
            qk_scale, softcap_scale, plan.window or 0, *b.fd)
    key = None
    if fast:  # what changes the code besides the plan: features, dtypes, strides, alignment
        key = (b.kid, features, q.dtype, k.dtype, out.dtype, mask_t.dtype, qs, ks, vs, os_, slb,
               slh, smb, smm,
               *(x.data_ptr() % 16 == 0 for x in (q, k, v, out, lse_t, mask_t, sinks_t, slopes_t,
                                                  ks_t, vs_t, ws_o, ws_m, ws_l, counters)))
    elif stamps is not None:
        main_const = dict(main_const, STAMPS=stamps[0], TIMELINE=True)
        if b.fix_kernel == "uniform":
            fix_const = dict(fix_const, STAMPS=stamps[1], TIMELINE=True)
    if b.prefill is not None and _prefill.usable(b.prefill, features, k, v):
        kd, vd = _prefill.descriptors(b.prefill, k, v)
        pconst = _prefill.constants(b.prefill, features)
        if b.prefill.kind == "ws":
            wargs = (q, qs[0], qs[1], qs[2], kd, vd, out, os_[0], os_[1], os_[2], lse_t, slb,
                     slh, sinks_t, ws_o, ws_m, ws_l, *b.prefill.tables,
                     *b.main_ints[:3], qk_scale)  # q_len, kv_len, GQA ratio
            # the descriptors' shapes and strides are arguments (not specialised on); k's and
            # v's dtypes, strides and alignment are in the key with the rest
            _launch(_prefill_ws.ws_prefill_kernel, key and (*key, "ws"), wargs, pconst,
                    b.main_grid, stream, record)
        else:
            pargs = (q, qs[0], qs[1], qs[2], kd, ks[0], ks[1], ks[2], vd, vs[0], vs[1], vs[2],
                     out, os_[0], os_[1], os_[2], lse_t, slb, slh, sinks_t,
                     ws_o, ws_m, ws_l, counters, b.qblock_off, b.kv_first, *b.main_ints,
                     qk_scale, *b.fd)
            with _prefill.scratch(b.prefill):
                _launch(_prefill_kernel.prefill_kernel, key and (*key, "tma"), pargs, pconst,
                        b.main_grid, stream, record)
    else:
        _launch(_main.attention_kernel, key, args, main_const, b.main_grid, stream, record)
    if main_only or b.fix_kernel is None:
        return
    out_args = (out, os_[0], os_[1], os_[2], lse_t, slb, slh, sinks_t, ws_o, ws_m, ws_l)
    if b.fix_kernel == "uniform":
        kernel, fargs = _fixup.uniform_fixup_kernel, (*out_args, *b.fix_ints)
    else:
        kernel, fargs = _fixup.general_fixup_kernel, (*out_args, b.qblock_off, *b.fix_ints)
    _launch(kernel, key and (*key, "fixup"), fargs, fix_const, b.fix_grid, stream, record)


def _consts(b: Bound, features: tuple) -> tuple[dict, dict]:
    """The kernels' compile-time constants for one set of features."""
    has_mask, has_sinks, has_alibi, softcap, has_lse, interpret, _, head_scales, pairs = features
    main = dict(b.main_const, HAS_MASK=has_mask, HAS_SINKS=has_sinks, HAS_ALIBI=has_alibi,
                SOFTCAP=softcap, RETURN_LSE=has_lse, INTERPRET=interpret, HEAD_SCALES=head_scales,
                V_PAIRS=pairs)
    fix = dict(b.fix_const, HAS_SINKS=has_sinks, RETURN_LSE=has_lse)
    return main, fix


def _check_stamps(plan: Plan, stamps, device) -> None:
    check_stamps(stamps, (plan.programs, math.prod(fixup_grid(plan))
                          if plan.fixup == "uniform" else 0), device)


def check_stamps(stamps, rows: tuple[int, int], device) -> None:
    """Stamp buffers for `rows` (main, fixup) programs: the kernels write 4 int64 a program,
    so wrong buffers would be written out of bounds."""
    if interpreting() or torch.device(device).type != "cuda":
        raise ValueError("stamps read the GPU clock: they need CUDA tensors and no interpreter")
    for name, x, n in zip(("main", "fixup"), stamps, rows):
        if (not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or not x.is_contiguous()
                or x.numel() < 4 * n or x.device != torch.device(device)):
            raise ValueError(f"stamps[{name}] must be a contiguous int64 tensor of at least "
                             f"[{n}, 4] on {device}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
