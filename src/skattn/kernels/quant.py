"""Loads of quantized K/V blocks, dequantized in registers (skattn.quant describes the forms)."""
import triton
import triton.language as tl

QK8_0 = tl.constexpr(32)  # values per q8_0 block


@triton.jit
def load_q8_0(X, XS, base, offs_n, kv_len, stride_n, d0,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              DTYPE: tl.constexpr):
    """Rows `offs_n`, columns d0 .. d0 + BLOCK_D - 1 of a q8_0 cache as [BLOCK_N, BLOCK_D] DTYPE:
    int8 values times their block's f16 scale. The scales are laid out like the values with
    every stride divided by 32 (`skattn.quant.Q8_0`), so `base // 32` and `stride_n // 32`
    address them. MASKED: mask rows past kv_len and columns past HEAD_DIM (read as 0)."""
    NB: tl.constexpr = BLOCK_D // QK8_0
    d = d0 + tl.arange(0, BLOCK_D)
    blk = d0 // QK8_0 + tl.arange(0, NB)
    ptrs = X + base + offs_n[:, None] * stride_n + d[None, :]
    sptrs = XS + base // QK8_0 + offs_n[:, None] * (stride_n // QK8_0) + blk[None, :]
    if MASKED:
        rows = offs_n[:, None] < kv_len
        x = tl.load(ptrs, mask=rows & (d[None, :] < HEAD_DIM), other=0)
        s = tl.load(sptrs, mask=rows & (blk[None, :] < HEAD_DIM // QK8_0), other=0.0)
    else:
        x = tl.load(ptrs)
        s = tl.load(sptrs)
    # int8 x f16 is exact in f32; one rounding to DTYPE (for f16 the same as an f16 multiply)
    x = tl.reshape(x.to(tl.float32), [offs_n.shape[0], NB, QK8_0]) * s.to(tl.float32)[:, :, None]
    return tl.reshape(x, [offs_n.shape[0], BLOCK_D]).to(DTYPE)
