"""The warp-specialised prompt-chunk kernel for Hopper, in Gluon (`Tuning(prefill="ws")`).

One program (CTA) runs three partitions that share its shared memory:

- a loader (one warp, few registers) copies K and V blocks through TMA into a ring of
  `STAGES` buffers, each with a "K ready", a "V ready" and an "empty" barrier;
- two consumer warpgroups each take 64 of the tile's 128 rows: Q·K^T and P·V as
  warpgroup MMAs on the shared buffers, the online softmax in registers. Each frees a
  buffer (arrives on "empty", count 2) once its P·V MMA has read it, so the loader refills
  it while they work on the next block.

The program's work is a list of segments made on the host once per bound plan
(`prefill_launch.segments`): one row per (tile, KV range) piece of the program's range of the
stream-K work list, in the order the base kernel walks it: sequence, KV head, head group,
token block, the first KV block, the first block that needs a mask, the end, and the
partial slot (-1: the piece is the whole tile, written out here). So the partial slots, the
fixups and the outputs are those of `attention_kernel`; the fused fixup is not taken.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)
SEG = gl.constexpr(8)  # int32 fields of a segment


@gluon.jit
def ws_prefill_kernel(
    Q, stride_qb, stride_qm, stride_qh,  # q [B, Lq, Hq, D]
    K_DESC, V_DESC,  # descriptors over k, v [B, Lk, Hkv, D], blocks [1, BLOCK_N, 1, D]
    O, stride_ob, stride_om, stride_oh,  # out [B, Lq, Hq, D]
    LSE, stride_lb, stride_lh,  # lse [B, Hq, Lq]
    SINKS,  # [Hq] f32
    WS_O, WS_M, WS_L,  # partial slots, as attention_kernel's
    SEGS, SEG_OFF,  # segments [S, 8] int32; program p's are SEG_OFF[p] .. SEG_OFF[p+1]-1
    q_len, kv_len, ratio, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    HEADS_PER_TILE: gl.constexpr, TOKENS_PER_TILE: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_SINKS: gl.constexpr, RETURN_LSE: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr = False,
    SUM_MMA: gl.constexpr = False,
):
    p = gl.program_id(0)
    s_lo = gl.load(SEG_OFF + p)
    s_hi = gl.load(SEG_OFF + p + 1)
    layout: gl.constexpr = K_DESC.layout  # of blocks [1, BLOCK_N, 1, HEAD_DIM]
    q_smem, ring, ones = shared_state(K_DESC.dtype, layout, HEAD_DIM, BLOCK_N, STAGES, SUM_MMA)
    outs = (O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS, WS_O, WS_M, WS_L)
    shape = (q_len, kv_len, ratio, qk_scale)
    gl.warp_specialize([
        (_consume, (Q, stride_qb, stride_qm, stride_qh, outs, SEGS, s_lo, s_hi, shape, q_smem, ring,
                    0, HEAD_DIM, BLOCK_N, HEADS_PER_TILE, TOKENS_PER_TILE, CAUSAL, HAS_SINKS,
                    RETURN_LSE, STAGES, PINGPONG, SUM_MMA, ones)),
        (_consume, (Q, stride_qb, stride_qm, stride_qh, outs, SEGS, s_lo, s_hi, shape, q_smem, ring,
                    1, HEAD_DIM, BLOCK_N, HEADS_PER_TILE, TOKENS_PER_TILE, CAUSAL, HAS_SINKS,
                    RETURN_LSE, STAGES, PINGPONG, SUM_MMA, ones)),
        (_load, (K_DESC, V_DESC, SEGS, s_lo, s_hi, ring, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


@gluon.jit
def shared_state(dtype: gl.constexpr, layout: gl.constexpr, HEAD_DIM: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SUM_MMA: gl.constexpr):
    """A program's shared memory: the two warpgroups' 64-row query buffers, the ring of
    `STAGES` K and V blocks [1, BLOCK_N, 1, HEAD_DIM] in `layout` with their "K ready",
    "V ready" and "empty" barriers (empty: count 2, one arrival a warpgroup) and the
    ping-pong turns; SUM_MMA: a [8, BLOCK_N] block of ones (P times its transpose is each
    row's sum, 8 times), else the query buffers in its place. Returns (q buffers, ring,
    ones)."""
    block: gl.constexpr = [STAGES, 1, BLOCK_N, 1, HEAD_DIM]
    k_bufs = gl.allocate_shared_memory(dtype, block, layout)
    v_bufs = gl.allocate_shared_memory(dtype, block, layout)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    if SUM_MMA:
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
        ones = gl.allocate_shared_memory(dtype, [8, BLOCK_N], ones_layout)
        ones.store(gl.full([8, BLOCK_N], 1.0, dtype, gl.BlockedLayout([1, 8], [2, 16], [4, 1],
                                                                       [1, 0])))
        fence_async_shared()
    else:
        ones = q_smem
    return q_smem, (k_bufs, v_bufs, k_ready, v_ready, empty, turns), ones


@gluon.jit
def _segment(SEGS, s):
    """Segment s: (sequence, KV head, head group, token block, first KV block, first masked
    block, end, partial slot or -1)."""
    row = SEGS + s * SEG
    return (gl.load(row), gl.load(row + 1), gl.load(row + 2), gl.load(row + 3), gl.load(row + 4),
            gl.load(row + 5), gl.load(row + 6), gl.load(row + 7))


@gluon.jit
def _load(K_DESC, V_DESC, SEGS, s_lo, s_hi, ring, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader: every KV block of every segment, in order, into the ring."""
    k_bufs, v_bufs, k_ready, v_ready, empty, _turns = ring
    it = 0
    for s in range(s_lo, s_hi):
        b, g, _z, _qblock, lo, _mid, hi, _slot = _segment(SEGS, s)
        for blk in range(lo, hi):
            idx = it % STAGES
            mbarrier.wait(empty.index(idx), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(idx), K_DESC.block_type.nbytes)
            tma.async_copy_global_to_shared(K_DESC, [b, blk * BLOCK_N, g, 0], k_ready.index(idx),
                                            k_bufs.index(idx))
            mbarrier.expect(v_ready.index(idx), V_DESC.block_type.nbytes)
            tma.async_copy_global_to_shared(V_DESC, [b, blk * BLOCK_N, g, 0], v_ready.index(idx),
                                            v_bufs.index(idx))
            it += 1


