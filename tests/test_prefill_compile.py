"""The prompt-chunk kernel compiled for an H100/H200 (sm_90) here, without a GPU: the A/B
run's configurations compile (a Triton compiler crash would abort the process), fit shared
memory, read K/V by the copy engine into warpgroup MMAs, and the warp-specialised ones are
specialised (Triton 3.6 declines silently when a loop does not suit it).

Compiled in a subprocess (scripts/prefill_resources.py), since this session runs the
kernels under the interpreter.
"""
import json
import os
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
