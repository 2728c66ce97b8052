"""Kernel configurations fit the GPU's shared memory: the estimate, the reductions, the refusals."""
import pytest
import torch

import skattn
from skattn import launch
from skattn.config import (SM90_SHARED_LIMIT, TileGeometry, _pow2, shared_bytes,
                           tile_geometry)
from skattn.device import shared_memory_limit

# Triton 3.6's shared memory for sm_90 (`ttg.shared`, scripts/resources.py) of main kernels:
# (Dk, Dv, BLOCK_M, BLOCK_N, warps, stages, without a mask, with an f32 mask)
COMPILED = [
    (64, 64, 16, 128, 4, 4, 104448, 129024),     # decode, head size 64 (gpt-oss)
    (64, 64, 32, 32, 4, 3, 22528, 30720),        # 32 rows: warp MMA
    (64, 64, 64, 128, 4, 4, 139264, 237568),     # 64 rows: warpgroup MMA, one more K/V stage
    (64, 64, 128, 64, 4, 4, 81920, 180224),      # prompt chunk, head size 64
    (128, 128, 16, 64, 4, 4, 104448, 116736),    # decode, head size 128
    (128, 128, 64, 64, 4, 4, 147456, 196608),
    (128, 128, 128, 128, 8, 3, 229376, 360448),  # prompt chunk: the mask's tile overflows
    (128, 128, 128, 128, 8, 2, 163840, 229376),  # ... two stages fit it
    (160, 160, 16, 64, 4, 4, 206848, 219136),    # Dk padded to 256
    (192, 128, 64, 64, 4, 3, 180224, 212992),
    (256, 256, 16, 64, 4, 3, 141312, 149504),
    (256, 256, 64, 64, 4, 3, 229376, 262144),
    (256, 256, 128, 64, 8, 2, 196608, 229376),
    (256, 256, 128, 16, 8, 2, 131072, 131072),   # the f32 accumulator's store dominates
    (320, 320, 16, 32, 4, 3, 117760, 121856),    # Dk in 5 chunks of 64, Q kept whole
    (320, 320, 64, 32, 4, 3, 200704, 217088),
    (512, 512, 128, 32, 8, 2, 262144, 278528),
    (512, 512, 128, 16, 8, 2, 262144, 262144),
    (576, 512, 16, 32, 4, 2, 89088, 91136),
    (576, 512, 64, 32, 4, 2, 212992, 221184),
    (1024, 1024, 16, 16, 4, 2, 98816, 99840),
    (1024, 1024, 64, 16, 4, 2, 262144, 266240),
]
# head size 72: Triton does not pipeline its K/V loads (masked at column 72 of 128), so it
# needs less than counted
LOOSE = [(72, 72, 128, 64, 8, 3, 65536, 114688)]


