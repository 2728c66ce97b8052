"""A program's share of a ragged work list as one KV loop across its tiles (docs/serving.md,
"One loop across tiles").

The per-tile loop (`ragged.py`) starts each tile with a chain of dependent loads (the
tile's row block, its sequence's lengths and starts, q, the first page id) and Triton's
pipeline fills again after it, so the program's K/V stream stops for several memory
latencies at every tile it crosses. Here one loop runs over the share's items: each
iteration finds its tile from the last (a tile holds at least one item, so an item is in
the current tile or the next), and Triton's pipeliner issues the K/V loads of the next
tiles' first blocks while the current tile's last blocks are computed. A tile's output is
written on its last item (whole tiles normalised, cut tiles as pieces); the fused merge of
the share's cut tiles (at most its first and its last) runs after the loop.

Taken by 16-bit K/V without ALiBi, the stream-K build (no dynamic tail, no per-tile split);
every block is masked (its keys' pages, the sequence's length, causal and window edges).
"""
import triton
import triton.language as tl

from skattn.kernels.kv_loop import load_q
from skattn.kernels.ragged_kv import _ragged_step
from skattn.kernels.tile import LN2, LOG2E, tile_rows
from skattn.kernels.worklist import wl_offsets


@triton.jit
def _ld(ptr, ASM: tl.constexpr):
    """A 32-bit load the pipeliner does not see as one (inline PTX): it then leaves the K/V
    loads that depend on it in the first stage, three blocks ahead, where a chain of loads
    would take a stage each."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [ptr],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(ptr)


@triton.jit
def tile_meta(WL, rb, h, batch, rb_max, ntiles_z, ratio, HEADS_PER_TILE: tl.constexpr,
              TOKENS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr = False):
    """Tile (rb, h)'s sequence b, first KV block, lengths, q and key starts, KV head g,
    head group z, token block and its rows (qi, head, valid)."""
    o_lq, o_lk, o_qs, o_ks, _, _, _, o_seq, o_qblock, o_first = wl_offsets(batch, rb_max)
    b = _ld(WL + o_seq + rb, ASM)
    qblock = _ld(WL + o_qblock + rb, ASM)
    kv_first = _ld(WL + o_first + rb, ASM)
    lq = _ld(WL + o_lq + b, ASM)
    g = h // ntiles_z
    z = h - g * ntiles_z
    qi, head, valid = tile_rows(g, z, qblock, lq, ratio, HEADS_PER_TILE, TOKENS_PER_TILE, BLOCK_M)
    return (b, kv_first, lq, _ld(WL + o_lk + b, ASM), _ld(WL + o_qs + b, ASM),
            _ld(WL + o_ks + b, ASM), g, z, qblock, qi, head, valid)


@triton.jit
def _write(acc, m_i, l_i, qi, head, valid, whole, piece, slot, O, stride_om, stride_oh, LSE,
           stride_lh, SINKS, WS_O, WS_M, WS_L, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr):
    """`finalize_store` where `whole`, `store_partial` to `slot` where `piece` (scalars)."""
    if HAS_SINKS:
        sink = tl.load(SINKS + head, mask=valid & whole, other=float("-inf")).to(tl.float32) * LOG2E
        m_f = tl.maximum(m_i, sink)
        m_safe = tl.where(m_f == float("-inf"), 0.0, m_f)
        alpha = tl.exp2(m_i - m_safe)
        acc_f = acc * alpha[:, None]
        l_f = l_i * alpha + tl.exp2(sink - m_safe)
    else:
        m_f, acc_f, l_f = m_i, acc, l_i
    has = l_f != 0.0  # a NaN row stays NaN, in out and lse
    inv = tl.where(has, 1.0 / tl.where(has, l_f, 1.0), 0.0)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv[None, :] < HEAD_DIM_V
    o_ptrs = O + qi[:, None] * stride_om + head[:, None] * stride_oh + dv[None, :]
    tl.store(o_ptrs, (acc_f * inv[:, None]).to(O.dtype.element_ty),
             mask=(valid & whole)[:, None] & dv_ok)
    if RETURN_LSE:
        lse = tl.where(has, (m_f + tl.log2(tl.where(has, l_f, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + head * stride_lh + qi, lse, mask=valid & whole)
    r = tl.arange(0, BLOCK_M)
    base = slot * BLOCK_M + r
    tl.store(WS_O + base[:, None] * HEAD_DIM_V + dv[None, :], acc, mask=dv_ok & piece)
    tl.store(WS_M + base, m_i, mask=(r >= 0) & piece)
    tl.store(WS_L + base, l_i, mask=(r >= 0) & piece)


@triton.jit
def flat_share(p, start, end, rb, h, WL, batch, rb_max, ratio, ntiles_z, hz,
               Q, stride_qb, stride_qm, stride_qh, K, stride_kb, stride_kn, stride_kh,
               V, stride_vb, stride_vn, stride_vh, O, stride_ob, stride_om, stride_oh,
               LSE, stride_lb, stride_lh, BT, stride_bt, SINKS, WS_O, WS_M, WS_L,
               num_pages, qk_scale, softcap_scale, window,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
               HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
               SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr,
               PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, TILES: tl.constexpr = 16):
    """Items [start, end) of program p, starting in tile (rb, h): online softmax per tile,
    each tile written on its last item here, whole (normalised into O) or as a piece in slot
    2p (the share's first tile) or 2p + 1. TILES tiles at a time: their ends are found before
    the loop, so that no iteration waits on a load to know its tile (a load in that
    recurrence stops Triton's pipeliner). Returns the tile of the share's last item."""
    o_start = wl_offsets(batch, rb_max)[5]
    o_count = o_start + rb_max + 1
    work = tl.load(WL + 0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q = tl.zeros([BLOCK_M, BLOCK_DK], dtype=K.dtype.element_ty)
    t = rb * hz + h
    last_tile = t
    it = start
    while it < end:
        # -- the ends of tiles t .. t + TILES - 1 (items past the last row block: W)
        tj = t + tl.arange(0, TILES)
        rbj = tj // hz
        inside = rbj < rb_max
        ends = (tl.load(WL + o_start + rbj, mask=inside, other=work)
                + (tj - rbj * hz + 1) * tl.load(WL + o_count + rbj, mask=inside, other=0))
        stop = tl.minimum(end, tl.max(ends, 0))
        for i in range(it, stop):
            k = tl.sum((ends <= i).to(tl.int32), 0)
            rb = (t + k) // hz
            h = t + k - rb * hz
            first = _ld(WL + o_start + rb, not INTERPRET) + h * _ld(WL + o_count + rb, not INTERPRET)
            c = _ld(WL + o_count + rb, not INTERPRET)
            b, kv_first, lq, lk, qs, ks, g, z, qblock, qi, head, valid = tile_meta(
                WL, rb, h, batch, rb_max, ntiles_z, ratio, HEADS_PER_TILE, TOKENS_PER_TILE,
                BLOCK_M, not INTERPRET)
            b64 = tl.cast(b, tl.int64)
            Qb = Q + b64 * stride_qb + tl.cast(qs, tl.int64) * stride_qm
            # -- a tile starts (or the share does, inside one): its q, an empty state
            new = (i == first) | (i == start)
            if new:  # (a branch: Triton's pipeliner leaves this load synchronous)
                q = load_q(Qb, 0, qi, head, valid, 0, stride_qm, stride_qh, 0, HEAD_DIM,
                           BLOCK_DK, K.dtype.element_ty)
            # (m = -inf makes the step's rescaling factor 0: acc and l start over)
            m_i = tl.where(new, float("-inf"), m_i)
            if PAGED:
                kofs = tl.cast(g, tl.int64) * stride_kh
                vofs = tl.cast(g, tl.int64) * stride_vh
            else:
                kofs = (b64 * stride_kb + tl.cast(ks, tl.int64) * stride_kn
                        + tl.cast(g, tl.int64) * stride_kh)
                vofs = (b64 * stride_vb + tl.cast(ks, tl.int64) * stride_vn
                        + tl.cast(g, tl.int64) * stride_vh)
            acc, _, m_i, l_i = _ragged_step(
                acc, 0.0, m_i, l_i, q, Qb, K + kofs, V + vofs, 0, 0, BT + b64 * stride_bt, 0.0,
                qi, head, valid, lk - lq + qi, kv_first + i - first, 0, 0, 0, 0, 0.0, 0.0,
                stride_qm, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn, lk,
                num_pages, qk_scale, softcap_scale, window, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                BLOCK_DK, 1, BLOCK_DV, CAUSAL, HAS_WINDOW, False, SOFTCAP, INTERPRET, PAGED,
                PAGE_SIZE, True, 0, False, False)
            # -- the tile's last item, or the share's: write what this program holds of it
            # (stores under a predicate: a branch here stops Triton's pipeliner)
            done = i == first + c - 1
            whole = done & (first >= start)
            piece = ((i == end - 1) | done) & ~whole
            if whole | piece:
                _write(acc, m_i, l_i, qi, head, valid, whole, piece,
                       p * 2 + (first > start).to(tl.int32),
                       O + b64 * stride_ob + tl.cast(qs, tl.int64) * stride_om, stride_om,
                       stride_oh, LSE + b64 * stride_lb + qs, stride_lh, SINKS, WS_O, WS_M,
                       WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV, HAS_SINKS, RETURN_LSE)
        last_tile = t + tl.sum((ends <= stop - 1).to(tl.int32), 0)
        it = stop
        t += TILES
    rb_last = last_tile // hz
    return rb_last, last_tile - rb_last * hz
