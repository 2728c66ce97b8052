"""The KV loop of one tile: scores, masks and the online softmax over a range of KV blocks."""
import triton
import triton.language as tl

from skattn.kernels.quant import (fp8_pairs, fp8_score_scales, fp8_v_scale, load_blocks,
                                  q8_0_pair_blocks, tile_scales)
from skattn.kernels.softmax import alibi_slope, scores, softmax_step, unmasked_end, visible
from skattn.kernels.tile import LOG2E, pair_offset


@triton.jit
def load_q(Q, b, qi, head, valid, stride_qb, stride_qm, stride_qh, chunk,
           HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, DTYPE: tl.constexpr,
           PAIR_D: tl.constexpr = 0, ratio=1):
    """q's rows of a tile. PAIR_D: the plan reads two KV heads of PAIR_D values as one of
    HEAD_DIM = 2 PAIR_D (docs/serving.md, "Two KV heads as one"): a row's PAIR_D values go
    to the half of its own KV head (`pair_offset`), zeros to the other."""
    dk = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)
    # the batch offset in 64 bits: a cache of B x Lk x H x D elements can pass 2**31
    base = Q + tl.cast(b, tl.int64) * stride_qb + qi[:, None] * stride_qm + head[:, None] * stride_qh
    if PAIR_D:
        col = dk[None, :] - pair_offset(head, ratio, PAIR_D)[:, None]
        q = tl.load(base + col, mask=valid[:, None] & (col >= 0) & (col < PAIR_D), other=0.0)
    else:
        q = tl.load(base + dk[None, :], mask=valid[:, None] & (dk[None, :] < HEAD_DIM), other=0.0)
    return q.to(DTYPE)


@triton.jit
def _load_kt(K, kbase, offs_n, kv_len, stride_kn, chunk,
             HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, MASKED: tl.constexpr):
    dk = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)
    ptrs = K + kbase + offs_n[None, :] * stride_kn + dk[:, None]
    if MASKED:
        kt = tl.load(ptrs, mask=(offs_n[None, :] < kv_len) & (dk[:, None] < HEAD_DIM), other=0.0)
    elif HEAD_DIM % BLOCK_DK == 0:
        kt = tl.load(ptrs)
    else:
        kt = tl.load(ptrs, mask=dk[:, None] < HEAD_DIM, other=0.0)
    return kt


@triton.jit
def _load_v(V, vbase, offs_n, kv_len, stride_vn,
            HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr):
    dv = tl.arange(0, BLOCK_DV)
    ptrs = V + vbase + offs_n[:, None] * stride_vn + dv[None, :]
    if MASKED:
        vt = tl.load(ptrs, mask=(offs_n[:, None] < kv_len) & (dv[None, :] < HEAD_DIM_V), other=0.0)
    elif HEAD_DIM_V == BLOCK_DV:
        vt = tl.load(ptrs)
    else:
        vt = tl.load(ptrs, mask=dv[None, :] < HEAD_DIM_V, other=0.0)
    return vt


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    # INTERPRET: the interpreter's bf16 tl.dot is wrong in triton 3.6, so it multiplies in f32
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


# q8_0 V as pairs: p is rounded to f16 and multiplied in f16 (two values a `HMUL2`) by each
# 32-column block's scale for the dot; in f32 each product would take a conversion of its
# scale, a multiplication and a rounding (PERF.md: 612 against 544 warp instructions a
# block in the sm_90 n = 1 loop at four warps). Times 2^6 (exact, divided out after the KV loop) the
# products of small scales (|V| ~1e-3: scales ~1e-5) stay out of f16's subnormal range, where
# they would keep few bits, while the largest scale (65504 / 127 ~ 516) times 64 stays below
# f16's largest value.
Q8_0_P_SCALE = tl.constexpr(64.0)


