"""Serving plans and the work list, in Python: bounds, coverage, the program count from W."""
import random

import pytest

import skattn
from skattn.planner import plan as dense_plan
from skattn.serving_worklist import effective_programs, host_work_list


def kv_plan(B, Lq, cap, **kw):
    return skattn.serving_plan(q_split=None, batch=B, q_len=Lq, max_kv_len=cap, q_heads=32, kv_heads=8,
                               head_dim=128, sms=132, occupancy=2, **kw)


@pytest.mark.parametrize("seed", range(20))
def test_work_list_covers_every_item_once(seed):
    rng = random.Random(seed)
    B = rng.randint(1, 12)
    lq = [rng.choice([0, 1, 2, 5, 40, 100]) for _ in range(B)]
    lk = [rng.randint(0, 300) for _ in range(B)]
    total_q = sum(lq) + rng.randint(0, 3)
    window = rng.choice([None, 16, 100])
    p = skattn.serving_plan(q_split=None, batch=B, max_q_len=max(1, max(lq)), total_q=max(1, total_q),
                            max_kv_len=300, q_heads=8, kv_heads=2, head_dim=64, sms=4,
                            occupancy=2, causal=True, window=window, block_n=16,
                            policy=rng.choice(["auto", "llamacpp", "llamacpp-before"]))
    cu_q = [0]
    cu_k = [0]
    for a, b in zip(lq, lk):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    wl = host_work_list(p, cu_q=cu_q, cu_k=cu_k)
    t = p.geometry.tokens_per_tile
    assert len(wl.rb_count) == sum(-(-n // t) for n in lq) <= p.rb_max
    # tiles' item ranges tile [0, W) in order, each at least one item long
    edge = 0
    for tile in range(len(wl.rb_count) * p.hz):
        first, stop = wl.tile_range(p, tile)
        assert first == edge and stop > first
        edge = stop
    assert edge == wl.work
    # programs split [0, W) into consecutive, non-empty ranges (none in a whole-tile step,
    # whose tiles are handed out one by one)
    ranges = [wl.program_range(i) for i in range(p.programs)]
    if wl.whole:
        assert wl.programs == 0 and all(a == b == wl.work for a, b in ranges)
        return
    assert ranges[0][0] == 0 and ranges[wl.programs - 1][1] == wl.work
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(wl.programs - 1))
    assert all(a == b for a, b in ranges[wl.programs:])
    firsts = {wl.tile_range(p, t)[0] for t in range(len(wl.rb_count) * p.hz)}
    for a, b in ranges[:wl.programs]:
        # shares that count tiles may leave a program only a tile's setup: empty, at the
        # tile's first item, before the program that starts the tile
        assert a < b or (p.tile_cost and a in firsts), (a, b)
    for i in range(wl.work):
        a, b = ranges[wl.program_of(i)]
        assert a <= i < b


def test_shares_that_count_tiles():
    # auto's decode plans count each tile's setup as TILE_COST KV blocks: a program of many
    # short tiles gets fewer blocks than one inside a long tile; whole tiles stay whole
    # where the program count divides equal tiles; other plans share W alone
    from skattn.serving_plan import TILE_COST

    p = kv_plan(64, 1, 32768, policy="auto")
    assert p.tile_cost == TILE_COST == 3
    wl = host_work_list(p, lens_k=[32768] + [1024] * 63)
    spans = [wl.program_range(i) for i in range(wl.programs)]
    long_items = wl.tile_range(p, p.hz - 1)[1]   # the long sequence's tiles come first

    def tiles_in(a, b):
        return sum(1 for t in range(64 * p.hz) if a < wl.tile_range(p, t)[1] and
                   wl.tile_range(p, t)[0] < b)

    inside = [b - a for a, b in spans if b <= long_items and tiles_in(a, b) == 1]
    short = [(b - a, tiles_in(a, b)) for a, b in spans if a >= long_items]
    assert inside and short
    cost = [blocks + TILE_COST * n for blocks, n in short]
    assert max(inside) > max(blocks for blocks, _ in short)
    assert max(cost) - min(cost) <= 2 * TILE_COST
    assert max(inside) + TILE_COST - max(cost) <= 2 * TILE_COST
    assert spans[0][0] == 0 and spans[-1][1] == wl.work
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    for i in range(wl.work):   # the fused merge finds a tile's pieces by program_of
        a, b = spans[wl.program_of(i)]
        assert a <= i < b
    eq = host_work_list(p, lens_k=[4096] * 64)   # 512 equal tiles, 256 programs: whole
    assert all((b - a) % 64 == 0 and a % 64 == 0 for a, b in map(eq.program_range,
                                                                 range(eq.programs)))
    for kw in (dict(policy="llamacpp"), dict(policy="split"), dict(policy="auto", fixup="general"),
               dict(policy="auto", fixup="fused", tail=15)):
        assert kv_plan(64, 1, 4096, **kw).tile_cost == 0, kw
    assert kv_plan(64, 1, 4096, policy="auto", tile_cost=0).tile_cost == 0
    with pytest.raises(ValueError, match="tile_cost"):
        kv_plan(64, 1, 4096, policy="auto", fixup="general", tile_cost=2)
    with pytest.raises(ValueError, match="tile_cost"):
        kv_plan(64, 1, 4096, policy="auto", tile_cost=-1)


def test_equal_lengths_match_the_dense_plan():
    # 64 x 4096, decode: the dense special case; W, tile counts and llamacpp's N agree
    B, L = 64, 4096
    p = kv_plan(B, 1, L, policy="llamacpp")
    wl = host_work_list(p, lens_k=[L] * B)
    d = dense_plan(batch=B, q_len=1, kv_len=L, q_heads=32, kv_heads=8, head_dim=128,
                   causal=True, sms=132, occupancy=2, policy="llamacpp")
    assert wl.work == d.work and len(wl.rb_count) * p.hz == d.ntiles_dst
    assert wl.programs == d.programs


def test_auto_sees_the_real_work():
    # the same plan picks fewer programs for a batch with little work than for a full one
    p = kv_plan(64, 1, 32768, policy="auto")
    small = host_work_list(p, lens_k=[1] * 64)   # 512 tiles of one block each
    big = host_work_list(p, lens_k=[1024] * 63 + [32768])
    assert small.work == 512 and big.work > 20 * small.work
    assert small.programs != big.programs
    assert small.programs <= p.programs and big.programs <= p.programs
    assert effective_programs(p, 0, 0, 0, 0) == 0


def test_auto_prefers_whole_tiles_for_equal_lengths():
    # 64 x 4096 (512 equal tiles, 264 programs at most): 256 programs of two whole tiles
    # each beat 264 that cut tiles (ragged_cost_model's cut_share); without the cut cost the
    # slightly shorter longest program of 264 wins; unequal lengths never count as cut-free
    from dataclasses import replace

    from skattn.serving_worklist import cut_free

    p = kv_plan(64, 1, 4096, policy="auto")
    assert host_work_list(p, lens_k=[4096] * 64).programs == 256
    free = replace(p, cost_model=replace(p.cost_model, cut_share=0.0))
    assert host_work_list(free, lens_k=[4096] * 64).programs == 264
    lens = [4096] * 63 + [4000]
    assert host_work_list(p, lens_k=lens).programs == 264
    assert cut_free(256, 512, 64, 64) and not cut_free(264, 512, 64, 64)
    assert not cut_free(256, 512, 64, 63)


def varlen_step(lq, lk, **kw):
    """(plan of llama-8b heads on an H200's grid for up to 8192 new tokens, work list)."""
    cu_q, cu_k = [0], [0]
    for a, b in zip(lq, lk):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    p = skattn.serving_plan(q_split=None, batch=32, max_q_len=8192, total_q=8192, max_kv_len=32768,
                            page_size=256, max_pages=128, q_heads=32, kv_heads=8,
                            head_dim=128, sms=132, occupancy=2, **kw)
    lq, lk = lq + [0] * (32 - len(lq)), lk + [0] * (32 - len(lk))
    cu_q += [cu_q[-1]] * (33 - len(cu_q))
    cu_k += [cu_k[-1]] * (33 - len(cu_k))
    return p, host_work_list(p, cu_q=cu_q, cu_k=cu_k)


def test_whole_tiles_for_prompt_steps():
    # the prompts of an 8192-token step run in whole tiles (1.4-1.5x over cut tiles measured,
    # tools/varlen_prefill.py); decode steps and a chunk among decode rows keep stream-K
    from skattn.kernels import worklist
    from skattn.policy import CUT_PENALTY_MANY, MANY_TILES, UNEQUAL_TILES

    assert (worklist.MANY.value, worklist.UNEQUAL.value) == (MANY_TILES, UNEQUAL_TILES)
    assert worklist.CUT_X10.value == 10 * CUT_PENALTY_MANY
    for lq in ([8192], [2048] * 4, [512] * 16):
        p, wl = varlen_step(lq, lq)
        assert p.whole_tiles and wl.whole and wl.programs == 0, lq
    for lq, lk in (([1] * 32, [4096 + 64 * i for i in range(32)]),
                   ([1024] + [1] * 31, [3072] + [2048 + 64 * i for i in range(31)])):
        p, wl = varlen_step(lq, lk)
        assert not wl.whole and wl.programs > 0
    # other policies, and plans whose steps cannot be whole prompts, never run whole tiles;
    # a grid given smaller than the GPU counts as the resident programs
    assert not varlen_step([8192], [8192], policy="llamacpp")[1].whole
    p, wl = varlen_step([512] * 16, [512] * 16, programs=1024)
    assert p.resident == 132 and wl.whole
    p, wl = varlen_step([1024], [1024], programs=64)
    assert p.resident == 64 and wl.whole  # 256 tiles > 3 x 64 programs
    assert not varlen_step([1024], [1024])[1].whole  # 256 tiles < 3 x 132 resident
    assert not kv_plan(64, 1, 32768, policy="auto").whole_tiles


def test_default_fixup_of_decode_tiles():
    # `auto` over decode tiles merges cut tiles inside the main kernel for 16-bit, FP8 and
    # q8_0 K/V (PERF.md, "Serving batches", "Quantized K/V"); q4_0 (not measured), the
    # llama.cpp policies and prompt-sized tiles keep the general fixup
    import torch

    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, "q8_0"):
        assert kv_plan(64, 1, 32768, dtype=dtype).fixup == "fused", dtype
        assert kv_plan(64, 1, 32768, dtype=dtype, policy="llamacpp").fixup == "general"
        p, _ = varlen_step([512] * 16, [512] * 16, dtype=dtype)
        assert p.geometry.block_m >= 64 and p.fixup == "general", dtype
    assert kv_plan(64, 1, 32768, dtype="q4_0").fixup == "general"


