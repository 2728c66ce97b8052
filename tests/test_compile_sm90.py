"""Every kernel configuration the planner picks compiles for an H100/H200 (sm_90) within its
shared memory, and `skattn.config.shared_bytes` bounds what Triton allocates for it.

Compiled ahead of time on the CPU (no GPU needed), in a subprocess because this test session
runs the kernels under the interpreter. On an H200, prompt-sized query blocks with a mask
and head size 256 once failed with 'OutOfResources: shared memory, Required: 262144-294912,
Hardware limit: 232448'; these tests are what keeps that from coming back.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED = 232448  # bytes one program may use on sm_90


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _rows(body: str, first: str) -> list[dict]:
    """The JSON lines printed by `body` (code run with scripts/ on the path, without the
    interpreter, importing `first`)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
            f"import {first}\n" + body)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_every_planned_config_fits_shared_memory():
    # head sizes {32 .. 576/512} x features {none, mask, sinks, sinks+softcap, alibi+mask,
    # window, fused+lse} x query tokens {1..16, 32, 64, 75, 128, 512} x GQA ratios {1, 4, 5,
    # 8, 12, 16}: ~10k plans, ~250 distinct configurations (scripts/resources.py
    # grid_configs), each compiled up to Triton's shared-memory allocation (1-6 s), in one
    # process per core: ~2.5 min on 2 cores
    jobs = max(2, min(8, os.cpu_count() or 2))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "resources.py"), "--grid",
                          f"--jobs={jobs}"], capture_output=True, text=True, env=_env(),
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    *rows, summary = lines
    assert summary["summary"] and summary["configs"] == len(rows) > 200
    assert summary["points"] == 11 * 7 * 21 * 6
    over = [r for r in rows if r["shared"] > SM90_SHARED]
    assert not over, over
    under = [r for r in rows if r["estimate"] < r["shared"]]
    assert not under, under  # the planner's estimate bounds the compiled number
    exact = sum(r["estimate"] == r["shared"] for r in rows)
    assert exact >= 0.8 * len(rows), exact  # and is calibrated, not just large
    # the shapes that overflowed on the H200 are among the compiled ones
    seen = {(r["head_dim"], r["head_dim_v"], r["feature"], r["geometry"][0]) for r in rows}
    assert {(128, 128, "mask", 128), (256, 256, "none", 128), (576, 512, "mask", 64),
            (192, 128, "alibi+mask", 128)} <= seen