@triton.jit
def pv_pairs(acc, acc2, p, alpha, V, VS, offs, ok, HEAD_DIM_V: tl.constexpr,
             BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr,
             INTERPRET: tl.constexpr, KV_FORMAT: tl.constexpr, S=None):
    """One KV block's P V for V read as 16-bit pairs (rows at byte offsets `offs` from V):
    the accumulators of V's even (acc) and odd (acc2) columns, rescaled by alpha. FP8
    (`kernels/quant.fp8_pairs`): [M, Dv / 2] each. q8_0 (`kernels/quant.q8_0_pair_blocks`,
    scales at offs / 32 from VS): [Dv / 32, M, 16] each, one dot a 32-column block of V with
    p times that block's scales times Q8_0_P_SCALE (`join_pairs` divides it out); S: those
    scales, loaded before, else loaded here."""
    if KV_FORMAT == 2:
        ve, vo, vs = q8_0_pair_blocks(V, VS, offs, ok, HEAD_DIM_V, BLOCK_DV, MASKED, ASM, S)
        ps = vs.to(ve.dtype) * Q8_0_P_SCALE
        p3 = p.to(ve.dtype)[None, :, :] * ps[:, None, :]
        acc = acc * alpha[None, :, None] + _dot(p3, ve, INTERPRET)
        acc2 = acc2 * alpha[None, :, None] + _dot(p3, vo, INTERPRET)
    else:
        ve, vo = fp8_pairs(V, offs, ok, HEAD_DIM_V, BLOCK_DV, MASKED, ASM)
        pv = p.to(ve.dtype)
        acc = acc * alpha[:, None] + _dot(pv, ve, INTERPRET)
        acc2 = acc2 * alpha[:, None] + _dot(pv, vo, INTERPRET)
    return acc, acc2