def test_split_plan_is_fixed_per_tile():
    # FlashDecoding-style: the split count from the upper bounds (4 x 8 tiles fill 264
    # programs in 8 pieces each); 64 sequences' 512 tiles already fill the GPU: no split
    p = kv_plan(4, 1, 32768, policy="split")
    assert p.fixup == "uniform" and p.split > 1 and p.programs == p.tiles_max * p.split
    assert p.workspace_bytes == p.programs * 2 * p.geometry.block_m * (128 + 2) * 4
    assert kv_plan(64, 1, 32768, policy="split").fixup == "none"


def test_bounds_of_varlen_row_blocks():
    # RB_max from total_q: a mixed batch of one 512-token chunk and 31 decode rows
    p = skattn.serving_plan(q_split=None, batch=32, max_q_len=512, total_q=512 + 31, max_kv_len=8192,
                            q_heads=32, kv_heads=8, head_dim=128, sms=132, occupancy=2)
    t = p.geometry.tokens_per_tile
    assert p.rb_max == min(32 * -(-512 // t), (543 + 32 * (t - 1)) // t)
    assert p.rb_max >= -(-512 // t) + 31
    assert "row blocks <=" in p.describe()


def test_a_pickled_plan_leaves_its_bound_tables_behind():
    # bound tables are device tensors and indices into this process's compiled-kernel keys
    import copy
    import pickle

    import torch

    from skattn import serving_launch

    p = kv_plan(4, 1, 256, policy="auto")
    serving_launch.bind(p, torch.device("cpu"))
    assert "_bound" in p.__dict__
    for c in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert "_bound" not in c.__dict__ and c == p


def test_bound_tables_outlive_their_plan():
    # a CUDA graph captured with a plan keeps the addresses of its device tables (the work
    # list's cost model here) after the plan caches drop the plan: they are kept per value
    import gc

    import torch

    from skattn import serving_launch

    dev = torch.device("cpu")
    p = kv_plan(4, 1, 256, policy="auto")
    cost = serving_launch.bind(p, dev).cost
    ptr = cost.data_ptr()
    del p, cost
    gc.collect()
    again = serving_launch.bind(kv_plan(5, 1, 512, policy="auto"), dev).cost
    assert again.data_ptr() == ptr  # the same tensor, still alive, shared by equal values