@gluon.jit
def _consume(Q, stride_qb, stride_qm, stride_qh, outs, SEGS, s_lo, s_hi, shape, q_smem, ring,
             HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
             HEADS_PER_TILE: gl.constexpr, TOKENS_PER_TILE: gl.constexpr, CAUSAL: gl.constexpr,
             HAS_SINKS: gl.constexpr, RETURN_LSE: gl.constexpr, STAGES: gl.constexpr,
             PINGPONG: gl.constexpr, SUM_MMA: gl.constexpr, ones):
    """One warpgroup: rows 64 * HALF .. 64 * HALF + 63 of every segment's tile."""
    q_len, kv_len, ratio, qk_scale = shape
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    q_buf = q_smem.index(HALF)
    it = 0
    tn = 0  # MMA turns taken (PINGPONG)
    for s in range(s_lo, s_hi):
        b, g, z, qblock, lo, mid, hi, slot = _segment(SEGS, s)
        qpos_s = stage_q(Q + b.to(gl.int64) * stride_qb, stride_qm, stride_qh, g, z, qblock, q_len,
                         kv_len, ratio, q_buf, s_layout, HALF, HEAD_DIM, HEADS_PER_TILE,
                         TOKENS_PER_TILE)
        it, tn, acc, m_i, l_i = _blocks(it, tn, q_buf, ring, lo, mid, hi, qpos_s, kv_len,
                                        qk_scale, s_layout, o_layout, HEAD_DIM, BLOCK_N, CAUSAL,
                                        STAGES, HALF, PINGPONG, SUM_MMA, ones)
        _epilogue(acc, m_i, l_i, b, g, z, qblock, slot, q_len, ratio, outs, o_layout, HALF,
                  HEAD_DIM, HEADS_PER_TILE, TOKENS_PER_TILE, HAS_SINKS, RETURN_LSE)


