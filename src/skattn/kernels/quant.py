"""Loads of quantized K/V blocks, dequantized in registers (skattn.quant describes the forms)."""
import triton
import triton.language as tl

QK8_0 = tl.constexpr(32)  # values per q8_0 block
QK4_0 = tl.constexpr(32)  # values per q4_0 block (16 bytes of nibbles)


@triton.jit
def load_q8_0(X, XS, base, offs_n, kv_len, stride_n, d0,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              DTYPE: tl.constexpr, ASM: tl.constexpr, WORDS: tl.constexpr, S=None):
    """Rows `offs_n`, columns d0 .. d0 + BLOCK_D - 1 of a q8_0 cache as [BLOCK_N, BLOCK_D] DTYPE:
    int8 values times their block's f16 scale. The scales are laid out like the values with
    every stride divided by 32 (`skattn.quant.Q8_0`), so `base // 32` and `stride_n // 32`
    address them. MASKED: mask rows past kv_len and columns past HEAD_DIM (read as 0).
    ASM, WORDS, S: as in `q8_0_rows`."""
    return q8_0_rows(X + base, XS + base // QK8_0, offs_n * stride_n,
                     offs_n * (stride_n // QK8_0), offs_n < kv_len, d0, HEAD_DIM, BLOCK_D,
                     MASKED, DTYPE, ASM, WORDS, S)


@triton.jit
def q8_0_rows(X, XS, rows, srows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr = False,
              WORDS: tl.constexpr = False, S=None):
    """Columns d0 .. d0 + BLOCK_D - 1 of the q8_0 rows at offsets `rows` from X (their scales
    at `srows` from XS) as [len(rows), BLOCK_D] DTYPE. MASKED: rows where `ok` is false and
    columns past HEAD_DIM read as 0.

    ASM (a GPU, not the interpreter): with f16 DTYPE, int8 -> f16 four values at a time in
    inline PTX (`i8x4_to_f16`). WORDS: load the values as 32-bit words of four
    (`words_to_f16`), for a tile whose dot reduces over its rows (V): Triton otherwise gathers
    such a tile's int8 values one byte at a time into the dot's layout; as words, the f16
    tile is staged in shared memory as f16 V is. f16 values times the f16 scale in f16 round
    once, as the exact f32 product rounded to f16 does; otherwise int8 x f16 exactly in f32,
    one rounding to DTYPE. S: the scales, loaded before (`block_scales`), else loaded here."""
    NB: tl.constexpr = BLOCK_D // QK8_0
    if S is None:
        s = block_scales(XS, srows, ok, d0, HEAD_DIM, BLOCK_D, MASKED)
    else:
        s = S
    if WORDS:
        x = words_to_f16(_words(X, rows, ok, d0, HEAD_DIM, BLOCK_D, MASKED), False, ASM)
    else:
        d = d0 + tl.arange(0, BLOCK_D)
        ptrs = X + rows[:, None] + d[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0)
        else:
            x = tl.load(ptrs)
        if ASM and DTYPE == tl.float16:
            x = i8x4_to_f16(x)
    if DTYPE == tl.float16 and x.dtype == tl.float16:
        x = tl.reshape(x, [rows.shape[0], NB, QK8_0]) * s[:, :, None]
        return tl.reshape(x, [rows.shape[0], BLOCK_D])
    x = tl.reshape(x.to(tl.float32), [rows.shape[0], NB, QK8_0]) * s.to(tl.float32)[:, :, None]
    return tl.reshape(x, [rows.shape[0], BLOCK_D]).to(DTYPE)


@triton.jit
def block_scales(XS, srows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASKED: tl.constexpr, COLS_FIRST: tl.constexpr = False):
    """The f16 scales of the 32-value blocks of columns d0 .. d0 + BLOCK_D - 1 (q8_0 and q4_0
    alike) of the rows whose scales start at `srows` from XS: [len(srows), BLOCK_D / 32], or
    [BLOCK_D / 32, len(srows)] with COLS_FIRST. MASKED: rows where `ok` is false and blocks
    past HEAD_DIM read as 0."""
    blk = d0 // QK8_0 + tl.arange(0, BLOCK_D // QK8_0)
    if COLS_FIRST:
        sptrs = XS + srows[None, :] + blk[:, None]
        keep = ok[None, :] & (blk[:, None] < HEAD_DIM // QK8_0)
    else:
        sptrs = XS + srows[:, None] + blk[None, :]
        keep = ok[:, None] & (blk[None, :] < HEAD_DIM // QK8_0)
    if MASKED:
        return tl.load(sptrs, mask=keep, other=0.0)
    return tl.load(sptrs)


@triton.jit
def _words(X, rows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
           WIDTH: tl.constexpr = 4):
    """Columns d0 .. d0 + BLOCK_D - 1 of the 1-byte rows at byte offsets `rows` from X as
    [len(rows), BLOCK_D / WIDTH] words of WIDTH bytes (4: int32, 2: int16; rows start at
    multiples of WIDTH bytes); masked words read as 0."""
    w = d0 // WIDTH + tl.arange(0, BLOCK_D // WIDTH)
    WORD: tl.constexpr = tl.int32 if WIDTH == 4 else tl.int16
    ptrs = (X + rows[:, None]).to(tl.pointer_type(WORD)) + w[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None] & (w[None, :] < HEAD_DIM // WIDTH), other=0)
    return tl.load(ptrs)


# int8 -> f16, four values of one 32-bit register: each byte plus 128 (the xor) becomes the
# low byte of the f16 1024 + (x + 128) (high byte 0x64, by prmt), from which 1152 (0x6480)
# is subtracted, exactly; {x} the register, {lo} {hi} the f16 pairs of bytes 0-1 and 2-3
_I8X4 = ("xor.b32 t, {x}, 0x80808080; prmt.b32 {lo}, t, 0x64646464, 0x4140; "
         "prmt.b32 {hi}, t, 0x64646464, 0x4342; mov.b32 m, 0x64806480; "
         "sub.f16x2 {lo}, {lo}, m; sub.f16x2 {hi}, {hi}, m;")
I8X4_PAIRS = tl.constexpr("{ .reg .b32 t, m; " + _I8X4.format(x="$2", lo="$0", hi="$1") + " }")
I8X4_HALVES = tl.constexpr("{ .reg .b32 t, m, lo, hi; " + _I8X4.format(x="$4", lo="lo", hi="hi")
                           + " mov.b32 {$0, $1}, lo; mov.b32 {$2, $3}, hi; }")


@triton.jit
def i8x4_to_f16(x):
    """int8 -> f16 exactly, four values (one 32-bit register) in five instructions (`_I8X4`);
    Triton's own conversion takes one instruction a value, plus packing."""
    return tl.inline_asm_elementwise(asm=I8X4_PAIRS, constraints="=r,=r,r", args=[x],
                                     dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def words_to_f16(w, FP8: tl.constexpr, ASM: tl.constexpr):
    """[N, W] 32-bit words of four int8 (FP8: float8 e4m3) values, byte 0 first, as [N, 4 W] f16,
    exactly: with ASM (inline PTX), int8 as in `i8x4_to_f16` and e4m3 by the hardware's
    conversion of two at a time; without (the interpreter), byte by byte in Triton."""
    if ASM and FP8:
        a, b, c, d = tl.inline_asm_elementwise(
            asm="""{
            .reg .b16 l, h;
            .reg .b32 lo, hi;
            mov.b32 {l, h}, $4;
            cvt.rn.f16x2.e4m3x2 lo, l;
            cvt.rn.f16x2.e4m3x2 hi, h;
            mov.b32 {$0, $1}, lo;
            mov.b32 {$2, $3}, hi;
            }""",
            constraints="=h,=h,=h,=h,r", args=[w],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    elif ASM:
        a, b, c, d = tl.inline_asm_elementwise(
            asm=I8X4_HALVES, constraints="=h,=h,=h,=h,r", args=[w],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        a = _byte_to_f16(w << 24, FP8)
        b = _byte_to_f16(w << 16, FP8)
        c = _byte_to_f16(w << 8, FP8)
        d = _byte_to_f16(w, FP8)
    # tl.join adds a last axis: [N, W, 2 (a|c, b|d), 2 (a|b, c|d)] flattens to a, b, c, d
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [w.shape[0], 4 * w.shape[1]])


@triton.jit
def _byte_to_f16(x, FP8: tl.constexpr):
    """The top byte of int32 x (int8, or FP8: float8 e4m3 bits) as f16."""
    if FP8:
        return (x >> 24).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return (x >> 24).to(tl.float16)


@triton.jit
def fp8_pairs(V, offs, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              ASM: tl.constexpr):
    """Columns 0 .. BLOCK_D - 1 of the float8 e4m3 rows at byte offsets `offs` from V (even)
    as two [len(offs), BLOCK_D / 2] f16 tiles: the even columns and the odd ones, exactly.
    Loaded as 16-bit pairs, so a dot that reduces over the rows reads them with the 16-bit
    transposing shared-memory load, as f16 V, instead of gathering single bytes."""
    w = _words(V, offs, ok, 0, HEAD_DIM, BLOCK_D, MASKED, 2)
    if ASM:
        return tl.inline_asm_elementwise(asm=PAIRS_F16, constraints="=r,=r,r", args=[w],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    lo = (w & 255).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    hi = ((w >> 8) & 255).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return lo, hi


@triton.jit
def q8_0_pair_blocks(X, XS, offs, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     MASKED: tl.constexpr, ASM: tl.constexpr, S=None):
    """q8_0 V rows at byte offsets `offs` from X (their scales at offs / 32 from XS) for dots
    that apply the scales to p: (even, odd, scales), the int8 values as f16 (exact, unscaled)
    in [BLOCK_D / 32, N, 16] tiles (block b's even, odd columns) and the f16 scales as
    [BLOCK_D / 32, N]; S: those scales, loaded before (`block_scales`), else loaded here."""
    NB: tl.constexpr = BLOCK_D // QK8_0
    blk = tl.arange(0, NB)
    c = tl.arange(0, QK8_0 // 2)
    ptrs = ((X + offs)[None, :, None].to(tl.pointer_type(tl.int16))
            + (blk * (QK8_0 // 2))[:, None, None] + c[None, None, :])
    if MASKED:
        w = tl.load(ptrs, mask=ok[None, :, None] & (blk[:, None, None] < HEAD_DIM // QK8_0),
                    other=0)
    else:
        w = tl.load(ptrs)
    if S is None:
        s = block_scales(XS, offs // QK8_0, ok, 0, HEAD_DIM, BLOCK_D, MASKED, True)
    else:
        s = S
    if ASM:
        lo, hi = tl.inline_asm_elementwise(asm=I8_PAIRS_F16, constraints="=r,=r,r", args=[w],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        lo = (w & 255).to(tl.int8).to(tl.float16)
        hi = (w >> 8).to(tl.int8).to(tl.float16)
    return lo, hi, s


# int8 pairs {a0 a1} {b0 b1} -> f16 pairs {a0 b0}, {a1 b1}, exactly, as `_I8X4` converts
I8_PAIRS_F16 = tl.constexpr("{ .reg .b32 t, m; xor.b32 t, $2, 0x80808080; "
                            "prmt.b32 $0, t, 0x64646464, 0x4240; "
                            "prmt.b32 $1, t, 0x64646464, 0x4341; mov.b32 m, 0x64806480; "
                            "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }")


# two 16-bit pairs of e4m3 bytes {a0 a1} {b0 b1} (one register, a first) -> the f16 pairs
# {a0 b0} (even columns) and {a1 b1} (odd): a byte permute, then the hardware's conversion
PAIRS_F16 = tl.constexpr("{ .reg .b32 t; .reg .b16 e, o; prmt.b32 t, $2, 0, 0x3120; "
                         "mov.b32 {e, o}, t; cvt.rn.f16x2.e4m3x2 $0, e; "
                         "cvt.rn.f16x2.e4m3x2 $1, o; }")


@triton.jit
def fp8_rows(X, rows, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
             ASM: tl.constexpr):
    """Columns 0 .. BLOCK_D - 1 of the float8 e4m3 rows at byte offsets `rows` from X as
    [len(rows), BLOCK_D] f16 (exact), loaded as 32-bit words (see `q8_0_rows`' WORDS), for V."""
    return words_to_f16(_words(X, rows, ok, 0, HEAD_DIM, BLOCK_D, MASKED), True, ASM)


@triton.jit
def load_q4_0(X, XS, base, offs_n, kv_len, stride_n, d0,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              DTYPE: tl.constexpr, S=None, ASM: tl.constexpr = False):
    """Rows `offs_n`, columns d0 .. d0 + BLOCK_D - 1 of a q4_0 cache as [BLOCK_N, BLOCK_D] DTYPE.

    X holds the packed bytes (`skattn.quant.Q4_0`): `base`, `stride_n` count bytes, and byte
    16 c + j of a row holds column 32 c + j in its low nibble, 32 c + j + 16 in its high one;
    a column's value is (nibble - 8) times its block's f16 scale. The scales are laid out like
    the bytes with every stride divided by 16, so `base // 16` and `stride_n // 16` address
    them. The [BLOCK_N, BLOCK_D / 2] bytes are loaded once; their low and high nibbles are
    joined back into column order per block. MASKED: mask rows past kv_len and columns past
    HEAD_DIM (read as 0; HEAD_DIM is a multiple of 32, so whole blocks are masked). ASM: as
    in `q4_0_rows`."""
    HALF: tl.constexpr = QK4_0 // 2
    return q4_0_rows(X + base, XS + base // HALF, offs_n * stride_n, offs_n * (stride_n // HALF),
                     offs_n < kv_len, d0, HEAD_DIM, BLOCK_D, MASKED, DTYPE, S, ASM)


@triton.jit
def q4_0_rows(X, XS, rows, srows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, DTYPE: tl.constexpr, S=None, ASM: tl.constexpr = False):
    """Columns d0 .. d0 + BLOCK_D - 1 of the q4_0 rows at byte offsets `rows` from X (their
    scales at `srows` from XS) as [len(rows), BLOCK_D] DTYPE (`load_q4_0`'s layout). MASKED:
    rows where `ok` is false and columns past HEAD_DIM read as 0. S: the scales, loaded
    before (`block_scales`), else loaded here. ASM (a GPU, not the interpreter): with f16
    DTYPE, the nibbles become f16 in inline PTX (`Q4_NIBBLES_F16`) and the scales multiply
    in f16 (one rounding, as the exact f32 product rounded to f16); else in Triton, in f32."""
    NB: tl.constexpr = BLOCK_D // QK4_0
    HALF: tl.constexpr = QK4_0 // 2
    BLOCK_B: tl.constexpr = BLOCK_D // 2
    byte = d0 // 2 + tl.arange(0, BLOCK_B)
    ptrs = X + rows[:, None] + byte[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None] & (byte[None, :] < HEAD_DIM // 2), other=0x88)  # both nibbles 0
    else:
        x = tl.load(ptrs)
    if S is None:
        s = block_scales(XS, srows, ok, d0, HEAD_DIM, BLOCK_D, MASKED)
    else:
        s = S
    if ASM and DTYPE == tl.float16:
        lo, hi = tl.inline_asm_elementwise(asm=Q4_NIBBLES_F16, constraints="=r,=r,=r,=r,r",
                                           args=[x], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        lo = tl.reshape(lo, [rows.shape[0], NB, HALF])
        hi = tl.reshape(hi, [rows.shape[0], NB, HALF])
    else:
        x = tl.reshape(x.to(tl.int32), [rows.shape[0], NB, HALF])
        lo = (x & 15) - 8
        hi = (x >> 4) - 8
    # [N, NB, 16, 2] -> [N, NB, 2, 16]: the low nibbles of a block, then its high nibbles
    x = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), [rows.shape[0], NB, QK4_0])
    if x.dtype == tl.float16:
        return tl.reshape(x * s[:, :, None], [rows.shape[0], BLOCK_D])
    # small integers x f16 are exact in f32; one rounding to DTYPE
    x = x.to(tl.float32) * s.to(tl.float32)[:, :, None]
    return tl.reshape(x, [rows.shape[0], BLOCK_D]).to(DTYPE)


# q4_0 nibbles -> f16, exactly, four bytes (one 32-bit register) at a time: prmt spreads bytes
# 0 and 1 (then 2 and 3) into the low bytes of two 16-bit halves; the low nibble of a half
# under the f16 0x6400 (1024, whose last bit is 1) is 1024 + x, the high nibble in place under
# 0x5400 (64, whose last bit is 1/16) is 64 + x; subtracting 1032 and 72 leaves x - 8. $0, $1:
# the low nibbles' values of bytes 0-1 and 2-3; $2, $3: the high nibbles'.
Q4_NIBBLES_F16 = tl.constexpr(
    "{ .reg .b32 t, u, a, b; "
    "prmt.b32 t, $4, 0, 0x4140; prmt.b32 u, $4, 0, 0x4342; "
    "lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea; lop3.b32 $1, u, 0x000f000f, 0x64006400, 0xea; "
    "lop3.b32 $2, t, 0x00f000f0, 0x54005400, 0xea; lop3.b32 $3, u, 0x00f000f0, 0x54005400, 0xea; "
    "mov.b32 a, 0x64086408; mov.b32 b, 0x54805480; sub.f16x2 $0, $0, a; sub.f16x2 $1, $1, a; "
    "sub.f16x2 $2, $2, b; sub.f16x2 $3, $3, b; }")


@triton.jit
def load_blocks(X, XS, base, offs_n, kv_len, stride_n, d0,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                DTYPE: tl.constexpr, KV_FORMAT: tl.constexpr, ASM: tl.constexpr = False,
                WORDS: tl.constexpr = False, S=None):
    """A block-quantized K or V tile: q8_0 (KV_FORMAT 2, ASM and WORDS as in `q8_0_rows`)
    or q4_0 (3). S: its scales, loaded before (`tile_scales`), else loaded here."""
    if KV_FORMAT == 3:
        return load_q4_0(X, XS, base, offs_n, kv_len, stride_n, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE, S, ASM)
    else:
        return load_q8_0(X, XS, base, offs_n, kv_len, stride_n, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE, ASM, WORDS, S)


@triton.jit
def tile_scales(XS, base, offs_n, kv_len, stride_n, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, COLS_FIRST: tl.constexpr, KV_FORMAT: tl.constexpr = 2):
    """The q8_0 (KV_FORMAT 2) or q4_0 (3) block scales of `load_blocks`' tile of columns
    0 .. BLOCK_D - 1 (rows past kv_len read as 0), as `block_scales` gives them; a KV loop
    loads a block's scales one block ahead (`kv_loop.tile_kv_loop`): Triton's pipeliner
    leaves these 2-byte loads in the loop, where a block would wait for them."""
    PER: tl.constexpr = QK8_0 if KV_FORMAT == 2 else QK4_0 // 2  # bytes a scale covers
    return block_scales(XS + base // PER, offs_n * (stride_n // PER), offs_n < kv_len, 0,
                        HEAD_DIM, BLOCK_D, True, COLS_FIRST)


@triton.jit
def block_rows(X, XS, rows, ok, d0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, DTYPE: tl.constexpr, KV_FORMAT: tl.constexpr,
               ASM: tl.constexpr = False, WORDS: tl.constexpr = False, S=None):
    """`load_blocks` for rows at offsets `rows` (int64) from X, such as a paged cache's
    gathered rows: a block form's scales are laid out like its values with every stride
    divided by the values a scale covers (32 int8 values, 16 bytes of nibbles), so a row's
    scales sit at its offset divided by that, from XS. S: as in `load_blocks`."""
    if KV_FORMAT == 3:
        return q4_0_rows(X, XS, rows, rows // (QK4_0 // 2), ok, d0, HEAD_DIM, BLOCK_D, MASKED,
                         DTYPE, S, ASM)
    else:
        return q8_0_rows(X, XS, rows, rows // QK8_0, ok, d0, HEAD_DIM, BLOCK_D, MASKED, DTYPE,
                         ASM, WORDS, S)


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
