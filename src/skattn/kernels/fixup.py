"""The separate fixup kernels (llama.cpp semantics): uniform and general.

Both run one program per (tile, chunk of Dv, chunk of ROWS rows) so that the partials of a
much-split tile are read by several SMs at once; llama.cpp likewise runs a block per
(tile, row).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from skattn.kernels.stamps import stamp
from skattn.kernels.tile import (_div, decode_group, finalize_store, locate, merge_pieces,
                                 program_of, program_start, tile_rows)


@triton.jit
def uniform_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L,
    q_len, ratio, kv_heads, ntiles_x, ntiles_z, split,
    div_x_mul, div_x_shift, div_z_mul, div_z_shift, div_h_mul, div_h_shift,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, USE_FASTDIV: tl.constexpr,
    MERGE_PIECES: tl.constexpr, USE_PDL: tl.constexpr, STAMPS=None,
    TIMELINE: tl.constexpr = False, LOADS_FIRST: tl.constexpr = False,
):
    """Tile t was cut into `split` pieces held by programs t*split .. t*split+split-1."""
    tile = tl.program_id(0)
    row = (tile * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    if TIMELINE:  # a diagnostic: start, partials ready (after gdc_wait), end
        stamp(STAMPS, row, 0)
    dv0 = tl.program_id(1) * BLOCK_DV
    m0 = tl.program_id(2) * ROWS
    group = _div(tile, ntiles_x, div_x_mul, div_x_shift, USE_FASTDIV)
    qblock = tile - group * ntiles_x
    b, g, z = decode_group(group, ntiles_z, kv_heads, div_z_mul, div_z_shift, div_h_mul, div_h_shift, USE_FASTDIV)
    qi, head, valid = tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                                ROWS, m0)
    if USE_PDL:
        gdc_wait()  # launched early (programmatic dependent launch): wait for the partials
    if TIMELINE:
        stamp(STAMPS, row, 1)
    acc, m_i, l_i = merge_pieces(tile * split, tile * split + split - 1, 0, 1, 1, valid,
                                 WS_O, WS_M, WS_L, m0, dv0, HEAD_DIM_V, BLOCK_M, ROWS,
                                 BLOCK_DV, MERGE_PIECES, False, LOADS_FIRST)
    finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                   LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS, RETURN_LSE,
                   dv0)
    if TIMELINE:
        stamp(STAMPS, row, 2)


@triton.jit
def general_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L, QBLOCK_OFF,
    q_len, ratio, kv_heads, ntiles_x, ntiles_z, group_work, work, programs,
    div_z_mul, div_z_shift, div_h_mul, div_h_shift, div_w_mul, div_w_shift,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, USE_FASTDIV: tl.constexpr,
    MERGE_PIECES: tl.constexpr, USE_PDL: tl.constexpr, LOADS_FIRST: tl.constexpr = False,
):
    """Program p0 acts when it finished a tile it did not start: it merges the pieces of the
    programs from the one that started the tile up to itself (llama.cpp walks them back)."""
    p0 = tl.program_id(0)
    dv0 = tl.program_id(1) * BLOCK_DV
    m0 = tl.program_id(2) * ROWS
    start = program_start(p0, work, programs)
    end = program_start(p0 + 1, work, programs)
    group, qblock, first, stop = locate(start, group_work, ntiles_x, QBLOCK_OFF, div_w_mul, div_w_shift,
                                    USE_FASTDIV, False)
    if (start > first) & (end >= stop):
        b, g, z = decode_group(group, ntiles_z, kv_heads, div_z_mul, div_z_shift, div_h_mul, div_h_shift,
                               USE_FASTDIV)
        qi, head, valid = tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                                    ROWS, m0)
        p_first = program_of(first, work, programs)  # the program that started the tile
        if USE_PDL:
            gdc_wait()
        acc, m_i, l_i = merge_pieces(p_first, p0, first, work, programs, valid, WS_O, WS_M, WS_L,
                                     m0, dv0, HEAD_DIM_V, BLOCK_M, ROWS, BLOCK_DV, MERGE_PIECES,
                                     True, LOADS_FIRST)
        finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                       LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS,
                       RETURN_LSE, dv0)
