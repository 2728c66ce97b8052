"""The serving kernels compile for sm_90 (no GPU needed) and keep the dense kernel's pipeline.

Compiled ahead of time in a subprocess (this session runs kernels under the interpreter) by
scripts/compile_serving.py: work list, main kernel and fixup of dense, paged (page sizes 16,
48, 64), packed varlen, feature, fp8, q8_0 and q4_0 K/V and 576/512-head cases.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import skattn
from skattn.config import SM_SHARED_BYTES, shared_bytes

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED = 232448


def test_serving_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_serving.py")],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    by = {(r["case"], r["kernel"]): r for r in rows}
    assert len({r["case"] for r in rows}) == 16
    for case in ("paged16-q8_0", "paged16-q4_0"):  # llama.cpp's blocks, dequantized on load
        assert by[(case, "ragged_attention_kernel")]["loop_spills"] == 0, case
    # q8_0 and q4_0 decode tiles three an SM (the serving default): the register cap fits
    # them, with no spill in the KV loop, and their shared memory fits three
    for case in ("paged16-q8_0-3", "paged16-q4_0-3"):
        three = by[(case, "ragged_attention_kernel")]
        assert three["regs"] <= 168 and three["loop_spills"] == 0, three
        assert 3 * (three["shared"] + 1024) <= SM_SHARED_BYTES, three  # (1 KB a block reserved)
    # a KV block over pages of 16 takes its page ids as a vector broadcast over the pages'
    # rows: its KV loop (unmasked blocks) stays within 1.6x of the unpaged layout's, where a
    # compare and select per key and page id took 1.9x (decode) and 2.0x (128-row tiles)
    loop = {r["case"]: r["loop_instructions"][0] for r in rows
            if r["kernel"] == "ragged_attention_kernel"}
    assert loop["paged16"] <= 1.6 * loop["dense"], loop
    prompt = [r["loop_instructions"][0] for r in rows
              if r["case"] == "varlen-mixed" and r["kernel"] == "ragged_attention_kernel"]
    assert max(prompt) <= 1.6 * loop["varlen-packed"], (prompt, loop)
    assert all(r["shared"] <= SM90_SHARED and (r["spill_bytes"] or 0) < 1024 for r in rows), rows
    # page ids read as scalars keep K/V in the same 3-stage shared-memory pipeline as the dense
    # layout (a vector gather of ids left a single buffer: 39680 bytes)
    dense = by[("dense", "ragged_attention_kernel")]["shared"]
    for case in ("paged16", "paged48-split", "paged64-fused", "paged16-pairs"):
        assert by[(case, "ragged_attention_kernel")]["shared"] == dense, case
    # two KV heads of 64 read as one of 128 (head_pairs): no spill in the KV loop
    assert by[("paged16-pairs", "ragged_attention_kernel")]["loop_spills"] == 0
    # fp8 K/V: 1-byte stages, as the planner's estimate counts them (config.shared_bytes)
    # Tuning.pdl_wait (the default): the main kernel waits on the GPU (griddepcontrol.wait)
    # and keeps the registers and shared memory of the plain launch's build
    wait = by[("paged16", "ragged_attention_kernel")]
    plain = by[("paged16-nowait", "ragged_attention_kernel")]
    assert wait["pdl_wait"] and not plain["pdl_wait"]
    assert (wait["regs"], wait["shared"]) == (plain["regs"], plain["shared"])
    fp8 = by[("paged16-fp8", "ragged_attention_kernel")]["shared"]
    p = skattn.serving_plan(q_split=None, batch=64, q_len=1, max_kv_len=4096, page_size=16, q_heads=32,
                            kv_heads=8, head_dim=128, sms=132, occupancy=2,
                            smem_limit=SM90_SHARED, dtype=torch.float8_e4m3fn)
    f16 = by[("paged16", "ragged_attention_kernel")]["shared"]
    assert fp8 <= shared_bytes(p.geometry, kv_format=p.dtype) < f16


def test_serving_kernels_keep_one_build_across_batch_shapes():
    """A serving step's batch size, packed tokens and key rows (1 to 64 sequences; 1 to
    512 tokens; 17 to 40000 keys), and for a paged cache the block table's width (1 to 32
    pages) and the pool's page count, change none of Triton's keys for the work list, main
    kernel and fixup, nor their compile-time constants beyond the plan's PDL choice (PDL
    and narrower fixup programs where tiles are cut into many pieces: the one-token step):
    a new batch shape must not compile a kernel in the middle of serving."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_serving.py"),
                          "--specialization"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    keys: dict = {}
    pdl_choice = ("USE_PDL", "ROWS", "MERGE_PIECES", "launch_pdl")
    for r in rows:
        const = {k: v for k, v in r["const"].items() if k not in pdl_choice}
        # the main kernel twice a step: its whole-tile build, then its stream-K build
        kernel = r["kernel"] + (":whole" if r["kernel"] != "work_list_kernel"
                                and r["const"].get("WHOLE") else "")
        keys.setdefault((r["family"], kernel), []).append((r["spec"], const))
    kernels = {"work_list_kernel", "ragged_attention_kernel", "ragged_attention_kernel:whole",
               "ragged_general_fixup_kernel"}
    assert set(keys) == {(f, k) for f in ("varlen-packed", "varlen-paged") for k in kernels}
    for kernel, builds in keys.items():
        assert len(builds) == 5 and all(b == builds[0] for b in builds), (kernel, builds)
