"""The warp-specialised prompt-chunk kernel (`Tuning(prefill="ws")`) without a GPU: its
segments against the plan's work list, when `auto` takes it, what runs under the interpreter,
and its sm_90a build (Gluon kernels do not run under the interpreter; tests/test_gpu_prefill_ws.py
checks their results on the GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import skattn
from skattn import prefill_launch, reference

ROOT = Path(__file__).resolve().parents[1]

WS = skattn.Tuning(prefill="ws")
SMS = dict(sms=132, occupancy=2)


def ws_plan(**kw):
    shape = dict(batch=1, q_len=512, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128,
                 causal=True)
    return skattn.plan(**dict(dict(shape, **SMS, tuning=WS), **kw))


def visible_whole(p, qblock, j) -> bool:
    """Every row of token block `qblock` sees every key of KV block j."""
    n = p.geometry.block_n
    last_row = p.kv_len - p.q_len + qblock * p.geometry.tokens_per_tile
    return (j + 1) * n <= p.kv_len and (not p.causal or (j + 1) * n - 1 <= last_row)


@pytest.mark.parametrize("kw", [
    {}, dict(policy="llamacpp"), dict(programs=256, fixup="uniform"),
    dict(batch=2, q_len=300, kv_len=5000, programs=131), dict(causal=False, kv_len=3000),
    dict(q_heads=40, q_len=200, kv_len=1234, programs=97), dict(q_len=2048, kv_len=2048),
])
def test_segments_walk_the_work_list(kw):
    p = ws_plan(**kw)
    assert prefill_launch.refusal(p) is None
    rows, offsets = prefill_launch.segments(p)
    assert len(offsets) == p.programs + 1 and offsets[-1] == len(rows)
    order = p.longest_first_order() if p.longest_first else list(range(p.programs))
    covered, cut = {}, {}
    for launch_p in range(p.programs):
        prog = order[launch_p]
        start, end = p.program_range(prog)
        for i, (b, g, z, qb, lo, mid, hi, slot) in enumerate(rows[offsets[launch_p]:
                                                                 offsets[launch_p + 1]]):
            tile = ((b * p.kv_heads + g) * p.ntiles_z + z) * p.ntiles_x + qb
            first, stop = p.tile_range(tile)
            shift = p.kv_first[qb] - first  # KV block = item + shift
            item_lo, item_hi = lo - shift, hi - shift
            assert start <= item_lo < item_hi <= end and first <= item_lo and item_hi <= stop
            covered.setdefault(tile, []).append((item_lo, item_hi))
            assert lo <= mid <= hi
            assert all(visible_whole(p, qb, j) for j in range(lo, mid))
            assert mid == hi or not visible_whole(p, qb, mid)
            whole = (item_lo, item_hi) == (first, stop)
            assert (slot == -1) == whole
            if not whole:
                assert slot == 2 * prog + (item_lo != start)
                cut.setdefault(tile, []).append(prog)
    for tile in range(p.ntiles_dst):  # every item of every tile exactly once
        pieces = sorted(covered[tile])
        first, stop = p.tile_range(tile)
        assert pieces[0][0] == first and pieces[-1][1] == stop
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert cut == p.pieces()


def test_auto_takes_it_for_prompt_tiles():
    base = dict(batch=1, kv_len=8192, q_heads=32, kv_heads=8, causal=True, **SMS)
    p = skattn.plan(q_len=512, head_dim=128, **base)
    assert p.tuning.prefill == "ws" and p.geometry.block_n == 128
    p = skattn.plan(q_len=512, head_dim=64, **base)  # head size 64: blocks of 128 keys
    assert p.tuning.prefill == "ws" and p.geometry.block_n == 128
    assert skattn.plan(q_len=512, head_dim=64, tuning=WS, **base).geometry.block_n == 128
    assert skattn.plan(q_len=512, head_dim=64, block_n=64, tuning=WS, **base).geometry.block_n == 64
    assert skattn.plan(q_len=1, head_dim=128, **base).tuning.prefill == "base"  # decode
    assert skattn.plan(q_len=512, head_dim=64, window=128, **base).tuning.prefill == "base"
    assert skattn.plan(q_len=512, head_dim=64, window=128, **base).geometry.block_n == 64
    assert skattn.plan(q_len=512, head_dim=128, policy="llamacpp", **base).tuning.prefill == "base"
    assert skattn.plan(q_len=512, head_dim=128, dtype=torch.float8_e4m3fn,
                       **base).tuning.prefill == "base"


def test_refusals():
    assert "fused" in prefill_launch.refusal(ws_plan(fixup="fused", policy="llamacpp"))
    assert "128 rows" in prefill_launch.refusal(ws_plan(block_m=64))
    assert "window" in prefill_launch.refusal(ws_plan(window=256))
    assert prefill_launch.ws_stages(128, 128) == 3 and prefill_launch.ws_stages(64, 64) == 4
    assert prefill_launch.ws_registers(64, 64)[0] == 2 and prefill_launch.ws_registers(64, 128)[0] == 1


@pytest.mark.interpret
def test_interpreter_runs_the_base_kernel():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 8, 64, generator=g).half()
    k = torch.randn(1, 300, 2, 64, generator=g).half()
    v = torch.randn(1, 300, 2, 64, generator=g).half()
    p = skattn.plan(batch=1, q_len=64, kv_len=300, q_heads=8, kv_heads=2, head_dim=64,
                    causal=True, sms=4, occupancy=2, tuning=WS)
    from skattn import launch
    assert launch.bind(p, q.device).prefill is None
    out = skattn.attention(q, k, v, causal=True, plan=p)
    ref = reference.attention(q, k, v, causal=True)
    assert (out.double() - ref).abs().max() < 2e-3


def ws_build(*args) -> dict:
    """scripts/ws_build.py's JSON line, in a process of its own, without the interpreter
    (which replaces what Gluon compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "ws_build.py"), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("head_dim, q_heads", [(128, 32), (64, 64)])
