"""The ragged work list, built on the GPU by one program (docs/serving.md, "The work list").

Layout of the int32 buffer WL (offsets by `wl_offsets`): a header (W, N, RB, max and min
KV blocks of a tile, whole-tile step, the whole-tile hand-out counter, the dynamic tail's
first item, chunk size, chunk count and hand-out counter), per sequence Lq, Lk,
first query row, first key row, end of its row blocks; per row block its first item
(RB_max + 1 entries), KV blocks per tile, sequence, token block and first KV block.
"""
import triton
import triton.language as tl

HEADER: tl.constexpr = tl.constexpr(16)
# header words: 1 where the step runs in whole tiles handed out one by one; the next whole
# tile to hand out (zeroed by the build)
WHOLE_FLAG: tl.constexpr = tl.constexpr(5)
WHOLE_NEXT: tl.constexpr = tl.constexpr(6)
# a plan with a dynamic tail (ServingPlan.tail): items [TAIL_START, W) go out at run time in
# TAIL_CHUNKS chunks of TAIL_CHUNK items, the next from TAIL_NEXT (zeroed by the build)
TAIL_START: tl.constexpr = tl.constexpr(7)
TAIL_CHUNK: tl.constexpr = tl.constexpr(8)
TAIL_CHUNKS: tl.constexpr = tl.constexpr(9)
TAIL_NEXT: tl.constexpr = tl.constexpr(10)
# the whole-tile rule (policy.whole_prompt and compute_bound_programs, kept equal to them by
# tests/test_serving_plan.py)
MANY: tl.constexpr = tl.constexpr(3)
UNEQUAL: tl.constexpr = tl.constexpr(2)
CUT_X10: tl.constexpr = tl.constexpr(15)  # CUT_PENALTY_MANY x 10


# The integers a serving step changes (batch, lengths, their bounds, the row blocks they
# make): Triton would specialise each on == 1 and divisibility by 16 and compile a new kernel
# the first time a batch shows a new combination, so the serving kernels do not specialise on
# them (this one, a single program, on none of its integers).
SHAPE_INTS = ["batch", "q_len", "cap_q", "total_q", "cap_k", "total_k", "hz", "rb_max",
              "window", "grid_programs", "split", "n_sat", "per_sm", "q_lo", "q_hi", "resident",
              "ws_resident"]


@triton.jit
def wl_offsets(batch, rb_max):
    """Offsets in WL of: Lq, Lk, q start, k start, row-block end (per sequence); row-block
    start, count, sequence, token block, first KV block (per row block)."""
    lq = HEADER
    lk = lq + batch
    qs = lk + batch
    ks = qs + batch
    rbe = ks + batch
    start = rbe + batch
    count = start + rb_max + 1
    seq = count + rb_max
    qblock = seq + rb_max
    first = qblock + rb_max
    return lq, lk, qs, ks, rbe, start, count, seq, qblock, first


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _span(CU, i, ok, cap, total):
    """Start and length of sequences i from cumulative lengths CU, clamped to [0, total) and
    a length of at most `cap`."""
    x0 = tl.load(CU + i, mask=ok, other=0)
    x1 = tl.load(CU + i + 1, mask=ok, other=0)
    start = _clamp(x0, 0, total)
    return start, tl.minimum(_clamp(x1 - x0, 0, cap), total - start)


