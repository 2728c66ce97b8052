"""Program-count policies (docs/design.md, "Program-count policies") and the fixup rule:
pure functions of numbers."""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

POLICIES = ("llamacpp-before", "round-4x", "llamacpp", "split", "auto")
# earlier names, still accepted
POLICY_ALIASES = {"llamacpp-master": "llamacpp-before", "seed-4x": "round-4x"}
FIXUPS = ("none", "uniform", "general", "fused")
MAX_EFFICIENCY_LOSS_PERCENT = 5  # llama.cpp: max_efficiency_loss_percent
# Prompt chunks (compute-bound): a plan that cuts tiles costs its programs the partials, the
# fixup and a second tile start. Measured on an H200 (PERF.md, "Prompt chunks"): at about the
# same items per program, cut plans took 1.06-1.12x the time of whole-tile plans where the
# tiles were about as many as the resident programs (prompt chunks), 1.49-1.53x where they
# were 3.9-31 times as many (whole prompts of 2048-16384 tokens: tools/prompt_square.py);
# at 2.5 times (qwen3-14b, 1024 tokens over 32768 keys: 328 equal tiles, three waves whole)
# one cut wave was 1.16x faster than whole tiles.
CUT_PENALTY = 1.1
CUT_PENALTY_MANY = 1.5
MANY_TILES = 3  # tiles per resident program beyond which CUT_PENALTY_MANY applies
UNEQUAL_TILES = 2  # ... where the longest tile has at least this many times the shortest's blocks
# A 128-row prompt tile does about 128 FLOPs per byte of 16-bit K/V it reads, under Hopper's
# ratio of matmul rate to DRAM bandwidth: a cut plan stays compute-bound only where programs
# of one KV head read the same blocks at about the same time, so that the L2 serves all but
# the first read (`co_readers`: ranges that start within LOCKSTEP_BLOCKS KV blocks of each
# other in one KV head). `auto` weighs program counts down to 1 - 1/SHARED_SEARCH of the
# resident programs too, where split points line up (PERF.md, "Prompt chunks").
LOCKSTEP_BLOCKS = 1
SHARED_SEARCH = 8
# A cut plan of more programs than run at once (two waves) against one wave of the same items
# per program: 1.04-1.08x slower where K/V reads did not decide (H200, the n = 128 chunks of
# four models and qwen3-14b n = 512 L = 8192; `prefill/programs.csv`)
WAVES_PENALTY = 1.06


class KVLayout(NamedTuple):
    """How a dense plan's work list reads K/V, for `compute_bound_programs`.

    kv_first, kv_count: each token block's first KV block and its number of blocks.
    groups_per_head: consecutive tile groups of the work list that read one KV head's K/V.
    memory_ratio: the time to read every item's K/V once from DRAM over the time to compute
        every item with all resident programs busy. 1.4 fits 128-row tiles of 16-bit K/V on
        an H200 (PERF.md, "Prompt chunks"); it scales with bytes per value and 1 / tile rows.
    """

    kv_first: tuple
    kv_count: tuple
    groups_per_head: int
    memory_ratio: float


# What each policy reproduces (docs/llamacpp.md has the llama.cpp facts with file:line)
POLICY_NOTES = {
    "llamacpp-before": "llama.cpp before its uniform fixup kernel: N = min(max_programs, W), "
                       "unrounded; every cut tile merged by the general fixup",
    "round-4x": "N rounded down to a multiple of ntiles_dst when N > 4 x ntiles_dst "
                "(an intermediate rule of llama.cpp's change); uniform fixup when it applies",
    "llamacpp": "llama.cpp today: N rounded down to a multiple of ntiles_dst when that loses at "
                "most 5% of the programs; uniform fixup when N is a multiple, else general",
    "split": "no stream-K: a fixed number of KV splits per tile (FlashDecoding, llama.cpp's "
             "parallel_blocks search) and a uniform merge",
    "auto": "skattn's cost model picks N among the candidates of the other policies",
}


