"""Default kernel configurations compile for an H100/H200 (sm_90) within its shared memory.

Compiled ahead of time with Triton's own ptxas (no GPU needed), in a subprocess because this
test session runs the kernels under the interpreter. The GPU run of test_head_sizes once
failed with 'out of resource: shared memory' for D = 256 and 576/512 (4 pipeline stages).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED = 232448  # bytes one program may use on sm_90


@pytest.mark.parametrize("D,Dv,n", [(256, 256, 4), (576, 512, 4), (128, 128, 1), (128, 128, 512),
                                    (64, 64, 512)])
def test_default_config_fits_shared_memory(D, Dv, n):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "resources.py"), "--shape",
                          str(D), str(Dv), str(n)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["shared"] <= SM90_SHARED, info


def test_time_stamps_compile():
    # the stamps (a diagnostic) compile for sm_90; the default main kernel keeps 168 registers
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    outs = []
    for extra in ([], ["stamps=1"]):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "resources.py"), "llama-8b",
                              "1", "8192", "nblocks=128", *extra], capture_output=True,
                             text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append([line for line in res.stdout.splitlines() if "kernel" in line])
    assert len(outs[0]) == len(outs[1]) == 2  # main and uniform fixup
    assert "'regs': 168" in outs[0][0], outs[0]  # PERF.md's compiled resources table
