"""The stream-K kernel over a ragged work list built on the GPU (docs/serving.md).

Tiles are (row block rb, h) with h = KV head x head group; row block rb is token block j
of sequence b. The work list (kernels/worklist.py) gives each row block's first item, its
KV blocks per tile, b, j and first KV block; W and the effective program count N are in its
header. A step the work list marks for whole tiles runs in the kernel's WHOLE variant,
launched before the stream-K one (which finds N = 0 then): its programs take whole tiles
one at a time, longest first, from a counter in the header (docs/serving.md, "Whole
tiles"). Output and q rows of a sequence start at its first row (`qs_b`), so the dense
helpers (`load_q`, `finalize_store`, the fused fixup) run on pointers moved to the
sequence, with b = 0.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from skattn.kernels.attention import _fused_fixup
from skattn.kernels.kv_loop import load_q
from skattn.kernels.ragged_kv import ragged_kv_loop
from skattn.kernels.stamps import stamp, tile_stamp, tile_value
from skattn.kernels.tile import finalize_store, program_of, program_start, store_partial, tile_rows
from skattn.kernels.worklist import (TAIL_CHUNK, TAIL_CHUNKS, TAIL_NEXT, TAIL_START, WHOLE_FLAG,
                                     WHOLE_NEXT, wl_offsets)


@triton.jit
def find_row_block(RB_START, rb_max, item, SEARCH: tl.constexpr, step=0):
    """The row block holding `item`: how many row blocks end at or before it (a vector
    count over the prefix sums, SEARCH entries per load). `step` > 0: `item` is a position
    of shares that count tiles, where row block r ends at its prefix sum + step x (r + 1)."""
    found = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, rb_max, SEARCH):
        idx = c0 + 1 + tl.arange(0, SEARCH)
        ends = tl.load(RB_START + idx, mask=idx <= rb_max, other=2147483647)
        found += tl.sum((ends <= item - step * idx).to(tl.int32), 0)
    return found


@triton.jit
def share_start(WL, o_start, o_count, rb_max, hz, p, work, programs, positions,
                TAU: tl.constexpr, SEARCH: tl.constexpr):
    """Program p's first item when each tile's setup counts TAU positions
    (serving_worklist.WorkList.item_at): its tile (rb, row block start, KV blocks a tile, h)
    and the item. Position `pos` of share p is floor(p x C / N), C = `positions` = W + TAU x
    tiles; tile t = rb x hz + h holds positions [first_t + TAU t, first_t + TAU (t + 1) + c)."""
    pos = program_start(p, positions, tl.maximum(programs, 1))
    step = TAU * hz
    rb = find_row_block(WL + o_start, rb_max, pos, SEARCH, step)
    inside = rb < rb_max
    rbs = tl.load(WL + o_start + rb, mask=inside, other=0)
    c = tl.load(WL + o_count + rb, mask=inside, other=0)
    rbs = tl.where(inside, rbs, work)
    off = pos - rbs - step * rb
    h = off // (c + TAU)
    item = rbs + h * c + tl.minimum(tl.maximum(off - h * (c + TAU) - TAU, 0), c)
    return rb, rbs, c, h, tl.minimum(item, work)


@triton.jit
def tile_at(WL, o_start, o_count, rb_max, item, SEARCH: tl.constexpr):
    """The tile holding `item`: its row block, the row block's first item, KV blocks a tile,
    and the head group h."""
    rb = find_row_block(WL + o_start, rb_max, item, SEARCH)
    inside = rb < rb_max
    rbs = tl.load(WL + o_start + rb, mask=inside, other=0)
    c = tl.load(WL + o_count + rb, mask=inside, other=1)
    return rb, rbs, c, (item - rbs) // tl.maximum(c, 1)


@triton.jit
def virtual_program_of(item, s_work, programs, chunk):
    """The range holding `item` under a dynamic tail: static share p < N of [0, S), or
    chunk k of [S, W) as program N + k (serving_worklist.WorkList.program_of)."""
    static = program_of(tl.minimum(item, s_work - 1), tl.maximum(s_work, 1),
                        tl.maximum(programs, 1))
    return tl.where(item < s_work, static, programs + (item - s_work) // chunk)


@triton.jit
def virtual_start(v, s_work, programs, chunk):
    """First item of virtual program v (WorkList.program_range)."""
    static = program_start(tl.minimum(v, programs), s_work, tl.maximum(programs, 1))
    return tl.where(v < programs, static, s_work + (v - programs) * chunk)


@triton.jit
def next_chunk(WL, programs, s_work, work):
    """The next chunk of the dynamic tail: (its virtual program N + k, start, end, whether one
    was left). Every program of the grid fetches once past the last chunk, so the fetch that
    returns chunks + grid - 1 is the launch's last: it sets the counter back to 0 for the
    next call that shares the work list."""
    chunks = tl.load(WL + TAIL_CHUNKS)
    chunk = tl.load(WL + TAIL_CHUNK)
    k = tl.atomic_add(WL + TAIL_NEXT, 1, sem="relaxed")
    if k == chunks + tl.num_programs(0) - 1:
        tl.store(WL + TAIL_NEXT, 0)
    start = s_work + k * chunk
    return programs + k, start, tl.minimum(work, start + chunk), k < chunks


@triton.jit
def next_whole_tile(WL, hz, o_start, o_count):
    """The next tile of a whole-tile step, from the last tile to the first (a causal
    sequence's longest first), as (rb, h, its first item, its KV blocks, whether one was left).
    Every program of the grid fetches once past the last tile, so the fetch that returns
    tiles + grid - 1 is the launch's last: it sets the counter back to 0 for the next call
    that shares the work list (the layers of one step)."""
    tiles = tl.load(WL + 2) * hz
    k = tl.atomic_add(WL + WHOLE_NEXT, 1, sem="relaxed")
    if k == tiles + tl.num_programs(0) - 1:
        tl.store(WL + WHOLE_NEXT, 0)
    left = k < tiles
    t = tl.where(left, tiles - 1 - k, 0)
    rb = t // hz
    h = t - rb * hz
    c = tl.load(WL + o_count + rb, mask=left, other=1)
    return rb, h, tl.load(WL + o_start + rb, mask=left, other=0), c, left


@triton.jit
def sequence_of(WL, rb, h, batch, rb_max, ntiles_z):
    """Tile (rb, h) -> b, token block, first KV block, Lq, Lk, first q row, first key row,
    KV head g, head group z."""
    o_lq, o_lk, o_qs, o_ks, _, _, _, o_seq, o_qblock, o_first = wl_offsets(batch, rb_max)
    b = tl.load(WL + o_seq + rb)
    qblock = tl.load(WL + o_qblock + rb)
    kv_first = tl.load(WL + o_first + rb)
    g = h // ntiles_z
    return (b, qblock, kv_first, tl.load(WL + o_lq + b), tl.load(WL + o_lk + b),
            tl.load(WL + o_qs + b), tl.load(WL + o_ks + b), g, h - g * ntiles_z)


@triton.jit
def _tile_state(WL, rb, h, rbs, c, item, stop_here, batch, rb_max, ntiles_z, ratio,
                Q, stride_qb, stride_qm, stride_qh, K, stride_kb, stride_kn, stride_kh,
                V, stride_vb, stride_vn, stride_vh, O, stride_ob, stride_om, LSE, stride_lb,
                BT, stride_bt, SLOPES, KS, VS, num_pages, qk_scale, softcap_scale, window,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr,
                BLOCK_DV: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
                TOKENS_PER_TILE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_FORMAT: tl.constexpr,
                HEAD_SCALES: tl.constexpr, V_PAIRS: tl.constexpr, PAIR_D: tl.constexpr = 0,
                TS=None, ts_row=0, ts_k=0, TS_TILES: tl.constexpr = 0):
    """The online-softmax state of tile (rb, h) over its items [item, stop_here), with the
    rows it covers and its output and LSE pointers moved to its sequence. TS_TILES: tile
    stamps (a diagnostic, `tile_stamp`): its sequence's numbers in, q in, first KV block and
    the loop done."""
    first = rbs + h * c
    b, qblock, kv_first, lq, lk, qs, ks, g, z = sequence_of(WL, rb, h, batch, rb_max, ntiles_z)
    if TS_TILES:
        tile_stamp(TS, ts_row, ts_k, 1, lk + ks + qs + lq + kv_first + b, TS_TILES)
    qi, head, valid = tile_rows(g, z, qblock, lq, ratio, HEADS_PER_TILE, TOKENS_PER_TILE, BLOCK_M)
    b64 = tl.cast(b, tl.int64)
    Qb = Q + b64 * stride_qb + tl.cast(qs, tl.int64) * stride_qm
    q = load_q(Qb, 0, qi, head, valid, 0, stride_qm, stride_qh, 0, HEAD_DIM, BLOCK_DK,
               K.dtype.element_ty if KV_FORMAT == 0 else Q.dtype.element_ty, PAIR_D, ratio)
    if TS_TILES:
        tile_stamp(TS, ts_row, ts_k, 2, tl.max(q.to(tl.float32), 1), TS_TILES)
    if PAGED:
        kofs = tl.cast(g, tl.int64) * stride_kh
        vofs = tl.cast(g, tl.int64) * stride_vh
    else:
        kofs = b64 * stride_kb + tl.cast(ks, tl.int64) * stride_kn + tl.cast(g, tl.int64) * stride_kh
        vofs = b64 * stride_vb + tl.cast(ks, tl.int64) * stride_vn + tl.cast(g, tl.int64) * stride_vh
    Kb, Vb = K + kofs, V + vofs
    if KV_FORMAT == 2:  # q8_0: scales laid out like the int8 values, strides / 32
        KS = KS + kofs // 32
        VS = VS + vofs // 32
    elif KV_FORMAT == 3:  # q4_0: like the bytes of nibbles, strides / 16
        KS = KS + kofs // 16
        VS = VS + vofs // 16
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv0 = kv_first - first
    acc, m_i, l_i = ragged_kv_loop(
        acc, m_i, l_i, q, Qb, Kb, Vb, BT + b64 * stride_bt, SLOPES, KS, VS, g, qi, head, valid,
        kv0 + item, kv0 + stop_here, stride_qm, stride_qh, stride_kb, stride_kn,
        stride_vb, stride_vn, lq, lk, num_pages, qk_scale, softcap_scale, window,
        qblock * TOKENS_PER_TILE, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, DK_CHUNKS,
        BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, INTERPRET, PAGED, PAGE_SIZE, KV_FORMAT,
        HEAD_SCALES, V_PAIRS, TS, ts_row, ts_k, TS_TILES)
    if TS_TILES:
        tile_stamp(TS, ts_row, ts_k, 4, l_i, TS_TILES)
    Ob = O + b64 * stride_ob + tl.cast(qs, tl.int64) * stride_om
    LSEb = LSE + b64 * stride_lb + qs
    return acc, m_i, l_i, qi, head, valid, Ob, LSEb, g, z, qblock, lq


@triton.jit(do_not_specialize=["stride_bt", "batch", "rb_max", "num_pages"])
def ragged_attention_kernel(
    Q, stride_qb, stride_qm, stride_qh,  # q [B, Lq, Hq, Dk] or packed [total_q, Hq, Dk] (stride_qb 0)
    K, stride_kb, stride_kn, stride_kh,  # dense [B, L, Hkv, Dk]; packed (stride_kb 0); paged [pages, page_size, Hkv, Dk]
    V, stride_vb, stride_vn, stride_vh,
    O, stride_ob, stride_om, stride_oh,  # out: q's layout
    LSE, stride_lb, stride_lh,  # lse [B, Hq, Lq] or [Hq, total_q] (tokens contiguous)
    BT, stride_bt,  # block table [B, max_pages] int32 (paged)
    SINKS, SLOPES,  # [Hq] f32
    KS, VS,  # fp8 K/V (KV_FORMAT 1): f32 scales [1] or [Hkv]; q8_0, q4_0 (2, 3): the block
    # scales, laid out like K's and V's values (strides / 32, bytes / 16); else unread
    WS_O, WS_M, WS_L, COUNTERS,  # partials [N_grid*2, BLOCK_M, (Dv)], per-tile counters
    WL,  # the work list
    batch, rb_max, ratio, ntiles_z, hz, num_pages, split,
    qk_scale, softcap_scale, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    RETURN_LSE: tl.constexpr, FUSED: tl.constexpr, PER_TILE_RANGES: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, INTERPRET: tl.constexpr,
    SEARCH: tl.constexpr, FIXUP_COLS: tl.constexpr, FIXUP_ROWS: tl.constexpr,
    MERGE_PIECES: tl.constexpr, USE_PDL: tl.constexpr,
    KV_FORMAT: tl.constexpr = 0, HEAD_SCALES: tl.constexpr = 0, WHOLE: tl.constexpr = False,
    WAIT_PDL: tl.constexpr = False, V_PAIRS: tl.constexpr = False, TAIL: tl.constexpr = False,
    TILE_COST: tl.constexpr = 0, PAIR_D: tl.constexpr = 0,
    STAMPS=None, TIMELINE: tl.constexpr = False, TSTAMPS=None, TILE_STAMPS: tl.constexpr = 0,
):
    p = tl.program_id(0)
    if WAIT_PDL:  # launched early (PDL): the work list and every earlier kernel done first
        gdc_wait()
    if TIMELINE:  # a diagnostic: start, first piece's KV loop done, end (kernels/stamps.py)
        stamp(STAMPS, p, 0)
    if USE_PDL == 1:
        gdc_launch_dependents()
    work = tl.load(WL + 0)
    programs = tl.load(WL + 1)
    s_work = work  # S: items [S, W) are the dynamic tail's (TAIL), handed out at run time
    chunk = 1
    if TAIL:
        s_work = tl.load(WL + TAIL_START)
        chunk = tl.load(WL + TAIL_CHUNK)
    _, _, _, _, _, o_start, o_count, _, _, _ = wl_offsets(batch, rb_max)
    positions = work
    if TILE_COST:  # C = W + TILE_COST x tiles: the line that shares count tiles on
        positions = work + TILE_COST * tl.load(WL + 2) * hz
    if WHOLE:  # the whole-tile variant: tiles handed out one by one until none is left
        if tl.load(WL + WHOLE_FLAG) != 0:
            rb, h, rbs, c, left = next_whole_tile(WL, hz, o_start, o_count)
            while left:
                acc, m_i, l_i, qi, head, valid, Ob, LSEb, _, _, _, _ = _tile_state(
                    WL, rb, h, rbs, c, rbs + h * c, rbs + h * c + c, batch, rb_max, ntiles_z,
                    ratio, Q, stride_qb, stride_qm, stride_qh, K, stride_kb, stride_kn,
                    stride_kh, V, stride_vb, stride_vn, stride_vh, O, stride_ob, stride_om, LSE,
                    stride_lb, BT, stride_bt, SLOPES, KS, VS, num_pages, qk_scale,
                    softcap_scale, window, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_DK,
                    DK_CHUNKS, BLOCK_DV, HEADS_PER_TILE, TOKENS_PER_TILE, CAUSAL, HAS_WINDOW,
                    HAS_ALIBI, SOFTCAP, INTERPRET, PAGED, PAGE_SIZE, KV_FORMAT, HEAD_SCALES,
                    V_PAIRS, PAIR_D)
                finalize_store(acc, m_i, l_i, 0, qi, head, valid, Ob, 0, stride_om, stride_oh,
                               LSEb, 0, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS,
                               RETURN_LSE, 0, PAIR_D, ratio)
                rb, h, rbs, c, left = next_whole_tile(WL, hz, o_start, o_count)
    else:
        # -- this program's [start, end) of the real work list (none in a whole-tile step: N = 0)
        if PER_TILE_RANGES:  # the split anchor: piece i of tile p // split
            tile = p // split
            i = p - tile * split
            rb = tile // hz
            h = tile - rb * hz
            real = rb < tl.load(WL + 2)
            rbs = tl.load(WL + o_start + rb, mask=real, other=0)
            c = tl.load(WL + o_count + rb, mask=real, other=0)
            start = rbs + h * c + i * c // split
            end = rbs + h * c + (i + 1) * c // split
            if real & (start == end) & (split > 1):  # an empty piece: an empty state to merge
                store_partial(tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32),
                              tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
                              tl.zeros([BLOCK_M], dtype=tl.float32), p * 2, WS_O, WS_M, WS_L,
                              HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        elif TILE_COST:  # stream-K, shares that count each tile's setup as TILE_COST items
            rb, rbs, c, h, start = share_start(WL, o_start, o_count, rb_max, hz,
                                               tl.minimum(p, programs), work, programs,
                                               positions, TILE_COST, SEARCH)
            _, _, _, _, end = share_start(WL, o_start, o_count, rb_max, hz,
                                          tl.minimum(p + 1, programs), work, programs,
                                          positions, TILE_COST, SEARCH)
        else:  # stream-K: an equal share of W (of S with a tail) among the N programs
            n = tl.maximum(programs, 1)
            start = program_start(tl.minimum(p, programs), s_work, n)
            end = program_start(tl.minimum(p + 1, programs), s_work, n)
            rb, rbs, c, h = tile_at(WL, o_start, o_count, rb_max, start, SEARCH)
        # v: whose slots this range's pieces take (p; a tail chunk k is virtual program N + k)
        v = p
        more = p >= 0
        k_tile = 0  # tiles this program has started (tile stamps)
        while more:
            item = start
            while item < end:
                first = rbs + h * c
                stop = first + c
                stop_here = tl.minimum(end, stop)
                if TILE_STAMPS:
                    tile_stamp(TSTAMPS, p, k_tile, 0, item + rbs + c, TILE_STAMPS)
                    tile_value(TSTAMPS, p, k_tile, 6, stop_here - item, TILE_STAMPS)
                    tile_value(TSTAMPS, p, k_tile, 7, rb * hz + h, TILE_STAMPS)
                acc, m_i, l_i, qi, head, valid, Ob, LSEb, g, z, qblock, lq = _tile_state(
                    WL, rb, h, rbs, c, item, stop_here, batch, rb_max, ntiles_z, ratio, Q,
                    stride_qb, stride_qm, stride_qh, K, stride_kb, stride_kn, stride_kh, V,
                    stride_vb, stride_vn, stride_vh, O, stride_ob, stride_om, LSE, stride_lb, BT,
                    stride_bt, SLOPES, KS, VS, num_pages, qk_scale, softcap_scale, window,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_DK, DK_CHUNKS, BLOCK_DV,
                    HEADS_PER_TILE, TOKENS_PER_TILE, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP,
                    INTERPRET, PAGED, PAGE_SIZE, KV_FORMAT, HEAD_SCALES, V_PAIRS, PAIR_D,
                    TSTAMPS, p, k_tile, TILE_STAMPS)
                if TIMELINE:
                    if (item == start) & (v == p):
                        stamp(STAMPS, p, 1)
                whole = (item == first) & (stop_here == stop)
                if PER_TILE_RANGES:
                    whole = whole & (split == 1)
                if whole:
                    # -- the whole tile is ours: normalise and write
                    finalize_store(acc, m_i, l_i, 0, qi, head, valid, Ob, 0, stride_om,
                                   stride_oh, LSEb, 0, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV,
                                   HAS_SINKS, RETURN_LSE, 0, PAIR_D, ratio)
                else:
                    # -- a piece of a cut tile: slot 0 for our first tile, 1 for our last
                    slot = v * 2 + (item != start).to(tl.int32)
                    store_partial(acc, m_i, l_i, slot, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M,
                                  BLOCK_DV)
                    if FUSED:
                        # the tile's pieces are those of programs p_first..p_last: from W and
                        # N, or (a tail) the virtual programs of its first and last items
                        p_first = None
                        p_last = None
                        lead = None
                        if TILE_COST:  # positions: item + TILE_COST x (tile + 1); `lead`
                            # matches the slot choice because every tile holds an item (a
                            # tile with no visible key keeps one masked block)
                            t_pos = TILE_COST * (rb * hz + h)
                            n = tl.maximum(programs, 1)
                            p_first = program_of(first + t_pos + TILE_COST, positions, n)
                            p_last = program_of(stop - 1 + t_pos + TILE_COST, positions, n)
                            lead = (program_start(p_first, positions, n)
                                    < first + t_pos).to(tl.int32)
                        if TAIL:
                            p_first = virtual_program_of(first, s_work, programs, chunk)
                            p_last = virtual_program_of(stop - 1, s_work, programs, chunk)
                            lead = (virtual_start(p_first, s_work, programs, chunk)
                                    < first).to(tl.int32)
                        _fused_fixup(rb * hz + h, first, stop, work, programs, 0, g, z, qblock,
                                     lq, ratio, Ob, 0, stride_om, stride_oh, LSEb, 0, stride_lh,
                                     SINKS, WS_O, WS_M, WS_L, COUNTERS, HEAD_DIM_V, BLOCK_M,
                                     BLOCK_DV, HEADS_PER_TILE, TOKENS_PER_TILE, HAS_SINKS,
                                     RETURN_LSE, FIXUP_COLS, FIXUP_ROWS, MERGE_PIECES, p_first,
                                     p_last, lead, PAIR_D)
                if TILE_STAMPS:
                    tile_stamp(TSTAMPS, p, k_tile, 5, stop_here, TILE_STAMPS)
                    k_tile += 1
                item = stop_here
                # -- the next tile: the next head group, or the next row block's first
                h += 1
                next_rb = h == hz
                rb = tl.where(next_rb, rb + 1, rb)
                h = tl.where(next_rb, 0, h)
                inside = rb < rb_max
                rbs = tl.load(WL + o_start + rb, mask=inside, other=0)
                c = tl.load(WL + o_count + rb, mask=inside, other=1)
            # -- then chunks of the dynamic tail while any is left
            more = p < 0
            if TAIL:
                v, start, end, more = next_chunk(WL, programs, s_work, work)
                if more:
                    rb, rbs, c, h = tile_at(WL, o_start, o_count, rb_max, start, SEARCH)
    if TIMELINE:
        stamp(STAMPS, p, 2)
    if USE_PDL == 2:
        gdc_launch_dependents()
