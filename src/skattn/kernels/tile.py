"""Tile helpers shared by the main kernel and the fixups: decode, rows, merge, finalise."""
import triton
import triton.language as tl

from skattn.kernels.fastdiv import fastdiv

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _div(n, d, mp, shift, USE_FASTDIV: tl.constexpr):
    if USE_FASTDIV:
        q = fastdiv(n, mp, shift)
    else:
        q = n // d
    return q


@triton.jit
def decode_group(group, ntiles_z, kv_heads, div_z_mul, div_z_shift, div_h_mul, div_h_shift,
                 USE_FASTDIV: tl.constexpr):
    """group = (b * kv_heads + g) * ntiles_z + z -> (b, g, z); tile = group * ntiles_x + qblock."""
    bg = _div(group, ntiles_z, div_z_mul, div_z_shift, USE_FASTDIV)
    z = group - bg * ntiles_z
    b = _div(bg, kv_heads, div_h_mul, div_h_shift, USE_FASTDIV)
    g = bg - b * kv_heads
    return b, g, z


@triton.jit
def program_start(p, work, programs):
    """First work item of program p: floor(p * W / N), in 64 bits (p * W can pass 2**31)."""
    return (tl.cast(p, tl.int64) * work // programs).to(tl.int32)


@triton.jit
def longest_first(p, programs, ntiles_x):
    """The tile of program p in a plan of one whole tile a program, longest tiles first: token
    block ntiles_x - 1 of every group, then ntiles_x - 2, ... (causal tiles grow with their
    token block). The GPU starts programs in about index order, so the shortest tiles end
    the call. `planner.longest_first_order` is the same map on the host."""
    groups = programs // ntiles_x
    step = p // groups
    return (p - step * groups) * ntiles_x + ntiles_x - 1 - step


@triton.jit
def program_range(p, work, programs, split, group_work, ntiles_x, QBLOCK_OFF, div_x_mul,
                  div_x_shift, USE_FASTDIV: tl.constexpr, ONE_TOKEN_BLOCK: tl.constexpr,
                  PER_TILE_RANGES: tl.constexpr):
    """Program p's [start, end) of the work list: an equal share of W among N programs, or
    (PER_TILE_RANGES) piece p % split of tile p // split."""
    if PER_TILE_RANGES:
        tile0 = p // split
        i = p - tile0 * split
        group0 = _div(tile0, ntiles_x, div_x_mul, div_x_shift, USE_FASTDIV)
        first0, stop0 = tile_items(group0, tile0 - group0 * ntiles_x, group_work, QBLOCK_OFF,
                                   ONE_TOKEN_BLOCK)
        n0 = stop0 - first0
        start = first0 + i * n0 // split
        end = first0 + (i + 1) * n0 // split
    else:
        start = program_start(p, work, programs)
        end = program_start(p + 1, work, programs)
    return start, end


@triton.jit
def program_of(item, work, programs):
    """The program whose range holds `item`: the largest p with floor(p * W / N) <= item."""
    return (((tl.cast(item, tl.int64) + 1) * programs - 1) // work).to(tl.int32)


@triton.jit
def locate(item, group_work, ntiles_x, QBLOCK_OFF, div_w_mul, div_w_shift, USE_FASTDIV: tl.constexpr,
           ONE_TOKEN_BLOCK: tl.constexpr):
    """The tile holding `item`: (group, token block qblock, its first item, its stop item).
    ONE_TOKEN_BLOCK (decode: ntiles_x == 1): a group is one tile; no table is read."""
    group = _div(item, group_work, div_w_mul, div_w_shift, USE_FASTDIV)
    if ONE_TOKEN_BLOCK:
        qblock = 0
    else:
        r = item - group * group_work
        qblock = 0
        j = 1
        while j < ntiles_x:  # a while loop: the interpreter cannot range() over an argument
            qblock += (tl.load(QBLOCK_OFF + j) <= r).to(tl.int32)
            j += 1
    first, stop = tile_items(group, qblock, group_work, QBLOCK_OFF, ONE_TOKEN_BLOCK)
    return group, qblock, first, stop


@triton.jit
def tile_items(group, qblock, group_work, QBLOCK_OFF, ONE_TOKEN_BLOCK: tl.constexpr):
    """Work items [first, stop) of the tile (group, token block qblock)."""
    base = group * group_work
    if ONE_TOKEN_BLOCK:
        return base, base + group_work
    return base + tl.load(QBLOCK_OFF + qblock), base + tl.load(QBLOCK_OFF + qblock + 1)


@triton.jit
def first_kv_block(KV_FIRST, qblock, kv_first0, ONE_TOKEN_BLOCK: tl.constexpr):
    """The first KV block token block `qblock` sees (kv_first0 when there is one token block)."""
    if ONE_TOKEN_BLOCK:
        return kv_first0
    return tl.load(KV_FIRST + qblock)


@triton.jit
def tile_rows(g, z, qblock, q_len, ratio, HEADS_PER_TILE: tl.constexpr,
              TOKENS_PER_TILE: tl.constexpr, ROWS: tl.constexpr, m0=0):
    """Rows m0 .. m0+ROWS-1 of a tile: token j = r // HEADS_PER_TILE, head r % HEADS_PER_TILE."""
    r = m0 + tl.arange(0, ROWS)
    tok = r // HEADS_PER_TILE
    hz = z * HEADS_PER_TILE + r % HEADS_PER_TILE
    qi = qblock * TOKENS_PER_TILE + tok
    valid = (tok < TOKENS_PER_TILE) & (qi < q_len) & (hz < ratio)
    head = g * ratio + hz
    return qi, head, valid


@triton.jit
def pair_offset(head, ratio, PAIR_D: tl.constexpr):
    """Where query head `head`'s values sit in a row of two KV heads read as one (ratio: the
    query heads of the pair): PAIR_D for the pair's second KV head, else 0."""
    return ((head % ratio) * 2 // ratio) * PAIR_D


@triton.jit
def finalize_store(acc, m_i, l_i, b, qi, head, valid,
                   O, stride_ob, stride_om, stride_oh,
                   LSE, stride_lb, stride_lh, SINKS,
                   HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, dv0=0,
                   PAIR_D: tl.constexpr = 0, ratio=1):
    """Add the sink, normalise, write out (and lse in natural log); empty rows give 0, -inf.
    PAIR_D: two KV heads read as one (`load_q`): a row writes the PAIR_D columns of its own
    KV head's half."""
    if HAS_SINKS:
        sink = tl.load(SINKS + head, mask=valid, other=float("-inf")).to(tl.float32) * LOG2E
        m_f = tl.maximum(m_i, sink)
        m_safe = tl.where(m_f == float("-inf"), 0.0, m_f)
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_safe)
        m_i = m_f
    has = l_i != 0.0  # a NaN row stays NaN, in out and lse
    inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    dv = dv0 + tl.arange(0, BLOCK_DV)
    base = O + tl.cast(b, tl.int64) * stride_ob + qi[:, None] * stride_om + head[:, None] * stride_oh
    if PAIR_D:
        col = dv[None, :] - pair_offset(head, ratio, PAIR_D)[:, None]
        tl.store(base + col, out.to(O.dtype.element_ty),
                 mask=valid[:, None] & (col >= 0) & (col < PAIR_D))
    else:
        tl.store(base + dv[None, :], out.to(O.dtype.element_ty),
                 mask=valid[:, None] & (dv[None, :] < HEAD_DIM_V))
    if RETURN_LSE and dv0 == 0:
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + tl.cast(b, tl.int64) * stride_lb + head * stride_lh + qi, lse, mask=valid)


@triton.jit
def store_partial(acc, m_i, l_i, slot_index, WS_O, WS_M, WS_L,
                  HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    r = tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    base = slot_index * BLOCK_M + r
    tl.store(WS_O + base[:, None] * HEAD_DIM_V + dv[None, :], acc, mask=dv[None, :] < HEAD_DIM_V)
    tl.store(WS_M + base, m_i)
    tl.store(WS_L + base, l_i)


@triton.jit
def merge_pieces(p_lo, p_hi, first, work, programs, valid, WS_O, WS_M, WS_L, m0, dv0,
                 HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_DV: tl.constexpr, PIECES: tl.constexpr, STREAM_K: tl.constexpr,
                 LOADS_FIRST: tl.constexpr = False, lead=None):
    """Merge the partials of programs p_lo..p_hi for the tile starting at item `first`:
    rows m0 .. m0+ROWS-1 of the tile's BLOCK_M, columns dv0 .. dv0+BLOCK_DV-1.

    A step merges PIECES partials, unrolled: their loads are independent, so a step costs
    about one memory latency, and every sum is elementwise in registers, with no shuffles or
    shared memory (separate fixup of llama-8b n=1 L=8192: 3.4 us, 4.8 with the pieces as one
    block reduced over its first axis; PERF.md, "The merge step"). Rows that are not `valid`
    are not read. Reads bypass L1, which is not coherent with other SMs' writes.
    LOADS_FIRST (the separate fixups): all loads of a step are waited for together, one
    memory latency a step instead of two (fixup 2.1-4.1 -> 1.3-2.4 us a call). The fused
    merge keeps two passes a step: waiting for every piece at once would hold all their
    values on top of the main kernel's registers. `lead` (1 where p_lo started before the
    tile) is computed from W and N unless given.
    """
    r = m0 + tl.arange(0, ROWS)
    dv = dv0 + tl.arange(0, BLOCK_DV)
    dv_ok = dv[None, :] < HEAD_DIM_V
    # program q keeps the tile in slot 0, except p_lo if it started before the tile: it is
    # then p_lo's last tile, in slot 1 (STREAM_K=False: per-tile ranges, always slot 0)
    if not STREAM_K:
        lead = 0
    elif lead is None:
        lead = (program_start(p_lo, work, programs) < first).to(tl.int32)
    m_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for q0 in tl.range(p_lo, p_hi + 1, PIECES, num_stages=1):  # no cp.async pipelining
        if LOADS_FIRST:
            acc, m_max, l_i = _merge_step_loads_first(acc, m_max, l_i, q0, p_lo, p_hi, lead, r,
                                                      dv, dv_ok, valid, WS_O, WS_M, WS_L,
                                                      HEAD_DIM_V, BLOCK_M, PIECES)
        else:
            m_new = m_max
            for j in tl.static_range(PIECES):
                row = _slot_row(q0 + j, p_lo, lead, r, BLOCK_M)
                ok = valid & (q0 + j <= p_hi)
                m_new = tl.maximum(m_new, tl.load(WS_M + row, mask=ok, other=float("-inf"),
                                                  cache_modifier=".cg"))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_max - m_safe)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            for j in tl.static_range(PIECES):
                row = _slot_row(q0 + j, p_lo, lead, r, BLOCK_M)
                ok = valid & (q0 + j <= p_hi)
                w = tl.exp2(tl.load(WS_M + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
                            - m_safe)  # 0 for pieces past p_hi
                o = tl.load(WS_O + row[:, None] * HEAD_DIM_V + dv[None, :], mask=ok[:, None] & dv_ok,
                            other=0.0, cache_modifier=".cg")
                acc += o * w[:, None]
                l_i += tl.load(WS_L + row, mask=ok, other=0.0, cache_modifier=".cg") * w
            m_max = m_new
    return acc, m_max, l_i


@triton.jit
def _merge_step_loads_first(acc, m_max, l_i, q0, p_lo, p_hi, lead, r, dv, dv_ok, valid,
                            WS_O, WS_M, WS_L, HEAD_DIM_V: tl.constexpr,
                            BLOCK_M: tl.constexpr, PIECES: tl.constexpr):
    """One merge step whose loads (m, l, O of PIECES partials) are all waited for together:
    one memory latency a step, not two."""
    ms = ()
    ls = ()
    os = ()
    for j in tl.static_range(PIECES):
        row = _slot_row(q0 + j, p_lo, lead, r, BLOCK_M)
        ok = valid & (q0 + j <= p_hi)
        ms = ms + (tl.load(WS_M + row, mask=ok, other=float("-inf"), cache_modifier=".cg"),)
        ls = ls + (tl.load(WS_L + row, mask=ok, other=0.0, cache_modifier=".cg"),)
        os = os + (tl.load(WS_O + row[:, None] * HEAD_DIM_V + dv[None, :],
                           mask=ok[:, None] & dv_ok, other=0.0, cache_modifier=".cg"),)
    # the maxima are taken over [ROWS, BLOCK_DV] copies that depend on the O values, so
    # ptxas issues the O loads with the others instead of sinking them below the maxima
    # (two latencies a step); rows are reduced once at the end
    m2 = m_max[:, None] + tl.zeros_like(acc)
    m_new = m2
    for j in tl.static_range(PIECES):
        m_new = tl.maximum(m_new, ms[j][:, None] + (os[j] + ls[j][:, None]) * 0.0)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m2 - m_safe)
    acc = acc * alpha
    l2 = l_i[:, None] * alpha
    for j in tl.static_range(PIECES):
        w = tl.exp2(ms[j][:, None] - m_safe)  # 0 for pieces past p_hi
        acc += os[j] * w
        l2 += ls[j][:, None] * w
    m_new = tl.max(m_new, 1)
    l_i = tl.max(l2, 1)  # every column holds the same sum
    return acc, m_new, l_i


@triton.jit
def _slot_row(q, p_lo, lead, r, BLOCK_M: tl.constexpr):
    return (2 * q + lead * (q == p_lo).to(tl.int32)) * BLOCK_M + r