def test_sm90_build(head_dim, q_heads):
    info = ws_build("--head-dim", head_dim, "--q-heads", q_heads)
    assert info["block_n"] == 128 and info["shared"] <= 227 * 1024 // info["programs_per_sm"]
    assert info["wgmma"] > 0 and info["tma_loads"] > 0 and info["setmaxnreg"] > 0
    assert info["wgmma_wait_partial"] > 0  # Q.K^T of the next block issued under P.V
    assert info["spill_bytes"] == 0 and info["local"] == 0


def test_sums_by_mma_at_head_size_64_by_default():
    assert prefill_launch.sum_mma(ws_plan(head_dim=64, q_heads=64))
    assert not prefill_launch.sum_mma(ws_plan())
    assert not prefill_launch.sum_mma(ws_plan(head_dim=64, q_heads=64, tuning=skattn.Tuning(
        prefill="ws", prefill_sum_mma=False)))
    assert prefill_launch.sum_mma(ws_plan(tuning=skattn.Tuning(prefill="ws",
                                                               prefill_sum_mma=True)))


def test_sm90_build_with_sums_by_mma():
    on = ws_build("--head-dim", 64, "--q-heads", 64, "--sum-mma", "on")
    off = ws_build("--head-dim", 64, "--q-heads", 64, "--sum-mma", "off")
    # one more MMA a block (P times a [BLOCK_N, 8] block of ones), its 2 KB of ones
    assert on["wgmma"] > off["wgmma"] and on["shared"] - off["shared"] <= 4096
    assert on["spill_bytes"] == off["spill_bytes"] == 0


def test_warp_specialize_protocol_probe_builds():
    # the protocol racecheck flags (docs/prefill.md, "Checking it"): partitions chosen by a
    # state word in shared memory (one indexed branch), each side of named barrier 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "ws_protocol_probe.py"),
                          "--build"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["warp_switch"] == 1 and info["barrier_1"] >= 2
    assert info["shared_stores"] >= 1 and info["shared_loads"] >= 1
    assert info["shared_full"] >= 224 * 1024
    assert info["setmaxnreg_ws_shape"] > 0 and info["barrier_1_ws_shape"] >= 2


def test_racecheck_gate_accepts_only_the_protocols_lines(tmp_path):
    # scripts/racecheck_ws.py: hazards at the def line and the warp_specialize call pass,
    # one anywhere else (here a ring-buffer line) fails, and so does a log without a summary
    sys.path.insert(0, str(ROOT / "scripts"))
    import racecheck_ws

    def_line, call = sorted(racecheck_ws.protocol_lines(racecheck_ws.KERNEL.read_text()))
    src = racecheck_ws.KERNEL.read_text().splitlines()
    assert src[def_line - 1].startswith("def ws_prefill_kernel(")
    assert "gl.warp_specialize(" in src[call - 1]
    path = "/x/src/skattn/kernels/prefill_ws.py"
    protocol = ("========= COMPUTE-SANITIZER\n"
                f"========= Error: Race reported between Read access at ws_prefill_kernel+0x1a0 in {path}:{def_line}\n"
                f"=========     and Write access at ws_prefill_kernel+0xb120 in {path}:{def_line} [54 hazards]\n"
                f"=========     and Write access at ws_prefill_kernel+0x151e0 in {path}:{call} [55 hazards]\n")
    ring = (f"========= Error: Race reported between Write access at ws_prefill_kernel+0x4e0 in {path}:{call + 30}\n"
            f"=========     and Read access at ws_prefill_kernel+0x900 in {path}:{def_line} [8 hazards]\n")
    end = "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    outcomes = {}
    for name, text in {"protocol": protocol + end, "ring": protocol + ring + end,
                       "truncated": protocol}.items():
        f = tmp_path / f"{name}.log"
        f.write_text(text)
        outcomes[name] = racecheck_ws.main([str(f)])
    assert outcomes == {"protocol": 0, "ring": 1, "truncated": 1}
    assert racecheck_ws.check(protocol, {def_line, call}) == (3, [])