def canonical_policy(policy: str) -> str:
    """The policy's name in POLICIES (aliases resolved); ValueError for an unknown one."""
    name = POLICY_ALIASES.get(policy, policy)
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES} (or an alias in "
                         f"{sorted(POLICY_ALIASES)}), got {policy!r}")
    return name


def fixup_for(programs: int, ntiles_dst: int) -> str:
    """llama.cpp's choice: none when N divides ntiles_dst, uniform for a multiple above it."""
    if programs < 1 or ntiles_dst < 1:
        raise ValueError(f"programs and ntiles_dst must be >= 1, got {programs}, {ntiles_dst}")
    if ntiles_dst % programs == 0:
        return "none"
    if programs % ntiles_dst == 0:
        return "uniform"
    return "general"


def _on_tile_edges(programs, work, kv_count) -> bool:
    """Whether every program boundary floor(p*W/N) is a tile boundary (llama.cpp's tiles are
    all ntiles_kv long, so there N | ntiles_dst suffices; ours need not be)."""
    group_work = sum(kv_count)
    edges, total = {0}, 0
    for c in kv_count:
        total += c
        edges.add(total)
    return all(p * work // programs % group_work in edges for p in range(programs))


def decide_fixup(*, programs: int, ntiles_dst: int, kv_count: tuple[int, ...], work: int,
                 requested: str | None, policy: str, chosen: bool, compute_bound: bool) -> str:
    """The fixup kind of a plan.

    1. llama.cpp's rule by N: none when N divides ntiles_dst, uniform when N is a multiple of
       it, general otherwise.
    2. Causal or window tiles differ in length, so N | ntiles_dst can still cut tiles: "none"
       holds where every program boundary is a tile edge, or with one whole tile per program
       (N = ntiles_dst) when that is asked for (fixup="none", or `auto` for a prompt chunk).
    3. With no kind requested, uniform becomes general for "llamacpp-before" (llama.cpp before
       the uniform kernel existed merged every cut tile with the general one) and where a
       policy's N cuts the shortest tile into more pieces than it has KV blocks.
    4. A requested kind: "fused" replaces any merge, "general" may replace uniform; any other
       disagreement with the rule is an error.
    """
    kind = fixup_for(programs, ntiles_dst)
    if kind == "none" and not _on_tile_edges(programs, work, kv_count):
        auto_whole = chosen and policy == "auto" and compute_bound and requested != "general"
        whole = programs == ntiles_dst and (requested == "none" or auto_whole)
        if not whole:
            kind = "general"
    too_many_pieces = kind == "uniform" and programs // ntiles_dst > min(kv_count)
    if requested is None and kind == "uniform" and (policy == "llamacpp-before"
                                                    or (chosen and too_many_pieces)):
        kind = "general"
    if requested is not None and requested != kind:
        if requested == "fused":
            kind = "none" if kind == "none" else "fused"
        elif requested == "general" and kind == "uniform":
            kind = "general"
        else:
            raise ValueError(f"fixup={requested!r} does not apply to programs={programs} with "
                             f"ntiles_dst={ntiles_dst} (llama.cpp's rule gives {kind!r})")
    if kind == "uniform" and too_many_pieces:
        raise ValueError(f"programs={programs} cuts tiles into {programs // ntiles_dst} pieces, more "
                         f"than the shortest tile's {min(kv_count)} KV blocks")
    return kind


@dataclass(frozen=True)
class CostModel:
    """Parameters of the `auto` policy, in microseconds (see `skattn calibrate`).

    us_per_item: one (tile, KV block) work item of a program that has an SM to itself.
    saturation: the fraction of max_programs that run as one program per SM, N_sat; beyond it
        programs share SMs in rounds (time = longest * us_per_item * ceil(N / N_sat)).
        Measured on an H200 (132 SMs): N = 128 beat every N from 129 to 263 in every swept
        decode cell (tests/data/sweep-8-cells.csv), so N_sat = 128-132.
    us_per_piece: merging one partial piece of a split tile.
    us_launch: the extra launch of a separate fixup kernel (uniform, general); ~0 since the
        fixup is launched while the main kernel runs (programmatic dependent launch).
    memory_ratio: for compute-bound (prompt) plans of 128-row tiles over 16-bit K/V, the time
        to read every item's K/V from DRAM over the time to compute them all (KVLayout).
    cut_share: the extra time of a plan that cuts tiles, as a share of its longest program's
        time, against one whose programs all hold whole tiles (`predict_us`'s cuts=False).
        0 for dense plans; ragged plans set it (serving_plan.ragged_cost_model).
    shared_round: for kernels of which an SM holds two programs (`predict_us`'s per_sm), the
        cost of the second round as a fraction of the first: the two programs hide each
        other's latencies. Measured on an H200, gpt-oss n=16 (128-row tiles of head size 64):
        N=264 against 128 was 1.12x slower at L=8192, 0.97x and 0.91x at 16384 and 32768
        (benchmarks/results/sweep/decode-n1-2-16.csv); 0.75-0.85 picks the faster in all
        three without changing any other cell of the sweep.
    """

    # fitted by `skattn calibrate --from-csv benchmarks/results/sweep/decode-n1-2-16.csv
    # benchmarks/results/sweep/decode-n4-8.csv` (H200, the grid's 75 decode cells x 17 N;
    # with shared_round, auto within 3% of the best measured N in all 75, worst 1.021).
    # `skattn calibrate` replaces them per GPU.
    us_per_item: float = 0.700
    saturation: float = 0.5
    us_per_piece: float = 0.0438
    us_launch: float = 0.0
    memory_ratio: float = 1.4
    shared_round: float = 0.8
    cut_share: float = 0.0
    source: str = "defaults"

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def cost_model_path() -> Path:
    env = os.environ.get("SKATTN_COST_MODEL")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skattn" / "cost_model.json"


def load_cost_model() -> CostModel:
    """The calibrated model if `skattn calibrate` wrote one, else the documented defaults."""
    path = cost_model_path()
    if path.is_file():
        data = json.loads(path.read_text())
        data["source"] = str(path)
        return CostModel(**data)
    return CostModel()


def split_count(ntiles_dst: int, ntiles_kv: int, max_programs: int) -> int:
    """KV splits per tile with the best wave efficiency (llama.cpp's parallel_blocks search)."""
    best_pb, best_eff, best_waves = 1, 0, 0
    for pb in range(1, ntiles_kv + 1):
        nblk = ntiles_dst * pb
        waves = -(-nblk // max_programs)
        eff = 100 * nblk // (waves * max_programs)
        if best_eff >= 95 and waves > best_waves:
            break
        if eff > best_eff:
            best_pb, best_eff, best_waves = pb, eff, waves
    return best_pb


def _rounded(raw: int, ntiles_dst: int, max_split: int) -> int:
    return min(raw // ntiles_dst, max_split) * ntiles_dst


def predict_us(model: CostModel, *, programs: int, ntiles_dst: int, work: int,
               max_tile_work: int, fixup: str, max_programs: int, per_sm: int = 1,
               cuts: bool = True) -> float:
    """Cost of one plan: longest program + merging the most-split tile + extra launch.
    `per_sm`: programs of this kernel one SM holds at once (see CostModel.shared_round);
    `cuts=False`: every program holds whole tiles (no piece, no CostModel.cut_share)."""
    if fixup == "uniform":
        split = programs // ntiles_dst
        longest = -(-max_tile_work // split)
        pieces = split
    else:
        longest = -(-work // programs)
        pieces = 0 if fixup == "none" else min(programs, -(-max_tile_work * programs // work) + 1)
    launch = model.us_launch if fixup in ("uniform", "general") else 0.0
    rounds = -(-programs // saturated_blocks(model, max_programs))
    if per_sm >= 2 and rounds == 2:  # the second round shares SMs with the first
        rounds = 1 + model.shared_round
    if not cuts:
        pieces = 0
    items = longest * model.us_per_item * rounds * (1.0 + (model.cut_share if cuts else 0.0))
    return items + pieces * model.us_per_piece + launch


def saturated_blocks(model: CostModel, max_programs: int) -> int:
    """N_sat: how many programs run one per SM (see CostModel.saturation)."""
    return max(1, int(model.saturation * max_programs + 1e-9))


def programs_for(policy: str, *, ntiles_dst: int, ntiles_kv: int, max_programs: int,
                work: int | None = None, min_tile_work: int | None = None,
                max_tile_work: int | None = None, fixup: str | None = None,
                cost: CostModel | None = None, compute_bound: bool = False,
                resident: int | None = None, per_sm: int = 1,
                layout: KVLayout | None = None) -> int:
    """Number of programs N for `policy` (docs/design.md), with llama.cpp's integer arithmetic.

    `work` (W) defaults to ntiles_dst * ntiles_kv; where causal or window rules give tiles
    fewer KV blocks, pass the real W and the shortest and longest tile's lengths: the
    shortest caps the pieces per tile of a uniform split so that no piece is empty.
    `per_sm` is how many programs of the kernel one SM holds (CostModel.shared_round).
    For compute-bound cells (prompt chunks), where its memory-saturation model does not
    hold, `auto` counts waves of `resident` programs (those the GPU runs at once; default
    max_programs) instead: see `compute_bound_programs` (`layout`: the work list's, for
    whether cut tiles share their K/V reads).
    """
    for name, value in (("ntiles_dst", ntiles_dst), ("ntiles_kv", ntiles_kv), ("max_programs", max_programs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    policy = canonical_policy(policy)
    work = ntiles_dst * ntiles_kv if work is None else work
    max_split = ntiles_kv if min_tile_work is None else min_tile_work
    raw = min(max_programs, work)
    if policy == "llamacpp-before":
        return raw
    if policy == "round-4x":
        return (_rounded(raw, ntiles_dst, max_split) or raw) if raw > 4 * ntiles_dst else raw
    if policy == "llamacpp":
        rounded = _rounded(raw, ntiles_dst, max_split)
        loss = 100 * (raw - rounded) // raw if rounded > 0 else 100
        return rounded if loss <= MAX_EFFICIENCY_LOSS_PERCENT else raw
    if policy == "split":
        return ntiles_dst * min(split_count(ntiles_dst, max_split, max_programs), max_split)
    longest_tile = ntiles_kv if max_tile_work is None else max_tile_work
    if compute_bound:
        rule = programs_for("llamacpp", ntiles_dst=ntiles_dst, ntiles_kv=ntiles_kv,
                           max_programs=max_programs, work=work, min_tile_work=min_tile_work)
        return compute_bound_programs(ntiles_dst, work, longest_tile, rule,
                                     resident or max_programs,
                                     whole=fixup not in ("general", "uniform"),
                                     shortest_tile=max_split, layout=layout)
    return _auto(ntiles_dst, work, max_split, longest_tile, raw, max_programs, fixup,
                 cost or load_cost_model(), per_sm)


def whole_prompt(ntiles_dst: int, resident: int, shortest: int, longest: int) -> bool:
    """Whether a compute-bound plan looks like a whole causal prompt: tiles of unequal length
    (the longest at least UNEQUAL_TILES x the shortest) that outnumber the programs the GPU
    runs at once more than MANY_TILES times. There cut plans pay CUT_PENALTY_MANY, whole
    tiles are counted as the GPU hands them out, and `auto`'s whole tiles run the Hopper
    prompt kernel (planner.plan)."""
    return ntiles_dst > MANY_TILES * resident and longest >= UNEQUAL_TILES * shortest


def co_readers(programs: int, work: int, layout: KVLayout) -> float:
    """The mean number of programs (itself included) whose ranges start in the same KV head
    within LOCKSTEP_BLOCKS KV blocks of each program's start: they read the same K/V blocks
    at about the same time."""
    kv_first, kv_count, groups = layout[:3]
    offsets = [0]
    for c in kv_count:
        offsets.append(offsets[-1] + c)
    starts = []
    for p in range(programs):
        group, r = divmod(p * work // programs, offsets[-1])
        j = bisect.bisect_right(offsets, r) - 1
        starts.append((group // groups, kv_first[j] + r - offsets[j]))
    starts.sort()
    total, lo, hi = 0, 0, 0
    for head, pos in starts:  # two pointers over the sorted (head, position) pairs
        while starts[lo] < (head, pos - LOCKSTEP_BLOCKS):
            lo += 1
        while hi < len(starts) and starts[hi] <= (head, pos + LOCKSTEP_BLOCKS):
            hi += 1
        total += hi - lo
    return total / max(programs, 1)


def compute_bound_programs(ntiles_dst: int, work: int, longest_tile: int, rule: int,
                          resident: int, whole: bool = True,
                          shortest_tile: int | None = None, layout: KVLayout | None = None) -> int:
    """N for a compute-bound plan: one whole tile a program (N = ntiles_dst, no fixup; only if
    `whole`), one wave of `resident` programs, or llama.cpp's `rule`, whichever has the fewest
    items in its programs' waves (ties go to fewer programs). Cut plans pay CUT_PENALTY, and
    WAVES_PENALTY where they take more than one wave.
    Where the plan looks like a whole prompt (`whole_prompt`; `shortest_tile` defaults to the
    longest: equal tiles), cut plans pay CUT_PENALTY_MANY and whole tiles take the lesser of
    their waves of the longest tile and the GPU's greedy hand-out of tiles to free SMs (the
    work per resident program plus one longest tile: unequal tiles fill each other's
    gaps). With the work list's `layout`, a cut plan also takes no less than its K/V reads from
    DRAM (`memory_ratio` x the work over the resident programs, divided by `co_readers`), and
    program counts down to 1 - 1/SHARED_SEARCH of `resident` are candidates too."""
    shortest = longest_tile if shortest_tile is None else shortest_tile

    def items(n):  # the cut plan's programs' items, without its K/V reads
        prompt = whole_prompt(ntiles_dst, min(n, resident), shortest, longest_tile)
        waves = -(-n // resident)
        return (waves * -(-work // n) * (CUT_PENALTY_MANY if prompt else CUT_PENALTY)
                * (WAVES_PENALTY if waves > 1 else 1.0))

    counts = {min(resident, work), rule}
    if layout is not None:
        counts |= set(range(max(1, resident - resident // SHARED_SEARCH), min(resident, work) + 1))
    best = (float("inf"), 0)
    if whole:
        time = -(-ntiles_dst // resident) * longest_tile
        if whole_prompt(ntiles_dst, resident, shortest, longest_tile):
            time = min(time, -(-work // resident) + longest_tile)
        best = (time, ntiles_dst)
    # the K/V reads only add to a cut plan's cost: count co-readers (the slow part) only for
    # counts whose items alone could still beat the best plan so far
    for base, n in sorted((items(n), n) for n in counts):
        if (base, n) >= best:
            break
        if layout is not None:
            base = max(base, layout.memory_ratio * work / resident / co_readers(n, work, layout))
        best = min(best, (base, n))
    return best[1]


def _auto(ntiles_dst, work, max_split, longest_tile, raw, max_programs, fixup, model,
          per_sm=1) -> int:
    """The candidate N with the lowest predicted time (ties go to the larger N)."""
    candidates = {raw, min(work, ntiles_dst * min(max_split, split_count(ntiles_dst, max_split, max_programs)))}
    candidates |= {k * ntiles_dst for k in range(1, min(raw // ntiles_dst, max_split) + 1)}
    candidates |= {d for d in range(1, min(raw, ntiles_dst) + 1) if ntiles_dst % d == 0}
    candidates |= {n for n in range(max(1, raw - 8), raw + 1)}

    def cost(n):
        kind = fixup_for(n, ntiles_dst)
        if fixup == "fused" and kind != "none":
            kind = "fused"
        return predict_us(model, programs=n, ntiles_dst=ntiles_dst, work=work,
                          max_tile_work=longest_tile, fixup=kind, max_programs=max_programs,
                          per_sm=per_sm)

    return min(sorted(candidates), key=lambda n: (cost(n), -n))