def geometry(Dk, Dv, block_m, block_n, warps, stages):
    dk, chunks = (max(16, _pow2(Dk)), 1) if Dk <= 256 else (64, -(-Dk // 64))
    return TileGeometry(block_m, 4, max(1, block_m // 4), block_n, dk, chunks,
                        max(16, _pow2(Dv)), warps, stages)


@pytest.mark.parametrize("row", COMPILED + LOOSE)
def test_estimate_bounds_what_triton_allocates(row):
    *config, plain, masked = row
    g = geometry(*config)
    assert shared_bytes(g) >= plain and shared_bytes(g, has_mask=True) >= masked
    if row not in LOOSE:  # calibrated: exact where the loads are pipelined
        assert (shared_bytes(g), shared_bytes(g, has_mask=True)) == (plain, masked)


@pytest.mark.parametrize("q_len,ratio,D,Dv,config", [
    (1, 4, 128, 128, (16, 64, 4, 4)),      # decode (PERF.md: 104 KB)
    (8, 8, 128, 128, (64, 64, 4, 4)),
    (512, 4, 128, 128, (128, 128, 8, 3)),  # prompt chunk (224 KB)
    (512, 8, 64, 64, (128, 64, 4, 4)),     # prompt chunk, head size 64 (80 KB)
    (4, 16, 256, 256, (64, 64, 4, 3)),
    (4, 16, 576, 512, (64, 32, 4, 2)),
])
def test_tuned_defaults_stay_where_they_fit(q_len, ratio, D, Dv, config):
    g = tile_geometry(q_len=q_len, gqa_ratio=ratio, head_dim=D, head_dim_v=Dv)
    assert (g.block_m, g.block_n, g.num_warps, g.num_stages) == config
    assert shared_bytes(g) <= SM90_SHARED_LIMIT


@pytest.mark.parametrize("q_len,ratio,D,Dv,has_mask,config", [
    # the shapes that overflowed on an H200: prompt-sized blocks with a mask, head size 256
    (75, 4, 128, 128, True, (128, 128, 8, 2)),
    (32, 16, 80, 80, True, (128, 128, 8, 2)),
    (75, 4, 192, 128, True, (128, 64, 8, 2)),
    (75, 4, 256, 256, False, (128, 64, 8, 2)),
    (16, 8, 256, 256, False, (128, 64, 8, 2)),
    (75, 4, 256, 256, True, (128, 64, 8, 2)),
    (75, 4, 576, 512, True, (64, 32, 4, 2)),
    (32, 4, 512, 512, False, (64, 32, 4, 2)),
    (32, 4, 1024, 1024, False, (32, 32, 4, 2)),
])
def test_overflowing_shapes_get_a_config_that_fits(q_len, ratio, D, Dv, has_mask, config):
    default = tile_geometry(q_len=q_len, gqa_ratio=ratio, head_dim=D, head_dim_v=Dv,
                            smem_limit=10**9)
    assert shared_bytes(default, has_mask=has_mask) > SM90_SHARED_LIMIT  # the old overflow
    g = tile_geometry(q_len=q_len, gqa_ratio=ratio, head_dim=D, head_dim_v=Dv,
                      has_mask=has_mask)
    assert (g.block_m, g.block_n, g.num_warps, g.num_stages) == config
    assert shared_bytes(g, has_mask=has_mask) <= SM90_SHARED_LIMIT


@pytest.mark.parametrize("limit,config", [
    (229376, (128, 128, 8, 3)),  # the default fits exactly
    (200000, (128, 128, 8, 2)),  # first fewer stages
    (150000, (128, 64, 8, 3)),   # then fewer keys per block, with its own default stages
    (100000, (128, 64, 8, 2)),
    (60000, (64, 32, 4, 2)),     # then fewer rows (64: a decode-style config)
    (20000, (32, 16, 4, 2)),
])
def test_reduction_order(limit, config):
    g = tile_geometry(q_len=512, gqa_ratio=4, head_dim=128, head_dim_v=128, smem_limit=limit)
    assert (g.block_m, g.block_n, g.num_warps, g.num_stages) == config
    assert shared_bytes(g) <= limit
    assert g.heads_per_tile * g.tokens_per_tile == g.block_m  # rows still filled


def test_overrides_are_kept_or_refused():
    kw = dict(q_len=16, gqa_ratio=8, head_dim=256, head_dim_v=256)
    assert tile_geometry(num_stages=2, **kw).num_stages == 2
    assert tile_geometry(block_n=32, **kw).block_n == 32  # the stages follow it: 3
    with pytest.raises(ValueError, match="num_stages=3"):
        tile_geometry(num_stages=3, block_n=64, block_m=128, **kw)


def test_impossible_head_size_is_refused_by_plan():
    with pytest.raises(ValueError, match=r"head size 4096/4096 .*fits 232448 bytes"):
        skattn.plan(batch=1, q_len=1, kv_len=64, q_heads=1, kv_heads=1, head_dim=4096,
                    sms=132, occupancy=2)
    with pytest.raises(ValueError, match="shared memory"):  # a smaller GPU's limit
        skattn.plan(batch=1, q_len=512, kv_len=64, q_heads=4, kv_heads=1, head_dim=128,
                    sms=132, occupancy=2, smem_limit=8192)


@pytest.fixture
def launches(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "run", lambda plan, *a, **kw: calls.append((plan, kw)))
    return calls


def inputs(Lq, ratio, Lk, D, Dv=None, mask=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Lq, ratio, D, generator=g).half()
    k = torch.randn(1, Lk, 1, D, generator=g).half()
    v = torch.randn(1, Lk, 1, Dv or D, generator=g).half()
    m = torch.zeros(1, Lq, Lk) if mask else None
    return q, k, v, m


def test_impossible_head_size_is_refused_by_attention(launches):
    q, k, v, _ = inputs(1, 1, 16, 4096)
    with pytest.raises(ValueError, match="fits 232448 bytes of shared memory"):
        skattn.attention(q, k, v)
    assert launches == []


def test_unplanned_call_plans_for_its_mask(launches):
    q, k, v, m = inputs(75, 4, 1024, 128, mask=True)
    skattn.attention(q, k, v, mask=m)
    skattn.attention(q, k, v, causal=True)
    (masked, _), (plain, _) = launches
    assert masked.has_mask and masked.geometry.num_stages == 2
    assert not plain.has_mask and plain.geometry.num_stages == 3
    assert shared_bytes(masked.geometry, has_mask=True) <= shared_memory_limit("cpu")


def test_plan_without_mask_is_refused_where_the_mask_does_not_fit(launches):
    q, k, v, m = inputs(75, 4, 1024, 128, mask=True)
    kw = dict(batch=1, q_len=75, kv_len=1024, q_heads=4, kv_heads=1, head_dim=128)
    with pytest.raises(ValueError, match="has_mask=True"):
        skattn.attention(q, k, v, mask=m, plan=skattn.plan(**kw))
    masked = skattn.plan(has_mask=True, **kw)
    skattn.attention(q, k, v, mask=m, plan=masked)
    with pytest.raises(ValueError, match="has_mask=False"):  # reduced for a mask it lacks
        skattn.attention(q, k, v, plan=masked)
    assert [p for p, _ in launches] == [masked]
    # decode: the same configuration with or without a mask, either plan serves both calls
    q, k, v, m = inputs(1, 4, 1024, 128, mask=True)
    kw.update(q_len=1)
    for p in (skattn.plan(**kw), skattn.plan(has_mask=True, **kw)):
        skattn.attention(q, k, v, mask=m, plan=p)
        skattn.attention(q, k, v, plan=p)
    assert len(launches) == 5


def test_shared_memory_limit_without_a_gpu():
    assert shared_memory_limit("cpu") == SM90_SHARED_LIMIT == 232448