def _llama_8b_decode(*extra) -> list[str]:
    """scripts/resources.py's lines per kernel for llama-8b n = 1 L = 8192 at 128 programs."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "resources.py"), "llama-8b",
                          "1", "8192", "programs=128", *extra], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return [line for line in res.stdout.splitlines() if "kernel" in line]


def test_time_stamps_compile():
    # the stamps (a diagnostic) compile for sm_90; the default main kernel keeps 168 registers
    outs = [_llama_8b_decode(*extra) for extra in ([], ["stamps=1"])]
    assert len(outs[0]) == len(outs[1]) == 2  # main and uniform fixup
    assert "'regs': 168" in outs[0][0], outs[0]  # PERF.md's compiled resources table


def test_pdl_wait_compiles():
    # Tuning.pdl_wait (the default on sm_90): the main kernel waits on the previous grid
    # (griddepcontrol.wait) before its first load; with pdl_wait=False there is no wait;
    # registers stay as they are
    outs = [_llama_8b_decode(*extra)[0] for extra in ([], ["pdl_wait=0"])]
    assert "'pdl_wait': True" in outs[0] and "'pdl_wait': False" in outs[1], outs
    assert "'regs': 168" in outs[1], outs


def test_allocation_only_compile_matches_the_full_one():
    # --grid stops after Triton's shared-memory allocation; a full compile (through ptxas) of
    # a decode and a prompt configuration reports the same bytes, as the estimate does
    for D, n in ((128, 1), (256, 16)):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "resources.py"), "--shape",
                              str(D), str(D), str(n)], capture_output=True, text=True,
                             env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        info = json.loads(res.stdout.strip().splitlines()[-1])
        assert info["shared"] == info["allocated"] == info["estimate"] <= SM90_SHARED, info


def test_sass_loop_counts_the_kv_loop():
    # scripts/sass_loop.py on the llama-8b decode kernel (sm_90 SASS, compiled here): the
    # unmasked KV loop holds the MMAs; q8_0's converts four values at a time (no I2F), so its
    # loop is under 2.5x f16's (Triton's one conversion a value made it 3.7x); --plan builds
    # other plans: two-warp tiles run a block in about twice a four-warp tile's instructions
    # a warp, and V staged in f16 (q8_0_v_blocks=0) is longer than V as pairs
    def loops(kv, *plan):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_loop.py"), "128", "128",
                              "1", kv, "--json", *plan], capture_output=True, text=True,
                             env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return [json.loads(line) for line in res.stdout.splitlines()]

    f16, q8 = loops("float16"), loops("q8_0")
    assert len(f16) >= 2 and f16[0]["opcodes"].get("HMMA.16816.F32", 0) > 0, f16
    assert not any(op.startswith("I2F") for op in q8[0]["opcodes"]), q8[0]
    assert q8[0]["instructions"] < 2.5 * f16[0]["instructions"], (q8[0], f16[0])
    two = loops("q8_0", "--plan", "num_warps=2,block_n=64,num_stages=3,occupancy=4")[0]
    staged = loops("q8_0", "--plan", "q8_0_v_blocks=0")[0]
    assert 1.5 * q8[0]["instructions"] < two["instructions"] < 2.5 * q8[0]["instructions"], two
    assert staged["instructions"] > q8[0]["instructions"], (staged, q8[0])


def test_block_scales_are_loaded_a_block_ahead():
    # q8_0 and q4_0 decode (llama-8b heads, n = 1, sm_90 SASS compiled here): the unmasked
    # KV loop issues its 2-byte scale loads (K's and V's) before its first MMA, i.e. for the
    # next block (`kv_loop._block_scales`); loaded in the block that uses them, V's come
    # after the scores' MMAs and each block waits on them
    rows = _rows("for kv in ('q8_0', 'q4_0'):\n"
                 "    body = sass_loop.mma_loops(sass_loop.sass(128, 128, 1, kv), True)[0]\n"
                 "    at = [i for i, x in enumerate(body) if 'LDG.E.U16' in x]\n"
                 "    mma = min(i for i, x in enumerate(body) if 'HMMA' in x)\n"
                 "    print(json.dumps(dict(kv=kv, loads=at, mma=mma)))\n", "sass_loop")
    assert [r["kv"] for r in rows] == ["q8_0", "q4_0"], rows
    for r in rows:
        assert len(r["loads"]) >= 2 and max(r["loads"]) < r["mma"], r


def test_fp8_wide_decode_tiles_compile_two_an_sm():
    # `config.fp8_wide_decode`'s tiles (16 rows, 128-key blocks, 3 stages; llama-8b and
    # gpt-oss heads; the geometry named, as the planner's default needs a GPU's occupancy:
    # tests/test_planner.py holds that default), compiled for sm_90 here: no spills, and
    # shared memory for two programs an SM (the count `auto` plans with)
    rows = _rows("for D, heads in ((128, 4), (64, 8)):\n"
                 "    p, fn, args, kw = resources._main_launch(\n"
                 "        D, D, 1, heads, 32768, 'float8_e4m3fn', block_n=128, num_stages=3)\n"
                 "    g = p.geometry\n"
                 "    print(json.dumps(dict(resources.compile_launch(fn, args, kw), D=D,\n"
                 "                          geo=[g.block_m, g.block_n, g.num_stages, g.num_warps])))\n",
                 "resources")
    assert [r["D"] for r in rows] == [128, 64], rows
    for r in rows:
        assert r["geo"] == [16, 128, 3, 4], r
        assert r["spill_bytes"] == 0 and 2 * r["shared"] <= 232448, r
