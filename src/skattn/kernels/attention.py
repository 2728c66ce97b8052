"""The stream-K attention forward kernel: persistent programs over (tile, KV block) items."""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from skattn.kernels.kv_loop import load_q, tile_kv_loop
from skattn.kernels.stamps import stamp
from skattn.kernels.tile import (decode_group, finalize_store, first_kv_block, locate,
                                 longest_first, merge_pieces, program_of, program_range,
                                 store_partial, tile_rows)


@triton.jit
def attention_kernel(
    Q, stride_qb, stride_qm, stride_qh,  # q [B, Lq, Hq, Dk]
    K, stride_kb, stride_kn, stride_kh,  # k [B, Lk, Hkv, Dk]
    V, stride_vb, stride_vn, stride_vh,  # v [B, Lk, Hkv, Dv]
    O, stride_ob, stride_om, stride_oh,  # out [B, Lq, Hq, Dv]
    LSE, stride_lb, stride_lh,  # lse [B, Hq, Lq]
    MASK, stride_mb, stride_mm,  # mask [B or 1, Lq, Lk]
    SINKS, SLOPES,  # [Hq] f32
    K_SCALE, V_SCALE,  # quantized K/V: fp8 scales [1 or Hkv] f32, or q8_0 block scales
    WS_O, WS_M, WS_L, COUNTERS,  # partials [N*2, BLOCK_M, (Dv)], per-tile counters
    QBLOCK_OFF, KV_FIRST,  # per token block: offset in its group's work, first KV block
    q_len, kv_len, ratio, kv_heads, ntiles_x, ntiles_z, group_work, work, programs, split,
    kv_first0,
    qk_scale, softcap_scale, window,
    div_x_mul, div_x_shift, div_z_mul, div_z_shift, div_h_mul, div_h_shift, div_w_mul, div_w_shift,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    RETURN_LSE: tl.constexpr, FUSED: tl.constexpr, PER_TILE_RANGES: tl.constexpr,
    USE_FASTDIV: tl.constexpr, INTERPRET: tl.constexpr, ONE_TOKEN_BLOCK: tl.constexpr,
    FIXUP_COLS: tl.constexpr, FIXUP_ROWS: tl.constexpr, MERGE_PIECES: tl.constexpr,
    USE_PDL: tl.constexpr, KV_FORMAT: tl.constexpr = 0, HEAD_SCALES: tl.constexpr = 0,
    STAMPS=None, TIMELINE: tl.constexpr = False, WAIT_PDL: tl.constexpr = False,
    LONGEST_FIRST: tl.constexpr = False, V_PAIRS: tl.constexpr = False,
):
    p = tl.program_id(0)
    if LONGEST_FIRST:  # one whole tile a program: program p runs the p-th longest tile
        p = longest_first(p, programs, ntiles_x)
    if WAIT_PDL:  # launched early (PDL): every earlier kernel done before any load or store
        gdc_wait()
    if TIMELINE:  # a diagnostic: start, first tile's KV loop done, end (kernels/stamps.py)
        stamp(STAMPS, p, 0)
    if USE_PDL == 1:
        gdc_launch_dependents()  # the fixup kernel may start now; it waits for our partials
    # -- this program's [start, end) of the work list
    start, end = program_range(p, work, programs, split, group_work, ntiles_x, QBLOCK_OFF,
                               div_x_mul, div_x_shift, USE_FASTDIV, ONE_TOKEN_BLOCK,
                               PER_TILE_RANGES)
    item = start
    while item < end:
        # -- which tile holds `item`
        group, qblock, first, stop = locate(item, group_work, ntiles_x, QBLOCK_OFF, div_w_mul, div_w_shift,
                                        USE_FASTDIV, ONE_TOKEN_BLOCK)
        tile = group * ntiles_x + qblock
        b, g, z = decode_group(group, ntiles_z, kv_heads, div_z_mul, div_z_shift, div_h_mul, div_h_shift,
                               USE_FASTDIV)
        kv0 = first_kv_block(KV_FIRST, qblock, kv_first0, ONE_TOKEN_BLOCK) - first
        stop_here = tl.minimum(end, stop)
        qi, head, valid = tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE, BLOCK_M)
        # K/V's dtype, or q's for quantized K/V (dequantized to it)
        q = load_q(Q, b, qi, head, valid, stride_qb, stride_qm, stride_qh, 0,
                    HEAD_DIM, BLOCK_DK, K.dtype.element_ty if KV_FORMAT == 0 else Q.dtype.element_ty)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = tile_kv_loop(
            acc, m_i, l_i, q, Q, K, V, K_SCALE, V_SCALE, MASK, SLOPES, b, g, qi, head, valid,
            kv0 + item, kv0 + stop_here,
            stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
            stride_vb, stride_vn, stride_vh, stride_mb, stride_mm,
            q_len, kv_len, qk_scale, softcap_scale, window, qblock * TOKENS_PER_TILE,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, DK_CHUNKS, BLOCK_DV,
            CAUSAL, HAS_WINDOW, HAS_MASK, HAS_ALIBI, SOFTCAP, INTERPRET, KV_FORMAT, HEAD_SCALES,
            V_PAIRS)
        if TIMELINE:
            if item == start:
                stamp(STAMPS, p, 1)
        if (item == first) & (stop_here == stop):
            # -- the whole tile is ours: normalise and write
            finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                           LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV,
                           HAS_SINKS, RETURN_LSE)
        else:
            # -- a piece of a split tile: slot 0 for our first tile, 1 for our last
            slot = p * 2 + (item != start).to(tl.int32)
            store_partial(acc, m_i, l_i, slot, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
            if FUSED:
                _fused_fixup(tile, first, stop, work, programs, b, g, z, qblock, q_len, ratio,
                             O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
                             WS_O, WS_M, WS_L, COUNTERS, HEAD_DIM_V, BLOCK_M, BLOCK_DV,
                             HEADS_PER_TILE, TOKENS_PER_TILE, HAS_SINKS, RETURN_LSE, FIXUP_COLS,
                             FIXUP_ROWS, MERGE_PIECES)
        item = stop_here
    if TIMELINE:
        stamp(STAMPS, p, 2)
    if USE_PDL == 2:
        gdc_launch_dependents()  # (trigger at the end instead: PERF.md)


@triton.jit
def _fused_fixup(tile, first, stop, work, programs, b, g, z, qblock, q_len, ratio,
                 O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
                 WS_O, WS_M, WS_L, COUNTERS,
                 HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                 HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
                 HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr,
                 FIXUP_COLS: tl.constexpr, FIXUP_ROWS: tl.constexpr, MERGE_PIECES: tl.constexpr,
                 p_first=None, p_last=None, lead=None, PAIR_D: tl.constexpr = 0):
    """The last program to leave a piece of `tile` merges all pieces (no waiting): the
    tile's first FIXUP_ROWS rows (those its heads and tokens fill), FIXUP_COLS columns at a time.
    The pieces' programs p_first..p_last (and whether p_first started before the tile,
    `lead`) follow from W and N, or are given (a ragged plan's dynamic tail)."""
    if p_first is None:
        p_first = program_of(first, work, programs)
        p_last = program_of(stop - 1, work, programs)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel")
    if arrived == p_last - p_first:
        tl.debug_barrier()
        qi, head, valid = tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                                    FIXUP_ROWS)
        for c in tl.static_range(BLOCK_DV // FIXUP_COLS):
            acc, m_i, l_i = merge_pieces(p_first, p_last, first, work, programs, valid,
                                         WS_O, WS_M, WS_L, 0, c * FIXUP_COLS, HEAD_DIM_V, BLOCK_M,
                                         FIXUP_ROWS, FIXUP_COLS, MERGE_PIECES, True, lead=lead)
            finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om,
                           stride_oh, LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, FIXUP_COLS,
                           HAS_SINKS, RETURN_LSE, c * FIXUP_COLS, PAIR_D, ratio)
        tl.atomic_xchg(COUNTERS + tile, 0)  # ready for the next launch of this plan
