"""Whole prompt tiles of serving plans on the Hopper kernel (`serving_ws`,
kernels/ragged_ws.py) without a GPU: which plans take it, the work list's rule under it
(device code under the interpreter against its Python mirror), and the kernel's sm_90a
build. tests/test_serving_ws_gpu.py checks its results on the GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import skattn
from skattn import serving, serving_launch, serving_ws
from skattn.bench.serving_mixes import mix
from skattn.kernels.worklist import WHOLE_FLAG
from skattn.serving_worklist import host_work_list, whole_tiles_step

ROOT = Path(__file__).resolve().parents[1]
WS = skattn.Tuning(prefill="ws")
H200 = dict(sms=132, occupancy=2)


def prompt_plan(**kw):
    args = dict(batch=4, max_q_len=2048, total_q=8192, max_kv_len=8192, q_heads=32, kv_heads=8,
                head_dim=128, page_size=16, max_pages=512, q_split=None, **H200)
    return skattn.serving_plan(**dict(args, **kw))


def cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def test_opt_in():
    assert prompt_plan().tuning.prefill == "base", "the base kernel's whole tiles by default"
    assert serving_ws.refusal(prompt_plan(tuning=WS)) is None
    decode = skattn.serving_plan(batch=8, q_len=1, max_kv_len=4096, q_heads=32, kv_heads=8,
                                 head_dim=128, page_size=16, tuning=WS, **H200)
    assert "whole tiles" in serving_ws.refusal(decode)


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=torch.float8_e4m3fn), "K/V in"),
    (dict(head_dim=96), "head sizes"),
    (dict(window=256), "window"),
    (dict(page_size=48, max_pages=200), "pages of 48"),
    (dict(page_size=None, max_pages=None, total_k=32768), "packed"),
    (dict(policy="llamacpp"), "whole tiles"),
    (dict(max_q_len=4), "whole tiles"),
])
def test_refusals(kw, why):
    p = prompt_plan(tuning=WS, **kw)
    assert why in serving_ws.refusal(p)
    assert serving_launch.bind(p, torch.device("cpu")).ws is None
    assert serving_launch.bind(p, torch.device("cpu")).wl_const["WS"] == 0


def test_usable_calls():
    # the copy engine's rule on the caches the kernel reads, and the features it lacks
    paged = torch.zeros(64, 16, 8, 128, dtype=torch.float16)
    dense = torch.zeros(2, 4096, 8, 128, dtype=torch.float16)
    assert serving_ws.usable(paged, paged, 0.0, None) and serving_ws.usable(dense, dense, 0.0, None)
    assert not serving_ws.usable(paged, paged, 30.0, None), "softcap"
    assert not serving_ws.usable(paged, paged, 0.0, torch.ones(32)), "ALiBi"
    odd = torch.zeros(64 * 16 * 8 * 128 + 1, dtype=torch.float16)[1:].view(64, 16, 8, 128)
    assert not serving_ws.usable(odd, odd, 0.0, None), "a base off 16 bytes"


def test_no_kernel_without_a_hopper():
    # bound on the CPU (the interpreter): the base kernel's whole-tile build and its rule
    b = serving_launch.bind(prompt_plan(), torch.device("cpu"))
    assert b.ws is None and b.wl_const["WS"] == 0


@pytest.mark.parametrize("model, heads", [("llama-8b", (32, 8, 128)), ("gpt-oss", (64, 8, 64))])
def test_rule_on_mixed_steps(model, heads):
    # (d) in one plan: decode rows in prompt tiles, some of thousands of keys, beside the
    # chunk: one cut wave of the base kernel beats whole tiles here; the chunk alone (a
    # MixedPlan's long half) runs whole tiles on the Hopper kernel
    hq, hkv, d = heads
    m = mix("mixed")
    p = skattn.serving_plan(batch=m.batch, max_q_len=m.max_q, total_q=sum(m.q_lens),
                            max_kv_len=max(m.kv_lens), q_heads=hq, kv_heads=hkv, head_dim=d,
                            page_size=16, max_pages=-(-max(m.kv_lens) // 16), q_split=None, **H200)
    ws = 132 * serving_ws.prefill_launch.ws_registers(d, p.geometry.block_n)[0]
    assert not host_work_list(p, cu_k=cu(m.kv_lens), cu_q=cu(m.q_lens), ws=ws).whole
    i = m.q_lens.index(max(m.q_lens))
    alone_q = [n if j == i else 0 for j, n in enumerate(m.q_lens)]
    alone_k = [n if j == i else 0 for j, n in enumerate(m.kv_lens)]
    assert host_work_list(p, cu_k=cu(alone_k), cu_q=cu(alone_q), ws=ws).whole
    assert not host_work_list(p, cu_k=cu(alone_k), cu_q=cu(alone_q)).whole, \
        "the base kernel's rule cuts the chunk (its tiles are within 2x of each other)"


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
def test_rule_host_and_device_agree(monkeypatch):
    # the work-list kernel (interpreter) with the Hopper kernel's rule against
    # whole_tiles_step(ws=...), on a pretend GPU of 4 SMs: steps each side of the line
    fake = serving_ws.WsBound({}, (1, 16, 1, 16), 4)
    monkeypatch.setattr(serving_ws, "bind", lambda plan, device: fake)
    p = skattn.serving_plan(batch=3, max_q_len=256, total_q=400, max_kv_len=512, q_heads=8,
                            kv_heads=2, head_dim=16, block_n=16, sms=4, occupancy=2,
                            q_split=None, tuning=WS)
    b = serving_launch.bind(p, torch.device("cpu"))
    assert b.wl_const["WS"] == serving_ws.WS_SPEED_X10 and b.wl_ints[-1] == 4
    seen = set()
    for lq, lk in (([256, 1, 0], [256, 40, 5]), ([16, 1, 1], [512, 512, 512]),
                   ([64, 64, 0], [64, 512, 0]), ([1, 1, 1], [300, 2, 9]),
                   ([200, 100, 100], [200, 512, 100]), ([128, 128, 128], [512, 512, 512])):
        cu_q = torch.tensor(cu(lq), dtype=torch.int32)
        cu_k = torch.tensor(cu(lk), dtype=torch.int32)
        host = host_work_list(p, cu_k=cu_k.tolist(), cu_q=cu_q.tolist(), ws=4)
        wl = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        assert wl[WHOLE_FLAG.value].item() == int(host.whole), (lq, lk)
        assert wl[1].item() == host.programs, (lq, lk)
        seen.add(host.whole)
    assert seen == {True, False}, "the steps should fall on both sides of the rule"


def test_rule_on_known_steps():
    # (work, tiles, longest): (d)'s chunk alone (3840 blocks in 128 tiles of up to 32) runs
    # whole, a 64-token chunk over 4096 keys (512 in 16 of 32) is cut, and (d) in one plan
    # (15312 in 376 tiles, the longest 219) is cut, on a 132-SM GPU
    p = prompt_plan()
    assert p.resident == 132
    expect = {(3840, 128, 32): True, (512, 16, 32): False, (15312, 376, 219): False}
    for (work, tiles, longest), whole in expect.items():
        assert whole_tiles_step(p, work, tiles, longest, 1, 2048, ws=132) == whole
    assert not whole_tiles_step(p, 3840, 128, 32, 28, 2048), "the base kernel's rule cuts it"


def ragged_ws_build(*args) -> dict:
    """scripts/ragged_ws_build.py's JSON line, in a process of its own, without the
    interpreter (Gluon compiles its functions)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "ragged_ws_build.py"),
                          *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, copies", [(("--layout", "paged", "--page-size", "16"), 32),
                                          (("--layout", "paged", "--page-size", "256"), 4),
                                          (("--layout", "dense"), 4)])
