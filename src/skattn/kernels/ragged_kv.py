"""The KV loop of one tile of a ragged batch: dense, packed or paged K/V (docs/serving.md).

The math is `kv_loop`'s (scores, softcap, ALiBi, causal and window masks, online softmax);
what differs is where key rows live. Dense and packed rows are `row x stride` from the
sequence's base; a paged row is gathered through the block table, one page id per key, so
any page size that is a multiple of 16 works with any BLOCK_N (a block reads the ids of
the few pages it spans as scalars). A page id outside
[0, num_pages) is not read: its keys count as masked.
"""
import triton
import triton.language as tl

from skattn.kernels.kv_loop import _dot, join_pairs, load_q, pv_pairs, split_pairs
from skattn.kernels.quant import (QK4_0, QK8_0, block_rows, block_scales, fp8_rows,
                                  fp8_score_scales, fp8_v_scale)
from skattn.kernels.stamps import tile_stamp
from skattn.kernels.softmax import alibi_slope, scores, softmax_step, unmasked_end, visible


@triton.jit
def _key_rows(BT, blk, kv_len, num_pages, stride_kb, stride_kn, stride_vb, stride_vn,
              PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets of the K and V rows of KV block `blk` and which rows may be read."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    if PAGED:
        # the block's keys lie in at most PAGES pages: one scalar id each (a vector gather of
        # ids would make Triton's pipeliner keep a single K/V buffer: an indirect load)
        if PAGE_SIZE % BLOCK_N == 0:
            PAGES: tl.constexpr = 1
        elif BLOCK_N % PAGE_SIZE == 0:
            PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
        else:
            PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE + 2
        first = (blk * BLOCK_N) // PAGE_SIZE
        if BLOCK_N % PAGE_SIZE == 0 and PAGES > 1:
            # the block starts a page: its ids as a [PAGES] vector, broadcast over each page's
            # rows. Choosing among the ids per key instead (a compare and a select per id and
            # per key, in each layout the keys are used in) took a third of the KV loop of a
            # 128-row tile with pages of 16 (sm_90 build: 1264 -> 864 instructions a block)
            jj = tl.arange(0, PAGES)
            ids = tl.full([PAGES], -1, dtype=tl.int32)
            for j in tl.static_range(PAGES):
                pj = tl.load(BT + first + j, mask=(first + j) * PAGE_SIZE < kv_len, other=-1)
                ids = tl.where(jj == j, pj, ids)
            ids = tl.where((ids >= 0) & (ids < num_pages), ids, -1)
            rows = tl.arange(0, PAGE_SIZE)
            page = tl.reshape(ids[:, None] + (rows * 0)[None, :], [BLOCK_N])
            ok = page >= 0
            page = tl.maximum(page, 0).to(tl.int64)
        else:
            local = offs_n // PAGE_SIZE - first
            page = tl.full([BLOCK_N], -1, dtype=tl.int32)
            for j in tl.static_range(PAGES):
                pj = tl.load(BT + first + j, mask=(first + j) * PAGE_SIZE < kv_len, other=-1)
                page = tl.where(local == j, pj, page)
            ok = (page >= 0) & (page < num_pages)
            page = tl.where(ok, page, 0).to(tl.int64)
        # (page * stride: the strides' divisibility, which Triton specialises on, carries over)
        row = offs_n % PAGE_SIZE
        krow = page * stride_kb + row * stride_kn
        vrow = page * stride_vb + row * stride_vn
    else:
        ok = offs_n >= 0
        krow = offs_n * stride_kn
        vrow = offs_n * stride_vn
    return offs_n, krow, vrow, ok


@triton.jit
def _block_ahead(BT, KS, VS, blk, kv_len, num_pages, stride_kb, stride_kn, stride_vb, stride_vn,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PAGED: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, KV_FORMAT: tl.constexpr, V_PAIRS: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """KV block blk's rows (`_key_rows`) and its K and V block scales (q8_0, q4_0: KV_FORMAT
    2, 3; V's in the pairs' layout with V_PAIRS; keys past kv_len or on a bad page read as 0),
    loaded one block ahead of their use: Triton's pipeliner leaves the page ids' and the
    scales' loads in the loop, where a block would wait for them. Without PREFETCH six unused
    zeros."""
    if PREFETCH:
        offs_n, krow, vrow, ok = _key_rows(BT, blk, kv_len, num_pages, stride_kb, stride_kn,
                                           stride_vb, stride_vn, PAGED, PAGE_SIZE, BLOCK_N)
        # a scale covers 32 values: 32 bytes of q8_0, 16 of q4_0's nibbles
        PER: tl.constexpr = QK8_0 if KV_FORMAT == 2 else QK4_0 // 2
        seen = ok & (offs_n < kv_len)
        ks = block_scales(KS, krow // PER, seen, 0, HEAD_DIM, BLOCK_DK, True)
        vs = block_scales(VS, vrow // PER, seen, 0, HEAD_DIM_V, BLOCK_DV, True, V_PAIRS)
    else:
        offs_n, krow, vrow, ok, ks, vs = 0, 0, 0, 0, 0.0, 0.0
    return offs_n, krow, vrow, ok, ks, vs


@triton.jit
def _ragged_step(acc, acc2, m_i, l_i, q, Qb, Kb, Vb, KS, VS, BT, slope, qi, head, valid, qpos, blk,
                 offs_n, krow, vrow, ok, ksc, vsc,
                 stride_qm, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn,
                 kv_len, num_pages, qk_scale, softcap_scale, window,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, PAGED: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, KV_FORMAT: tl.constexpr,
                 V_PAIRS: tl.constexpr, PREFETCH: tl.constexpr):
    """One KV block. MASKED=False: inside Lk and visible to every row (pages still checked).
    KV_FORMAT 1: fp8 e4m3 K/V, converted to q's dtype on load (exactly; scales in the loop);
    2, 3: q8_0, q4_0 blocks dequantized to q's dtype on load, their scales at KS, VS.
    V_PAIRS (fp8): V read as 16-bit pairs, acc and acc2 its even and odd columns'
    accumulators (`kv_loop._kv_step`); else acc2 is carried unused. PREFETCH: the block's
    rows and scales (offs_n .. vsc) were loaded one block ahead (`_block_ahead`); else they
    are found here."""
    if not PREFETCH:
        offs_n, krow, vrow, ok = _key_rows(BT, blk, kv_len, num_pages, stride_kb, stride_kn,
                                           stride_vb, stride_vn, PAGED, PAGE_SIZE, BLOCK_N)
    KSC = ksc if PREFETCH else None
    VSC = vsc if PREFETCH else None
    if MASKED:
        ok = ok & (offs_n < kv_len)
    ASM: tl.constexpr = not INTERPRET  # quant.py's inline PTX conversions
    # -- scores
    if KV_FORMAT >= 2:
        qk = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(DK_CHUNKS):
            if DK_CHUNKS == 1:
                qc = q
            else:
                qc = load_q(Qb, 0, qi, head, valid, 0, stride_qm, stride_qh, c, HEAD_DIM,
                            BLOCK_DK, q.dtype)
            kc = tl.trans(block_rows(Kb, KS, krow, ok, c * BLOCK_DK, HEAD_DIM, BLOCK_DK,
                                     MASKED or PAGED or HEAD_DIM != BLOCK_DK * DK_CHUNKS,
                                     q.dtype, KV_FORMAT, ASM, False, KSC))
            qk += _dot(qc, kc, INTERPRET)
    elif DK_CHUNKS == 1:
        dk = tl.arange(0, BLOCK_DK)
        kptrs = Kb + krow[None, :] + dk[:, None]
        if MASKED or PAGED:
            kt = tl.load(kptrs, mask=ok[None, :] & (dk[:, None] < HEAD_DIM), other=0.0)
        elif HEAD_DIM == BLOCK_DK:
            kt = tl.load(kptrs)
        else:
            kt = tl.load(kptrs, mask=dk[:, None] < HEAD_DIM, other=0.0)
        if KV_FORMAT == 1:
            kt = kt.to(q.dtype)
        qk = _dot(q, kt, INTERPRET)
    else:
        qk = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(DK_CHUNKS):
            qc = load_q(Qb, 0, qi, head, valid, 0, stride_qm, stride_qh, c, HEAD_DIM, BLOCK_DK,
                        q.dtype)
            dk = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
            kc = tl.load(Kb + krow[None, :] + dk[:, None],
                         mask=ok[None, :] & (dk[:, None] < HEAD_DIM), other=0.0)
            if KV_FORMAT == 1:
                kc = kc.to(q.dtype)
            qk += _dot(qc, kc, INTERPRET)
    s = scores(qk, qk_scale, softcap_scale, slope, qpos, offs_n, SOFTCAP, HAS_ALIBI)
    # -- masks
    if MASKED:
        s = tl.where(visible(ok[None, :], offs_n, qpos, window, CAUSAL, HAS_WINDOW), s,
                     float("-inf"))
    elif PAGED:
        s = tl.where(ok[None, :], s, float("-inf"))
    # -- online softmax
    p, alpha, m_new = softmax_step(s, m_i)
    l_i = l_i * alpha + tl.sum(p, 1)
    dv = tl.arange(0, BLOCK_DV)
    vptrs = Vb + vrow[:, None] + dv[None, :]
    if V_PAIRS:
        acc, acc2 = pv_pairs(acc, acc2, p, alpha, Vb, VS, vrow, ok, HEAD_DIM_V, BLOCK_DV,
                             MASKED or PAGED or HEAD_DIM_V != BLOCK_DV, ASM, INTERPRET,
                             KV_FORMAT, VSC)
    else:
        if KV_FORMAT >= 2:
            vt = block_rows(Vb, VS, vrow, ok, 0, HEAD_DIM_V, BLOCK_DV,
                            MASKED or PAGED or HEAD_DIM_V != BLOCK_DV, q.dtype, KV_FORMAT, ASM,
                            True, VSC)
        elif KV_FORMAT == 1:
            vt = fp8_rows(Vb, vrow, ok, HEAD_DIM_V, BLOCK_DV,
                          MASKED or PAGED or HEAD_DIM_V != BLOCK_DV, ASM)
        elif MASKED or PAGED:
            vt = tl.load(vptrs, mask=ok[:, None] & (dv[None, :] < HEAD_DIM_V), other=0.0)
        elif HEAD_DIM_V == BLOCK_DV:
            vt = tl.load(vptrs)
        else:
            vt = tl.load(vptrs, mask=dv[None, :] < HEAD_DIM_V, other=0.0)
        if KV_FORMAT == 1:
            vt = vt.to(q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, INTERPRET)
    return acc, acc2, m_new, l_i


@triton.jit
def ragged_kv_loop(acc, m_i, l_i, q, Qb, Kb, Vb, BT, SLOPES, KS, VS, g, qi, head, valid, blk_lo,
                   blk_hi,
                   stride_qm, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn,
                   q_len, kv_len, num_pages, qk_scale, softcap_scale, window, first_token,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, PAGED: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, KV_FORMAT: tl.constexpr = 0,
                   HEAD_SCALES: tl.constexpr = 0, V_PAIRS: tl.constexpr = False, TS=None,
                   ts_row=0, ts_k=0, TS_TILES: tl.constexpr = 0):
    """Online softmax over KV blocks [blk_lo, blk_hi) of one tile of sequence lengths
    (q_len, kv_len): first the blocks that need no mask, then the rest (`tile_kv_loop`).
    fp8 K/V (KV_FORMAT 1) as in `tile_kv_loop`: KS, VS hold f32 scales, KV head g's where
    HEAD_SCALES says (bit 0: K's, bit 1: V's); K's is folded into the score scale, V's
    multiplies the accumulator (a partial's too: the merge is linear in it). q8_0, q4_0 (2, 3):
    KS, VS point at the block scales of Kb's and Vb's first element. TS_TILES (a diagnostic,
    kernels/stamps.py): TS[ts_row, ts_k, 3] gets the time the first block is done."""
    qpos = kv_len - q_len + qi
    if KV_FORMAT == 1:
        qk_scale, softcap_scale = fp8_score_scales(KS, g, qk_scale, softcap_scale, SOFTCAP,
                                                   HEAD_SCALES)
    slope = alibi_slope(SLOPES, head, valid, HAS_ALIBI)
    mid = unmasked_end(blk_lo, blk_hi, q_len, kv_len, first_token, BLOCK_N, CAUSAL,
                       HAS_WINDOW or DK_CHUNKS > 1)
    acc, acc2 = split_pairs(acc, V_PAIRS, KV_FORMAT)
    # q8_0, q4_0: a block's rows and scales are loaded one block ahead (`_block_ahead`;
    # PERF.md, "Block scales loaded one KV block ahead")
    PREFETCH: tl.constexpr = KV_FORMAT >= 2 and DK_CHUNKS == 1
    for masked in tl.static_range(2):  # blocks blk_lo..mid unmasked, mid..blk_hi masked
        lo = blk_lo + (mid - blk_lo) * masked
        offs_n, krow, vrow, ok, ksc, vsc = _block_ahead(
            BT, KS, VS, lo, kv_len, num_pages, stride_kb, stride_kn, stride_vb, stride_vn,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, PAGED, PAGE_SIZE, KV_FORMAT,
            V_PAIRS, PREFETCH)
        for blk in range(lo, mid + (blk_hi - mid) * masked):
            if PREFETCH:
                n_offs, n_krow, n_vrow, n_ok, nks, nvs = _block_ahead(
                    BT, KS, VS, blk + 1, kv_len, num_pages, stride_kb, stride_kn, stride_vb,
                    stride_vn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, PAGED,
                    PAGE_SIZE, KV_FORMAT, V_PAIRS, PREFETCH)
            acc, acc2, m_i, l_i = _ragged_step(
                acc, acc2, m_i, l_i, q, Qb, Kb, Vb, KS, VS, BT, slope, qi, head, valid, qpos, blk,
                offs_n, krow, vrow, ok, ksc, vsc,
                stride_qm, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn,
                kv_len, num_pages, qk_scale, softcap_scale, window, HEAD_DIM, HEAD_DIM_V,
                BLOCK_N, BLOCK_DK, DK_CHUNKS, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP,
                INTERPRET, PAGED, PAGE_SIZE, masked == 1, KV_FORMAT, V_PAIRS, PREFETCH)
            if TS_TILES:  # a diagnostic: the first block done (kernels/stamps.py)
                if blk == blk_lo:
                    tile_stamp(TS, ts_row, ts_k, 3, l_i, TS_TILES)
            if PREFETCH:
                offs_n, krow, vrow, ok, ksc, vsc = n_offs, n_krow, n_vrow, n_ok, nks, nvs
    acc = join_pairs(acc, acc2, V_PAIRS, KV_FORMAT)
    if KV_FORMAT == 1:
        acc = acc * fp8_v_scale(VS, g, HEAD_SCALES)
    return acc, m_i, l_i
