"""Launch shapes chosen by launch.run, with the kernels replaced by recorders (no GPU, no
interpreter): fixup programs per tile rows, and PDL only for CUDA devices."""
import pytest
import torch

import skattn
from skattn import launch
from skattn.kernels import attention, fixup


class Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, kw))


@pytest.fixture
def recorded(monkeypatch):
    rec = {"main": Recorder(), "uniform": Recorder(), "general": Recorder()}
    monkeypatch.setattr(attention, "attention_kernel", rec["main"])
    monkeypatch.setattr(fixup, "uniform_fixup_kernel", rec["uniform"])
    monkeypatch.setattr(fixup, "general_fixup_kernel", rec["general"])
    return rec


def run(q_len, programs, kv_len=8192):
    p = skattn.plan(batch=1, q_len=q_len, kv_len=kv_len, q_heads=64, kv_heads=8, head_dim=64,
                    causal=True, sms=132, occupancy=2, programs=programs)
    q = torch.zeros(1, q_len, 64, 64, dtype=torch.float16)
    k = torch.empty(1, kv_len, 8, 64, dtype=torch.float16)
    launch.run(p, q, k, k, torch.empty_like(q), None, scale=0.125)
    return p


def test_decode_fixup_programs_take_16_rows(recorded):
    # n = 16, ratio 8: 128-row tiles in 16 pieces each; the fixup runs (tile, Dv/32, rows/16)
    p = run(16, 128)
    assert p.geometry.block_m == 128 and p.fixup == "uniform"
    (grid, kw), = recorded["uniform"].calls
    assert grid == (p.ntiles_dst, 64 // 32, 128 // 16) and kw["ROWS"] == 16
    assert "launch_pdl" not in kw and kw["USE_PDL"] is False  # CPU tensors: no PDL


def test_prompt_chunk_fixup_programs_take_whole_tiles(recorded):
    # n = 512: about one piece a tile; 16-row programs and PDL cost time there (PERF.md)
    p = run(512, 264, kv_len=16384)
    assert p.programs < 4 * p.ntiles_dst and p.fixup == "general"
    (grid, kw), = recorded["general"].calls
    assert grid[2] == 1 and kw["ROWS"] == p.geometry.block_m


def test_whole_tile_plan_launches_no_fixup(recorded):
    # auto's prompt-chunk plan here: one causal tile a program, finished by the main kernel
    p = run(512, None, kv_len=16384)
    assert p.fixup == "none" and p.programs == p.ntiles_dst and p.per_tile_ranges
    (grid, kw), = recorded["main"].calls
    assert grid == (p.ntiles_dst, 1, 1) and kw["PER_TILE_RANGES"] and not kw["FUSED"]
    assert not recorded["uniform"].calls and not recorded["general"].calls


def test_fused_merge_reads_only_the_filled_rows(recorded):
    # n = 1, ratio 8: 8 of a tile's 16 rows hold a head; n = 16: all 128
    for q_len, rows in ((1, 8), (16, 128)):
        recorded["main"].calls.clear()
        p = skattn.plan(batch=1, q_len=q_len, kv_len=8192, q_heads=64, kv_heads=8, head_dim=64,
                        causal=True, sms=132, occupancy=2, programs=128, fixup="fused")
        q = torch.zeros(1, q_len, 64, 64, dtype=torch.float16)
        k = torch.empty(1, 8192, 8, 64, dtype=torch.float16)
        launch.run(p, q, k, k, torch.empty_like(q), None, scale=0.125)
        (grid, kw), = recorded["main"].calls
        assert kw["FIXUP_ROWS"] == rows and kw["BLOCK_M"] == max(16, rows)


def test_stamps_are_refused_where_they_cannot_be_written():
    # the GPU clock stamps (a diagnostic) need CUDA tensors; here CPU tensors are refused
    # before any launch, so a wrong buffer is never written out of bounds
    p = skattn.plan(batch=1, q_len=1, kv_len=8192, q_heads=64, kv_heads=8, head_dim=64,
                    causal=True, sms=132, occupancy=2, programs=128)
    q = torch.zeros(1, 1, 64, 64, dtype=torch.float16)
    k = torch.empty(1, 8192, 8, 64, dtype=torch.float16)
    stamps = (torch.zeros(p.programs, 4, dtype=torch.int64), torch.zeros(64, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="stamps"):
        launch.run(p, q, k, k, torch.empty_like(q), None, scale=0.125, stamps=stamps)


def test_pdl_wait_on_hopper_unless_turned_off(monkeypatch):
    # the main kernel is launched with PDL on sm_90+ by default (Tuning.pdl_wait); never with
    # pdl_wait=False, on a CPU, under the interpreter or on an older GPU
    from skattn import Tuning

    def plan(**tuning):
        return skattn.plan(batch=1, q_len=1, kv_len=256, q_heads=8, kv_heads=2, head_dim=64,
                           causal=True, sms=4, occupancy=2, tuning=Tuning(**tuning))

    cuda = torch.device("cuda")
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for major, want in ((9, True), (8, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert launch._pdl_wait(plan(), cuda) is want
        assert launch._pdl_wait(plan(pdl_wait=False), cuda) is False
    assert launch._pdl_wait(plan(pdl_wait=True), torch.device("cpu")) is False
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    assert launch._pdl_wait(plan(pdl_wait=True), cuda) is False