def test_sm90_build(args, copies):
    # head size 128: a block's K and V each in two 64-column copies, times the pages a
    # block spans; warpgroup MMAs; registers handed between the partitions; V's tail zeroed
    # in shared memory before the last P·V (stores, then the async proxy's fence)
    info = ragged_ws_build(*args)
    assert info["tma_loads"] == copies
    assert info["wgmma"] >= 32 and info["setmaxnreg"] > 0 and info["local"] == 0
    assert info["spill_bytes"] <= 64, info
    assert info["fences"] >= 4, "each warpgroup fences its q stores, and its V's before its MMA"


@pytest.mark.parametrize("block_n, copies, spill", [(64, 8, 96), (128, 16, 16)])
def test_sm90_build_head_64(block_n, copies, spill):
    # head size 64 over pages of 16: 64-key blocks (the plan's default; two programs an SM,
    # 84 registers a thread, 84 bytes spilled with V's tail zeroing) and 128-key blocks
    # (`serving_plan(block_n=128)`: one program an SM, as the dense kernel runs head size 64)
    info = ragged_ws_build("--head-dim", 64, "--block-n", block_n)
    assert info["block_n"] == block_n and info["tma_loads"] == copies
    assert info["regs"] == (84 if block_n == 64 else 168) and info["local"] == 0
    assert info["spill_bytes"] <= spill, info
