"""Loads of quantized K/V blocks, dequantized in registers (skattn.quant describes the forms)."""
import triton
import triton.language as tl

QK8_0 = tl.constexpr(32)  # values per q8_0 block
QK4_0 = tl.constexpr(32)  # values per q4_0 block (16 bytes of nibbles)


@triton.jit
def load_q8_0(X, XS, base, offs_n, kv_len, stride_n, d0,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              DTYPE: tl.constexpr):
    """Rows `offs_n`, columns d0 .. d0 + BLOCK_D - 1 of a q8_0 cache as [BLOCK_N, BLOCK_D] DTYPE:
    int8 values times their block's f16 scale. The scales are laid out like the values with
    every stride divided by 32 (`skattn.quant.Q8_0`), so `base // 32` and `stride_n // 32`
    address them. MASKED: mask rows past kv_len and columns past HEAD_DIM (read as 0)."""
    return q8_0_rows(X + base, XS + base // QK8_0, offs_n * stride_n,
                     offs_n * (stride_n // QK8_0), offs_n < kv_len, d0, HEAD_DIM, BLOCK_D,
                     MASKED, DTYPE)


@triton.jit
def q8_0_rows(X, XS, rows, srows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, DTYPE: tl.constexpr):
    """Columns d0 .. d0 + BLOCK_D - 1 of the q8_0 rows at offsets `rows` from X (their scales
    at `srows` from XS) as [len(rows), BLOCK_D] DTYPE. MASKED: rows where `ok` is false and
    columns past HEAD_DIM read as 0."""
    NB: tl.constexpr = BLOCK_D // QK8_0
    d = d0 + tl.arange(0, BLOCK_D)
    blk = d0 // QK8_0 + tl.arange(0, NB)
    ptrs = X + rows[:, None] + d[None, :]
    sptrs = XS + srows[:, None] + blk[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0)
        s = tl.load(sptrs, mask=ok[:, None] & (blk[None, :] < HEAD_DIM // QK8_0), other=0.0)
    else:
        x = tl.load(ptrs)
        s = tl.load(sptrs)
    # int8 x f16 is exact in f32; one rounding to DTYPE (for f16 the same as an f16 multiply)
    x = tl.reshape(x.to(tl.float32), [rows.shape[0], NB, QK8_0]) * s.to(tl.float32)[:, :, None]
    return tl.reshape(x, [rows.shape[0], BLOCK_D]).to(DTYPE)


@triton.jit
def load_q4_0(X, XS, base, offs_n, kv_len, stride_n, d0,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              DTYPE: tl.constexpr):
    """Rows `offs_n`, columns d0 .. d0 + BLOCK_D - 1 of a q4_0 cache as [BLOCK_N, BLOCK_D] DTYPE.

    X holds the packed bytes (`skattn.quant.Q4_0`): `base`, `stride_n` count bytes, and byte
    16 c + j of a row holds column 32 c + j in its low nibble, 32 c + j + 16 in its high one;
    a column's value is (nibble - 8) times its block's f16 scale. The scales are laid out like
    the bytes with every stride divided by 16, so `base // 16` and `stride_n // 16` address
    them. The [BLOCK_N, BLOCK_D / 2] bytes are loaded once; their low and high nibbles are
    joined back into column order per block. MASKED: mask rows past kv_len and columns past
    HEAD_DIM (read as 0; HEAD_DIM is a multiple of 32, so whole blocks are masked)."""
    HALF: tl.constexpr = QK4_0 // 2
    return q4_0_rows(X + base, XS + base // HALF, offs_n * stride_n, offs_n * (stride_n // HALF),
                     offs_n < kv_len, d0, HEAD_DIM, BLOCK_D, MASKED, DTYPE)


@triton.jit
def q4_0_rows(X, XS, rows, srows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, DTYPE: tl.constexpr):
    """Columns d0 .. d0 + BLOCK_D - 1 of the q4_0 rows at byte offsets `rows` from X (their
    scales at `srows` from XS) as [len(rows), BLOCK_D] DTYPE (`load_q4_0`'s layout). MASKED:
    rows where `ok` is false and columns past HEAD_DIM read as 0."""
    NB: tl.constexpr = BLOCK_D // QK4_0
    HALF: tl.constexpr = QK4_0 // 2
    BLOCK_B: tl.constexpr = BLOCK_D // 2
    byte = d0 // 2 + tl.arange(0, BLOCK_B)
    blk = d0 // QK4_0 + tl.arange(0, NB)
    ptrs = X + rows[:, None] + byte[None, :]
    sptrs = XS + srows[:, None] + blk[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None] & (byte[None, :] < HEAD_DIM // 2), other=0x88)  # both nibbles 0
        s = tl.load(sptrs, mask=ok[:, None] & (blk[None, :] < HEAD_DIM // QK4_0), other=0.0)
    else:
        x = tl.load(ptrs)
        s = tl.load(sptrs)
    x = tl.reshape(x.to(tl.int32), [rows.shape[0], NB, HALF])
    lo = (x & 15) - 8
    hi = (x >> 4) - 8
    # [N, NB, 16, 2] -> [N, NB, 2, 16]: the low nibbles of a block, then its high nibbles
    x = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), [rows.shape[0], NB, QK4_0])
    # small integers x f16 are exact in f32; one rounding to DTYPE
    x = x.to(tl.float32) * s.to(tl.float32)[:, :, None]
    return tl.reshape(x, [rows.shape[0], BLOCK_D]).to(DTYPE)


@triton.jit
def load_blocks(X, XS, base, offs_n, kv_len, stride_n, d0,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                DTYPE: tl.constexpr, KV_FORMAT: tl.constexpr):
    """A block-quantized K or V tile: q8_0 (KV_FORMAT 2) or q4_0 (3)."""
    if KV_FORMAT == 3:
        return load_q4_0(X, XS, base, offs_n, kv_len, stride_n, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE)
    else:
        return load_q8_0(X, XS, base, offs_n, kv_len, stride_n, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE)


@triton.jit
def block_rows(X, XS, rows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, DTYPE: tl.constexpr, KV_FORMAT: tl.constexpr):
    """`load_blocks` for rows at offsets `rows` (int64) from X, such as a paged cache's
    gathered rows: a block form's scales are laid out like its values with every stride
    divided by the values a scale covers (32 int8 values, 16 bytes of nibbles), so a row's
    scales sit at its offset divided by that, from XS."""
    if KV_FORMAT == 3:
        return q4_0_rows(X, XS, rows, rows // (QK4_0 // 2), ok, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE)
    else:
        return q8_0_rows(X, XS, rows, rows // QK8_0, ok, d0, HEAD_DIM, BLOCK_D, MASKED, DTYPE)


@triton.jit
def fp8_score_scales(KS, g, qk_scale, softcap_scale, SOFTCAP: tl.constexpr,
                     HEAD_SCALES: tl.constexpr):
    """fp8 K: K's scale (KV head g's where bit 0 of HEAD_SCALES says so, else the tensor's)
    folded into the score scale, or into softcap's inner scale when there is one."""
    ks = tl.load(KS + g * (HEAD_SCALES % 2))
    if SOFTCAP:
        softcap_scale = softcap_scale * ks
    else:
        qk_scale = qk_scale * ks
    return qk_scale, softcap_scale


@triton.jit
def fp8_v_scale(VS, g, HEAD_SCALES: tl.constexpr):
    """fp8 V: V's scale (KV head g's where bit 1 of HEAD_SCALES says so), which multiplies a
    tile's accumulator (a partial's too: the merge is linear in it)."""
    return tl.load(VS + g * (HEAD_SCALES // 2))
