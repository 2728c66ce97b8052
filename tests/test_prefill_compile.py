"""The prompt-chunk kernel compiled for an H100/H200 (sm_90) here, without a GPU: the A/B
run's configurations compile (a Triton compiler crash would abort the process), fit shared
memory, read K/V by the copy engine into warpgroup MMAs, and the warp-specialised ones are
specialised (Triton 3.6 declines silently when a loop does not suit it).

Compiled in a subprocess (scripts/prefill_resources.py), since this session runs the
kernels under the interpreter.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED = 232448

# (model, arguments): the default TMA kernels of both head sizes and the warp-specialised
# configurations of tools/prefill_ab.py, whole tiles and cut tiles
CASES = [
    ("llama-8b", []),
    ("gpt-oss", ["dtype=bf16"]),
    ("llama-8b", ["ws=1", "num_warps=4", "occupancy=1", "block_n=128", "num_stages=2"]),
    ("llama-70b", ["ws=1", "num_warps=4", "occupancy=1", "n=128", "L=32768", "block_n=64",
                   "num_stages=2"]),
    ("gpt-oss", ["ws=1", "num_warps=4", "occupancy=1", "block_n=128", "num_stages=3"]),
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("model,args", CASES)
def test_compiles_for_sm90(model, args):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefill_resources.py"), model,
                          *args], capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["shared"] <= SM90_SHARED, row
    assert row["tma_loads"] >= 2 and row["wgmma"] >= 2, row
    if "ws=1" in args:
        assert row["ws"] and row["warp_specialize"] >= 1, row
        assert row["spill_bytes"] == 0, row
        if "n=128" in args:
            assert row["fixup"] != "none", row  # the cut-tile configuration
    else:
        assert row["warp_specialize"] == 0, row


def _squeeze(shape: str) -> list[int]:
    return [int(d) for d in shape.split("x") if d != "1"]


@pytest.mark.parametrize("model,args", [c for c in CASES if "ws=1" in c[1]])
def test_warp_specialised_copies_fill_their_buffers(model, args, tmp_path):
    # Triton's Hopper warp specialisation gives each consumer warpgroup 64 of the tile's 128
    # q rows, so it splits the q load in two. Each copy must move exactly the block of its
    # shared-memory buffer: with q as a host descriptor the split kept the host's 128-row box
    # (twice the bytes of the 64-row buffer and of what its barrier waits for) and, for a
    # [1, BLOCK_M, D] block, moved the second half along the wrong dimension (another
    # sequence and KV head's rows)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefill_resources.py"), model,
                          *args, f"ir={tmp_path}"], capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (ttgir,) = [p.read_text() for p in tmp_path.glob("*.ttgir")]
    copies = re.findall(r"async_tma_copy_global_to_local %(\w+)\[([^\]]*)\][^\n]*?"
                        r"tensordesc<tensor<([0-9x]+)x\w+[^\n]*?-> !ttg\.memdesc<([0-9x]+)x\w+",
                        ttgir)
    assert len(copies) >= 4, copies  # q in two halves, K, V
    for desc, _, block, dest in copies:
        assert _squeeze(block) == _squeeze(dest), (desc, block, dest)
    # q's halves (K and V have 4 coordinates): rows r and r + 64 of the packed q
    q_halves = [c[1].split(", ") for c in copies if len(c[1].split(", ")) == 2]
    assert len(q_halves) == 2, copies
    (r0, _), (r1, _) = q_halves
    assert re.search(rf"{re.escape(r1)} = arith\.addi {re.escape(r0)}, %c64_i32", ttgir), q_halves
