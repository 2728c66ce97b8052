"""FP8 and q8_0 K or V written as 16-bit values in one pass (`Tuning.quant_route` "dequant":
the 16-bit kernels then read them)."""
import triton
import triton.language as tl


@triton.jit
def dequant_kernel(X, XS, O, rows, L, H, sxb, sxl, sxh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, FORMAT: tl.constexpr,
                   HEAD_SCALES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows (b, l, h) of X ([B, L, H, D] at strides sxb, sxl, sxh, last dimension contiguous)
    times their scales into O ([B, L, H, D] contiguous, its dtype): FORMAT 1 FP8 with one f32
    scale (per KV head h where HEAD_SCALES), 2 q8_0 with one f16 scale a 32-value block, laid
    out as X with every stride divided by 32. The product is exact in f32 for q8_0 and
    rounded once to O's dtype (for FP8 once to f32 first)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    ok = (r < rows)[:, None] & (d < D)[None, :]
    h = r % H
    l_ = (r // H) % L
    b = r // (H * L)
    base = (tl.cast(b, tl.int64) * sxb + tl.cast(l_, tl.int64) * sxl
            + tl.cast(h, tl.int64) * sxh)
    x = tl.load(X + base[:, None] + d[None, :], mask=ok).to(tl.float32)
    if FORMAT == 1:
        s = tl.load(XS + h * HEAD_SCALES, mask=r < rows, other=0.0)[:, None]
    else:
        s = tl.load(XS + (base // 32)[:, None] + (d // 32)[None, :], mask=ok,
                    other=0.0).to(tl.float32)
    out = (x * s).to(O.dtype.element_ty)
    tl.store(O + tl.cast(r, tl.int64)[:, None] * D + d[None, :], out, mask=ok)