@triton.jit
def split_pairs(acc, V_PAIRS: tl.constexpr, KV_FORMAT: tl.constexpr = 1):
    """(acc, acc2) for a KV loop: V_PAIRS, [M, Dv] apart into its even and odd columns (for
    q8_0 as [Dv / 32, M, 16] per 32-column block); else acc and an unused 0.0."""
    M: tl.constexpr = acc.shape[0]
    if V_PAIRS and KV_FORMAT == 2:
        a, b = tl.split(tl.permute(tl.reshape(acc, [M, acc.shape[1] // 32, 16, 2]),
                                   (1, 0, 2, 3)))
    elif V_PAIRS:
        a, b = tl.split(tl.reshape(acc, [M, acc.shape[1] // 2, 2]))
    else:
        a, b = acc, 0.0
    return a, b


@triton.jit
def join_pairs(acc, acc2, V_PAIRS: tl.constexpr, KV_FORMAT: tl.constexpr = 1):
    """`split_pairs` undone after the KV loop: the columns back in order."""
    if V_PAIRS and KV_FORMAT == 2:
        acc = tl.reshape(tl.permute(tl.join(acc, acc2), (1, 0, 2, 3)),
                         [acc.shape[1], acc.shape[0] * 32]) * (1.0 / Q8_0_P_SCALE)
    elif V_PAIRS:
        acc = tl.reshape(tl.join(acc, acc2), [acc.shape[0], 2 * acc.shape[1]])
    return acc


@triton.jit
def _mask_bias(MASK, b, qi, offs_n, stride_mb, stride_mm, ok):
    """The additive mask of rows qi, keys offs_n where `ok` (0 elsewhere), in log2 units."""
    mptr = (MASK + tl.cast(b, tl.int64) * stride_mb + tl.cast(qi, tl.int64)[:, None] * stride_mm
            + offs_n[None, :])
    return tl.load(mptr, mask=ok, other=0.0).to(tl.float32) * LOG2E


@triton.jit
def _kv_step(acc, acc2, m_i, l_i, q, Q, K, V, KS, VS, MASK, slope, b, qi, head, valid, qpos,
             kbase, vbase, blk, ksc, vsc,
             stride_qb, stride_qm, stride_qh, stride_kn, stride_vn, stride_mb, stride_mm,
             kv_len, qk_scale, softcap_scale, window,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
             HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
             MASKED: tl.constexpr, KV_FORMAT: tl.constexpr, V_PAIRS: tl.constexpr,
             PREFETCH: tl.constexpr):
    """One KV block. MASKED=False: the block is inside Lk and visible to every row.
    KV_FORMAT: 0 K/V in q's dtype, 1 fp8 e4m3, 2 q8_0, 3 q4_0; quantized K/V become q's dtype
    on load
    (fp8 e4m3 exactly; the scales are applied in `tile_kv_loop`). V_PAIRS: V read as 16-bit
    pairs, `acc` and `acc2` the accumulators of its even and odd columns ([M, Dv / 2]; for
    q8_0 [Dv / 32, M, 16] per 32-column block, p times the block's scales); else acc2 is
    carried unused. PREFETCH: ksc, vsc are the block's K and V block scales,
    loaded one block ahead (`_block_scales`; q8_0, q4_0); else they are loaded here."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ASM: tl.constexpr = not INTERPRET  # quant.py's inline PTX conversions
    KSC = ksc if PREFETCH else None
    VSC = vsc if PREFETCH else None
    # -- scores
    if DK_CHUNKS == 1:
        if KV_FORMAT >= 2:
            kt = tl.trans(load_blocks(K, KS, kbase, offs_n, kv_len, stride_kn, 0, HEAD_DIM,
                                      BLOCK_DK, MASKED or HEAD_DIM != BLOCK_DK, q.dtype,
                                      KV_FORMAT, ASM, False, KSC))
        else:
            kt = _load_kt(K, kbase, offs_n, kv_len, stride_kn, 0, HEAD_DIM, BLOCK_DK,
                          MASKED).to(q.dtype)
        qk = _dot(q, kt, INTERPRET)
    else:
        qk = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(DK_CHUNKS):
            qc = load_q(Q, b, qi, head, valid, stride_qb, stride_qm, stride_qh, c,
                        HEAD_DIM, BLOCK_DK, q.dtype)
            if KV_FORMAT >= 2:
                kc = tl.trans(load_blocks(K, KS, kbase, offs_n, kv_len, stride_kn, c * BLOCK_DK,
                                          HEAD_DIM, BLOCK_DK, True, q.dtype, KV_FORMAT, ASM))
            else:
                kc = _load_kt(K, kbase, offs_n, kv_len, stride_kn, c, HEAD_DIM, BLOCK_DK,
                              True).to(q.dtype)
            qk += _dot(qc, kc, INTERPRET)
    s = scores(qk, qk_scale, softcap_scale, slope, qpos, offs_n, SOFTCAP, HAS_ALIBI)
    # -- masks
    if MASKED:
        keep = visible(offs_n[None, :] < kv_len, offs_n, qpos, window, CAUSAL, HAS_WINDOW)
        if HAS_MASK:
            s += _mask_bias(MASK, b, qi, offs_n, stride_mb, stride_mm, valid[:, None] & keep)
        s = tl.where(keep, s, float("-inf"))
    elif HAS_MASK:
        s += _mask_bias(MASK, b, qi, offs_n, stride_mb, stride_mm, valid[:, None])
    # -- online softmax
    p, alpha, m_new = softmax_step(s, m_i)
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_PAIRS:
        acc, acc2 = pv_pairs(acc, acc2, p, alpha, V, VS, vbase + offs_n * stride_vn,
                             offs_n < kv_len, HEAD_DIM_V, BLOCK_DV,
                             MASKED or HEAD_DIM_V != BLOCK_DV, ASM, INTERPRET, KV_FORMAT, VSC)
    else:
        if KV_FORMAT >= 2:
            vt = load_blocks(V, VS, vbase, offs_n, kv_len, stride_vn, 0, HEAD_DIM_V, BLOCK_DV,
                             MASKED or HEAD_DIM_V != BLOCK_DV, q.dtype, KV_FORMAT, ASM, True,
                             VSC)
        else:
            vt = _load_v(V, vbase, offs_n, kv_len, stride_vn, HEAD_DIM_V, BLOCK_DV,
                         MASKED).to(q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, INTERPRET)
    return acc, acc2, m_new, l_i


@triton.jit
def _block_scales(KS, VS, kbase, vbase, blk, kv_len, stride_kn, stride_vn,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, V_PAIRS: tl.constexpr,
                  KV_FORMAT: tl.constexpr, PREFETCH: tl.constexpr):
    """KV block blk's K and V block scales as `_kv_step` takes them (V's in the pairs' layout
    with V_PAIRS), keys past kv_len read as 0; without PREFETCH two unused zeros."""
    if PREFETCH:
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tile_scales(KS, kbase, offs_n, kv_len, stride_kn, HEAD_DIM, BLOCK_DK, False,
                         KV_FORMAT)
        vs = tile_scales(VS, vbase, offs_n, kv_len, stride_vn, HEAD_DIM_V, BLOCK_DV, V_PAIRS,
                         KV_FORMAT)
    else:
        ks = 0.0
        vs = 0.0
    return ks, vs


@triton.jit
def tile_kv_loop(acc, m_i, l_i, q, Q, K, V, KS, VS, MASK, SLOPES, b, g, qi, head, valid, blk_lo,
                 blk_hi,
                 stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh, stride_mb, stride_mm,
                 q_len, kv_len, qk_scale, softcap_scale, window, first_token,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
                 KV_FORMAT: tl.constexpr = 0, HEAD_SCALES: tl.constexpr = 0,
                 V_PAIRS: tl.constexpr = False):
    """Online softmax over KV blocks [blk_lo, blk_hi) of one tile (scores in log2 units):
    first the blocks that need no mask, then the ones at the causal edge or past Lk.
    fp8 K/V (KV_FORMAT 1): KS, VS hold f32 scales, one per KV head where HEAD_SCALES says
    (bit 0: K's, bit 1: V's); K's is folded into the score scale, V's multiplies the
    accumulator (a partial's too: the merge is linear in it). q8_0 (2), q4_0 (3): KS, VS are
    the block scales (`kernels/quant.py`). V_PAIRS: V read as 16-bit pairs (`_kv_step`), the
    accumulator split for the loop and joined back into column order after it."""
    # sequence and head offsets in 64 bits (a cache can pass 2**31 elements); a key's offset
    # inside one sequence's rows stays 32-bit (the API refuses Lk x row stride >= 2**31)
    kbase = tl.cast(b, tl.int64) * stride_kb + tl.cast(g, tl.int64) * stride_kh
    vbase = tl.cast(b, tl.int64) * stride_vb + tl.cast(g, tl.int64) * stride_vh
    qpos = kv_len - q_len + qi
    if KV_FORMAT == 1:
        qk_scale, softcap_scale = fp8_score_scales(KS, g, qk_scale, softcap_scale, SOFTCAP,
                                                   HEAD_SCALES)
    slope = alibi_slope(SLOPES, head, valid, HAS_ALIBI)
    mid = unmasked_end(blk_lo, blk_hi, q_len, kv_len, first_token, BLOCK_N, CAUSAL,
                       HAS_WINDOW or DK_CHUNKS > 1)
    acc, acc2 = split_pairs(acc, V_PAIRS, KV_FORMAT)
    # q8_0, q4_0: a block's scales are loaded one block ahead (`quant.tile_scales`; PERF.md,
    # "Block scales loaded one KV block ahead")
    PREFETCH: tl.constexpr = KV_FORMAT >= 2 and DK_CHUNKS == 1
    for masked in tl.static_range(2):  # blocks blk_lo..mid unmasked, mid..blk_hi masked
        lo = blk_lo + (mid - blk_lo) * masked
        ksc, vsc = _block_scales(KS, VS, kbase, vbase, lo, kv_len, stride_kn, stride_vn,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, V_PAIRS,
                                 KV_FORMAT, PREFETCH)
        for blk in range(lo, mid + (blk_hi - mid) * masked):
            if PREFETCH:
                nks, nvs = _block_scales(KS, VS, kbase, vbase, blk + 1, kv_len, stride_kn,
                                         stride_vn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK,
                                         BLOCK_DV, V_PAIRS, KV_FORMAT, PREFETCH)
            acc, acc2, m_i, l_i = _kv_step(
                acc, acc2, m_i, l_i, q, Q, K, V, KS, VS, MASK, slope, b, qi, head, valid, qpos,
                kbase, vbase, blk, ksc, vsc, stride_qb, stride_qm, stride_qh, stride_kn,
                stride_vn, stride_mb, stride_mm, kv_len, qk_scale, softcap_scale, window,
                HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, DK_CHUNKS, BLOCK_DV, CAUSAL, HAS_WINDOW,
                HAS_MASK, HAS_ALIBI, SOFTCAP, INTERPRET, masked == 1, KV_FORMAT, V_PAIRS,
                PREFETCH)
            if PREFETCH:
                ksc, vsc = nks, nvs
    acc = join_pairs(acc, acc2, V_PAIRS, KV_FORMAT)
    if KV_FORMAT == 1:
        acc = acc * fp8_v_scale(VS, g, HEAD_SCALES)
    return acc, m_i, l_i
