"""Plans for ragged and paged batches, made from upper bounds (docs/serving.md; pure Python).

The host fixes the tile geometry, the most row blocks and tiles the batch can have, the
grid and the workspace; the lengths are read on the GPU (`kernels/worklist.py`).
`serving_worklist.host_work_list` computes the same work list in Python, for tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from skattn import buffers
from skattn.checks import causal_window
from skattn.config import TileGeometry, quant_decode_per_sm, tile_geometry
from skattn.planner import (_DTYPES, COMPUTE_BOUND_INTENSITY, _check_positive, gpu_limits,
                            shared_programs)
from skattn.policy import (CostModel, canonical_policy, load_cost_model, saturated_blocks,
                           split_count)
from skattn.tuning import Tuning

__all__ = ["ServingPlan", "serving_plan", "SERVING_POLICIES"]

SERVING_POLICIES = ("auto", "llamacpp", "llamacpp-before", "split")
SERVING_FIXUPS = ("general", "fused")
# device policy codes (kernels/worklist.py)
POLICY_CODE = {"llamacpp-before": 0, "llamacpp": 1, "auto": 2, "split": 3}
HEADER = 16  # int32 words before the per-sequence arrays
# K/V forms of the serving kernels -> ServingPlan.dtype (the dense path's: skattn.quant)
SERVING_DTYPES = dict(_DTYPES)
# K/V forms whose `auto` decode tiles merge cut tiles inside the main kernel (default_fixup)
FUSED_KV_FORMATS = ("float16", "bfloat16", "float8_e4m3fn", "q8_0")


@dataclass(frozen=True)
class ServingPlan:
    """A frozen decomposition of a ragged batch from its upper bounds (docs/serving.md).

    Made by `skattn.serving_plan`; pass it to `attention_with_kvcache(..., plan=)` or
    `attention_varlen(..., plan=)`. Any batch within its bounds runs with it, so one CUDA
    graph serves every decode step; the work list is built on the GPU from the lengths.

    Attributes
    ----------
    batch, max_q_len, max_kv_len : int
        Upper bounds: sequences, query tokens and keys per sequence.
    q_heads, kv_heads, head_dim, head_dim_v : int
    dtype : str
        K/V dtype planned for.
    causal : bool
    window : int or None
    layout : str
        "dense", "packed" or "paged" (with `page_size` and `max_pages`).
    sms, occupancy, max_programs, programs : int
        The GPU planned for and N, the main kernel's grid.
    policy, fixup : str
        The program-count policy and the fixup kind.
    """

    batch: int
    q_len: int | None       # Lq of attention_with_kvcache; None for varlen
    max_q_len: int          # max_seqlen_q (= q_len for attention_with_kvcache)
    total_q: int            # query rows of q: B x Lq, or q.shape[0] for varlen
    max_kv_len: int         # key capacity per sequence
    q_heads: int
    kv_heads: int
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: bool
    window: int | None
    layout: str             # "dense", "packed" or "paged"
    page_size: int | None
    max_pages: int | None   # paged: the block table's width
    total_k: int | None     # packed: rows of k
    geometry: TileGeometry
    ntiles_z: int           # head groups per KV head
    hz: int                 # tiles per row block: kv_heads x ntiles_z
    rb_max: int             # most row blocks (token blocks of sequences)
    tiles_max: int          # rb_max x hz
    sms: int
    occupancy: int
    max_programs: int
    policy: str
    programs: int           # N_grid: the grid of the main kernel
    split: int              # pieces per tile for policy "split" (1 otherwise)
    fixup: str              # "general", "fused", "uniform" (split) or "none" (split of 1)
    fastdiv: bool = True
    cost_model: CostModel = field(default_factory=CostModel, compare=False)
    tuning: Tuning = field(default_factory=Tuning)
    # varlen: the plan runs only the sequences with lo < Lq <= hi (a MixedPlan's halves)
    q_range: tuple[int, int] | None = None
    # percent of the real work W handed out at run time in chunks (docs/serving.md, "A
    # dynamic tail"); 0: every program's range is its static share
    tail: int = 0
    # KV blocks each tile's setup counts for in the programs' shares (docs/serving.md,
    # "Shares that count tiles"); 0: shares of W alone
    tile_cost: int = 0
    # the caller's K/V have 2 x kv_heads heads of head_dim / 2 values, read as kv_heads heads
    # of head_dim (two adjacent KV heads as one row; docs/serving.md, "Two KV heads as one")
    head_pairs: bool = False

    def __getstate__(self):
        # a copy or a pickle is a new plan: not the bound tables of this process (device
        # tensors and indices into its compiled-kernel keys)
        return {k: v for k, v in self.__dict__.items() if k != "_bound"}

    @property
    def gqa_ratio(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def varlen(self) -> bool:
        return self.q_len is None

    @property
    def key_capacity(self) -> int:
        """Keys one sequence can address (the device clamps lengths to it)."""
        if self.layout == "paged":
            return min(self.max_kv_len, self.max_pages * self.page_size)
        return self.max_kv_len

    @property
    def per_tile_ranges(self) -> bool:
        return self.policy == "split"

    @property
    def per_sm(self) -> int:
        return shared_programs(self.geometry, self.occupancy, self.dtype)

    @property
    def resident(self) -> int:
        """Programs of the grid the GPU runs at once."""
        return min(self.programs, self.sms * self.per_sm)

    @property
    def whole_q_min(self) -> int:
        """Query tokens of a sequence from which a step counts as compute-bound (the dense
        planner's COMPUTE_BOUND_INTENSITY over the GQA ratio)."""
        return -(-COMPUTE_BOUND_INTENSITY // self.gqa_ratio)

    @property
    def whole_tiles(self) -> bool:
        """Whether the device may run a step of this plan in whole tiles, handed out one by
        one longest first (`whole_tiles_step`; docs/serving.md, "Whole tiles"): policy auto
        and sequences allowed to be long enough to be compute-bound. Not the batch's size or
        token count, which change from step to step: the kernels would be built again."""
        return self.policy == "auto" and self.max_q_len >= self.whole_q_min

    @property
    def partial_programs(self) -> int:
        """Programs that own partial slots: the grid, and as many tail chunks at most."""
        return self.programs * (2 if self.tail else 1)

    @property
    def workspace_floats(self) -> int:
        o, m, _ = buffers.layout(self, self.tiles_max)
        return o + 2 * m

    @property
    def workspace_bytes(self) -> int:
        return buffers.nbytes(self, self.tiles_max)

    @property
    def work_list_words(self) -> int:
        """int32 words of the device work list (docs/serving.md, "The work list")."""
        return HEADER + 5 * self.batch + 5 * self.rb_max + 1

    def describe(self) -> str:
        g = self.geometry
        return "\n".join([
            f"serving attention ({self.layout} K/V{f', page size {self.page_size}' if self.page_size else ''}): "
            f"batch {self.batch}, q tokens {self.q_len if self.q_len else f'<= {self.max_q_len} each, {self.total_q} in all'}, "
            f"keys <= {self.max_kv_len}, heads {self.q_heads}/{self.kv_heads}, head dim "
            f"{self.head_dim}/{self.head_dim_v}, {self.dtype}, causal={self.causal}, window={self.window}"
            f"{f' (KV heads read in pairs: the caller has {2 * self.kv_heads} of {self.head_dim // 2})' if self.head_pairs else ''}",
            f"tile: {g.block_m} rows = {g.tokens_per_tile} tokens x {g.heads_per_tile} heads; "
            f"BLOCK_N {g.block_n}; warps {g.num_warps}, stages {g.num_stages}",
            f"bounds: row blocks <= {self.rb_max}, tiles <= {self.tiles_max} ({self.hz} per row block)",
            f"grid: {self.programs} programs ({self.sms} SMs x {self.occupancy}); policy {self.policy}"
            f"{f', {self.split} pieces a tile' if self.per_tile_ranges else ' (N chosen on the GPU from the real work)'}"
            f"{'; whole tiles where a step is a long prompt' if self.whole_tiles else ''}; "
            f"fixup {self.fixup}"
            f"{f'; the last {self.tail}% of the work handed out at run time' if self.tail else ''}"
            f"{f'; a tile counts {self.tile_cost} KV blocks in the shares' if self.tile_cost else ''}",
            f"workspace: {self.workspace_bytes} bytes; work list: {self.work_list_words * 4} bytes",
        ])


def serving_plan(*, batch: int, max_kv_len: int, q_heads: int, kv_heads: int, head_dim: int,
                 q_len: int | None = None, max_q_len: int | None = None,
                 total_q: int | None = None, head_dim_v: int | None = None,
                 dtype=torch.float16, causal: bool = True, window: int | None = None,
                 page_size: int | None = None, max_pages: int | None = None,
                 total_k: int | None = None, layout: str | None = None,
                 sms: int | None = None, occupancy: int | None = None, policy: str = "auto",
                 programs: int | None = None, fixup: str | None = None,
                 block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, fastdiv: bool = True,
                 cost_model: CostModel | None = None, tuning: Tuning | None = None,
                 smem_limit: int | None = None,
                 q_split: int | str | None = "auto", tail: int = 0,
                 tile_cost: int | None = None, head_pairs: bool | None = None):
    """Plan a ragged batch from its upper bounds (docs/serving.md).

    Parameters
    ----------
    batch : int
        Sequences B.
    max_kv_len : int
        Keys one sequence can have: Lmax of a dense cache, max_pages x page_size of a paged
        one, max_seqlen_k of varlen.
    q_heads, kv_heads, head_dim : int
    q_len : int, optional
        Query tokens of every sequence (attention_with_kvcache). Give it, or max_q_len and
        total_q (attention_varlen).
    max_q_len, total_q : int, optional
        Varlen: max_seqlen_q and the rows of the packed q.
    head_dim_v : int, optional
    dtype : torch.dtype or str
        K/V's: float16, bfloat16, float8_e4m3fn, or "q8_0" / "q4_0" (`skattn.quant.Q8_0`,
        `Q4_0` caches; head sizes multiples of 32). Quantized K/V: the shared-memory estimate
        counts their bytes (docs/quant.md).
    causal, window
        Bottom-right causal per sequence; a window needs causal=True.
    page_size, max_pages : int, optional
        A paged cache's page size (a positive multiple of 16) and block-table width
        (default: enough pages for max_kv_len).
    total_k : int, optional
        Rows of a packed k (varlen without a block table; default max_kv_len x batch).
    layout : {"dense", "packed", "paged"}, optional
        Default: "paged" with a page size, else "dense" for q_len and "packed" for varlen.
    sms, occupancy : int, optional
        The GPU (asked of the current one when None). Without an occupancy, FP8 decode tiles
        that read V as 16-bit pairs (head sizes 65-128) run three programs an SM.
    policy : {"auto", "llamacpp", "llamacpp-before", "split"}
        Stream-K policies pick the program count on the GPU from the real work; "split"
        cuts every tile into a fixed number of pieces chosen here (FlashDecoding-style).
    programs : int, optional
        The grid of a stream-K plan (default SMs x occupancy), or for "split" the total
        programs (a multiple of the most tiles).
    fixup : {None, "general", "fused"}
        For stream-K plans (default: `default_fixup`, "fused" for `auto` over decode tiles,
        else "general"); "split" plans use the uniform merge.
    block_n, num_warps, num_stages, fastdiv, cost_model, tuning, smem_limit
        As in `skattn.plan`. `Tuning(prefill="ws")`: a plan's whole prompt tiles run the
        warp-specialised Hopper kernel on an sm_90 GPU where `serving_ws` allows it
        (docs/serving.md, "Whole tiles on the Hopper kernel"; opt-in).
    tail : int
        Percent of the real work that programs take at run time in chunks, from a counter,
        after their static shares (fused plans only; default 0). Programs of a ragged step
        run at different speeds under equal shares; the chunks go to those that finish
        first. Slower than none on most decode mixes measured (PERF.md, "Serving batches").
    tile_cost : int, optional
        KV blocks that each tile's setup counts for when the work is shared among the
        programs (docs/serving.md, "Shares that count tiles"). Default: 3 for `auto` with the
        fused merge and no tail, else 0 (equal shares of the KV blocks). A value of the
        caller's needs the fused merge: a varlen batch planned in two halves gives its
        prompt half the general fixup (pass it with `q_split=None`, or leave the default).
    head_pairs : bool, optional
        Read two adjacent KV heads of 64 values as one of 128 (docs/serving.md, "Two KV heads
        as one"): a decode tile then fills its 16 rows where one KV head's query heads fill
        8, and a paged key row is 256 bytes. Possible for 16-bit K/V of head size 64 with an
        even number of KV heads whose tiles stay 16 rows; the default there with pages of 16
        (measured faster; PERF.md, "Serving batches"). Calls need K/V whose heads are
        adjacent (`stride(-2)` = head size, the usual `[.., Hkv, D]` caches; calls without
        a plan choose none for other layouts). The plan's `kv_heads`, `head_dim`,
        `head_dim_v` and `gqa_ratio` are then the kernel's (half, twice, twice, twice). In a
        MixedPlan only the short half can pair.
    q_split : int, "auto" (default) or None
        Varlen only: plan the batch in two halves (a `MixedPlan`, docs/serving.md "Mixed
        batches"): sequences of at most `q_split` query tokens with decode tiles, the others
        with prompt tiles. "auto": `decode_q_split(q_heads, kv_heads)` (the tokens that fill
        a 16-row tile), and one plan where max_q_len does not exceed it or both halves would
        get the same tiles. None: one plan, one tile geometry for every sequence.

    Returns
    -------
    ServingPlan, or MixedPlan with q_split

    Raises
    ------
    ValueError
        Bad arguments.
    """
    if q_split is not None:
        args = {name: value for name, value in locals().items() if name != "q_split"}
        from skattn.serving_mixed import mixed_plan

        return mixed_plan(q_split, args)
    if q_len is not None:
        if max_q_len is not None or total_q is not None:
            raise ValueError("give q_len (attention_with_kvcache) or max_q_len and total_q "
                             "(attention_varlen), not both")
        _check_positive(batch=batch, q_len=q_len)
        max_q_len, total_q = q_len, batch * q_len
    elif max_q_len is None or total_q is None:
        raise ValueError("give q_len, or max_q_len and total_q")
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    _check_positive(batch=batch, max_q_len=max_q_len, total_q=total_q, max_kv_len=max_kv_len,
                    q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, head_dim_v=head_dim_v)
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    causal_window(causal, window)
    if not isinstance(dtype, (torch.dtype, str)) or dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype is K/V's and must be one of {list(SERVING_DTYPES)}, got {dtype}")
    if SERVING_DTYPES[dtype] in ("q8_0", "q4_0") and (head_dim % 32 or head_dim_v % 32):
        raise ValueError(f"{dtype} K/V need head sizes that are multiples of 32 (its blocks), "
                         f"got {head_dim}/{head_dim_v}")
    if page_size is not None:
        _check_positive(page_size=page_size)
        if page_size % 16:
            raise ValueError(f"page_size must be a positive multiple of 16, got {page_size}")
    layout = layout or ("paged" if page_size else "dense" if q_len is not None else "packed")
    if layout not in ("dense", "packed", "paged") or (layout == "paged") != (page_size is not None):
        raise ValueError(f"layout {layout!r} with page_size={page_size!r}: 'paged' needs a page "
                         f"size, 'dense' and 'packed' none")
    if layout == "paged":
        max_pages = -(-max_kv_len // page_size) if max_pages is None else max_pages
        _check_positive(max_pages=max_pages)
    else:
        max_pages = None
    if layout == "packed":
        total_k = max_kv_len * batch if total_k is None else total_k
        _check_positive(total_k=total_k)
    else:
        total_k = None
    policy = canonical_policy(policy)
    if policy not in SERVING_POLICIES:
        raise ValueError(f"policy must be one of {SERVING_POLICIES} for a ragged batch, got {policy!r}")
    if fixup is not None and fixup not in SERVING_FIXUPS:
        raise ValueError(f"fixup must be None or one of {SERVING_FIXUPS}, got {fixup!r}")
    if fixup is not None and policy == "split":
        raise ValueError("policy 'split' merges with the uniform fixup; fixup= is for stream-K policies")
    occupancy_given = occupancy is not None
    sms, occupancy, smem_limit = gpu_limits(sms, occupancy, smem_limit)
    pairs = _head_pairs(head_pairs, SERVING_DTYPES[dtype], head_dim, head_dim_v, kv_heads,
                        q_heads // kv_heads, max_q_len, page_size)
    if pairs:  # the kernel's problem: half the KV heads, twice the head size
        kv_heads, head_dim, head_dim_v = kv_heads // 2, head_dim * 2, head_dim_v * 2
    ratio = q_heads // kv_heads
    geo = tile_geometry(q_len=max_q_len, gqa_ratio=ratio, head_dim=head_dim,
                        head_dim_v=head_dim_v, block_n=block_n, num_warps=num_warps,
                        num_stages=num_stages, smem_limit=smem_limit,
                        kv_format=SERVING_DTYPES[dtype])
    tuning = tuning or Tuning()
    quant = quant_decode_per_sm(geo, SERVING_DTYPES[dtype], head_dim, head_dim_v,
                                tuning.fp8_v_pairs)
    if quant is not None and not occupancy_given:  # three an SM (PERF.md)
        occupancy = max(occupancy, quant)
    t = geo.tokens_per_tile
    ntiles_z = -(-ratio // geo.heads_per_tile)
    hz = kv_heads * ntiles_z
    rb_max = min(batch * -(-max_q_len // t), (total_q + batch * (t - 1)) // t)
    tiles_max = rb_max * hz
    max_programs = sms * occupancy
    split = 1
    if policy == "split":
        if programs is None:
            ntiles_kv = -(-max_kv_len // geo.block_n)
            split = split_count(tiles_max, ntiles_kv, max_programs)
        elif programs % tiles_max:
            raise ValueError(f"programs={programs} for policy 'split' must be a multiple of the "
                             f"most tiles, {tiles_max}")
        else:
            split = programs // tiles_max
        programs = tiles_max * split
        kind = "uniform" if split > 1 else "none"
    else:
        if programs is None:
            programs = max_programs
        elif not isinstance(programs, int) or isinstance(programs, bool) or programs < 1:
            raise ValueError(f"programs must be a positive integer, got {programs!r}")
        kind = fixup or default_fixup(policy, geo, SERVING_DTYPES[dtype])
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail < 100:
        raise ValueError(f"tail must be an integer percent in [0, 100), got {tail!r}")
    elif tail and kind != "fused":
        raise ValueError(f"tail={tail} needs the fused fixup (fixup='fused'), not {kind!r}")
    return ServingPlan(batch, q_len, max_q_len, total_q, max_kv_len, q_heads, kv_heads, head_dim,
                       head_dim_v, _DTYPES[dtype], bool(causal), window, layout, page_size,
                       max_pages, total_k, geo,
                       ntiles_z, hz, rb_max, tiles_max, sms, occupancy, max_programs, policy,
                       programs, split, kind, bool(fastdiv), cost_model or ragged_cost_model(),
                       tuning, tail=tail,
                       tile_cost=_tile_cost(tile_cost, policy, kind, tail), head_pairs=pairs)


TILE_COST = 3  # KV blocks a tile's setup counts for in `auto`'s decode shares


def _tile_cost(tile_cost, policy: str, kind: str, tail: int) -> int:
    """KV blocks each tile's setup counts for in the programs' shares: `TILE_COST` for
    `auto` plans with the fused merge and no dynamic tail, else 0 (shares of W alone). The
    per-program time stamps of the one-long mix's fused decode steps fit 0.8-1.5 µs a KV
    block and 2.3-4.8 µs a tile (its first loads, its query rows, its store or partial;
    `timeline/serving.csv`), so under shares of W alone a program of many short tiles ends
    last (PERF.md, "Serving batches"). A caller's value needs the fused merge and no tail."""
    if tile_cost is None:
        return TILE_COST if (policy == "auto" and kind == "fused" and not tail) else 0
    if isinstance(tile_cost, bool) or not isinstance(tile_cost, int) or tile_cost < 0:
        raise ValueError(f"tile_cost must be a non-negative integer, got {tile_cost!r}")
    if tile_cost and (kind != "fused" or tail or policy == "split"):
        raise ValueError(f"tile_cost={tile_cost} needs a stream-K plan with the fused merge "
                         f"and no tail (fixup {kind!r}, tail {tail})")
    return tile_cost


PAIR_HEAD_DIM = 64  # the head size whose KV heads a serving plan reads in pairs


def _head_pairs(head_pairs, kv_format: str, head_dim: int, head_dim_v: int, kv_heads: int,
                ratio: int, max_q_len: int, page_size: int | None) -> bool:
    """Whether the plan reads two adjacent KV heads as one (`serving_plan(head_pairs=)`):
    possible for 16-bit K/V of head size 64, an even number of KV heads, and tiles of the
    pairs' query rows (2 x ratio a token) that still fit 16 rows; the default where measured
    faster, pages of 16. H200, graph timer, gpt-oss's shape, pairs against none in one call
    (`tools/serving_sweep.py`, PERF.md "Serving batches"): pages of 16 1.03-1.09x on mixes
    (a)-(c) (64 x 4096 keys 144.1 -> 132.7 µs); pages of 64 1.04x on (a), 0.99x on (c) and
    0.94x on (b) (63.8 -> 67.7 µs: half the tiles, in 64-key blocks), so not by default there,
    nor on dense or packed K/V (not measured in a serving plan)."""
    can = (kv_format in ("float16", "bfloat16") and head_dim == head_dim_v == PAIR_HEAD_DIM
           and kv_heads % 2 == 0 and max_q_len * 2 * ratio <= 16)
    if head_pairs is None:
        return can and page_size == 16
    if not isinstance(head_pairs, bool):
        raise ValueError(f"head_pairs must be True, False or None, got {head_pairs!r}")
    if head_pairs and not can:
        raise ValueError(f"head_pairs=True needs 16-bit K/V of head size {PAIR_HEAD_DIM}, an "
                         f"even number of KV heads and at most 16 query rows a pair (query "
                         f"tokens a sequence x 2 x the GQA ratio; a MixedPlan's short half has "
                         f"q_split tokens); got {kv_format}, head size {head_dim}/{head_dim_v}, "
                         f"{kv_heads} KV heads, {max_q_len} x 2 x {ratio} rows")
    return head_pairs


def default_fixup(policy: str, geo, kv_format: str = "float16") -> str:
    """The fixup of a stream-K serving plan when the caller names none: `auto` over decode
    tiles (fewer than 64 rows) of 16-bit, FP8 or q8_0 K/V merges a cut tile inside the main
    kernel, where the last program to leave one of its pieces arrives ("fused"); other plans
    use the separate general fixup. In a ragged batch the slowest program ends 7-37 µs after
    the median one (per-SM bandwidth differs under equal work), so a tile's last arrival
    mostly comes before the slowest program ends, while the separate fixup costs 4-12 µs
    after it (its launch and a grid of N_grid x Dv / 32 programs). Measured, graph timer
    (PERF.md, "Serving batches" and "Quantized K/V"): 16-bit decode mixes (a)-(c) on an H200
    1.00-1.05x faster in all 18 cells of one run, 16 of 18 in another; FP8 and q8_0 on an
    H100 (llama-8b, gpt-oss, qwen3-14b, pages of 16 and 64) 0.98-1.10x, 31 of 36 cells at
    1.00x or more in one run and 26 of 36 in another (the least: lognormal lengths with pages
    of 64, FP8 0.98-1.00x); prompt-sized tiles (a 512-token chunk among decode rows)
    0.98-0.99x on llama-8b and gpt-oss, so they keep the general fixup, as do head sizes
    above 128 (measured at 64 and 128; MLA's 512-wide V merged inside the main kernel spills
    in its KV loop, sm_90 build) and q4_0 K/V (not measured). The llama.cpp policies keep
    their own fixup (the general one)."""
    fused = (policy == "auto" and geo.block_m < 64 and geo.block_dv <= 128
             and kv_format in FUSED_KV_FORMATS)
    return "fused" if fused else "general"


CUT_SHARE = 0.05  # ragged plans' CostModel.cut_share (ragged_cost_model)


def ragged_cost_model() -> CostModel:
    """The dense planner's cost model with every resident program counted in one round
    (saturation 1) and a cost for cutting tiles (cut_share 0.05). Measured on an H200
    (llama-8b shape, graph timer, tools/serving_sweep.py):

    - the ragged kernel gathers K/V page by page, and one program an SM does not keep enough
      loads in flight: with the dense saturation `auto` picked 132 programs and ran 1.4x
      slower than the full grid of 264 (equal 4096-key sequences 387 vs 284 us, one long + 63
      short 168 vs 118 us, lognormal 581 vs 398 us);
    - 64 equal 4096-key sequences (512 tiles): 256 programs of two whole tiles each ran 261
      us against 284 for 264 programs that cut tiles (pages of 16; 254 vs 268 with pages of
      64), though their longest program is 2.4% longer. Cut-free counts exist only when
      every tile has the same length (n divides the tile count)."""
    return replace(load_cost_model(), saturation=1.0, cut_share=CUT_SHARE)


def n_sat(plan: ServingPlan) -> int:
    return saturated_blocks(plan.cost_model, plan.max_programs)