@triton.jit
def _sequences(SEQ_K, SEQ_Q, WL, batch, q_len, cap_q, total_q, cap_k, total_k, rb_max,
               q_lo, q_hi, CU_K: tl.constexpr, VARLEN_Q: tl.constexpr, Q_RANGE: tl.constexpr,
               TOKENS: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per-sequence lengths and starts, clamped to the plan's bounds; returns real row blocks
    and the most query tokens of a sequence.
    Q_RANGE: a sequence whose query count is not in (q_lo, q_hi] belongs to the other half
    of a MixedPlan and counts as empty."""
    o_lq, o_lk, o_qs, o_ks, o_rbe, _, _, _, _, _ = wl_offsets(batch, rb_max)
    i = tl.arange(0, BLOCK_B)
    ok = i < batch
    if CU_K:
        ks, lk = _span(SEQ_K, i, ok, cap_k, total_k)
    else:
        lk = _clamp(tl.load(SEQ_K + i, mask=ok, other=0), 0, cap_k)
        ks = tl.zeros_like(lk)
    if VARLEN_Q:
        qs, lq = _span(SEQ_Q, i, ok, cap_q, total_q)
        if Q_RANGE:
            raw = tl.load(SEQ_Q + i + 1, mask=ok, other=0) - tl.load(SEQ_Q + i, mask=ok, other=0)
            lq = tl.where((raw > q_lo) & (raw <= q_hi), lq, 0)
    else:
        qs = tl.zeros_like(lk)
        lq = tl.zeros_like(lk) + q_len
    lq = tl.where(ok, lq, 0)
    nqb = (lq + TOKENS - 1) // TOKENS
    rb_end = tl.cumsum(nqb, 0)
    tl.store(WL + o_lq + i, lq, mask=ok)
    tl.store(WL + o_lk + i, lk, mask=ok)
    tl.store(WL + o_qs + i, qs, mask=ok)
    tl.store(WL + o_ks + i, ks, mask=ok)
    tl.store(WL + o_rbe + i, rb_end, mask=ok)
    return tl.minimum(tl.sum(nqb, 0), rb_max), tl.max(lq, 0)


@triton.jit
def _kv_blocks(lq, lk, qblock, window, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First visible KV block and count of a token block (planner._kv_blocks, vectorised)."""
    q0 = qblock * TOKENS
    q1 = tl.minimum(lq, q0 + TOKENS)
    if CAUSAL:
        hi = tl.minimum(lk, lk - lq + q1)
    else:
        hi = lk
    if HAS_WINDOW:
        lo = tl.maximum(lk - lq + q0 - window + 1, 0)
    else:
        lo = tl.zeros_like(hi)
    empty = hi <= lo
    first = tl.where(empty, 0, lo // BLOCK_N)
    count = tl.where(empty, 1, (tl.maximum(hi, 1) + BLOCK_N - 1) // BLOCK_N - first)
    return first, count


@triton.jit
def _programs(work, tiles, maxc, minc, grid_programs, split, n_sat, per_sm, COST,
              POLICY: tl.constexpr, FUSED: tl.constexpr, NB: tl.constexpr):
    """The effective program count N from the real work (serving_worklist.effective_programs)."""
    raw = tl.minimum(grid_programs, work)
    if POLICY == 0:  # llamacpp-before, or programs= given
        n = raw
    elif POLICY == 1:  # llamacpp: round to a multiple of the tiles when it loses <= 5%
        rounded = tl.minimum(raw // tl.maximum(tiles, 1), minc) * tiles
        loss = tl.where(rounded > 0, 100 * (raw - rounded) // tl.maximum(raw, 1), 100)
        n = tl.where(loss <= 5, rounded, raw)
    elif POLICY == 2:  # auto: the cost model over every n <= raw, ties to the larger n
        # COST: f64 [us_per_item, us_per_piece, us_launch, shared_round, cut_share] (exact, as
        # on the host)
        u_item = tl.load(COST + 0)
        u_piece = tl.load(COST + 1)
        u_launch = tl.load(COST + 2)
        shared_round = tl.load(COST + 3)
        cut_share = tl.load(COST + 4)
        cand = tl.arange(0, NB) + 1
        w = tl.cast(work, tl.int64)
        c64 = cand.to(tl.int64)
        longest = ((w + c64 - 1) // c64).to(tl.float64)
        rounds = ((cand + n_sat - 1) // n_sat).to(tl.float64)
        if per_sm >= 2:
            rounds = tl.where(rounds == 2.0, 1.0 + shared_round, rounds)
        pieces = tl.minimum(c64, (tl.cast(maxc, tl.int64) * c64 + w - 1) // tl.maximum(w, 1) + 1)
        # cut-free: equal tiles and n divides their count (serving_worklist.cut_free)
        whole = (maxc == minc) & (tiles % cand == 0)
        pieces = tl.where(whole, 0, pieces)
        share = tl.where(whole, 0.0, cut_share)
        cost = longest * u_item * rounds * (1.0 + share) + pieces.to(tl.float64) * u_piece
        if not FUSED:
            cost = cost + u_launch
        cost = tl.where(cand <= raw, cost, float("inf"))
        best = tl.min(cost, 0)
        n = tl.max(tl.where(cost <= best, cand, 0), 0)
    else:  # split: every real tile in `split` pieces
        n = tiles * split
    return tl.where(work > 0, n, 0)


@triton.jit
def _whole_tiles(work, tiles, maxc, minc, lq_max, resident, lq_min, ws_resident,
                 WS: tl.constexpr):
    """Whether a step runs in whole tiles, each program taking the next longest-first
    (serving_worklist.whole_tiles_step): a compute-bound step whose tiles differ in length at
    least UNEQUAL x and outnumber the resident programs more than MANY x, where the GPU's
    hand-out of whole tiles (work per resident program plus one longest tile, or their
    waves) beats one cut wave at CUT_PENALTY_MANY. WS: whole tiles run the Hopper kernel
    (`ws_resident` programs, each WS / 10 x as fast as a stream-K program): any
    compute-bound step whose whole tiles there beat the cut wave."""
    work = tl.cast(work, tl.int64)
    one = tl.maximum(tl.minimum(resident, work), 1)
    cut_x10 = (work + one - 1) // one * CUT_X10
    if WS:
        r = tl.maximum(ws_resident, 1)
        ws_waves = (tl.cast(tiles, tl.int64) + r - 1) // r * maxc
        ws_handed = (work + r - 1) // r + maxc
        return ((lq_max >= lq_min) & (work > 0)
                & (tl.minimum(ws_waves, ws_handed) * 100 < cut_x10 * WS))
    waves = (tl.cast(tiles, tl.int64) + resident - 1) // resident * maxc
    handed = (work + resident - 1) // resident + maxc
    whole_x10 = tl.minimum(waves, handed) * 10
    prompt = (tiles > MANY * resident) & (maxc >= UNEQUAL * minc) & (lq_max >= lq_min)
    return prompt & (work > 0) & (whole_x10 < cut_x10)


@triton.jit(do_not_specialize=[*SHAPE_INTS, "n_counters"])
def work_list_kernel(
    SEQ_K, SEQ_Q, WL, COST, COUNTERS, n_counters,
    batch, q_len, cap_q, total_q, cap_k, total_k, hz, rb_max, window,
    grid_programs, split, n_sat, per_sm, q_lo, q_hi, resident, ws_resident,
    CU_K: tl.constexpr, VARLEN_Q: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, POLICY: tl.constexpr, FUSED: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    LOG_B: tl.constexpr, RB_CHUNK: tl.constexpr, NB: tl.constexpr, Q_RANGE: tl.constexpr,
    WHOLE: tl.constexpr = False, LQ_MIN: tl.constexpr = 0, TAIL: tl.constexpr = 0,
    WS: tl.constexpr = 0,
):
    """One program: lengths -> row blocks -> per-row-block KV blocks -> prefix sums -> N.
    Also sets the fused merge's `n_counters` counters to 0 (the main kernel leaves them so,
    but a workspace of the call's own starts as garbage)."""
    if FUSED:
        for c0 in range(0, n_counters, 1024):
            c = c0 + tl.arange(0, 1024)
            tl.store(COUNTERS + c, tl.zeros([1024], dtype=tl.int32), mask=c < n_counters)
    rb_real, lq_max = _sequences(SEQ_K, SEQ_Q, WL, batch, q_len, cap_q, total_q, cap_k,
                                 total_k, rb_max, q_lo, q_hi, CU_K, VARLEN_Q, Q_RANGE, TOKENS,
                                 BLOCK_B)
    tl.debug_barrier()  # the per-sequence arrays are read back below by other threads
    o_lq, o_lk, _, _, o_rbe, o_start, o_count, o_seq, o_qblock, o_first = wl_offsets(batch, rb_max)
    carry = tl.zeros([], dtype=tl.int32)
    maxc = tl.zeros([], dtype=tl.int32)
    minc = tl.zeros([], dtype=tl.int32) + 2147483647
    for r0 in range(0, rb_max, RB_CHUNK):
        rb = r0 + tl.arange(0, RB_CHUNK)
        real = rb < rb_real
        # -- its sequence: the number of sequences whose row blocks end at or before rb
        lo = tl.zeros([RB_CHUNK], dtype=tl.int32)
        hi = tl.zeros([RB_CHUNK], dtype=tl.int32) + batch
        for step in tl.static_range(LOG_B + 1):
            open_ = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(WL + o_rbe + mid, mask=real & open_, other=0)
            right = open_ & (end <= rb)
            hi = tl.where(open_ & (end > rb), mid, hi)
            lo = tl.where(right, mid + 1, lo)
        b = tl.where(real, lo, 0)
        lq = tl.load(WL + o_lq + b, mask=real, other=0)
        lk = tl.load(WL + o_lk + b, mask=real, other=0)
        rb_end = tl.load(WL + o_rbe + b, mask=real, other=0)
        qblock = rb - (rb_end - (lq + TOKENS - 1) // TOKENS)
        first, count = _kv_blocks(lq, lk, qblock, window, TOKENS, BLOCK_N, CAUSAL, HAS_WINDOW)
        count = tl.where(real, count, 0)
        inside = rb < rb_max
        ends = tl.cumsum(count * hz, 0) + carry
        tl.store(WL + o_start + 1 + rb, ends, mask=inside)
        tl.store(WL + o_count + rb, count, mask=inside)
        tl.store(WL + o_seq + rb, b, mask=inside)
        tl.store(WL + o_qblock + rb, tl.where(real, qblock, 0), mask=inside)
        tl.store(WL + o_first + rb, tl.where(real, first, 0), mask=inside)
        carry = carry + tl.sum(count * hz, 0)
        maxc = tl.maximum(maxc, tl.max(count, 0))
        minc = tl.minimum(minc, tl.min(tl.where(real, count, 2147483647), 0))
    tl.store(WL + o_start, 0)
    work = carry
    n = _programs(work, rb_real * hz, maxc, minc, grid_programs, split, n_sat, per_sm, COST,
                  POLICY, FUSED, NB)
    whole = work < 0  # False
    if WHOLE:  # policy auto on a plan whose steps can be whole prompts
        whole = _whole_tiles(work, rb_real * hz, maxc, minc, lq_max, resident, LQ_MIN,
                             ws_resident, WS)
    tl.store(WL + 0, work)
    tl.store(WL + 1, tl.where(whole, 0, n))  # no stream-K program: the fixups find nothing
    tl.store(WL + WHOLE_FLAG, whole.to(tl.int32))
    tl.store(WL + WHOLE_NEXT, 0)
    tl.store(WL + 2, rb_real)
    tl.store(WL + 3, maxc)
    tl.store(WL + 4, tl.where(rb_real > 0, minc, 0))
    # the dynamic tail (serving_worklist.tail_split): TAIL percent of W in at most
    # grid_programs chunks, leaving every one of the N static shares an item (an empty share
    # would count as a piece of the tiles around it); none in a whole-tile step
    t_items = tl.minimum((tl.cast(work, tl.int64) * TAIL // 100).to(tl.int32), work - n)
    t_items = tl.where(whole | (n == 0), 0, t_items)
    chunk = tl.maximum((t_items + grid_programs - 1) // grid_programs, 1)
    tl.store(WL + TAIL_START, work - t_items)
    tl.store(WL + TAIL_CHUNK, chunk)
    tl.store(WL + TAIL_CHUNKS, (t_items + chunk - 1) // chunk)
    tl.store(WL + TAIL_NEXT, 0)
