"""The prompt-chunk kernel compiled for an H100/H200 (sm_90) here, without a GPU: its default
configurations of both head sizes compile (a Triton compiler crash would abort the process),
fit shared memory and read K/V by the copy engine into warpgroup MMAs.

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

# (model, arguments): the default TMA kernels of both head sizes
CASES = [
    ("llama-8b", []),
    ("gpt-oss", ["dtype=bf16"]),
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
