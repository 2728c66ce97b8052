"""Writes of new K and V rows into a quantized cache, one launch for both (`skattn.quant_store`).

A decode step appends n tokens to every layer's cache. Done with torch operations, quantizing
K and V and copying them in costs 10-42 small kernels a layer (FP8: a division, a clamp, a
conversion and a copy each; q8_0: the block maxima, scales, rounding and two copies each);
these kernels do the same arithmetic in one launch a layer, bit for bit.

Each program takes one row (sequence b, new token i, KV head h) of K and the same row of V,
reads them in any strides, and writes row `start + i` of the caches, where `start` is read
from device memory (so a CUDA graph of a decode step follows the cache's length); a row
outside [0, L) is not written. K's and V's caches have the same L.
"""
import triton
import triton.language as tl

QK8_0 = tl.constexpr(32)  # values per q8_0 block
FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn


@triton.jit
def _row(pid, n, heads, X, sxb, sxn, sxh, C, scb, scn, sch, START, L, SLOTS: tl.constexpr,
         slots):
    """(new row pointer, cache row pointer, head, whether the row is inside the cache) of
    program `pid`: row (b, i, h) of the new states [B, n, H, D] and row (b, start + i, h) of
    the cache [B, L, H, D]. SLOTS (B = 1): START holds one slot per new token instead, the
    cache's row (slot // L, slot % L) (a paged cache [pages, L, H, D]); a slot outside
    [0, slots) is not written (-1 marks a padding token)."""
    h = pid % heads
    i = (pid // heads) % n
    b = pid // (heads * n)
    x = X + b.to(tl.int64) * sxb + i.to(tl.int64) * sxn + h.to(tl.int64) * sxh
    if SLOTS:
        slot = tl.load(START + i).to(tl.int64)
        inside = (slot >= 0) & (slot < slots)
        c = C + (slot // L) * scb + (slot % L) * scn + h.to(tl.int64) * sch
    else:
        start = tl.load(START).to(tl.int64)
        inside = (start + i >= 0) & (start + i < L)
        c = C + b.to(tl.int64) * scb + (start + i) * scn + h.to(tl.int64) * sch
    return x, c, h, inside


@triton.jit
def _e4m3_bits(y):
    """The e4m3 byte of y (float32, |y| <= 448): nearest value, ties to even, sign kept (-0
    too). For the interpreter, whose own float8 conversion rounds wrongly in triton 3.6
    (half up, 125.3 -> 64 where the rounding carries into the exponent, -0 -> 0)."""
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # -6: subnormals
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    t = a / ulp  # exact: a power of two
    f = tl.floor(t)
    odd = f - 2.0 * tl.floor(f * 0.5)
    r = tl.where(t - f > 0.5, f + 1.0, tl.where(t - f < 0.5, f, f + odd)) * ulp  # exact
    r = tl.where(y == y, r, 0.0)  # (NaN's code is set below)
    rbits = r.to(tl.int32, bitcast=True)
    field = ((rbits >> 23) & 0xFF) - 127 + 7
    normal = (rbits & 0x7FFFFFFF) != 0
    normal = normal & (field >= 1)
    code = tl.where(normal, (field << 3) | ((rbits >> 20) & 7), (r * 512.0).to(tl.int32))
    code = tl.where(y == y, code, 0x7F)  # NaN: e4m3's NaN, its sign kept as torch keeps it
    return code | tl.where(y.to(tl.int32, bitcast=True) < 0, 128, 0)


@triton.jit
def _fp8_row(X, C, S, h, inside, D: tl.constexpr, BLOCK_D: tl.constexpr,
             HEAD_SCALES: tl.constexpr, INTERPRET: tl.constexpr):
    """One row quantized as `skattn.transformers_fp8.quantize`: x / scale in float32 (rounded
    to nearest), clamped to +-448, converted to e4m3 (nearest, ties to even)."""
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    x = tl.load(X + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(S + h * HEAD_SCALES)
    nan: tl.constexpr = tl.PropagateNan.ALL  # NaN stays NaN, as torch's clamp keeps it
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -FP8_MAX, propagate_nan=nan), FP8_MAX,
                   propagate_nan=nan)
    if INTERPRET:  # C: the cache's bytes
        tl.store(C + d, _e4m3_bits(y).to(tl.uint8), mask=ok & inside)
    else:
        tl.store(C + d, y.to(tl.float8e4nv), mask=ok & inside)


@triton.jit
def store_fp8_kernel(K, skb, skn, skh, V, svb, svn, svh,
                     KC, skcb, skcn, skch, VC, svcb, svcn, svch, KS, VS, START, n, heads, L,
                     slots, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, K_HEAD_SCALES: tl.constexpr,
                     V_HEAD_SCALES: tl.constexpr, INTERPRET: tl.constexpr,
                     SLOTS: tl.constexpr = False):
    pid = tl.program_id(0)
    x, c, h, inside = _row(pid, n, heads, K, skb, skn, skh, KC, skcb, skcn, skch, START, L,
                           SLOTS, slots)
    _fp8_row(x, c, KS, h, inside, DK, BLOCK_DK, K_HEAD_SCALES, INTERPRET)
    x, c, h, inside = _row(pid, n, heads, V, svb, svn, svh, VC, svcb, svcn, svch, START, L,
                           SLOTS, slots)
    _fp8_row(x, c, VS, h, inside, DV, BLOCK_DV, V_HEAD_SCALES, INTERPRET)


@triton.jit
def _q8_0_row(X, C, CS, inside, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row in q8_0 blocks as `skattn.quant.q8_0` (llama.cpp's `quantize_row_q8_0_ref`):
    per 32 values d = amax / 127, values roundf(x * (1 / d)) (0 where d = 0), in float32
    with correctly rounded division; scale float16(d)."""
    NB: tl.constexpr = BLOCK_D // QK8_0
    d = tl.arange(0, BLOCK_D)
    x = tl.load(X + d, mask=d < D, other=0.0).to(tl.float32)
    x = tl.reshape(x, [NB, QK8_0])
    amax = tl.max(tl.abs(x), 1)
    amax = tl.where(tl.max((x != x).to(tl.int32), 1) > 0, float("nan"), amax)  # NaN scale
    scale = tl.math.div_rn(amax, 127.0)
    inv = tl.where(scale != 0, tl.math.div_rn(1.0, tl.where(scale != 0, scale, 1.0)), 0.0)
    y = x * inv[:, None]
    q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))  # C's roundf
    q = tl.where(q == q, q, 0.0)  # a NaN block's values: 0, as torch converts them
    tl.store(C + d, tl.reshape(q, [BLOCK_D]).to(tl.int8), mask=(d < D) & inside)
    blk = tl.arange(0, NB)
    tl.store(CS + blk, scale.to(tl.float16), mask=(blk < D // QK8_0) & inside)


@triton.jit
def store_q8_0_kernel(K, skb, skn, skh, V, svb, svn, svh,
                      KC, skcb, skcn, skch, KCS, sksb, sksn, sksh,
                      VC, svcb, svcn, svch, VCS, svsb, svsn, svsh, START, n, heads, L,
                      slots, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr = False):
    pid = tl.program_id(0)
    x, c, _, inside = _row(pid, n, heads, K, skb, skn, skh, KC, skcb, skcn, skch, START, L,
                           SLOTS, slots)
    _, cs, _, _ = _row(pid, n, heads, K, skb, skn, skh, KCS, sksb, sksn, sksh, START, L,
                       SLOTS, slots)
    _q8_0_row(x, c, cs, inside, DK, BLOCK_DK)
    x, c, _, inside = _row(pid, n, heads, V, svb, svn, svh, VC, svcb, svcn, svch, START, L,
                           SLOTS, slots)
    _, cs, _, _ = _row(pid, n, heads, V, svb, svn, svh, VCS, svsb, svsn, svsh, START, L,
                       SLOTS, slots)
    _q8_0_row(x, c, cs, inside, DV, BLOCK_DV)
