"""Whole prompt tiles of a ragged batch on Hopper's own instructions (Gluon; docs/serving.md,
"Whole tiles on the Hopper kernel").

The warp-specialised prompt kernel's schedule (`kernels/prefill_ws.py`: a TMA loader warp,
two consumer warpgroups of 64 rows each, warpgroup MMAs, K/V in a ring of `STAGES` buffers),
fed from the ragged work list instead of host-made segments. It runs where the work list
marks a step for whole tiles (WHOLE_FLAG); the stream-K build after it then finds N = 0.

Tiles are taken longest first, as the base kernel's whole-tile build takes them, but from a
fixed order instead of a counter, so that the three partitions of a program agree on the
next tile without talking: round r gives program p the tile of hand-out index r x G + p,
or r x G + G - 1 - p on odd rounds (a snake, so each program's sum of tiles stays close to
the others' as tiles shrink).

K/V blocks come through tensor descriptors over the caller's cache:
- LAYOUT 0, dense [B, Lk, Hkv, D]: block rows [blk x BLOCK_N, +BLOCK_N) of sequence b;
- LAYOUT 1, paged [pages, PAGE_SIZE, Hkv, D]: a page of PAGE_SIZE >= BLOCK_N holds whole
  blocks (one copy at the block's row in its page), smaller pages fill a block in
  BLOCK_N / PAGE_SIZE copies, each into its rows of the stage buffer. A page past the
  sequence's keys or an id outside [0, pages) is read at row `pages` of the descriptor,
  past its end, which the copy engine fills with zeros: nothing outside the cache is read.
Keys past a sequence's length are masked in the scores, and their V rows in the last block
set to zero before its P·V (`prefill_ws._zero_tail`): a cache's rows past a sequence's
length may hold anything.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from skattn.kernels import worklist as _wl
from skattn.kernels.prefill_ws import _blocks, _epilogue, shared_state, stage_q

HEADER = gl.constexpr(_wl.HEADER.value)  # header words, then the per-sequence arrays
WHOLE_FLAG = gl.constexpr(_wl.WHOLE_FLAG.value)


# the batch's shape is not specialised on (kernels/worklist.py SHAPE_INTS): the compiled
# kernel is launched directly for every batch of the plan's bounds
@gluon.jit(do_not_specialize=["stride_bt", "batch", "rb_max", "num_pages"])
def ragged_ws_kernel(
    Q, stride_qb, stride_qm, stride_qh,  # q [B, Lq, Hq, D] or packed [total_q, Hq, D] (stride_qb 0)
    K_DESC, V_DESC,  # descriptors over the cache (LAYOUT), blocks [1, rows, 1, D]
    O, stride_ob, stride_om, stride_oh,  # out: q's layout
    LSE, stride_lb, stride_lh,  # lse [B, Hq, Lq] or [Hq, total_q]
    SINKS,  # [Hq] f32
    WS_O, WS_M, WS_L,  # (f32 buffers the epilogue's partial branch names; whole tiles only)
    BT, stride_bt,  # block table [B, max_pages] int32 (LAYOUT 1)
    WL,  # the work list
    batch, rb_max, ratio, ntiles_z, hz, num_pages, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    HEADS_PER_TILE: gl.constexpr, TOKENS_PER_TILE: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_SINKS: gl.constexpr, RETURN_LSE: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, LAYOUT: gl.constexpr,
    PAGE_SIZE: gl.constexpr, SUM_MMA: gl.constexpr = False, LOADER_REGS: gl.constexpr = 24,
):
    if gl.load(WL + WHOLE_FLAG) != 0:
        block: gl.constexpr = [1, BLOCK_N, 1, HEAD_DIM]
        layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(block, K_DESC.dtype)
        q_smem, ring, ones = shared_state(K_DESC.dtype, layout, HEAD_DIM, BLOCK_N, STAGES, SUM_MMA)
        outs = (Q, stride_qb, stride_qm, stride_qh, O, stride_ob, stride_om, stride_oh, LSE,
                stride_lb, stride_lh, SINKS, WS_O, WS_M, WS_L)
        wl = (WL, batch, rb_max, ratio, ntiles_z, hz)
        gl.warp_specialize([
            (_consume, (outs, wl, qk_scale, q_smem, ring, 0, HEAD_DIM, BLOCK_N, HEADS_PER_TILE,
                        TOKENS_PER_TILE, CAUSAL, HAS_SINKS, RETURN_LSE, STAGES, SUM_MMA, ones)),
            (_consume, (outs, wl, qk_scale, q_smem, ring, 1, HEAD_DIM, BLOCK_N, HEADS_PER_TILE,
                        TOKENS_PER_TILE, CAUSAL, HAS_SINKS, RETURN_LSE, STAGES, SUM_MMA, ones)),
            (_load, (K_DESC, V_DESC, BT, stride_bt, num_pages, wl, ring, HEAD_DIM, BLOCK_N, STAGES,
                     LAYOUT, PAGE_SIZE)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


@gluon.jit
def _rounds(WL, hz):
    """(tiles of the step, hand-out rounds of the grid)."""
    tiles = gl.load(WL + 2) * hz
    g = gl.num_programs(0)
    return tiles, (tiles + g - 1) // g


@gluon.jit
def _handout(r):
    """Hand-out index of round r for this program (the snake order)."""
    p = gl.program_id(0)
    g = gl.num_programs(0)
    return r * g + gl.where(r % 2 == 0, p, g - 1 - p)


@gluon.jit
def _tile(wl, k, tiles):
    """Tile of hand-out index k (the last tile first): its sequence b, KV head g, head group
    z, token block, first KV block and KV block count, Lq, Lk, first q row and first key row."""
    WL, batch, rb_max, ratio, ntiles_z, hz = wl
    t = tiles - 1 - k
    rb = t // hz
    h = t - rb * hz
    o_lk = HEADER + batch
    o_qs = o_lk + batch
    o_ks = o_qs + batch
    o_start = o_ks + 2 * batch
    o_count = o_start + rb_max + 1
    o_seq = o_count + rb_max
    o_qblock = o_seq + rb_max
    o_first = o_qblock + rb_max
    b = gl.load(WL + o_seq + rb)
    g = h // ntiles_z
    return (b, g, h - g * ntiles_z, gl.load(WL + o_qblock + rb), gl.load(WL + o_first + rb),
            gl.load(WL + o_count + rb), gl.load(WL + HEADER + b), gl.load(WL + o_lk + b),
            gl.load(WL + o_qs + b), gl.load(WL + o_ks + b))


@gluon.jit
def _page(BT, row, lk, num_pages, PAGE_SIZE: gl.constexpr, i):
    """Page id of the sequence's page i (block-table row `row`), or num_pages (zeros) for a
    page past its keys or an id out of range."""
    pid = gl.load(BT + row + i, mask=i * PAGE_SIZE < lk, other=-1)
    return gl.where((pid >= 0) & (pid < num_pages), pid, num_pages)


@gluon.jit
def _copy(descs, bars, bufs, BT, row, b, g, blk, lk, num_pages, BLOCK_N: gl.constexpr,
          LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """KV block `blk` of the tile's sequence (KV head g): K and V (`descs`) into their stage
    buffers `bufs` [1, BLOCK_N, 1, D], each copy counted on its barrier of `bars`; a page's
    id read once for both."""
    k_desc, v_desc = descs
    k_bar, v_bar = bars
    k_buf, v_buf = bufs
    if LAYOUT == 0:
        tma.async_copy_global_to_shared(k_desc, [b, blk * BLOCK_N, g, 0], k_bar, k_buf)
        tma.async_copy_global_to_shared(v_desc, [b, blk * BLOCK_N, g, 0], v_bar, v_buf)
    elif PAGE_SIZE >= BLOCK_N:
        i = blk * BLOCK_N // PAGE_SIZE
        at = [_page(BT, row, lk, num_pages, PAGE_SIZE, i), blk * BLOCK_N - i * PAGE_SIZE, g, 0]
        tma.async_copy_global_to_shared(k_desc, at, k_bar, k_buf)
        tma.async_copy_global_to_shared(v_desc, at, v_bar, v_buf)
    else:
        PER: gl.constexpr = BLOCK_N // PAGE_SIZE
        for j in gl.static_range(PER):
            at = [_page(BT, row, lk, num_pages, PAGE_SIZE, blk * PER + j), 0, g, 0]
            tma.async_copy_global_to_shared(k_desc, at, k_bar,
                                            k_buf.slice(j * PAGE_SIZE, PAGE_SIZE, dim=1))
            tma.async_copy_global_to_shared(v_desc, at, v_bar,
                                            v_buf.slice(j * PAGE_SIZE, PAGE_SIZE, dim=1))


@gluon.jit
def _load(K_DESC, V_DESC, BT, stride_bt, num_pages, wl, ring, HEAD_DIM: gl.constexpr,
          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LAYOUT: gl.constexpr,
          PAGE_SIZE: gl.constexpr):
    """The loader: every KV block of this program's tiles, in order, into the ring (a
    block's bytes in full, the zeros of rows past the cache included)."""
    k_bufs, v_bufs, k_ready, v_ready, empty, _turns = ring
    nbytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2  # f16 / bf16
    tiles, rounds = _rounds(wl[0], wl[5])
    it = 0
    for r in range(0, rounds):
        k = _handout(r)
        if k < tiles:
            b, g, _z, _qb, first, count, _lq, lk, _qs, _ks = _tile(wl, k, tiles)
            row = b.to(gl.int64) * stride_bt
            for blk in range(first, first + count):
                idx = it % STAGES
                mbarrier.wait(empty.index(idx), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(idx), nbytes)
                mbarrier.expect(v_ready.index(idx), nbytes)
                _copy((K_DESC, V_DESC), (k_ready.index(idx), v_ready.index(idx)),
                      (k_bufs.index(idx), v_bufs.index(idx)), BT, row, b, g, blk, lk, num_pages,
                      BLOCK_N, LAYOUT, PAGE_SIZE)
                it += 1


