"""The separate fixup kernels (llama.cpp semantics): uniform and general."""
import triton
import triton.language as tl

from skattn.kernels.tile import (_div, decode_group, finalize_store, load_partial, merge,
                                 tile_rows)


@triton.jit
def uniform_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L,
    q_len, ratio, kv_heads, ntiles_x, ntiles_z, split,
    fd_x_mp, fd_x_sh, fd_z_mp, fd_z_sh, fd_h_mp, fd_h_sh,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, USE_FASTDIV: tl.constexpr,
):
    """One program per tile: merge its `split` pieces, the last first (llama.cpp's order)."""
    tile = tl.program_id(0)
    group = _div(tile, ntiles_x, fd_x_mp, fd_x_sh, USE_FASTDIV)
    jt = tile - group * ntiles_x
    b, g, z = decode_group(group, ntiles_z, kv_heads, fd_z_mp, fd_z_sh, fd_h_mp, fd_h_sh, USE_FASTDIV)
    qi, head, valid = tile_rows(g, z, jt, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE, BLOCK_M)
    last = tile * split + split - 1
    acc, m_i, l_i = load_partial(last * 2, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    for k in range(1, split):
        o_b, m_b, l_b = load_partial((last - k) * 2, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        acc, m_i, l_i = merge(acc, m_i, l_i, o_b, m_b, l_b)
    finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                   LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS, RETURN_LSE)


@triton.jit
def general_fixup_kernel(
    O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, SINKS,
    WS_O, WS_M, WS_L, JT_OFF,
    q_len, ratio, kv_heads, ntiles_x, ntiles_z, group_work, work, nblocks,
    fd_z_mp, fd_z_sh, fd_h_mp, fd_h_sh, fd_w_mp, fd_w_sh,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_LSE: tl.constexpr, USE_FASTDIV: tl.constexpr,
):
    """Program p0 acts when it finished a tile it did not start: it merges the pieces of
    the programs before it, walking back to the one that started the tile."""
    p0 = tl.program_id(0)
    start = (p0.to(tl.int64) * work // nblocks).to(tl.int32)
    end = ((p0.to(tl.int64) + 1) * work // nblocks).to(tl.int32)
    group = _div(start, group_work, fd_w_mp, fd_w_sh, USE_FASTDIV)
    r = start - group * group_work
    jt = 0
    j = 1
    while j < ntiles_x:  # a while loop: the interpreter cannot range() over an argument
        jt += (tl.load(JT_OFF + j) <= r).to(tl.int32)
        j += 1
    first = group * group_work + tl.load(JT_OFF + jt)
    stop = group * group_work + tl.load(JT_OFF + jt + 1)
    if (start > first) & (end >= stop):
        b, g, z = decode_group(group, ntiles_z, kv_heads, fd_z_mp, fd_z_sh, fd_h_mp, fd_h_sh,
                               USE_FASTDIV)
        qi, head, valid = tile_rows(g, z, jt, q_len, ratio, HEADS_PER_TILE, TOKENS_PER_TILE, BLOCK_M)
        acc, m_i, l_i = load_partial(p0 * 2, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        q = p0 - 1
        q_start = (tl.cast(q, tl.int64) * work // nblocks).to(tl.int32)
        while q_start > first:
            # -- programs inside the tile hold it as their first tile (slot 0)
            o_b, m_b, l_b = load_partial(q * 2, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
            acc, m_i, l_i = merge(acc, m_i, l_i, o_b, m_b, l_b)
            q -= 1
            q_start = (tl.cast(q, tl.int64) * work // nblocks).to(tl.int32)
        # -- the program that started the tile: slot 1 if the tile was its last, not its first
        slot = q * 2 + (q_start < first).to(tl.int32)
        o_b, m_b, l_b = load_partial(slot, WS_O, WS_M, WS_L, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        acc, m_i, l_i = merge(acc, m_i, l_i, o_b, m_b, l_b)
        finalize_store(acc, m_i, l_i, b, qi, head, valid, O, stride_ob, stride_om, stride_oh,
                       LSE, stride_lb, stride_lh, SINKS, HEAD_DIM_V, BLOCK_DV, HAS_SINKS, RETURN_LSE)
