"""The prompt-chunk kernel for Hopper: K/V through tensor descriptors (TMA), a pipelined KV loop.

The same stream-K work list, program ranges, partial slots and fused merge as
`attention_kernel`, so every fixup merges its pieces unchanged; what differs is the KV loop:

- K and V blocks are read by the bulk tensor copy engine (TMA) through tensor descriptors,
  `num_stages` blocks ahead, into swizzled shared memory that the warpgroup MMA reads
  directly; blocks past Lk come back as zeros;
- scores are scaled and shifted in one multiply-add, P goes straight into the second dot,
  which accumulates in place (`tl.dot(p, v, acc)`), and l is updated after it, so fewer
  values live across the MMA.

Features: causal or not, sinks, lse, every fixup kind; head sizes 64 and 128 with Dk = Dv.
Masks, ALiBi, softcap and windows stay on `attention_kernel` (`launch` chooses at bind time).

K_DESC / V_DESC are host tensor descriptors over the whole cache, [B, Lk, Hkv, D] with
blocks [1, BLOCK_N, 1, D], or, with DEVICE_DESC, K and V themselves: each tile then makes
a 2-D descriptor of its (sequence, KV head) slice in the kernel (global scratch, 128 bytes a
program).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from skattn.kernels.attention import _fused_fixup
from skattn.kernels.kv_loop import load_q
from skattn.kernels.softmax import softmax_step, unmasked_end
from skattn.kernels.tile import (_div, decode_group, finalize_store, first_kv_block,
                                 longest_first, program_range, store_partial, tile_items,
                                 tile_rows)


@triton.jit
def prefill_kernel(
    Q, stride_qb, stride_qm, stride_qh,  # q [B, Lq, Hq, D]
    K_DESC, stride_kb, stride_kn, stride_kh,  # k [B, Lk, Hkv, D]: descriptor, or the tensor
    V_DESC, stride_vb, stride_vn, stride_vh,  # v [B, Lk, Hkv, D]
    O, stride_ob, stride_om, stride_oh,  # out [B, Lq, Hq, D]
    LSE, stride_lb, stride_lh,  # lse [B, Hq, Lq]
    SINKS,  # [Hq] f32
    WS_O, WS_M, WS_L, COUNTERS,  # partials and per-tile counters, as attention_kernel's
    QBLOCK_OFF, KV_FIRST,
    q_len, kv_len, ratio, kv_heads, ntiles_x, ntiles_z, group_work, work, programs, split,
    kv_first0,
    qk_scale,
    div_x_mul, div_x_shift, div_z_mul, div_z_shift, div_h_mul, div_h_shift, div_w_mul, div_w_shift,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr,
    FUSED: tl.constexpr, PER_TILE_RANGES: tl.constexpr, USE_FASTDIV: tl.constexpr,
    INTERPRET: tl.constexpr, ONE_TOKEN_BLOCK: tl.constexpr,
    FIXUP_COLS: tl.constexpr, FIXUP_ROWS: tl.constexpr, MERGE_PIECES: tl.constexpr,
    USE_PDL: tl.constexpr, DEVICE_DESC: tl.constexpr, XBLOCKS: tl.constexpr,
    LONGEST_FIRST: tl.constexpr = False,
):
    p = tl.program_id(0)
    if LONGEST_FIRST:  # one whole tile a program, longest first (as attention_kernel)
        p = longest_first(p, programs, ntiles_x)
    if USE_PDL == 1:
        gdc_launch_dependents()
    # -- this program's [start, end) of the work list (as attention_kernel)
    start, end = program_range(p, work, programs, split, group_work, ntiles_x, QBLOCK_OFF,
                               div_x_mul, div_x_shift, USE_FASTDIV, ONE_TOKEN_BLOCK,
                               PER_TILE_RANGES)
    # -- its tiles, first to last: a counted loop
    t_first = _tile_of(start, group_work, ntiles_x, QBLOCK_OFF, div_w_mul, div_w_shift,
                       USE_FASTDIV, ONE_TOKEN_BLOCK, XBLOCKS)
    t_last = _tile_of(tl.maximum(end - 1, start), group_work, ntiles_x, QBLOCK_OFF, div_w_mul,
                      div_w_shift, USE_FASTDIV, ONE_TOKEN_BLOCK, XBLOCKS)
    t_last = tl.where(end > start, t_last, t_first - 1)
    for tile in range(t_first, t_last + 1):
        group = _div(tile, ntiles_x, div_x_mul, div_x_shift, USE_FASTDIV)
        qblock = tile - group * ntiles_x
        first, stop = tile_items(group, qblock, group_work, QBLOCK_OFF, ONE_TOKEN_BLOCK)
        kv0 = first_kv_block(KV_FIRST, qblock, kv_first0, ONE_TOKEN_BLOCK) - first
        item = tl.maximum(start, first)
        stop_here = tl.minimum(end, stop)
        b, g, z = decode_group(group, ntiles_z, kv_heads, div_z_mul, div_z_shift, div_h_mul,
                               div_h_shift, USE_FASTDIV)
        qi, head, valid = tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                                    BLOCK_M)
        q = load_q(Q, b, qi, head, valid, stride_qb, stride_qm, stride_qh, 0, HEAD_DIM,
                   HEAD_DIM, K_DESC.dtype.element_ty if DEVICE_DESC else K_DESC.dtype)
        acc, m_i, l_i = tile_kv_blocks(
            q, K_DESC, V_DESC, b, g, kv0 + item, kv0 + stop_here, qblock * TOKENS_PER_TILE, qi,
            stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, q_len, kv_len,
            qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, INTERPRET, DEVICE_DESC)
        whole = (item == first) & (stop_here == stop)
        slot = p * 2 + (item != start).to(tl.int32)
        if whole:
            finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                           LSE, stride_lb, stride_lh, SINKS, HEAD_DIM, HEAD_DIM,
                           HAS_SINKS, RETURN_LSE)
        else:
            store_partial(acc, m_i, l_i, slot, WS_O, WS_M, WS_L, HEAD_DIM, BLOCK_M, HEAD_DIM)
            if FUSED:
                _fused_fixup(tile, first, stop, work, programs, b, g, z, qblock, q_len, ratio,
                             O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
                             WS_O, WS_M, WS_L, COUNTERS, HEAD_DIM, BLOCK_M, HEAD_DIM,
                             HEADS_PER_TILE, TOKENS_PER_TILE, HAS_SINKS, RETURN_LSE, FIXUP_COLS,
                             FIXUP_ROWS, MERGE_PIECES)
    if USE_PDL == 2:
        gdc_launch_dependents()


@triton.jit
def _tile_of(item, group_work, ntiles_x, QBLOCK_OFF, div_w_mul, div_w_shift,
             USE_FASTDIV: tl.constexpr, ONE_TOKEN_BLOCK: tl.constexpr, XBLOCKS: tl.constexpr):
    """The tile holding work item `item` (`tile.locate` without its loop: the token block is
    counted over all XBLOCKS >= ntiles_x + 1 offsets at once)."""
    group = _div(item, group_work, div_w_mul, div_w_shift, USE_FASTDIV)
    if ONE_TOKEN_BLOCK:
        return group
    j = tl.arange(0, XBLOCKS)
    offs = tl.load(QBLOCK_OFF + j, mask=(j >= 1) & (j < ntiles_x), other=2147483647)
    qblock = tl.sum((offs <= item - group * group_work).to(tl.int32), 0)
    return group * ntiles_x + qblock


@triton.jit
def _descriptors(K_DESC, V_DESC, b, g, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                 stride_vh, kv_len,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DEVICE_DESC: tl.constexpr):
    """K and V of (sequence b, KV head g) as descriptors: the host's 4-D ones, or 2-D ones
    made here for this slice (its rows past Lk read as zeros either way)."""
    if DEVICE_DESC:
        kd = tl.make_tensor_descriptor(
            K_DESC + tl.cast(b, tl.int64) * stride_kb + tl.cast(g, tl.int64) * stride_kh,
            shape=[kv_len, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
        vd = tl.make_tensor_descriptor(
            V_DESC + tl.cast(b, tl.int64) * stride_vb + tl.cast(g, tl.int64) * stride_vh,
            shape=[kv_len, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        kd = K_DESC
        vd = V_DESC
    return kd, vd


@triton.jit
def _load_block(desc, b, g, n0, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                DEVICE_DESC: tl.constexpr):
    """[BLOCK_N, HEAD_DIM] keys (or values) n0 .. n0 + BLOCK_N - 1 of (b, g)."""
    if DEVICE_DESC:
        x = desc.load([n0, 0])
    else:
        x = desc.load([b, n0, g, 0]).reshape([BLOCK_N, HEAD_DIM])
    return x


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    # INTERPRET: the interpreter's bf16 tl.dot is wrong in triton 3.6, so it multiplies in f32
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def tile_kv_blocks(q, K_DESC, V_DESC, b, g, blk_lo, blk_hi, first_token, qi,
                   stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                   q_len, kv_len, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, DEVICE_DESC: tl.constexpr):
    """Online softmax over KV blocks [blk_lo, blk_hi) of one tile, scores in log2 units.

    Two loops, the blocks inside Lk and before every row's causal edge without masks, then
    the rest with them."""
    kd, vd = _descriptors(K_DESC, V_DESC, b, g, stride_kb, stride_kn, stride_kh, stride_vb,
                          stride_vn, stride_vh, kv_len, HEAD_DIM, BLOCK_N, DEVICE_DESC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qpos = kv_len - q_len + qi
    mid = unmasked_end(blk_lo, blk_hi, q_len, kv_len, first_token, BLOCK_N, CAUSAL, False)
    acc, m_i, l_i = _kv_range(acc, m_i, l_i, q, kd, vd, b, g, blk_lo, mid, qpos, kv_len,
                              qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, INTERPRET,
                              DEVICE_DESC, False)
    acc, m_i, l_i = _kv_range(acc, m_i, l_i, q, kd, vd, b, g, mid, blk_hi, qpos, kv_len,
                              qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, INTERPRET,
                              DEVICE_DESC, True)
    return acc, m_i, l_i


@triton.jit
def _kv_range(acc, m_i, l_i, q, kd, vd, b, g, lo, hi, qpos, kv_len, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, DEVICE_DESC: tl.constexpr,
              MASKED: tl.constexpr):
    """KV blocks [lo, hi). MASKED=False: every row sees every key of these blocks, so m is
    finite after the first one and needs no guard; scaling and shifting are one multiply-add.
    MASKED: keys past Lk (and, causal, after a row's position) score -inf; a row that has
    seen none keeps m = -inf and l = 0."""
    for blk in tl.range(lo, hi):
        n0 = blk * BLOCK_N
        k = _load_block(kd, b, g, n0, BLOCK_N, HEAD_DIM, DEVICE_DESC)
        qk = _mma(q, k.T, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRET)
        if MASKED:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if CAUSAL:  # (a key past Lk is past every row's position too)
                keep = offs_n[None, :] <= qpos[:, None]
            else:
                keep = offs_n[None, :] < kv_len
            pr, alpha, m_new = softmax_step(tl.where(keep, qk * qk_scale, float("-inf")), m_i)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            pr = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        l_blk = tl.sum(pr, 1)
        acc = acc * alpha[:, None]
        v = _load_block(vd, b, g, n0, BLOCK_N, HEAD_DIM, DEVICE_DESC)
        acc = _mma(pr.to(v.dtype), v, acc, INTERPRET)
        l_i = l_i * alpha + l_blk
        m_i = m_new
    return acc, m_i, l_i
