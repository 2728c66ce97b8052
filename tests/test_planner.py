"""Planner: exact properties of plans over random shapes, and the policies' worked examples."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skattn.planner import FIXUPS, POLICIES, fixup_for, programs_for, plan
from skattn.policy import canonical_policy, load_cost_model, split_count
from skattn.tuning import Tuning

H100 = dict(sms=132, occupancy=2)  # max_programs = 264, llama.cpp's worked example


@st.composite
def shapes(draw, max_q=600, max_kv=5000, max_sms=140):
    kv_heads = draw(st.integers(1, 8))
    return dict(
        batch=draw(st.integers(1, 3)),
        q_len=draw(st.integers(1, max_q)),
        kv_len=draw(st.integers(1, max_kv)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16])),
        head_dim=draw(st.sampled_from([64, 128])),
        causal=(causal := draw(st.booleans())),
        window=draw(st.one_of(st.none(), st.integers(1, 3000))) if causal else None,
        sms=draw(st.integers(1, max_sms)),
        occupancy=draw(st.integers(1, 4)),
        policy=draw(st.sampled_from(POLICIES)),
        fixup=draw(st.sampled_from([None, "fused"])),
    )


def _check_plan(p, requested_fixup):
    ranges = p.ranges()
    assert 1 <= p.programs <= p.work and len(ranges) == p.programs
    # -- every item of [0, W) exactly once: ranges contiguous and in program order
    assert ranges[0][0] == 0 and ranges[-1][1] == p.work
    assert all(a <= b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    # -- the fixup kind
    kind = fixup_for(p.programs, p.ntiles_dst)
    cuts = any(p.tile_range(p.tile_of(a))[0] != a or p.tile_range(p.tile_of(b - 1))[1] != b
               for a, b in ranges if b > a)
    if kind == "none" and cuts and not (requested_fixup == "none"
                                        and p.programs == p.ntiles_dst):
        kind = "general"  # tiles of unequal length (causal, window): N | ntiles_dst cuts some
    if kind == "uniform" and p.programs // p.ntiles_dst > min(p.kv_count):
        kind = "general"  # a policy's N would leave empty uniform pieces
    if kind == "uniform" and p.policy == "llamacpp-before" and requested_fixup is None:
        kind = "general"  # llama.cpp before the uniform kernel: general for every cut tile
    if requested_fixup == "fused":
        assert p.fixup == ("none" if kind == "none" else "fused")
    else:
        assert p.fixup == kind
    lengths = [b - a for a, b in ranges]
    if p.fixup == "uniform":
        split = p.programs // p.ntiles_dst
        assert p.split == split > 1
        for tile in range(p.ntiles_dst):
            first, stop = p.tile_range(tile)
            mine = ranges[tile * split:(tile + 1) * split]
            assert mine[0][0] == first and mine[-1][1] == stop  # no program crosses a tile edge
            assert all(b > a for a, b in mine)                  # every piece nonempty
    elif p.per_tile_ranges:
        assert p.fixup == "none" and ranges == [p.tile_range(t) for t in range(p.ntiles_dst)]
    else:
        assert max(lengths) - min(lengths) <= 1                 # balanced within one item
    # -- tiles partition the work list, and tile_of inverts tile_range
    assert p.tile_range(0)[0] == 0 and p.tile_range(p.ntiles_dst - 1)[1] == p.work
    step = max(1, p.ntiles_dst // 50)
    for tile in list(range(0, p.ntiles_dst, step)) + [p.ntiles_dst - 1]:
        first, stop = p.tile_range(tile)
        assert stop - first == p.kv_count[tile % p.ntiles_x] >= 1
        assert p.tile_of(first) == tile == p.tile_of(stop - 1)
        if tile + 1 < p.ntiles_dst:
            assert p.tile_range(tile + 1)[0] == stop
    assert p.workspace_floats <= p.programs * 2 * p.geometry.block_m * (p.head_dim_v + 2)
    if p.fixup == "none":
        assert p.workspace_floats == 0 and not p.pieces()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes())
def test_policy_plans(shape):
    _check_plan(plan(**shape), shape["fixup"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes(max_q=300, max_kv=600, max_sms=8))
def test_small_policy_plans(shape):
    # few SMs and short tiles: W <= max_programs and causal tiles of unequal length are common
    _check_plan(plan(**shape), shape["fixup"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes(), st.data())
def test_explicit_programs_plans(shape, data):
    work = plan(**shape).work
    shape["programs"] = n = data.draw(st.integers(1, work), label="programs")
    pieces = n // plan(**dict(shape, programs=1)).ntiles_dst
    probe = plan(**dict(shape, programs=1))
    if (shape["fixup"] is None and fixup_for(n, probe.ntiles_dst) == "uniform"
            and pieces > min(probe.kv_count)
            and canonical_policy(shape["policy"]) != "llamacpp-before"):
        # a uniform cut into more pieces than the shortest tile has KV blocks leaves one empty
        # ("llamacpp-before" merges every cut tile with the general fixup: no uniform cut)
        with pytest.raises(ValueError, match="programs"):
            plan(**shape)
        return
    _check_plan(plan(**shape), shape["fixup"])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 300), st.integers(1, 600), st.sampled_from(POLICIES))
def test_policies_stay_in_range(ntiles_dst, ntiles_kv, max_programs, policy):
    n = programs_for(policy, ntiles_dst=ntiles_dst, ntiles_kv=ntiles_kv, max_programs=max_programs)
    assert 1 <= n <= ntiles_dst * ntiles_kv
    if policy not in ("split", "auto"):  # split (an auto candidate) may run several waves
        assert n <= max_programs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 64), st.integers(1, 64),
       st.booleans(), st.one_of(st.none(), st.integers(1, 400)))
def test_visible_kv_blocks_match_the_mask(q_len, kv_len, tokens, block_n, causal, window):
    # brute force over the mask: bottom-right causal, window implies causal
    from skattn.planner import _kv_blocks

    for qblock in range(-(-q_len // tokens)):
        first, count = _kv_blocks(qblock, q_len=q_len, kv_len=kv_len, tokens=tokens,
                                  block_n=block_n, causal=causal, window=window)
        rows = range(qblock * tokens, min(q_len, (qblock + 1) * tokens))
        seen = {j // block_n for i in rows for j in range(kv_len)
                if (not (causal or window) or j <= kv_len - q_len + i)
                and (window is None or j > kv_len - q_len + i - window)}
        if seen:
            assert (first, count) == (min(seen), max(seen) - min(seen) + 1)
        else:
            assert (first, count) == (0, 1)  # one masked block keeps the tile in the work list


# -- worked examples: llama.cpp's rule for max_programs = 264 (docs/llamacpp.md, "The program count")
@pytest.mark.parametrize("ntiles_dst, ntiles_kv, programs, fixup", [
    (128, 64, 256, "uniform"),   # rounded 256 loses 3%
    (100, 64, 264, "general"),   # rounded 200 would lose 24%
    (264, 64, 264, "none"),
    (300, 1, 264, "general"),    # raw = min(264, 300); rounds to 0, keeps raw
    (528, 64, 264, "none"),      # two whole tiles per program
    (4, 8, 32, "uniform"),       # raw = W = 32: eight pieces of one KV block each
])
def test_llamacpp_worked_table(ntiles_dst, ntiles_kv, programs, fixup):
    n = programs_for("llamacpp", ntiles_dst=ntiles_dst, ntiles_kv=ntiles_kv, max_programs=264)
    assert n == programs and fixup_for(n, ntiles_dst) == fixup


def test_llamacpp_five_percent_is_integer_percent():
    kw = dict(ntiles_kv=64)
    assert programs_for("llamacpp", ntiles_dst=95, max_programs=200, **kw) == 190    # exactly 5%
    assert programs_for("llamacpp", ntiles_dst=941, max_programs=1000, **kw) == 941  # 5.9% -> 5
    assert programs_for("llamacpp", ntiles_dst=470, max_programs=1000, **kw) == 1000  # 6%
    assert programs_for("llamacpp", ntiles_dst=47, max_programs=100, **kw) == 100    # 6%


def test_seed_4x_threshold():
    # min_tile_work=3 caps the round-down at 3 pieces, so rounding is visible at raw == 4T
    kw = dict(ntiles_dst=10, ntiles_kv=8, min_tile_work=3)
    assert programs_for("seed-4x", max_programs=40, **kw) == 40   # raw == 4T: kept
    assert programs_for("seed-4x", max_programs=41, **kw) == 30   # raw > 4T: rounded (capped)
    assert programs_for("seed-4x", ntiles_dst=10, ntiles_kv=8, max_programs=47) == 40
    # where the policies differ: T=60, raw=264 > 240 rounds; llamacpp's loss 9% does not
    assert programs_for("seed-4x", ntiles_dst=60, ntiles_kv=64, max_programs=264) == 240
    assert programs_for("llamacpp", ntiles_dst=60, ntiles_kv=64, max_programs=264) == 264
    assert programs_for("llamacpp-master", ntiles_dst=128, ntiles_kv=64, max_programs=264) == 264


def test_split_wave_efficiency():
    # T=8: pb=33 fills one wave exactly (100%); pb=34 needs a second wave, search stops
    assert split_count(8, 64, 264) == 33
    assert programs_for("split", ntiles_dst=8, ntiles_kv=64, max_programs=264) == 264
    # T=100: pb=2 75% (1 wave), pb=5 94% (2 waves), pb=13 98% (5 waves); pb=14 opens a 6th
    assert split_count(100, 64, 264) == 13
    assert programs_for("split", ntiles_dst=100, ntiles_kv=64, max_programs=264) == 1300
    # only 10 KV blocks: pb=10 ties 94% with pb=5, and ties keep the first
    assert split_count(100, 10, 264) == 5


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 600), st.integers(1, 200), st.integers(1, 600), st.integers(1, 200),
       st.sampled_from([None, "fused"]))
def test_auto_in_range(ntiles_dst, ntiles_kv, max_programs, min_work, fixup):
    min_work = min(min_work, ntiles_kv)
    work = ntiles_dst * ntiles_kv
    n = programs_for("auto", ntiles_dst=ntiles_dst, ntiles_kv=ntiles_kv, max_programs=max_programs,
                    work=work, min_tile_work=min_work, max_tile_work=ntiles_kv, fixup=fixup)
    assert 1 <= n <= work


# -- bad arguments name the argument
SHAPE = dict(batch=1, q_len=4, kv_len=1000, q_heads=32, kv_heads=8, head_dim=128, **H100)


@pytest.mark.parametrize("change, name", [
    (dict(q_heads=30), "q_heads"),
    (dict(batch=0), "batch"),
    (dict(q_len=-1), "q_len"),
    (dict(kv_len=0), "kv_len"),
    (dict(head_dim=0), "head_dim"),
    (dict(kv_heads=0), "kv_heads"),
    (dict(sms=0), "sms"),
    (dict(window=0), "window"),
    (dict(policy="fastest"), "policy"),
    (dict(programs=0), "programs"),
    (dict(programs=10**6), "programs"),
    (dict(fixup="lazy"), "fixup"),
    (dict(programs=8, fixup="uniform"), "fixup"),  # N divides ntiles_dst: llama.cpp says none
])
def test_bad_arguments(change, name):
    with pytest.raises(ValueError, match=name):
        plan(**dict(SHAPE, **change))


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="policy"):
        programs_for("fastest", ntiles_dst=4, ntiles_kv=4, max_programs=8)
    with pytest.raises(ValueError, match="max_programs"):
        programs_for("llamacpp", ntiles_dst=4, ntiles_kv=4, max_programs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_plan_without_gpu_asks_for_sms(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape = {k: v for k, v in SHAPE.items() if k not in H100}
    with pytest.raises(RuntimeError, match="sms="):
        plan(**shape)


def test_fixup_names():
    assert set(FIXUPS) == {"none", "uniform", "general", "fused"}


# -- causal and window rules shrink the work list
def test_causal_drops_hidden_kv_blocks():
    p = plan(batch=1, q_len=512, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128, causal=True,
             **H100)
    assert p.work < p.ntiles_dst * p.ntiles_kv
    assert p.kv_count[0] < p.kv_count[-1] == p.ntiles_kv  # the last token block sees everything


def test_window_drops_most_kv_blocks():
    p = plan(batch=1, q_len=16, kv_len=8192, q_heads=64, kv_heads=8, head_dim=64, causal=True,
             window=128, **H100)
    assert p.work * 10 < p.ntiles_dst * p.ntiles_kv
    assert all(c <= 3 for c in p.kv_count)
    _check_plan(p, None)


def test_none_becomes_general_when_unequal_tiles_are_cut():
    # N | ntiles_dst, but causal tiles of 1, 1, 2, 2 KV blocks: W=6 over 4 programs cuts tile 2
    shape = dict(batch=1, q_len=97, kv_len=66, q_heads=4, kv_heads=1, head_dim=64, causal=True,
                 sms=1, occupancy=1, policy="split", block_n=64)
    p = plan(**shape)
    assert (p.programs, p.ntiles_dst, p.kv_count) == (4, 4, (1, 1, 2, 2))
    assert p.fixup == "general" and p.pieces() == {2: [1, 2]}
    assert plan(**dict(shape, fixup="fused")).fixup == "fused"
    # asked for: one whole tile per program (N = ntiles_dst), no fixup, unequal lengths
    whole = plan(**dict(shape, fixup="none"))
    assert whole.fixup == "none" and whole.per_tile_ranges and not whole.pieces()
    assert whole.ranges() == [(0, 1), (1, 2), (2, 4), (4, 6)]
    _check_plan(whole, "none")
    with pytest.raises(ValueError, match="fixup"):  # N | ntiles_dst but N < ntiles_dst: cuts
        plan(**dict(shape, programs=2, fixup="none"))


@pytest.mark.parametrize("policy", ["llamacpp-master", "llamacpp", "auto"])
def test_policy_n_beyond_the_shortest_tile_is_general(policy):
    # causal prefill of one head: tiles of 2..16 KV blocks, W = 72 = 9 x ntiles_dst < 264;
    # a uniform cut into 9 pieces would leave the 2-block tiles with empty pieces
    shape = dict(batch=1, q_len=1024, kv_len=1024, q_heads=1, kv_heads=1, head_dim=64,
                 causal=True, policy=policy, **H100)
    p = plan(**shape)
    assert p.fixup in ("general", "none") and p.ntiles_dst == 8
    _check_plan(p, None)
    if p.policy == "llamacpp-before":  # merges every cut tile with the general fixup
        assert plan(**dict(shape, programs=72)).fixup == "general"
    else:
        with pytest.raises(ValueError, match="programs"):  # the caller's own N fails loudly
            plan(**dict(shape, programs=72))


@pytest.mark.parametrize("n,ratio", [(1, 4), (2, 8), (16, 8)])
def test_before_and_after_the_uniform_fixup_differ(n, ratio):
    # 132 SMs x 2: N = 264 is a multiple of ntiles_dst (8 KV heads), so llama.cpp's rule gives
    # uniform; llama.cpp before that kernel existed ran its one (general) fixup for the same N
    kw = dict(batch=1, q_len=n, kv_len=16384, q_heads=8 * ratio, kv_heads=8, head_dim=128,
              causal=True, sms=132, occupancy=2)
    before, after = plan(policy="llamacpp-before", **kw), plan(policy="llamacpp", **kw)
    assert before.programs == after.programs == 264
    assert (before.fixup, after.fixup) == ("general", "uniform")
    assert plan(policy="llamacpp-master", **kw) == before  # the earlier name is an alias
    assert "before its uniform fixup" in before.describe()
    assert plan(policy="seed-4x", **kw).policy == "round-4x"


def test_queries_without_keys_keep_their_tile():
    # q_len > kv_len with bottom-right causal: the first queries see no key at all
    p = plan(batch=2, q_len=600, kv_len=100, q_heads=8, kv_heads=8, head_dim=64, causal=True,
             policy="llamacpp", **H100)
    assert p.ntiles_dst == 2 * 8 * p.ntiles_x and 1 in p.kv_count
    _check_plan(p, None)


# -- output
def test_describe_and_draw(tmp_path):
    p = plan(**SHAPE)
    text = p.describe()
    assert f"programs {p.programs}" in text and f"fixup {p.fixup}" in text
    path = tmp_path / "plan.png"
    p.draw(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model,programs,fixup", [
    ("qwen3-14b", 132, "general"),  # 168 tiles on 132 SMs: whole tiles would take 2 waves
    ("llama-8b", 128, "none"),      # 128 tiles, one wave: each program its whole tile
    ("gpt-oss", 256, "none"),       # head size 64: two programs an SM, 256 tiles in one wave
    ("llama-70b", 256, "none"),     # 2 waves either way; whole tiles need no fixup
])
def test_auto_counts_waves_for_compute_bound_cells(model, programs, fixup):
    # 512-token prompt chunks; measured on an H200 (PERF.md, "Prompt chunks"): whole tiles 152 vs
    # 179 us at N = 264 (llama-8b L=8192); qwen3-14b N = 132 216 vs 225 (264), 289 (168)
    from skattn.bench.models import MODELS

    Hq, Hkv, D = MODELS[model][:3]
    kw = dict(batch=1, q_len=512, kv_len=8192, q_heads=Hq, kv_heads=Hkv, head_dim=D,
              causal=True, sms=132, occupancy=2)
    p = plan(policy="auto", **kw)
    assert (p.programs, p.fixup) == (programs, fixup)
    assert p.per_tile_ranges == (fixup == "none") and not (fixup == "none" and p.pieces())
    _check_plan(p, None)
    with pytest.raises(ValueError, match="fixup"):  # not whole tiles unless asked for
        plan(policy="llamacpp", programs=p.ntiles_dst, fixup="uniform", **kw)
    decode = dict(kw, q_len=1)
    assert plan(policy="auto", **decode).programs != plan(policy="llamacpp", **decode).programs


def test_compute_bound_choice_and_residency():
    from skattn.planner import programs_per_sm, tile_geometry
    from skattn.policy import compute_bound_programs

    g128 = tile_geometry(q_len=512, gqa_ratio=4, head_dim=128, head_dim_v=128)
    g64 = tile_geometry(q_len=512, gqa_ratio=8, head_dim=64, head_dim_v=64)
    assert (programs_per_sm(g128), programs_per_sm(g64)) == (1, 2)  # 224 KB / 80 KB shared
    # a whole causal prompt (4096 tokens: 1024 tiles of 1..32 blocks): the GPU hands the
    # unequal tiles to free SMs, and cutting tiles that outnumber the resident programs 8x
    # costs more than the greedy hand-out's tail; without whole tiles, one wave
    assert compute_bound_programs(1024, 16896, 32, 264, 132, shortest_tile=1) == 1024
    assert compute_bound_programs(1024, 16896, 32, 264, 132, whole=False, shortest_tile=1) == 132
    # 400 tiles, 3 per SM: equal ones take 4 waves whole, one cut wave is shorter; of 1 to 64
    # blocks (a whole prompt's), the greedy hand-out beats a cut wave
    assert compute_bound_programs(400, 25600, 64, 264, 132) == 132
    assert compute_bound_programs(400, 25600, 64, 264, 132, shortest_tile=1) == 400
    assert compute_bound_programs(128, 8000, 64, 256, 132) == 128
    assert compute_bound_programs(128, 8000, 64, 256, 132, whole=False) == 132
    # 168 equal tiles on 132 SMs: whole tiles take two waves, one cut wave is shorter
    assert compute_bound_programs(168, 10512, 64, 264, 132) == 132


def test_co_readers_counts_programs_in_step():
    from skattn.policy import KVLayout, co_readers

    # 32 tiles of 256 KV blocks, 4 tiles a KV head: 128 programs start each tile's quarters
    # together (4 in step), 132 start at 33 different offsets (each alone)
    layout = KVLayout((0,) * 4, (256,) * 4, 1, 1.4)
    assert co_readers(128, 32 * 256, layout) == 4.0
    assert co_readers(132, 32 * 256, layout) == 1.0
    assert co_readers(32, 32 * 256, layout) == 4.0  # whole tiles: all four from block 0
    # two token blocks (the second from KV block 1) and two head groups a KV head: starts one
    # block apart count (LOCKSTEP_BLOCKS), programs of the other KV head do not
    layout = KVLayout((0, 1), (10, 10), 2, 1.4)
    assert co_readers(8, 80, layout) == 4.0
    assert co_readers(2, 80, layout) == 1.0


def test_co_readers_only_where_a_cut_plan_could_win(monkeypatch):
    # planning stays cheap (a new prompt length plans anew): the K/V-read term, which only
    # adds to a cut plan's cost, is counted only for counts whose items could still win
    from skattn import policy

    calls = []
    real = policy.co_readers
    monkeypatch.setattr(policy, "co_readers", lambda *a: calls.append(a[0]) or real(*a))
    kw = dict(batch=1, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128, causal=True, sms=132,
              occupancy=2)
    assert plan(q_len=512, **kw).programs == 128 and calls == []  # whole tiles win outright
    assert plan(q_len=128, kv_len=32768, **{k: v for k, v in kw.items() if k != "kv_len"}).programs == 128
    assert 0 < len(calls) < 20 and 132 in calls  # the wave of 132 was weighed and lost


@pytest.mark.parametrize("model,n,L,programs,fixup", [
    # tiles that share a KV head split at the same KV blocks, the L2 serving all but one read
    # (H200, graph timer: 118 against 158 us at N = 132; PERF.md, "Prompt chunks")
    ("llama-8b", 128, 32768, 128, "uniform"),
    ("llama-70b", 128, 32768, 128, "uniform"),
    # 168 tiles: 132 programs start at scattered KV blocks, 126 read in step (584-593 against
    # 648-654 us at L = 32768), and two waves of 264 cost more than one (614-615 us);
    # where K/V fit the L2, 132 stays (156 us either way)
    ("qwen3-14b", 512, 32768, 126, "general"),
    ("qwen3-14b", 512, 8192, 132, "general"),
])
def test_auto_lines_up_cut_prompt_tiles(model, n, L, programs, fixup):
    from skattn.bench.models import MODELS
    from skattn.policy import co_readers

    Hq, Hkv, D = MODELS[model][:3]
    kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True,
              sms=132, occupancy=2)
    p = plan(**kw)
    assert (p.programs, p.fixup) == (programs, fixup)
    _check_plan(p, None)
    layout = (p.kv_first, p.kv_count, p.ntiles_z)
    if programs != 132:  # more programs in step than at one a resident slot
        assert co_readers(programs, p.work, layout) > co_readers(132, p.work, layout)


@pytest.mark.parametrize("L", [2048, 4096, 8192, 16384])
def test_whole_prompts_run_whole_tiles(L):
    # measured (tools/prompt_square.py, H200): whole tiles 1.5x faster than one cut wave for
    # causal prompts of n = L = 2048 and 8192
    p = plan(batch=1, q_len=L, kv_len=L, q_heads=32, kv_heads=8, head_dim=128, causal=True,
             sms=132, occupancy=2)
    assert (p.programs, p.fixup) == (p.ntiles_dst, "none")
    assert not p.pieces()
    # and the warp-specialised prompt kernel (1.23-1.26x the TMA kernel on those whole tiles),
    # unless tuning is given
    assert p.tuning.prefill == "ws"
    assert plan(batch=1, q_len=L, kv_len=L, q_heads=32, kv_heads=8, head_dim=128, causal=True,
                sms=132, occupancy=2, tuning=Tuning()).tuning.prefill == "base"


@pytest.mark.parametrize("n,L,heads,kernel", [(512, 8192, 32, "ws"), (1024, 32768, 40, "ws"),
                                              (1, 32768, 32, "base")])
def test_chunks_take_the_ws_kernel_and_decode_the_base_kernel(n, L, heads, kernel):
    # prompt chunks (one wave of whole tiles; qwen3-14b n = 1024: a cut plan, general fixup)
    # run the warp-specialised kernel (1.04-1.37x the base kernel on the seed grid's chunks);
    # decode tiles keep the base kernel
    p = plan(batch=1, q_len=n, kv_len=L, q_heads=heads, kv_heads=8, head_dim=128, causal=True,
             sms=132, occupancy=2)
    assert p.tuning.prefill == kernel


@pytest.mark.parametrize("kw,kernel", [
    (dict(fixup="general"), "ws"), (dict(causal=False), "ws"), (dict(q_len=2048), "ws"),
    (dict(policy="llamacpp"), "base"), (dict(policy="split"), "base"),
    (dict(programs=2048, fixup="none"), "base")])
def test_prompt_kernels_only_for_autos_plans(kw, kernel):
    # `auto` choosing the program count takes the warp-specialised kernel for prompt-sized
    # tiles, whatever fixup it was asked for (not "fused"); another policy or a program count
    # asked for keep the base kernel
    args = dict(batch=1, q_len=8192, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128,
                causal=True, sms=132, occupancy=2)
    args.update(kw)
    assert plan(**args).tuning.prefill == kernel


def test_whole_prompts_the_prompt_kernel_refuses_keep_the_base_kernel():
    # a sliding window (and head sizes other than 64/128) run the base kernel: whole tiles
    # still, and the plan says which kernel runs
    kw = dict(batch=1, q_len=8192, kv_len=8192, kv_heads=8, causal=True, sms=132, occupancy=2)
    p = plan(q_heads=64, head_dim=64, window=128, **kw)
    assert (p.programs, p.fixup, p.tuning.prefill) == (p.ntiles_dst, "none", "base")
    assert plan(q_heads=32, head_dim=256, **kw).tuning.prefill == "base"
    p = plan(q_heads=64, head_dim=64, **kw)
    assert (p.tuning.prefill, p.geometry.block_n) == ("ws", 128)


@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (256, 256), (192, 128), (576, 512)])
@pytest.mark.parametrize("q_len", [1, 4, 512])
def test_default_stages_fit_the_shared_memory_budget(D, Dv, q_len):
    from skattn.planner import STAGE_BYTES_BUDGET, tile_geometry

    g = tile_geometry(q_len=q_len, gqa_ratio=4, head_dim=D, head_dim_v=Dv)
    stage = g.block_n * (g.block_dk * g.dk_chunks + g.block_dv) * 2
    assert g.num_stages == 2 or g.num_stages * stage <= STAGE_BYTES_BUDGET, g
    assert g.num_stages >= 2


@pytest.mark.parametrize("q_len,ratio,D,block_m", [
    (1, 4, 128, 16), (1, 8, 64, 16),      # up to 16 rows: 16
    (4, 8, 64, 64), (8, 4, 128, 64),      # 17-32 rows, head size <= 128: 64 (measured faster)
    (4, 5, 128, 64), (4, 8, 256, 32),     # head size 256 keeps 32 (not measured)
    (16, 4, 128, 64), (16, 8, 128, 128),  # 33-64 rows: 64; more: 128
])
def test_default_tile_rows(q_len, ratio, D, block_m):
    from skattn.planner import tile_geometry

    g = tile_geometry(q_len=q_len, gqa_ratio=ratio, head_dim=D, head_dim_v=D)
    assert g.block_m == block_m
    assert g.tokens_per_tile * g.heads_per_tile >= min(q_len * ratio, block_m)


def test_auto_shares_sms_only_where_two_programs_fit():
    # the base kernel (a Tuning given): gpt-oss n=16: 128-row tiles of head size 64 (80 KB
    # shared, two programs an SM) take two programs an SM at L=32768 (measured 37.8 vs 41.6
    # us, PERF.md), not at L=8192 (21.9 vs 19.5); llama-70b n=16 (head size 128, one program
    # an SM) never does
    from skattn.planner import shared_programs

    kw = dict(batch=1, q_len=16, q_heads=64, kv_heads=8, causal=True, sms=132, occupancy=2,
              tuning=Tuning())
    long = plan(kv_len=32768, head_dim=64, **kw)
    assert shared_programs(long.geometry, 2) == 2 and long.programs > 132
    assert plan(kv_len=8192, head_dim=64, **kw).programs == 128
    big = plan(kv_len=32768, head_dim=128, **kw)
    assert shared_programs(big.geometry, 2) == 1 and big.programs <= 132


@pytest.mark.parametrize("model, n", [("gpt-oss", 16), ("llama-70b", 16), ("llama-70b", 12),
                                      ("qwen3-14b", 16), ("qwen3moe-30b-a3b", 16)])
def test_auto_runs_decode_tiles_of_128_rows_warp_specialised(model, n):
    # decode tiles of 128 rows (not compute-bound: n x ratio < 256) go to the warp-specialised
    # kernel in 128-key blocks, one program an SM, tiles cut into equal pieces (uniform fixup,
    # pieces a multiple of 16 where that fills 95% of the SMs)
    from skattn.bench.models import MODELS

    hq, hkv, d = MODELS[model][:3]
    kw = dict(q_len=n, q_heads=hq, kv_heads=hkv, head_dim=d, causal=True, sms=132, occupancy=2)
    p = plan(batch=1, kv_len=8192, **kw)
    assert p.tuning.prefill == "ws" and p.geometry.block_m == 128 and p.geometry.block_n == 128
    assert p.fixup == "uniform" and p.programs == 128 and p.programs % p.ntiles_dst == 0
    assert (p.programs // p.ntiles_dst) % 16 == 0
    assert p.work >= 2 * p.programs
    assert "kernel: the warp-specialised" in p.describe()
    assert f"in {p.programs // p.ntiles_dst} equal pieces" in p.describe()
    # where it does not: too few KV blocks a program, too many tiles for 4 pieces each, a
    # caller's Tuning, program count, geometry or cost model, another policy, a window, a
    # mask, quantized K/V, 128-key blocks beyond the shared memory given (the base kernel's
    # plan, no error)
    base = [dict(batch=1, kv_len=2048), dict(batch=16, kv_len=8192),
            dict(tuning=Tuning()), dict(programs=128), dict(block_n=64), dict(num_stages=2),
            dict(num_warps=4), dict(cost_model=load_cost_model()), dict(policy="llamacpp"),
            dict(policy="split"), dict(window=4096), dict(has_mask=True),
            dict(smem_limit=48 * 1024)]
    for extra in base:
        args = dict(dict(batch=1, kv_len=32768, **kw), **extra)
        assert plan(**args).tuning.prefill == "base", extra
    fp8 = plan(batch=1, kv_len=8192, dtype=torch.float8_e4m3fn, **kw)
    assert fp8.tuning.prefill != "ws"


def test_ws_decode_plans_only_on_a_hopper(monkeypatch):
    # with a GPU present, a compute capability other than 9 keeps the base kernel's plan
    kw = dict(batch=1, q_len=16, kv_len=32768, q_heads=64, kv_heads=8, head_dim=64,
              causal=True, sms=108, occupancy=2)
    assert plan(**kw).tuning.prefill == "ws"  # no GPU here: planned for a Hopper
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, kernel in (((8, 0), "base"), ((9, 0), "ws"), ((10, 0), "base")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        assert plan(**kw).tuning.prefill == kernel, cap


@pytest.mark.parametrize("hq, n", [(64, 8), (64, 24), (32, 16), (64, 9)])
def test_auto_leaves_other_decode_tiles_on_the_base_kernel(hq, n):
    # fewer than 80 rows a KV head (ratio 8 n = 8 and 9: 64 and 72 rows; ratio 4 n = 16: 64),
    # or two token blocks a KV head (ratio 8 n = 24: 192 rows)
    p = plan(batch=1, q_len=n, kv_len=32768, q_heads=hq, kv_heads=8, head_dim=128,
             causal=True, sms=132, occupancy=2)
    assert p.tuning.prefill == "base"


def test_llamacpp_names_are_aliases():
    kw = dict(batch=1, q_len=1, kv_len=4096, q_heads=32, kv_heads=8, head_dim=128, sms=132)
    new = plan(programs=100, occupancy=2, **kw)
    old = plan(nblocks=100, blocks_per_sm=2, **kw)
    assert (old.programs, old.occupancy) == (new.programs, new.occupancy) == (100, 2)
    with pytest.raises(ValueError, match="alias"):
        plan(programs=100, nblocks=99, occupancy=2, **kw)


@pytest.mark.parametrize("n, hq, d, narrow", [(1, 32, 128, True), (4, 32, 128, True),
                                               (1, 64, 64, True), (8, 32, 128, False),
                                               (1, 32, 256, False)])
def test_q8_0_decode_tiles_of_16_rows_take_two_warps_four_an_sm(n, hq, d, narrow):
    kw = dict(batch=1, q_len=n, kv_len=32768, q_heads=hq, kv_heads=8, head_dim=d, causal=True,
              sms=132)
    p = plan(dtype="q8_0", **kw)
    g = p.geometry
    shape = (g.block_n, g.num_stages, g.num_warps, p.occupancy)
    assert (shape == (64, 3, 2, 4)) == narrow
    assert (p.programs > 132 * 2) == narrow  # the rounding rule picks 512 of 528
    # a caller's occupancy or geometry, and other K/V forms, keep the usual choice
    for given in (dict(occupancy=2), dict(num_warps=4), dict(block_n=64), dict(num_stages=4)):
        q = plan(dtype="q8_0", **kw, **given)
        assert q.geometry.num_warps != 2 or given.get("num_warps") == 2
        assert q.occupancy <= 2
    for dtype in (torch.float8_e4m3fn, torch.float16, "q4_0"):
        assert plan(dtype=dtype, **kw).geometry.num_warps in (4, 8)
    # a smaller shared memory still plans (the narrow tile where it fits, else the usual one)
    for limit, mask in ((49152, False), (65536, True), (32768, True)) if narrow else ():
        small = plan(dtype="q8_0", smem_limit=limit, has_mask=mask, **kw).geometry
        assert small.block_m == 16
        assert (small.num_warps == 2) == (small.block_n == 64 and small.num_stages == 3)


def test_q8_0_narrow_decode_only_at_the_head_sizes_measured():
    kw = dict(batch=1, q_len=1, kv_len=4096, q_heads=32, kv_heads=8, causal=True, sms=132,
              dtype="q8_0")
    assert plan(head_dim=96, **kw).geometry.num_warps == 4  # padded to 128: not measured
    assert plan(head_dim=64, head_dim_v=128, **kw).geometry.num_warps == 4


def test_unplanned_calls_take_the_planners_defaults_by_kv_form():
    # skattn.attention, the custom op and the serving entry points name no occupancy, so the
    # defaults the benchmarks measured reach them: q8_0 decode tiles four an SM (dense), three
    # (serving)
    import skattn.ops
    from skattn import api, serving
    from skattn.device import hardware

    cpu = torch.device("cpu")
    sms, _ = hardware(cpu)
    args = (1, 1, 4096, 32, 8, 128, 128, "q8_0", True, None, cpu)
    want = plan(batch=1, q_len=1, kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
                dtype="q8_0", causal=True, sms=sms)
    for p in (api._cached_plan(*args), skattn.ops._cached_plan(*args[:-1], cpu, "auto", False)):
        assert (p.occupancy, p.geometry.num_warps, p.programs) == (4, 2, want.programs)
    sp = serving._cached_plan(cpu, q_split=None, batch=4, q_len=1, max_kv_len=4096, q_heads=32,
                              kv_heads=8, head_dim=128, head_dim_v=128, dtype="q8_0", causal=True,
                              page_size=16)
    assert sp.occupancy == 3
    f16 = api._cached_plan(*args[:7], torch.float16, True, None, cpu)
    assert (f16.occupancy, f16.geometry.num_warps) == (2, 4)


@pytest.mark.parametrize("L, programs", [(1024, 64), (8192, 128), (16384, 256), (32768, 256)])
def test_fp8_decode_tiles_of_16_rows_take_128_key_blocks(L, programs):
    # `config.fp8_wide_decode`: 128 keys in 3 stages, and `auto` gives each program at least
    # 4 KV blocks or runs one an SM (the choices measured fastest on an H200, PERF.md)
    kw = dict(batch=1, q_len=1, kv_len=L, q_heads=32, kv_heads=8, head_dim=128, causal=True,
              sms=132, dtype=torch.float8_e4m3fn)
    p = plan(**kw)
    g = p.geometry
    assert (g.block_m, g.block_n, g.num_stages, g.num_warps, p.programs) == (16, 128, 3, 4,
                                                                              programs)
    # a caller's word keeps the usual tile and count: occupancy, or a block size
    for extra in (dict(occupancy=2), dict(block_n=64)):
        q = plan(**kw, **extra)
        assert (q.geometry.block_n, q.programs) == (64, min(256, 8 * L // 64)), extra


def test_fp8_wide_decode_only_where_measured():
    kw = dict(batch=1, q_len=1, kv_len=8192, q_heads=32, kv_heads=8, causal=True, sms=132,
              dtype=torch.float8_e4m3fn)
    assert plan(head_dim=96, **kw).geometry.num_stages == 4  # padded to 128: not measured
    assert plan(head_dim=64, **kw).geometry.num_stages == 3
    wide = dict(kw, q_len=16)  # 64-row tiles (warpgroup MMA) keep their geometry
    assert plan(head_dim=128, **wide).geometry.block_m == 64
    assert plan(head_dim=128, **wide).geometry.block_n == 64
    f16 = dict(kw, dtype=torch.float16)
    assert plan(head_dim=128, **f16).geometry.block_n == 64
    assert plan(head_dim=128, policy="llamacpp", **kw).programs == 264  # other policies' N
    # other forms' counts are untouched by the cap, also where W is small (f16 at L = 1024:
    # 128 programs, not one an SM's worth of the cap)
    assert plan(head_dim=128, **dict(f16, kv_len=1024)).programs == 128
