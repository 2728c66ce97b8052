"""The work list a ragged step's device code builds (`kernels/worklist.py`), computed in
Python from a `ServingPlan` and the step's lengths: for tests, tools and the float64
replay of a plan (`reference_serving_plan`), with the device's clamping rules."""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from skattn.planner import _kv_blocks
from skattn.policy import CUT_PENALTY_MANY, predict_us, whole_prompt
from skattn.serving_plan import ServingPlan
from skattn.serving_ws import WS_SPEED_X10

__all__ = ["WorkList", "host_work_list", "whole_tiles_step", "effective_programs", "cut_free",
           "tail_split"]


@dataclass(frozen=True)
class WorkList:
    """The device work list computed in Python (`host_work_list`): what the kernels read."""

    lens_q: list[int]
    lens_k: list[int]
    q_start: list[int]
    k_start: list[int]
    rb_seq: list[int]       # per real row block: sequence
    rb_qblock: list[int]    # token block
    rb_first: list[int]     # first visible KV block
    rb_count: list[int]     # KV blocks of each of its tiles
    rb_start: list[int]     # [RB_max + 1] first item of each row block (padding at W)
    work: int               # W
    programs: int           # N chosen from W (0 in a whole-tile step)
    whole: bool             # the step runs in whole tiles, handed out longest first
    tail_start: int         # S: items [0, S) are the N static shares, [S, W) the tail's
    tail_chunk: int         # items a chunk of the tail
    tail_chunks: int        # chunks K (0: no tail, S = W)
    tile_cost: int = 0      # items each tile's setup counts for in the shares (plan.tile_cost)
    hz: int = 1             # tiles a row block

    # -- shares that count tiles: tile t = rb * hz + h takes tile_cost "setup" positions, then
    # its items, on a line of C = W + tile_cost x tiles positions split evenly among N
    @property
    def positions(self) -> int:
        return self.work + self.tile_cost * len(self.rb_count) * self.hz

    def item_at(self, pos: int) -> int:
        """The first item at or after position `pos` (W past the last tile)."""
        tau, hz = self.tile_cost, self.hz
        rb = sum(1 for r in range(1, len(self.rb_count) + 1)
                 if self.rb_start[r] + tau * hz * r <= pos)
        if rb >= len(self.rb_count):
            return self.work
        c, rbs = self.rb_count[rb], self.rb_start[rb]
        off = pos - rbs - tau * hz * rb
        h = off // (c + tau)
        return rbs + h * c + min(max(off - h * (c + tau) - tau, 0), c)

    def position_of(self, item: int, tile: int) -> int:
        """The position of `item` of tile `tile` (tile = rb x hz + h)."""
        return item + self.tile_cost * (tile + 1)

    @property
    def ranges(self) -> int:
        """N + K: the static shares and the tail's chunks (virtual programs 0 .. N + K - 1,
        each with two partial slots)."""
        return self.programs + self.tail_chunks

    def tile_range(self, plan: ServingPlan, tile: int) -> tuple[int, int]:
        rb, h = divmod(tile, plan.hz)
        first = self.rb_start[rb] + h * self.rb_count[rb]
        return first, first + self.rb_count[rb]

    def program_range(self, p: int) -> tuple[int, int]:
        """[start, end) of virtual program p: static share p < N (of positions where the
        plan counts tiles: `item_at`), else tail chunk p - N."""
        n, s = max(self.programs, 1), self.tail_start
        if p < self.programs and self.tile_cost:
            c = self.positions
            return self.item_at(p * c // n), self.item_at((p + 1) * c // n)
        if p < self.programs:
            return p * s // n, (p + 1) * s // n
        k = p - self.programs
        if k >= self.tail_chunks:
            return self.work, self.work
        return s + k * self.tail_chunk, min(self.work, s + (k + 1) * self.tail_chunk)

    def program_of(self, item: int) -> int:
        """The virtual program whose range holds `item`."""
        s = self.tail_start
        if self.tile_cost and self.programs:
            rb = bisect_right(self.rb_start, item, 1) - 1
            h = (item - self.rb_start[rb]) // self.rb_count[rb]
            pos = self.position_of(item, rb * self.hz + h)
            return ((pos + 1) * self.programs - 1) // self.positions
        if item >= s:
            return self.programs + (item - s) // self.tail_chunk
        return ((item + 1) * max(self.programs, 1) - 1) // s


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def host_work_list(plan: ServingPlan, *, lens_k=None, cu_k=None, cu_q=None, ws: int = 0) -> WorkList:
    """The work list the device builds, in Python, with the device's clamping rules.

    Parameters
    ----------
    plan : ServingPlan
    lens_k : sequence of int, optional
        cache_seqlens (attention_with_kvcache), or
    cu_k : sequence of int, optional
        cu_seqlens_k (varlen).
    cu_q : sequence of int, optional
        cu_seqlens_q (varlen).
    ws : int
        Programs of the Hopper kernel where the plan is bound to run its whole tiles there
        (`serving_launch.bind(plan, device).ws.grid`), else 0 (`whole_tiles_step`).

    Returns
    -------
    WorkList
    """
    geo, b = plan.geometry, plan.batch
    big = 2**31 - 1
    total_k = plan.total_k if plan.layout == "packed" else big
    cap_k = plan.key_capacity
    lq, lk, qs, ks = [], [], [], []
    for i in range(b):
        if cu_k is not None:
            k0 = _clamp(int(cu_k[i]), 0, total_k)
            n = _clamp(int(cu_k[i + 1]) - int(cu_k[i]), 0, cap_k)
            lk.append(min(n, total_k - k0))
            ks.append(k0)
        else:
            lk.append(_clamp(int(lens_k[i]), 0, cap_k))
            ks.append(0)
        if cu_q is not None:
            q0 = _clamp(int(cu_q[i]), 0, plan.total_q)
            raw = int(cu_q[i + 1]) - int(cu_q[i])
            n = _clamp(raw, 0, plan.max_q_len)
            if plan.q_range is not None and not plan.q_range[0] < raw <= plan.q_range[1]:
                n = 0  # the other half's sequence
            lq.append(min(n, plan.total_q - q0))
            qs.append(q0)
        else:
            lq.append(plan.q_len)
            qs.append(0)
    rb_seq, rb_qblock, rb_first, rb_count = [], [], [], []
    t = geo.tokens_per_tile
    for i in range(b):
        for j in range(-(-lq[i] // t)):
            if len(rb_seq) == plan.rb_max:
                break
            first, count = _kv_blocks(j, q_len=lq[i], kv_len=lk[i], tokens=t,
                                      block_n=geo.block_n, causal=plan.causal,
                                      window=plan.window)
            rb_seq.append(i)
            rb_qblock.append(j)
            rb_first.append(first)
            rb_count.append(count)
    rb_start = [0]
    for c in rb_count:
        rb_start.append(rb_start[-1] + c * plan.hz)
    work = rb_start[-1]
    rb_start += [work] * (plan.rb_max - len(rb_count))
    tiles = len(rb_count) * plan.hz
    longest, shortest = max(rb_count, default=0), min(rb_count, default=0)
    whole = whole_tiles_step(plan, work, tiles, longest, shortest, max(lq, default=0), ws)
    programs = 0 if whole else effective_programs(plan, work, tiles, longest, shortest)
    start, chunk, chunks = tail_split(plan, work, programs)
    return WorkList(lq, lk, qs, ks, rb_seq, rb_qblock, rb_first, rb_count, rb_start, work,
                    programs, whole, start, chunk, chunks, plan.tile_cost, plan.hz)


def tail_split(plan: ServingPlan, work: int, programs: int) -> tuple[int, int, int]:
    """(S, chunk, K) of the dynamic tail (kernels/worklist.py): `plan.tail` percent of W,
    at most W - N (every static share keeps an item: the fused merge counts each program
    between a tile's first and last as one of its pieces), in chunks of ceil(tail / N_grid)
    items (at most one a grid program); none where no stream-K program runs."""
    tail = min(work * plan.tail // 100, work - programs) if programs > 0 else 0
    chunk = max(-(-tail // plan.programs), 1)
    return work - tail, chunk, -(-tail // chunk)


def whole_tiles_step(plan: ServingPlan, work: int, tiles: int, longest: int, shortest: int,
                     q_max: int, ws: int = 0) -> bool:
    """Whether the device runs a step in whole tiles (kernels/worklist.py `_whole_tiles`):
    on a plan that allows it (`ServingPlan.whole_tiles`), a compute-bound step (a sequence
    of at least `whole_q_min` query tokens) whose tiles differ in length at least
    UNEQUAL_TILES x and outnumber the resident programs more than MANY_TILES x, where whole
    tiles handed out to free programs (the work per resident program plus one longest tile,
    or their waves) take less than one cut wave at CUT_PENALTY_MANY (the dense planner's
    rule for whole prompts, policy.compute_bound_programs). `ws`: the programs of the Hopper
    kernel that then runs whole tiles (`serving_ws`, bound on a Hopper GPU; 0: none): whole
    tiles wherever their time there, at `serving_ws.WS_SPEED_X10` / 10 times a stream-K
    program's speed, beats one cut wave."""
    r = plan.resident
    if not plan.whole_tiles or work == 0 or q_max < plan.whole_q_min:
        return False
    cut = -(-work // max(min(r, work), 1)) * CUT_PENALTY_MANY
    if ws:
        return min(-(-tiles // ws) * longest, -(-work // ws) + longest) * 10 < cut * WS_SPEED_X10
    if not whole_prompt(tiles, r, shortest, longest):
        return False
    return min(-(-tiles // r) * longest, -(-work // r) + longest) < cut


def effective_programs(plan: ServingPlan, work: int, tiles: int, max_count: int,
                       min_count: int) -> int:
    """The program count the device picks from the real work (docs/serving.md, step 4)."""
    if work == 0:
        return 0
    if plan.policy == "split":
        return tiles * plan.split
    raw = min(plan.programs, work)
    if plan.policy == "llamacpp":
        rounded = min(raw // tiles, min_count) * tiles
        loss = 100 * (raw - rounded) // raw if rounded > 0 else 100
        return rounded if loss <= 5 else raw
    if plan.policy == "auto":
        kind = "fused" if plan.fixup == "fused" else "general"
        best = None
        for n in range(1, raw + 1):
            c = predict_us(plan.cost_model, programs=n, ntiles_dst=max(tiles, 1), work=work,
                           max_tile_work=max_count, fixup=kind, max_programs=plan.max_programs,
                           per_sm=plan.per_sm, cuts=not cut_free(n, tiles, max_count, min_count))
            if best is None or c <= best[0]:
                best = (c, n)
        return best[1]
    return raw


def cut_free(n: int, tiles: int, max_count: int, min_count: int) -> bool:
    """n programs share the work list without cutting a tile: every tile has the same length
    and n divides the tile count."""
    return max_count == min_count and tiles % n == 0
