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
    """%globaltimer read once every value of x (float32) is in its register: the read is
    predicated on a comparison of x, so it cannot be issued before x arrives."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.neu.f32 p, $1, 0f7FC00001; mov.u64 $0, 0; "
        "@p mov.u64 $0, %globaltimer; }", "=l,f", [x], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def tile_stamp(TS, row, k, col: tl.constexpr, dep, TILES: tl.constexpr):
    """TS[row, k, col] = %globaltimer once `dep` (a tensor) is ready, for a program's first
    TILES tiles."""
    if k < TILES:
        tl.store(TS + (row * TILES + k) * TILE_COLS + col, tl.max(timer_after(dep.to(tl.float32))))


@triton.jit
def tile_value(TS, row, k, col: tl.constexpr, value, TILES: tl.constexpr):
    """TS[row, k, col] = value (an integer), for a program's first TILES tiles."""
    if k < TILES:
        tl.store(TS + (row * TILES + k) * TILE_COLS + col, value.to(tl.int64))
