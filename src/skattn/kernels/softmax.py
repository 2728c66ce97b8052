"""Score, mask and online-softmax steps shared by the KV loops (dense, ragged, prompt-chunk)."""
import triton
import triton.language as tl

from skattn.kernels.tile import LOG2E


@triton.jit
def alibi_slope(SLOPES, head, valid, HAS_ALIBI: tl.constexpr):
    """Each row's ALiBi slope in log2 units (0.0 without ALiBi)."""
    if HAS_ALIBI:
        slope = tl.load(SLOPES + head, mask=valid, other=0.0).to(tl.float32) * LOG2E
    else:
        slope = 0.0
    return slope


@triton.jit
def unmasked_end(blk_lo, blk_hi, q_len, kv_len, first_token, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr):
    """`mid`: blocks [blk_lo, mid) lie inside Lk and before the causal edge of every row from
    token `first_token` on, so they need no mask; [mid, blk_hi) do. ALL_MASKED: mid = blk_lo."""
    full_end = kv_len // BLOCK_N
    if CAUSAL:
        full_end = tl.minimum(full_end, (kv_len - q_len + first_token + 1) // BLOCK_N)
    if ALL_MASKED:
        full_end = blk_lo
    return tl.maximum(blk_lo, tl.minimum(blk_hi, full_end))


@triton.jit
def scores(qk, qk_scale, softcap_scale, slope, qpos, offs_n, SOFTCAP: tl.constexpr,
           HAS_ALIBI: tl.constexpr):
    """Scores in log2 units: scaled (softcapped: qk_scale = softcap * log2(e)), ALiBi bias."""
    if SOFTCAP:
        e = tl.exp2(qk * softcap_scale * (2.0 * LOG2E))
        s = qk_scale * (1.0 - 2.0 / (e + 1.0))
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s -= slope[:, None] * tl.abs(qpos[:, None] - offs_n[None, :]).to(tl.float32)
    return s


@triton.jit
def visible(keep, offs_n, qpos, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """`keep` narrowed to the keys each row sees: at or before its position (CAUSAL), and
    less than `window` before it (HAS_WINDOW)."""
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        keep = keep & (offs_n[None, :] > qpos[:, None] - window)
    return keep


@triton.jit
def softmax_step(s, m_i):
    """One block of the online softmax over masked scores `s`: (p, alpha, new m). A row with
    every score -inf so far keeps m = -inf, l = 0 and a zero accumulator (p = alpha = 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, alpha, m_new
