"""The separate fixups over a ragged work list (docs/serving.md, "Fixups in a ragged list").

Both take their grid from the plan's upper bounds and exit where the real work list has
no tile (uniform) or no program (general); the merge is the dense fixups' `merge_pieces`.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from skattn.kernels.ragged import find_row_block, sequence_of
from skattn.kernels.stamps import stamp
from skattn.kernels.tile import finalize_store, merge_pieces, program_of, program_start, tile_rows
from skattn.kernels.worklist import wl_offsets


@triton.jit
def _linear_id():
    return (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) \
        + tl.program_id(2)


@triton.jit
def _merge_and_store(p_lo, p_hi, first, work, programs, WL, rb, h, batch, rb_max, ratio,
                     ntiles_z, m0, dv0,
                     O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
                     WS_O, WS_M, WS_L,
                     HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_DV: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
                     TOKENS_PER_TILE: tl.constexpr, HAS_SINKS: tl.constexpr,
                     RETURN_LSE: tl.constexpr, MERGE_PIECES: tl.constexpr,
                     STREAM_K: tl.constexpr, LOADS_FIRST: tl.constexpr,
                     PAIR_D: tl.constexpr = 0):
    b, qblock, _, lq, _, qs, _, g, z = sequence_of(WL, rb, h, batch, rb_max, ntiles_z)
    qi, head, valid = tile_rows(g, z, qblock, lq, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                                ROWS, m0)
    acc, m_i, l_i = merge_pieces(p_lo, p_hi, first, work, programs, valid, WS_O, WS_M, WS_L,
                                 m0, dv0, HEAD_DIM_V, BLOCK_M, ROWS, BLOCK_DV, MERGE_PIECES,
                                 STREAM_K, LOADS_FIRST)
    b64 = tl.cast(b, tl.int64)
    Ob = O + b64 * stride_ob + tl.cast(qs, tl.int64) * stride_om
    LSEb = LSE + b64 * stride_lb + qs
    finalize_store(acc, m_i, l_i, 0, qi, head, valid, Ob, 0, stride_om, stride_oh, LSEb, 0,
                   stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS, RETURN_LSE, dv0, PAIR_D,
                   ratio)


@triton.jit(do_not_specialize=["batch", "rb_max"])
def ragged_uniform_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L, WL,
    batch, rb_max, ratio, ntiles_z, hz, split,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, MERGE_PIECES: tl.constexpr,
    USE_PDL: tl.constexpr, LOADS_FIRST: tl.constexpr = False, PAIR_D: tl.constexpr = 0,
    STAMPS=None, TIMELINE: tl.constexpr = False,
):
    """Tile t (of the upper bound's tiles) was cut into `split` pieces held by programs
    t*split .. t*split+split-1; tiles past the real ones exit. TIMELINE (a diagnostic):
    stamps start, after the PDL wait, end at the program's linear index."""
    tile = tl.program_id(0)
    dv0 = tl.program_id(1) * BLOCK_DV
    m0 = tl.program_id(2) * ROWS
    row = _linear_id()
    if TIMELINE:
        stamp(STAMPS, row, 0)
    rb = tile // hz
    live = rb < tl.load(WL + 2)  # the work list was built before the main kernel started
    if USE_PDL:  # every program waits, merging or not (`ragged_general_fixup_kernel`)
        gdc_wait()
    if TIMELINE:
        stamp(STAMPS, row, 1)
    if live:
        _merge_and_store(tile * split, tile * split + split - 1, 0, 1, 1, WL, rb, tile - rb * hz,
                         batch, rb_max, ratio, ntiles_z, m0, dv0, O, stride_ob, stride_om,
                         stride_oh, LSE, stride_lb, stride_lh, SINKS, WS_O, WS_M, WS_L,
                         HEAD_DIM_V, BLOCK_M, ROWS, BLOCK_DV, HEADS_PER_TILE, TOKENS_PER_TILE,
                         HAS_SINKS, RETURN_LSE, MERGE_PIECES, False, LOADS_FIRST, PAIR_D)
    if TIMELINE:
        stamp(STAMPS, row, 2)


@triton.jit(do_not_specialize=["batch", "rb_max"])
def ragged_general_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L, WL,
    batch, rb_max, ratio, ntiles_z, hz,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, MERGE_PIECES: tl.constexpr,
    USE_PDL: tl.constexpr, SEARCH: tl.constexpr, LOADS_FIRST: tl.constexpr = False,
    PAIR_D: tl.constexpr = 0, STAMPS=None, TIMELINE: tl.constexpr = False,
):
    """Program p0 < N acts when it finished a tile it did not start: it merges the pieces of
    the programs from program_of(first item of the tile) up to itself. Launched by PDL, every
    program waits for the main kernel, merging or not: a step whose tiles are all whole has
    no merging program, and the next kernel's own wait covers the main kernel only through
    this grid's completion."""
    p0 = tl.program_id(0)
    dv0 = tl.program_id(1) * BLOCK_DV
    m0 = tl.program_id(2) * ROWS
    row = _linear_id()
    if TIMELINE:  # a diagnostic, as in the uniform fixup
        stamp(STAMPS, row, 0)
    work = tl.load(WL + 0)
    programs = tl.load(WL + 1)
    if p0 < programs:
        _, _, _, _, _, o_start, o_count, _, _, _ = wl_offsets(batch, rb_max)
        start = program_start(p0, work, programs)
        end = program_start(p0 + 1, work, programs)
        rb = find_row_block(WL + o_start, rb_max, start, SEARCH)
        inside = rb < rb_max
        c = tl.load(WL + o_count + rb, mask=inside, other=1)
        h = (start - tl.load(WL + o_start + rb, mask=inside, other=0)) // tl.maximum(c, 1)
        first = tl.load(WL + o_start + rb, mask=inside, other=0) + h * c
        if USE_PDL:
            gdc_wait()
        if TIMELINE:
            stamp(STAMPS, row, 1)
        if (start > first) & (end >= first + c) & inside:
            _merge_and_store(program_of(first, work, programs), p0, first, work, programs, WL,
                             rb, h, batch, rb_max, ratio, ntiles_z, m0, dv0, O, stride_ob,
                             stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS, WS_O, WS_M,
                             WS_L, HEAD_DIM_V, BLOCK_M, ROWS, BLOCK_DV, HEADS_PER_TILE,
                             TOKENS_PER_TILE, HAS_SINKS, RETURN_LSE, MERGE_PIECES, True,
                             LOADS_FIRST, PAIR_D)
    elif USE_PDL:
        gdc_wait()
    if TIMELINE:
        stamp(STAMPS, row, 2)