@gluon.jit
def stage_q(Qb, stride_qm, stride_qh, g, z, qblock, q_len, kv_len, ratio, q_buf,
            s_layout: gl.constexpr, HALF: gl.constexpr, HEAD_DIM: gl.constexpr,
            HEADS_PER_TILE: gl.constexpr, TOKENS_PER_TILE: gl.constexpr):
    """This warpgroup's query rows of the tile (q from `Qb`, its sequence's first row),
    through registers into `q_buf` for the MMAs; returns each row's position among the keys
    (bottom-right: kv_len - q_len + its token), in the scores' row layout."""
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    qi, head, valid = _rows(g, z, qblock, q_len, ratio, HALF, HEADS_PER_TILE, TOKENS_PER_TILE,
                            gl.SliceLayout(1, ld_layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    q = gl.load(Qb + qi[:, None] * stride_qm + head[:, None] * stride_qh + d[None, :],
                mask=valid[:, None], other=0.0)
    q_buf.store(q.to(q_buf.dtype))
    fence_async_shared()
    qpos, _, _ = _rows(g, z, qblock, q_len, ratio, HALF, HEADS_PER_TILE, TOKENS_PER_TILE,
                       gl.SliceLayout(1, s_layout))
    return kv_len - q_len + qpos


@gluon.jit
def _rows(g, z, qblock, q_len, ratio, HALF: gl.constexpr, HEADS_PER_TILE: gl.constexpr,
          TOKENS_PER_TILE: gl.constexpr, layout: gl.constexpr):
    """(query token, query head, valid) of rows 64 * HALF .. +63 of the tile (`tile_rows`)."""
    r = HALF * 64 + gl.arange(0, 64, layout=layout)
    tok = r // HEADS_PER_TILE
    hz = z * HEADS_PER_TILE + r % HEADS_PER_TILE
    qi = qblock * TOKENS_PER_TILE + tok
    valid = (tok < TOKENS_PER_TILE) & (qi < q_len) & (hz < ratio)
    return qi, g * ratio + hz, valid


@gluon.jit
def _blocks(it, tn, q_buf, ring, lo, mid, hi, qpos, kv_len, qk_scale,
            s_layout: gl.constexpr, o_layout: gl.constexpr, HEAD_DIM: gl.constexpr,
            BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
            HALF: gl.constexpr, PINGPONG: gl.constexpr, SUM_MMA: gl.constexpr, ones,
            V_TAIL: gl.constexpr = False):
    """Online softmax over KV blocks [lo, hi) (hi > lo), scores in log2 units, software
    pipelined inside the warpgroup: block j's Q·K^T MMA is issued before block j - 1's P·V,
    and block j's softmax runs while that P·V is in flight. PINGPONG: the two warpgroups take
    turns to issue their MMAs (each turn ends when the other's may start), so one's softmax
    runs under the other's MMAs. SUM_MMA: the rows' sums of P as an MMA beside P·V (P times
    `ones` [8, BLOCK_N] transposed: 8 equal columns), not as additions in registers. Returns
    (ring position, turns, O, m, l). V_TAIL: V's rows at or past kv_len in the last block are
    zeroed before its P·V (`_zero_tail`; only the last block reaches past kv_len)."""
    k_bufs, v_bufs, k_ready, v_ready, empty, turns = ring
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 8, 16])
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, l_layout)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
    acc_l = gl.zeros([64, 8], gl.float32, l_layout)
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
    idx = it % STAGES
    phase = (it // STAGES) & 1
    mbarrier.wait(k_ready.index(idx), phase)
    tn = _my_turn(turns, tn, HALF, PINGPONG)
    qk = warpgroup_mma(q_buf, _kv(k_bufs, idx, BLOCK_N, HEAD_DIM).permute((1, 0)),
                       gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    _their_turn(turns, HALF, PINGPONG)
    qk = warpgroup_mma_wait(0, deps=(qk, ))
    TREE: gl.constexpr = HEAD_DIM <= 64  # row max and sum as trees (`_row_max`)
    pr, alpha, m_i, l_i = _softmax(qk, m_i, l_i, lo, mid, qpos, kv_len, qk_scale, s_layout,
                                   BLOCK_N, CAUSAL, TREE, SUM_MMA)
    p = gl.convert_layout(pr.to(k_bufs.dtype), p_layout)
    for blk in range(lo + 1, hi):
        nidx = (it + 1) % STAGES
        nphase = ((it + 1) // STAGES) & 1
        mbarrier.wait(k_ready.index(nidx), nphase)
        mbarrier.wait(v_ready.index(idx), phase)
        tn = _my_turn(turns, tn, HALF, PINGPONG)
        qk = warpgroup_mma(q_buf, _kv(k_bufs, nidx, BLOCK_N, HEAD_DIM).permute((1, 0)),
                           gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False,
                           is_async=True)
        acc = warpgroup_mma(p, _kv(v_bufs, idx, BLOCK_N, HEAD_DIM), acc, is_async=True)
        acc_l = _row_sums(p, ones, acc_l, pl_layout, SUM_MMA)
        _their_turn(turns, HALF, PINGPONG)
        # this block's scores; the P·V (and the sums' MMA) still run
        qk = warpgroup_mma_wait(2 if SUM_MMA else 1, deps=(qk, ))
        pr, alpha, m_i, l_i = _softmax(qk, m_i, l_i, blk, mid, qpos, kv_len, qk_scale,
                                       s_layout, BLOCK_N, CAUSAL, TREE, SUM_MMA)
        if SUM_MMA:
            acc, p, acc_l = warpgroup_mma_wait(0, deps=(acc, p, acc_l))
            acc_l = acc_l * gl.convert_layout(alpha, row_l)[:, None]
        else:
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(empty.index(idx), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = gl.convert_layout(pr.to(k_bufs.dtype), p_layout)
        it += 1
        idx = nidx
        phase = nphase
    mbarrier.wait(v_ready.index(idx), phase)
    if V_TAIL:
        _zero_tail(_kv(v_bufs, idx, BLOCK_N, HEAD_DIM), (hi - 1) * BLOCK_N, kv_len, BLOCK_N)
    tn = _my_turn(turns, tn, HALF, PINGPONG)
    acc = warpgroup_mma(p, _kv(v_bufs, idx, BLOCK_N, HEAD_DIM), acc, is_async=True)
    acc_l = _row_sums(p, ones, acc_l, pl_layout, SUM_MMA)
    _their_turn(turns, HALF, PINGPONG)
    if SUM_MMA:
        acc, p, acc_l = warpgroup_mma_wait(0, deps=(acc, p, acc_l))
        l_i = gl.convert_layout(gl.max(acc_l, 1), gl.SliceLayout(1, s_layout))
    else:
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    mbarrier.arrive(empty.index(idx), count=1)
    return it + 1, tn, acc, m_i, l_i


@gluon.jit
def _zero_tail(vb, start, kv_len, BLOCK_N: gl.constexpr):
    """Rows of the V block `vb` [BLOCK_N, D] (keys start ..) at or past kv_len set to 0, in
    shared memory, 32 rows at a time. Their probabilities are 0, but the MMA would take
    0 x Inf or 0 x NaN as NaN, and a ragged cache's rows past a sequence's length hold
    whatever was written there before. Both warpgroups run it on the buffer they share: each
    writes back the values it read, or zeros, so neither can see the other's writes change a
    value it needs; the fence orders the stores before this warpgroup's MMA reads them."""
    if start + BLOCK_N > kv_len:
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        for r0 in gl.static_range(0, BLOCK_N, 32):
            part = vb.slice(r0, 32, dim=0)
            v = part.load(layout)
            rows = start + r0 + gl.arange(0, 32, layout=gl.SliceLayout(1, layout))
            part.store(gl.where(rows[:, None] < kv_len, v, 0.0))
        fence_async_shared()


@gluon.jit
def _row_sums(p, ones, acc_l, pl_layout: gl.constexpr, SUM_MMA: gl.constexpr):
    """SUM_MMA: the MMA that adds P's rows into acc_l [64, 8] (P times `ones` transposed),
    issued asynchronously; else acc_l as it is."""
    if SUM_MMA:
        acc_l = warpgroup_mma(gl.convert_layout(p, pl_layout), ones.permute((1, 0)), acc_l,
                              is_async=True)
    return acc_l


@gluon.jit
def _my_turn(turns, tn, HALF: gl.constexpr, PINGPONG: gl.constexpr):
    """Wait for this warpgroup's turn to issue MMAs (warpgroup 0 goes first); the count."""
    if PINGPONG:
        mbarrier.wait(turns.index(HALF), (tn & 1) ^ (1 - HALF))
    return tn + 1


@gluon.jit
def _their_turn(turns, HALF: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - HALF), count=1)


@gluon.jit
def _kv(bufs, idx, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    return bufs.index(idx).reshape([BLOCK_N, HEAD_DIM])


@gluon.jit
def _halves(x):
    """Columns [0, N/2) and [N/2, N) of x [M, N] (one thread holds both of a pair)."""
    M: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[1]
    return gl.split(gl.permute(gl.reshape(x, [M, 2, N // 2]), (0, 2, 1)))


@gluon.jit
def _row_max(x, s_layout: gl.constexpr, TREE: gl.constexpr):
    """Each row's maximum. TREE: the halves of the row max'd together twice first (columns
    c and c + N/2 lie in one thread's registers), so a thread's chain of dependent maxima is
    a quarter as long (PERF.md, "Prompt chunks": faster at head size 64, slower at 128)."""
    if not TREE:
        return gl.max(x, 1)
    a, b = _halves(x)
    a, b = _halves(gl.maximum(a, b))
    return gl.convert_layout(gl.max(gl.maximum(a, b), 1), gl.SliceLayout(1, s_layout))


@gluon.jit
def _row_sum(x, s_layout: gl.constexpr, TREE: gl.constexpr):
    """Each row's sum; TREE: halves added together twice first (as `_row_max`)."""
    if not TREE:
        return gl.sum(x, 1)
    a, b = _halves(x)
    a, b = _halves(a + b)
    return gl.convert_layout(gl.sum(a + b, 1), gl.SliceLayout(1, s_layout))


@gluon.jit
def _softmax(qk, m_i, l_i, blk, mid, qpos, kv_len, qk_scale, s_layout: gl.constexpr,
             BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, TREE: gl.constexpr,
             SUM_MMA: gl.constexpr):
    """One block of the online softmax: (p, alpha, m, l). Blocks before `mid` are seen whole
    by every row (m finite after the first); later ones score keys past Lk (and, causal,
    past a row's position) -inf, and a row that has seen none keeps m = -inf, l = 0.
    SUM_MMA: l is left as it is (the MMA sums p)."""
    if blk >= mid:
        offs_n = blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if CAUSAL:  # (a key past Lk is past every row's position too)
            keep = offs_n[None, :] <= qpos[:, None]
        else:
            keep = offs_n[None, :] < kv_len
        sc = gl.where(keep, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, _row_max(sc, s_layout, TREE))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        pr = gl.exp2(sc - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
    else:
        m_new = gl.maximum(m_i, _row_max(qk, s_layout, TREE) * qk_scale)
        pr = gl.exp2(qk * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
    if not SUM_MMA:
        l_i = l_i * alpha + _row_sum(pr, s_layout, TREE)
    return pr, alpha, m_new, l_i


@gluon.jit
def _epilogue(acc, m_i, l_i, b, g, z, qblock, slot, q_len, ratio, outs, o_layout: gl.constexpr,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, HEADS_PER_TILE: gl.constexpr,
              TOKENS_PER_TILE: gl.constexpr, HAS_SINKS: gl.constexpr, RETURN_LSE: gl.constexpr):
    """A whole tile (slot < 0): sink, normalise, write out (`finalize_store`); a piece: its
    (O, m, l) into partial slot `slot`, rows 64 * HALF .. (`store_partial`)."""
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS, WS_O, WS_M, WS_L = outs
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.convert_layout(m_i, row_o)
    l_i = gl.convert_layout(l_i, row_o)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if slot < 0:
        qi, head, valid = _rows(g, z, qblock, q_len, ratio, HALF, HEADS_PER_TILE, TOKENS_PER_TILE,
                                row_o)
        if HAS_SINKS:
            sink = gl.load(SINKS + head, mask=valid, other=float("-inf")).to(gl.float32) * LOG2E
            m_f = gl.maximum(m_i, sink)
            m_safe = gl.where(m_f == float("-inf"), 0.0, m_f)
            alpha = gl.exp2(m_i - m_safe)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + gl.exp2(sink - m_safe)
            m_i = m_f
        has = l_i != 0.0  # a NaN row stays NaN, in out and lse
        inv = gl.where(has, 1.0 / gl.where(has, l_i, 1.0), 0.0)
        out = acc * inv[:, None]
        o_ptrs = (O + b.to(gl.int64) * stride_ob + qi[:, None] * stride_om
                  + head[:, None] * stride_oh + d[None, :])
        gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=valid[:, None])
        if RETURN_LSE:
            lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2, float("-inf"))
            gl.store(LSE + b.to(gl.int64) * stride_lb + head * stride_lh + qi, lse, mask=valid)
    else:
        base = slot * 128 + HALF * 64 + gl.arange(0, 64, layout=row_o)
        gl.store(WS_O + base[:, None] * HEAD_DIM + d[None, :], acc)
        gl.store(WS_M + base, m_i)
        gl.store(WS_L + base, l_i)