@gluon.jit
def _consume(outs, wl, qk_scale, q_smem, ring, HALF: gl.constexpr, HEAD_DIM: gl.constexpr,
             BLOCK_N: gl.constexpr, HEADS_PER_TILE: gl.constexpr, TOKENS_PER_TILE: gl.constexpr,
             CAUSAL: gl.constexpr, HAS_SINKS: gl.constexpr, RETURN_LSE: gl.constexpr,
             STAGES: gl.constexpr, SUM_MMA: gl.constexpr, ones):
    """One warpgroup: rows 64 x HALF .. +63 of every tile of this program."""
    (Q, stride_qb, stride_qm, stride_qh, O, stride_ob, stride_om, stride_oh, LSE, stride_lb,
     stride_lh, SINKS, WS_O, WS_M, WS_L) = outs
    ratio = wl[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    q_buf = q_smem.index(HALF)
    tiles, rounds = _rounds(wl[0], wl[5])
    it = 0
    tn = 0
    for r in range(0, rounds):
        k = _handout(r)
        if k < tiles:
            b, g, z, qblock, first, count, lq, lk, qs, _ks = _tile(wl, k, tiles)
            qpos = stage_q(Q + b.to(gl.int64) * stride_qb + qs.to(gl.int64) * stride_qm,
                           stride_qm, stride_qh, g, z, qblock, lq, lk, ratio, q_buf, s_layout,
                           HALF, HEAD_DIM, HEADS_PER_TILE, TOKENS_PER_TILE)
            # blocks [first, mid) are seen whole by every row of the tile (`unmasked_end`)
            full = lk // BLOCK_N
            if CAUSAL:
                full = gl.minimum(full, gl.maximum(lk - lq + qblock * TOKENS_PER_TILE + 1, 0)
                                  // BLOCK_N)
            mid = gl.minimum(gl.maximum(full, first), first + count)
            it, tn, acc, m_i, l_i = _blocks(it, tn, q_buf, ring, first, mid, first + count, qpos,
                                            lk, qk_scale, s_layout, o_layout, HEAD_DIM, BLOCK_N,
                                            CAUSAL, STAGES, HALF, False, SUM_MMA, ones, True)
            Ob = O + b.to(gl.int64) * stride_ob + qs.to(gl.int64) * stride_om
            LSEb = LSE + b.to(gl.int64) * stride_lb + qs
            tile_outs = (Ob, 0, stride_om, stride_oh, LSEb, 0, stride_lh, SINKS, WS_O, WS_M,
                         WS_L)
            _epilogue(acc, m_i, l_i, b * 0, g, z, qblock, -1, lq, ratio, tile_outs, o_layout, HALF,
                      HEAD_DIM, HEADS_PER_TILE, TOKENS_PER_TILE, HAS_SINKS, RETURN_LSE)
