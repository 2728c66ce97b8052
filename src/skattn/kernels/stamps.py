"""Per-program time stamps on the GPU clock: a diagnostic (`launch.run(stamps=...)`)."""
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer, smid

# tile stamps (`serving_launch.run(stamps=(main, fixup, tiles))`): TILE_COLS int64 per tile
TILE_COLS = tl.constexpr(8)


@triton.jit
def stamp(STAMPS, row, col: tl.constexpr):
    """STAMPS[row, col] = %globaltimer (ns); column 3 holds the program's SM."""
    tl.store(STAMPS + row * 4 + col, globaltimer())
    if col == 0:
        tl.store(STAMPS + row * 4 + 3, smid().to(tl.int64))


@triton.jit
def timer_after(x):
    """%globaltimer read once every value of x (int32) is in its register: a branch on a
    comparison of x skips the read (only where x is the bit pattern 0x7FC00001, a NaN's, then
    0), so ptxas predicates the read on x instead of hoisting it above the value's wait."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.b32 p, $1, 2143289345; mov.u64 $0, 0; "
        "@p bra SKIP${:uid}; mov.u64 $0, %globaltimer; SKIP${:uid}: }", "=l,r", [x],
        dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def tile_stamp(TS, row, k, col: tl.constexpr, dep, TILES: tl.constexpr):
    """TS[row, k, col] = %globaltimer once `dep` (a scalar or a vector) is ready, for a
    program's first TILES tiles."""
    if k < TILES:
        bits = (dep.to(tl.float32) + tl.zeros([1], dtype=tl.float32)).to(tl.int32, bitcast=True)
        tl.store(TS + (row * TILES + k) * TILE_COLS + col, tl.max(timer_after(bits)))


@triton.jit
def tile_value(TS, row, k, col: tl.constexpr, value, TILES: tl.constexpr):
    """TS[row, k, col] = value (an integer), for a program's first TILES tiles."""
    if k < TILES:
        tl.store(TS + (row * TILES + k) * TILE_COLS + col, value.to(tl.int64))
