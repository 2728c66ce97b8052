"""Per-program time stamps on the GPU clock: a diagnostic (`launch.run(stamps=...)`)."""
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer, smid


@triton.jit
def stamp(STAMPS, row, col: tl.constexpr):
    """STAMPS[row, col] = %globaltimer (ns); column 3 holds the program's SM."""
    tl.store(STAMPS + row * 4 + col, globaltimer())
    if col == 0:
        tl.store(STAMPS + row * 4 + 3, smid().to(tl.int64))
