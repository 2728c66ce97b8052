"""Kernel configurations: the tile geometry of a shape and the shared memory it needs (pure Python).

`tile_geometry` starts from the measured defaults (PERF.md) and gives up pipeline stages, then
keys per KV block, then rows per tile until `shared_bytes` fits the device's limit; a shape
that no configuration fits is refused before anything is compiled or launched.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TileGeometry", "tile_geometry", "shared_bytes", "programs_per_sm",
           "SM90_SHARED_LIMIT"]

SM90_SHARED_LIMIT = 232448  # bytes one program may use on sm_90 (H100/H200: 227 KB opt-in)
STAGE_BYTES_BUDGET = 192 << 10  # shared memory for the K/V pipeline stages of a default config
SM_SHARED_BYTES = 228 << 10  # sm_90: shared memory and registers of one SM
SM_REGISTERS = 64 << 10
MIN_BLOCK = 16  # smallest block_m and block_n: tl.dot needs 16 along M, N and K
MIN_STAGES = 2  # fewer stages stop the K/V loads from overlapping the math


@dataclass(frozen=True)
class TileGeometry:
    """Shape of one output tile and of the kernel that walks it."""

    block_m: int          # rows of a tile (power of two, >= 16 for tl.dot)
    heads_per_tile: int   # query heads of one KV head packed in a tile (llama.cpp: ncols2)
    tokens_per_tile: int  # query tokens per tile (llama.cpp: ncols1)
    block_n: int          # keys per KV block (llama.cpp: nbatch_fa)
    block_dk: int         # padded K head size handled per dot (a chunk when dk_chunks > 1)
    dk_chunks: int        # chunks of block_dk covering Dk (1 except for very large heads)
    block_dv: int         # padded V head size
    num_warps: int
    num_stages: int


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def shared_bytes(geo: TileGeometry, *, has_mask: bool = False, kv_format: str = "float16") -> int:
    """Shared memory (bytes) of the main kernel compiled for sm_90 with this geometry.

    What Triton 3.6 keeps there, calibrated against `ttg.shared` of the compiled kernel
    (`scripts/resources.py`; `tests/test_compile_sm90.py` checks it bounds every
    configuration the planner picks):

    - K and V tiles of the pipeline, [BLOCK_N, Dk padded] + [BLOCK_N, Dv padded] in 16 bits:
      num_stages buffers with Hopper's warpgroup MMA (BLOCK_M >= 64: the asynchronous dot
      still reads one while the next loads), num_stages - 1 with the warp MMA (BLOCK_M < 64);
    - the Q tile, [BLOCK_M, Dk padded] in 16 bits (all chunks of a chunked head size: their
      loads are hoisted out of the KV loop);
    - with the warp MMA, P's layout conversion, [BLOCK_M, BLOCK_N] in 16 bits;
    - with a mask, num_stages - 1 buffers of its [BLOCK_M, BLOCK_N] tile, counted as f32
      (the widest mask; f16/bf16 masks need at most half of it);
    - after the KV loop, the f32 accumulator's layout conversion for the store,
      [BLOCK_M, Dv padded], which reuses the loop's buffers (the larger of the two counts).

    Sinks, softcap, ALiBi, the sliding window, causal masking, lse and the fused fixup add
    nothing measurable (none of them keeps a tile in shared memory). Compiled for sm_80 (no
    warpgroup MMA) the same configurations take less, so the count bounds them there too.

    Quantized K/V (`kv_format`, `skattn.quant`), dequantized in registers: float8_e4m3fn
    takes the same buffers at 1 byte an element (without the staged V tile below: exact in
    210 of the 252 configurations of `scripts/resources.py --grid --kv=float8_e4m3fn`, above
    in the others; with the warpgroup MMA a Dk wider than Dv adds K's extra columns once);
    for q8_0 the count adds the f16 block scales of each buffer and one more [BLOCK_N, Dv]
    byte tile: a bound (Triton pipelines its int8 and f16 loads differently by shape), above
    all 210 configurations of `--grid --kv=q8_0`, by 17% in the median (counted before the
    staged V tile below).
    q4_0 is counted as q8_0: its loads are half the bytes of q8_0's ([BLOCK_N, D / 2] packed
    bytes, 18/32 bytes a value in all) with the same f16 scales and the same dequantized
    tiles, so q8_0's count bounds it. q8_0 V tiles, and FP8 V tiles in the serving kernel,
    are loaded as 32-bit words and dequantized to f16 in the load's layout
    (`skattn.kernels.quant`), then staged for the dot as f16 V is: one [BLOCK_N, Dv] f16
    tile more, counted for every quantized form (a bound for the dense kernel's FP8 V, which
    Triton gathers byte by byte from the pipeline's buffers instead). With that tile a
    quantized count can exceed f16's for one K/V buffer (16 rows, 64 keys, head size 128, two
    stages: 48128 bytes for q8_0 against 38912), and masked FP8 prompt tiles of head size
    160-256 get two stages where the count without it allowed three.
    """
    dk = geo.block_dk * geo.dk_chunks
    wgmma = geo.block_m >= 64
    kv_buffers = max(1, geo.num_stages if wgmma else geo.num_stages - 1)
    elem = 2 if kv_format in ("float16", "bfloat16") else 1
    loop = kv_buffers * geo.block_n * (dk + geo.block_dv) * elem + geo.block_m * dk * 2
    if elem == 1 and wgmma and dk > geo.block_dv:  # 192/128 took K's extra columns once more
        loop += geo.block_n * (dk - geo.block_dv)
    if kv_format in ("q8_0", "q4_0"):
        loop += kv_buffers * geo.block_n * (dk + geo.block_dv) // 16 + geo.block_n * geo.block_dv
    if elem == 1:  # V dequantized as 32-bit words, staged in f16 (see below)
        loop += geo.block_n * geo.block_dv * 2
    if not wgmma:
        loop += geo.block_m * geo.block_n * 2
    if has_mask:
        loop += max(1, geo.num_stages - 1) * geo.block_m * geo.block_n * 4
    return max(loop, geo.block_m * geo.block_dv * 4)


def fp8_pairs(geo: TileGeometry, kv_format: str, head_dim_v: int, enabled: bool) -> bool:
    """Whether a plan's kernel reads FP8 V as 16-bit pairs (`kernels/quant.fp8_pairs`):
    tiles under 64 rows, whose dots are the 16-row MMAs that then take V from shared memory
    through the 16-bit transposing load (the 64-row warpgroup MMAs take V converted to f16
    in shared memory either way), and an even Dv; `enabled` is `Tuning.fp8_v_pairs`."""
    return (enabled and kv_format == "float8_e4m3fn" and geo.block_m < 64
            and head_dim_v % 2 == 0)


def quant_decode_per_sm(geo: TileGeometry, kv_format: str, head_dim: int, head_dim_v: int,
                        fp8_v_pairs: bool) -> int | None:
    """Programs an SM for a serving plan's quantized decode tiles where the caller names no
    occupancy: three for tiles under 64 rows of head sizes 65-128 that read FP8 V as pairs
    (`fp8_pairs`), q8_0 or q4_0 blocks, else None (the GPU's default). Their sm_90 builds
    take at most 71.7 KB of shared memory, and under the register cap of three an SM
    (`register_cap`: 168) none spills in its KV loop (scripts/compile_serving.py, checked
    by a CPU test); three ran 1.01-1.16x (FP8), 1.11-1.20x (q8_0) and 1.08-1.11x (q4_0)
    faster than two on the serving mixes (f16 queries; with bf16 queries, which unpack q4_0 in
    Triton's arithmetic, its build fits the cap without a spill, not timed), and up to 1.4x
    slower for FP8 at head size 64 (PERF.md)."""
    if not (64 < max(head_dim, head_dim_v) <= 128 and geo.block_m < 64):
        return None
    if kv_format in ("q8_0", "q4_0") or fp8_pairs(geo, kv_format, head_dim_v, fp8_v_pairs):
        return 3
    return None


# a dense plan's q8_0 decode tiles of 16 rows: (block_n, num_stages, num_warps, programs an SM)
Q8_0_NARROW_DECODE = (64, 3, 2, 4)


def q8_0_narrow_decode(geo: TileGeometry, kv_format: str, head_dim: int, head_dim_v: int) -> bool:
    """Whether a dense plan's q8_0 decode tile (16 rows, head sizes up to 128) runs
    `Q8_0_NARROW_DECODE` where the caller names no block size, stages, warps or occupancy
    (the head sizes measured, 64 and 128; at 96, padded to 128, its build takes 254 registers
    and 55 KB, so four fit an SM with no margin: not taken):
    two warps a program split a block's keys, and so its softmax, across fewer warps (17
    barriers a block against 13, but 2 x 1095 warp instructions against 4 x 612 in the sm_90
    llama-8b n = 1 loop), and four programs an SM keep eight warps resident (230 registers,
    38 KB each). On an H200 (graph timer, PERF.md) 1.18x at llama-8b n = 1 L = 32768 and
    1.07x at gpt-oss, even at L = 8192 and qwen3-14b; slower for FP8 and f16 tiles, and far
    slower for 64-row tiles (two warps hold their accumulators)."""
    return (kv_format == "q8_0" and geo.block_m == 16 and head_dim == head_dim_v
            and head_dim in (64, 128))


# a dense plan's FP8 decode tiles of 16 rows: (block_n, num_stages, fewest KV blocks a
# program takes when `auto` picks the program count)
FP8_WIDE_DECODE = (128, 3, 4)


def fp8_wide_decode(geo: TileGeometry, kv_format: str, head_dim: int, head_dim_v: int) -> bool:
    """Whether a dense plan's FP8 decode tile (16 rows, head sizes 64 and 128, the ones
    measured) runs `FP8_WIDE_DECODE` where the caller names no block size, stages, warps or
    occupancy: 128-key blocks in 3 stages (the sm_90 llama-8b n = 1 loop 596 warp
    instructions a block of 128 keys against 2 x 353 for two of 64), and `auto` gives each
    program at least 4 KV blocks (or runs one program an SM): at L = 8192 its 256 programs of
    2 blocks ran 1.10-1.19x slower than 128 of 4 (two sweeps), while at 32768 256 programs of 8
    beat 128 of 16. On an H200 (graph timer, same call, PERF.md) 0.996-1.10x over the tiles
    before it (64-key blocks in 4 stages at head size 128, 128-key blocks in 4 stages at 64;
    256 programs) in the 9 cells measured (llama-8b n = 1 and 4, gpt-oss, qwen3-14b;
    L = 8192-32768)."""
    return (kv_format == "float8_e4m3fn" and geo.block_m == 16 and head_dim == head_dim_v
            and head_dim in (64, 128))


def register_cap(occupancy: int, num_warps: int) -> int | None:
    """Registers a thread that let `occupancy` programs of `num_warps` warps share an SM
    (a multiple of 8, as ptxas allocates), or None where 255 (the most a thread takes) fit.
    Compiled with it (Triton's `maxnreg`), a plan's programs are resident together as its
    cost model counts them, whatever registers the build would have taken."""
    per_thread = SM_REGISTERS // (occupancy * num_warps * 32)
    return None if per_thread >= 255 else per_thread // 8 * 8


def programs_per_sm(geo: TileGeometry, kv_format: str = "float16") -> int:
    """Programs of a 128-row (prompt) geometry that one Hopper SM holds at once: its shared
    memory (224 KB for head size 128, 80 KB for 64, as compiled) and 255 registers a thread
    (what those kernels take)."""
    shared = shared_bytes(geo, kv_format=kv_format)
    return max(1, min(SM_SHARED_BYTES // shared, SM_REGISTERS // (geo.num_warps * 32 * 255)))


def _default_rows(q_len: int, heads: int, head_dim: int, head_dim_v: int) -> int:
    rows = q_len * heads
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    if block_m == 32 and max(head_dim, head_dim_v) <= 128:
        # 64 rows (Hopper's warpgroup MMA) streamed K/V 5-11% faster than 32 in every
        # decode cell measured, e.g. llama-8b n=8 L=32768 46.0 -> 41.1 us (PERF.md)
        block_m = 64
    return block_m


def _check_overrides(block_m, block_n, num_warps, num_stages) -> None:
    # overrides Triton can compile: power-of-two blocks of >= 16 (tl.dot), warps, stages >= 1
    for name, value, allowed in (("block_m", block_m, (16, 32, 64, 128, 256)),
                                 ("block_n", block_n, (16, 32, 64, 128, 256)),
                                 ("num_warps", num_warps, (1, 2, 4, 8, 16)),
                                 ("num_stages", num_stages, tuple(range(1, 9)))):
        if value is not None and (type(value) is not int or value not in allowed):
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _halvings(start: int, given: int | None) -> list[int]:
    """`given` alone, or start, start / 2, ... down to MIN_BLOCK."""
    if given is not None:
        return [given]
    out = [start]
    while out[-1] > MIN_BLOCK:
        out.append(out[-1] // 2)
    return out


def tile_geometry(*, q_len: int, gqa_ratio: int, head_dim: int, head_dim_v: int,
                  block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  has_mask: bool = False, smem_limit: int = SM90_SHARED_LIMIT,
                  kv_format: str = "float16") -> TileGeometry:
    """The kernel configuration of a shape: the query heads of a KV head packed into the rows of
    a tile, then tokens; the measured defaults where they fit `smem_limit` bytes of shared
    memory, else fewer stages, then fewer keys per KV block, then fewer rows.

    Parameters
    ----------
    q_len, gqa_ratio, head_dim, head_dim_v : int
        Query tokens, query heads per KV head, Dk and Dv.
    block_m, block_n, num_warps, num_stages : int, optional
        Fixed by the caller (never reduced); None: chosen here.
    has_mask : bool
        An additive mask is read in the KV loop (its tile is pipelined in shared memory).
    smem_limit : int
        Shared memory one program may use, bytes (232448 on sm_90).
    kv_format : str
        K/V's form (`Plan.dtype`): "float16", "bfloat16", "float8_e4m3fn" or "q8_0".

    Returns
    -------
    TileGeometry

    Raises
    ------
    ValueError
        An override Triton cannot compile, or no configuration fits `smem_limit`.
    """
    _check_overrides(block_m, block_n, num_warps, num_stages)
    heads = min(gqa_ratio, 16)
    if head_dim <= 256:
        block_dk, dk_chunks = max(16, _pow2(head_dim)), 1
    else:
        block_dk = 64
        dk_chunks = -(-head_dim // block_dk)
    block_dv = max(16, _pow2(head_dim_v))
    wide = max(block_dk * dk_chunks, block_dv)
    smallest = None
    for bm in _halvings(_default_rows(q_len, heads, head_dim, head_dim_v), block_m):
        prefill = bm == 128
        # measured on an H200 (PERF.md): decode 64/4/4, BLOCK_N 128 for head sizes <= 64
        # (gpt-oss n=1 L=32768: 26.5 vs 30.1 us); prefill 128/8/3 for head sizes 65-128,
        # 64/4/4 for head sizes <= 64 (gpt-oss n=512: 357 vs 408 us)
        narrow_prefill = prefill and wide <= 64
        if wide > 256:
            bn0 = 32
        elif (prefill and not narrow_prefill and wide <= 128) or (not prefill and wide <= 64):
            bn0 = 128
        else:
            bn0 = 64
        warps = num_warps or (8 if prefill and not narrow_prefill else 4)
        tile_heads = min(heads, bm)
        tokens = max(1, min(q_len, bm // tile_heads))
        for bn in _halvings(bn0, block_n):
            if num_stages is None:
                # K and V of one stage stay in shared memory: large heads get fewer stages
                # (D=256 decode needs 64 KB a stage, 576/512 needs 68 KB)
                st0 = 3 if prefill and not narrow_prefill else 4
                stage_bytes = bn * (block_dk * dk_chunks + block_dv) * 2
                while st0 > MIN_STAGES and st0 * stage_bytes > STAGE_BYTES_BUDGET:
                    st0 -= 1
                stages = range(st0, MIN_STAGES - 1, -1)
            else:
                stages = [num_stages]
            for st in stages:
                geo = TileGeometry(bm, tile_heads, tokens, bn, block_dk, dk_chunks, block_dv,
                                   warps, st)
                need = shared_bytes(geo, has_mask=has_mask, kv_format=kv_format)
                if need <= smem_limit:
                    return geo
                smallest = need if smallest is None else min(smallest, need)
    mask = " with a mask" if has_mask else ""
    given = ", ".join(f"{name}={value}" for name, value in (
        ("block_m", block_m), ("block_n", block_n), ("num_warps", num_warps),
        ("num_stages", num_stages)) if value is not None)
    raise ValueError(
        f"no kernel configuration of head size {head_dim}/{head_dim_v}{mask} (q_len {q_len}, "
        f"{gqa_ratio} query heads per KV head{', ' + given if given else ''}) fits {smem_limit} "
        f"bytes of shared memory: the smallest tried needs {smallest}")
