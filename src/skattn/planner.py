"""Stream-K plans: tile geometry, work list, program count and fixup kind (pure Python)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from skattn import buffers, prefill_launch, quant_route, ws_decode
from skattn.checks import causal_window
from skattn.config import (FP8_WIDE_DECODE, Q8_0_NARROW_DECODE, STAGE_BYTES_BUDGET,  # noqa: F401
                           TileGeometry, fp8_wide_decode, programs_per_sm, q8_0_narrow_decode,
                           tile_geometry)
from skattn.policy import (FIXUPS, POLICIES, POLICY_NOTES, CostModel, KVLayout,  # noqa: F401
                           canonical_policy, decide_fixup, fixup_for, load_cost_model,
                           programs_for, whole_prompt)
from skattn.tuning import Tuning

__all__ = ["Plan", "plan", "programs_for", "fixup_for", "tile_geometry", "POLICIES", "FIXUPS"]

# FLOP per byte of K/V above which a cell is compute-bound (it is q_len x GQA ratio; the
# H100/H200 ridge points are about 220/180 FLOP/B for f16)
COMPUTE_BOUND_INTENSITY = 256
# K/V forms -> Plan.dtype (skattn.quant: fp8 with scales, q8_0 and q4_0 blocks)
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16",
           torch.float8_e4m3fn: "float8_e4m3fn", "q8_0": "q8_0", "q4_0": "q4_0"}
# bytes a K/V value takes in each form (q8_0: 34 bytes a block of 32, q4_0: 18)
VALUE_BYTES = {"float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class Plan:
    """A frozen stream-K decomposition of one attention shape on one GPU size.

    Made by `skattn.plan`; pass it to `skattn.attention(..., plan=p)`. Tiles are ordered
    (sequence, KV head, head group, token block), the token block fastest; work item
    w = (tile's offset) + KV block, the KV block fastest (docs/design.md).

    Attributes
    ----------
    batch, q_len, kv_len, q_heads, kv_heads, head_dim, head_dim_v : int
        The shape planned for (B, Lq, Lk, Hq, Hkv, Dk, Dv).
    dtype : str
        K/V dtype planned for ("float16", "bfloat16", "float8_e4m3fn", "q8_0", ...).
    causal : bool
    window : int or None
    geometry : TileGeometry
        Tile shape and kernel configuration (BLOCK_M, BLOCK_N, warps, stages).
    ntiles_dst, ntiles_kv, work : int
        Output tiles, KV blocks of an unrestricted tile, work items W.
    sms, occupancy, max_programs : int
        The GPU planned for: SMs, programs per SM, and their product.
    policy : str
        The program-count policy that chose `programs`.
    programs : int
        N, programs of the main kernel.
    fixup : str
        "none", "uniform", "general" or "fused".
    tuning : Tuning
        Launch choices that leave the decomposition unchanged.
    dequant : Plan or None
        FP8 or q8_0 K/V on the dequant route (`Tuning.quant_route`): the plan of the same call
        with f16 K/V, which runs after K/V are written in q's dtype (its dtype says float16
        for bf16 q too: the kernels take the element type from the tensors).

    `describe()` prints the plan in words, `draw(path)` draws it, `workspace_bytes` is the
    scratch it needs.
    """

    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: bool
    window: int | None
    geometry: TileGeometry
    ntiles_x: int           # token blocks per (sequence, KV head, head group)
    ntiles_z: int           # head groups per KV head
    ntiles_dst: int
    ntiles_kv: int          # KV blocks of an unrestricted tile: ceil(Lk / BLOCK_N)
    kv_first: tuple[int, ...]  # per token block: first visible KV block
    kv_count: tuple[int, ...]  # per token block: visible KV blocks (>= 1)
    work: int               # W: all work items
    sms: int
    occupancy: int
    max_programs: int
    policy: str
    programs: int
    fixup: str
    fastdiv: bool = True    # fastdiv for the kernels' run-time divisions (False: plain //)
    cost_model: CostModel = field(default_factory=CostModel, compare=False)
    tuning: Tuning = field(default_factory=Tuning)
    has_mask: bool = False  # planned for an additive mask (its tile takes shared memory)
    dequant: Plan | None = None  # the dequant route (`skattn.quant_route`): the 16-bit plan

    # -- derived sizes
    def __getstate__(self):
        # a copy or a pickle is a new plan: not the api's token (another process's counter
        # may have given it to another plan) nor the bound tables (`launch._KEYS` indices and
        # device tensors of this process)
        return {k: v for k, v in self.__dict__.items() if k not in ("_token", "_bound")}

    @property
    def gqa_ratio(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def group_work(self) -> int:
        """Work items of one (sequence, KV head, head group): all its token blocks."""
        return sum(self.kv_count)

    @property
    def split(self) -> int:
        """Pieces per tile of a uniform plan (1 otherwise)."""
        return self.programs // self.ntiles_dst if self.fixup == "uniform" else 1

    @property
    def per_tile_ranges(self) -> bool:
        """Uniform plans cut each tile into `split` pieces by its own length (docs/design.md); a
        plan of one program per tile and no fixup gives each program its whole tile."""
        whole = self.fixup == "none" and self.programs == self.ntiles_dst
        return self.fixup == "uniform" or whole

    @property
    def longest_first(self) -> bool:
        """One whole tile a program whose tiles grow with their token block (causal prompts):
        the kernels run the longest first (`Tuning.tile_order`, `longest_first_order`)."""
        counts = self.kv_count
        return (self.tuning.tile_order == "longest" and self.fixup == "none"
                and self.programs == self.ntiles_dst and counts[0] < counts[-1]
                and list(counts) == sorted(counts))

    def longest_first_order(self) -> list[int]:
        """Tile of each program under `longest_first` (the kernels' `tile.longest_first`)."""
        groups, x = self.programs // self.ntiles_x, self.ntiles_x
        return [(p % groups) * x + x - 1 - p // groups for p in range(self.programs)]

    @property
    def workspace_floats(self) -> int:
        """f32 partial states: two slots per program of BLOCK_M rows x (Dv + 2)."""
        o, m, _ = buffers.layout(self)
        return o + 2 * m

    @property
    def workspace_bytes(self) -> int:
        return buffers.nbytes(self)

    # -- the work list
    @cached_property
    def qblock_offsets(self) -> tuple[int, ...]:
        out = [0]
        for c in self.kv_count:
            out.append(out[-1] + c)
        return tuple(out)

    def tile_range(self, tile: int) -> tuple[int, int]:
        """[first, stop) work items of `tile`."""
        group, qblock = divmod(tile, self.ntiles_x)
        base = group * self.group_work
        return base + self.qblock_offsets[qblock], base + self.qblock_offsets[qblock + 1]

    def tile_of(self, item: int) -> int:
        group, r = divmod(item, self.group_work)
        qblock = max(j for j in range(self.ntiles_x) if self.qblock_offsets[j] <= r)
        return group * self.ntiles_x + qblock

    def program_range(self, p: int) -> tuple[int, int]:
        """[start, stop) of program p's work items."""
        if self.per_tile_ranges:
            tile, i = divmod(p, self.split)
            first, stop = self.tile_range(tile)
            n = stop - first
            return first + i * n // self.split, first + (i + 1) * n // self.split
        return p * self.work // self.programs, (p + 1) * self.work // self.programs

    def ranges(self) -> list[tuple[int, int]]:
        return [self.program_range(p) for p in range(self.programs)]

    def pieces(self) -> dict[int, list[int]]:
        """Split tiles -> the programs holding a piece of them, in program order."""
        out: dict[int, list[int]] = {}
        for p, (start, stop) in enumerate(self.ranges()):
            if start == stop:
                continue
            for t in range(self.tile_of(start), self.tile_of(stop - 1) + 1):
                first, end = self.tile_range(t)
                if start > first or stop < end:
                    out.setdefault(t, []).append(p)
        return out

    def describe(self) -> str:
        g = self.geometry
        pieces = self.pieces()
        longest = max(b - a for a, b in self.ranges())
        idle = sum(longest - (b - a) for a, b in self.ranges())
        lines = [
            f"attention: batch {self.batch}, q_len {self.q_len}, kv_len {self.kv_len}, heads "
            f"{self.q_heads}/{self.kv_heads} (ratio {self.gqa_ratio}), head dim "
            f"{self.head_dim}/{self.head_dim_v}, {self.dtype}, causal={self.causal}, window={self.window}",
            f"tile: {g.block_m} rows = {g.tokens_per_tile} tokens x {g.heads_per_tile} heads; "
            f"BLOCK_N {g.block_n}; warps {g.num_warps}, stages {g.num_stages}",
            f"tiles: ntiles_dst {self.ntiles_dst} (token blocks {self.ntiles_x}, head groups "
            f"{self.ntiles_z}), ntiles_kv {self.ntiles_kv}, work items W {self.work}",
            f"grid: {self.sms} SMs x {self.occupancy} = max_programs {self.max_programs}; "
            f"policy {self.policy} -> programs {self.programs}, fixup {self.fixup}"
            + (", longest tiles first" if self.longest_first else ""),
            f"policy {self.policy}: {POLICY_NOTES[self.policy]}",
            f"programs: longest {longest} items, idle slots in the tail {idle}; split tiles "
            f"{len(pieces)}, max pieces per tile {max((len(v) for v in pieces.values()), default=1)}",
            f"workspace: {self.workspace_bytes} bytes",
        ]
        if self.tuning.prefill != "base":
            decode = (self.q_len * self.gqa_ratio < COMPUTE_BOUND_INTENSITY
                      and self.fixup == "uniform" and self.programs % self.ntiles_dst == 0)
            lines.append(f"kernel: {prefill_launch.KERNEL_NOTES[self.tuning.prefill]}" + (
                f"; decode tiles in {self.programs // self.ntiles_dst} equal pieces" if decode
                else ""))
        if self.dequant is not None:
            lines += ["route: K and V written in q's dtype first (a launch each), then this "
                      "plan of 16-bit K/V runs:", self.dequant.describe()]
        return "\n".join(lines)

    def draw(self, path) -> None:
        """Write a PNG: programs (rows) against the work list, tiles coloured, split tiles hatched."""
        from skattn.plot import draw_plan

        draw_plan(self, path)


def gpu_limits(sms, occupancy, smem_limit) -> tuple:
    """(sms, occupancy, smem_limit), those not given asked from the current GPU (a pretend
    one without a GPU: skattn.device); sms and occupancy must be positive integers."""
    if sms is None or occupancy is None:
        from skattn.device import hardware

        hw_sms, hw_occ = hardware()
        sms = hw_sms if sms is None else sms
        occupancy = hw_occ if occupancy is None else occupancy
    _check_positive(sms=sms, occupancy=occupancy)
    if smem_limit is None:
        from skattn.device import shared_memory_limit

        smem_limit = shared_memory_limit()
    return sms, occupancy, smem_limit


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def shared_programs(geo: TileGeometry, occupancy: int, kv_format: str = "float16") -> int:
    """Programs of this geometry that share an SM: the estimate of `programs_per_sm` for
    128-row tiles (prompt chunks, n=16 at GQA ratio 8), 1 for smaller decode tiles (two
    programs an SM never won in the decode sweeps, PERF.md)."""
    return min(occupancy, programs_per_sm(geo, kv_format)) if geo.block_m == 128 else 1


def _kv_blocks(qblock, *, q_len, kv_len, tokens, block_n, causal, window):
    """First visible KV block and count for token block qblock (bottom-right causal, window)."""
    q0 = qblock * tokens
    q1 = min(q_len, q0 + tokens)
    hi = min(kv_len, kv_len - q_len + q1) if (causal or window) else kv_len
    lo = max(0, kv_len - q_len + q0 - window + 1) if window else 0
    if hi <= lo:  # no visible key: keep one (masked) block so the tile is still written
        return 0, 1
    first = lo // block_n
    return first, -(-hi // block_n) - first


def _alias(value, old, name, old_name):
    if old is not None and value is not None and old != value:
        raise ValueError(f"{name}={value} and its alias {old_name}={old} disagree")
    return old if value is None else value


_QUANTIZED = ("float8_e4m3fn", "q8_0", "q4_0")


def quantized_cost_model() -> CostModel:
    """The cost model of quantized K/V (fp8, q8_0, q4_0): every resident program counted in one round
    (saturation 1). Dequantizing in registers makes a KV block cost more than its bytes, so one
    program an SM does not keep the copy engine busy: measured on an H200 (llama-8b shape,
    L = 32768, graph timer), 256 programs instead of 128 ran fp8 in 30.5 vs 37.0 us (n = 1) and
    39.5 vs 44.0 us (n = 16), q8_0 in 57.6 vs 88.4 us and 61.5 vs 88.3 us. q4_0 (unmeasured)
    follows q8_0, whose loads it shares."""
    return replace(load_cost_model(), saturation=1.0)


def _decode_tile(shape: dict, **overrides) -> TileGeometry | None:
    """The 16-row decode tile of `shape` (`tile_geometry`'s keywords) with `overrides`, or
    None where it does not fit this GPU's shared memory as 16 rows."""
    try:
        geo = tile_geometry(**shape, **overrides)
    except ValueError:
        return None
    return geo if geo.block_m == 16 else None


def plan(*, batch: int, q_len: int, kv_len: int, q_heads: int, kv_heads: int, head_dim: int,
         head_dim_v: int | None = None, dtype=torch.float16, causal: bool = False,
         window: int | None = None, sms: int | None = None, occupancy: int | None = None,
         policy: str = "auto", programs: int | None = None, fixup: str | None = None,
         block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None, fastdiv: bool = True,
         cost_model: CostModel | None = None, tuning: Tuning | None = None,
         has_mask: bool = False, smem_limit: int | None = None,
         nblocks: int | None = None, blocks_per_sm: int | None = None) -> Plan:
    """Plan one attention shape: tiles, work list, programs and fixup kind.

    Parameters
    ----------
    batch, q_len, kv_len, q_heads, kv_heads, head_dim : int
        The shape of `attention(q [B, Lq, Hq, Dk], k [B, Lk, Hkv, Dk], v [B, Lk, Hkv, Dv])`.
    head_dim_v : int, optional
        Dv (defaults to head_dim).
    dtype : torch.dtype, "q8_0" or "q4_0"
        The form of K and V: torch.float16, torch.bfloat16, torch.float8_e4m3fn (with
        scales), "q8_0" or "q4_0" (`skattn.quant.Q8_0`, `Q4_0`: head sizes multiples of 32).
        Quantized K/V take half the shared memory of f16 in the pipeline
        (`skattn.config.shared_bytes`).
    causal, window : bool, int or None
        Bottom-right causal mask and sliding window; KV blocks they hide are left out of the
        work list.
    sms, occupancy : int, optional
        Hardware: asked from the current GPU when None (needs one). Without an occupancy
        and without block_m, block_n, num_warps and num_stages, q8_0 decode tiles of 16 rows
        at head size 64 or 128 run 64-key blocks, 3 stages and 2 warps, four programs an SM
        (`config.q8_0_narrow_decode`), and FP8 ones 128-key blocks in 3 stages, `auto`
        giving each program at least 4 KV blocks or one program an SM
        (`config.fp8_wide_decode`), where that fits `smem_limit`.
    policy : {"auto", "llamacpp", "llamacpp-before", "round-4x", "split"}
        See `POLICY_NOTES`; "llamacpp-master" and "seed-4x" are accepted as aliases of
        "llamacpp-before" and "round-4x".
    programs : int, optional
        Force the number of programs (1 <= programs <= W).
    fixup : {None, "none", "uniform", "general", "fused"}
        None takes llama.cpp's rule for the chosen N; "fused" merges inside the main kernel;
        "none" with programs = ntiles_dst gives each program one whole tile, also where causal
        or window tiles differ in length (`auto` picks that for prompt chunks when it fills
        the GPU in as few waves as cutting tiles would).
    block_m, block_n, num_warps, num_stages : int, optional
        Override the kernel configuration chosen by `tile_geometry`.
    fastdiv : bool
        Use fastdiv for the kernels' divisions by run-time values (False: plain division).
    cost_model : CostModel, optional
        For policy="auto"; default: the file `skattn calibrate` wrote, else the defaults.
    tuning : Tuning, optional
        Launch choices that leave the decomposition unchanged (PDL, merge steps); the
        defaults are the measured best.
    has_mask : bool
        The calls will pass an additive `mask` (its tile takes shared memory, so the kernel
        configuration may be smaller); `attention` refuses a mask with a plan made without
        it where its configuration has no room for the mask's tile.
    smem_limit : int, optional
        Shared memory one program may use, bytes: asked from the current GPU when None
        (232448, sm_90's, without one). The configuration is reduced until it fits.
    nblocks, blocks_per_sm : int, optional
        llama.cpp's names for `programs` and `occupancy`, accepted as aliases.

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        Bad arguments, or a shape that no kernel configuration fits in `smem_limit`.
    """
    given = dict(locals())  # the arguments, for a re-plan in wider KV blocks
    programs = _alias(programs, nblocks, "programs", "nblocks")
    occupancy = _alias(occupancy, blocks_per_sm, "occupancy", "blocks_per_sm")
    route = quant_route.routed(plan, dict(given, programs=programs, occupancy=occupancy,
                                          nblocks=None, blocks_per_sm=None),
                               _DTYPES.get(dtype) if isinstance(dtype, (torch.dtype, str)) else None)
    if route is not None:
        return route
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    _check_positive(batch=batch, q_len=q_len, kv_len=kv_len, q_heads=q_heads, kv_heads=kv_heads,
                    head_dim=head_dim, head_dim_v=head_dim_v)
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    policy = canonical_policy(policy)
    if fixup is not None and fixup not in FIXUPS:
        raise ValueError(f"fixup must be None or one of {FIXUPS}, got {fixup!r}")
    causal_window(causal, window)
    if not isinstance(dtype, (torch.dtype, str)) or dtype not in _DTYPES:
        raise ValueError(f"dtype is K/V's and must be one of {list(_DTYPES)}, got {dtype}")
    kv_format = _DTYPES[dtype]
    if kv_format in ("q8_0", "q4_0") and (head_dim % 32 or head_dim_v % 32):
        raise ValueError(f"{kv_format} K/V need head sizes that are multiples of 32 (its "
                         f"blocks), got {head_dim}/{head_dim_v}")
    occupancy_given = occupancy is not None
    sms, occupancy, smem_limit = gpu_limits(sms, occupancy, smem_limit)
    _check_positive(smem_limit=smem_limit)
    ratio = q_heads // kv_heads
    compute_bound = q_len * ratio >= COMPUTE_BOUND_INTENSITY
    ws = tuning.prefill == "ws" if tuning is not None else (policy == "auto" and compute_bound
                                                             and programs is None)
    shape = dict(q_len=q_len, gqa_ratio=ratio, head_dim=head_dim, head_dim_v=head_dim_v,
                 has_mask=bool(has_mask), smem_limit=smem_limit, kv_format=kv_format)
    geo = tile_geometry(block_m=block_m, block_n=block_n, num_warps=num_warps,
                        num_stages=num_stages, **shape)
    min_blocks = 1  # the fewest KV blocks a program of `auto` takes
    if (not occupancy_given and block_m is None and block_n is None and num_warps is None
            and num_stages is None):  # the measured decode tiles of a form, where they fit
        if q8_0_narrow_decode(geo, kv_format, head_dim, head_dim_v):
            bn, st, warps, per_sm = Q8_0_NARROW_DECODE
            narrow = _decode_tile(shape, block_n=bn, num_stages=st, num_warps=warps)
            if narrow is not None:
                geo, occupancy = narrow, max(occupancy, per_sm)
        elif fp8_wide_decode(geo, kv_format, head_dim, head_dim_v):
            bn, st, fewest = FP8_WIDE_DECODE
            wide = _decode_tile(shape, block_n=bn, num_stages=st)
            if wide is not None:
                geo, min_blocks = wide, fewest
    ntiles_x = -(-q_len // geo.tokens_per_tile)
    ntiles_z = -(-ratio // geo.heads_per_tile)
    ntiles_dst = batch * kv_heads * ntiles_z * ntiles_x
    ntiles_kv = -(-kv_len // geo.block_n)
    blocks = [_kv_blocks(j, q_len=q_len, kv_len=kv_len, tokens=geo.tokens_per_tile,
                         block_n=geo.block_n, causal=causal, window=window) for j in range(ntiles_x)]
    kv_first = tuple(b[0] for b in blocks)
    kv_count = tuple(b[1] for b in blocks)
    work = batch * kv_heads * ntiles_z * sum(kv_count)
    if (not ws and tuning is None and cost_model is None and policy == "auto"
            and None is programs is block_m is block_n is num_warps is num_stages
            and geo.block_m == 128 and ntiles_x == ntiles_z == 1
            and ws_decode.ROWS <= q_len * ratio <= 128 and ws_decode.on_hopper_or_no_gpu()):
        decode = ws_decode.plan_for(plan, given, ntiles_dst, sms)
        if decode is not None:
            return decode
    max_programs = sms * occupancy
    model = cost_model or (quantized_cost_model() if kv_format in _QUANTIZED else load_cost_model())
    chosen = programs is None  # by the policy, not by the caller
    if chosen:
        per_sm = shared_programs(geo, occupancy, kv_format)
        cap = max_programs  # auto: min_blocks KV blocks a program, or one program an SM
        if policy == "auto" and min_blocks > 1:
            cap = min(max_programs, max(sms, work // min_blocks))
        programs = programs_for(policy, ntiles_dst=ntiles_dst, ntiles_kv=ntiles_kv,
                              max_programs=cap, work=work, min_tile_work=min(kv_count),
                              max_tile_work=max(kv_count), fixup=fixup, cost=model,
                              compute_bound=compute_bound, resident=sms * per_sm,
                              per_sm=per_sm, layout=KVLayout(
                                  kv_first, kv_count, ntiles_z,
                                  model.memory_ratio * VALUE_BYTES[kv_format] / 2 * 128 / geo.block_m))
    elif not isinstance(programs, int) or programs < 1 or programs > work:
        raise ValueError(f"programs must be an integer in [1, W={work}], got {programs!r}")
    kind = decide_fixup(programs=programs, ntiles_dst=ntiles_dst, kv_count=kv_count, work=work,
                        requested=fixup, policy=policy, chosen=chosen, compute_bound=compute_bound)
    prompt_kernel = (tuning is None and chosen and policy == "auto" and compute_bound
                     and kind == "none" and whole_prompt(ntiles_dst, sms * per_sm,
                                                         min(kv_count), max(kv_count)))
    p = Plan(batch, q_len, kv_len, q_heads, kv_heads, head_dim, head_dim_v, kv_format,
                bool(causal), window, geo, ntiles_x, ntiles_z, ntiles_dst, ntiles_kv, kv_first,
                kv_count, work, sms, occupancy, max_programs, policy, programs, kind,
                bool(fastdiv), model, tuning or Tuning(), bool(has_mask))
    if ws:
        # prompt-sized tiles: the warp-specialised kernel where it takes the plan, 1.04-1.37x
        # faster than the base kernel on the n = 128-2048 chunks of the seed grid; at head
        # size 64 in blocks of 128 keys (1.06-1.14x over 64 there; PERF.md)
        ws_plan = replace(p, tuning=tuning or Tuning(prefill="ws"))
        if prefill_launch.refusal(ws_plan) is None:
            if block_n is None and head_dim == head_dim_v == 64 and geo.block_n != 128:
                wide = plan(**dict(given, block_n=128, tuning=ws_plan.tuning))
                if prefill_launch.refusal(wide) is None:
                    return wide
            return ws_plan
    if prompt_kernel:
        # whole prompts: the Hopper prompt kernel where it takes the plan, 1.09-1.11x faster
        # than the base kernel on whole tiles of 2048-16384-token prompts (PERF.md)
        tma = replace(p, tuning=Tuning(prefill="tma"))
        if prefill_launch.refusal(tma) is None:
            return tma
    return p
