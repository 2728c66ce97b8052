"""The context-parallel benchmark (skattn.bench.dist): its options, its scaling arithmetic, and
a 2-rank gloo dry run under the interpreter that writes the CSV, JSON and plot."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skattn.bench import dist as bd

HERE = Path(__file__).parent


def test_defaults_follow_the_launched_ranks():
    a = bd.parse_args([], 8)
    assert a.worlds == [1, 2, 4, 8] and a.n == [1, 512] and a.comm == ["allgather", "ring"]
    assert a.kv_lens == [131072, 262144, 524288, 1048576]
    assert a.shapes == [("llama-8b", 32, 8, 128)]
    assert bd.parse_args([], 6).worlds == [1, 2, 4]
    a = bd.parse_args(["--heads", "40/8", "--head-dim", "128", "--kv-lens", "4096,8192",
                       "--q-lens", "1", "--worlds", "2", "--comm", "ring", "--out", "x"], 2)
    assert (a.shapes, a.kv_lens, a.n, a.worlds, a.comm, a.out) == (
        [("40/8/128", 40, 8, 128)], [4096, 8192], [1], [2], ["ring"], "x")
    dry = bd.parse_args(["--dry-run"], 2)
    assert dry.kv_lens == [64, 96] and dry.shapes == [("4/2/16", 4, 2, 16)] and dry.reps == 2


@pytest.mark.parametrize("argv, message", [
    (["--worlds", "1,4"], "needs 4 ranks"),
    (["--comm", "tree"], "--comm"),
    (["--heads", "32/8"], "--head-dim"),
    (["--heads", "32/5", "--head-dim", "64"], "multiple"),
    (["--models", "gpt-5"], "unknown model"),
    (["--kv-lens", "0"], "positive"),
    (["--q-lens", "4096", "--kv-lens", "1024"], "exceeds"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        bd.parse_args(argv, 2)
    assert message in capsys.readouterr().err


def test_scaling_against_one_gpu():
    rows = [dict(model="m", n=1, kv_len=100, world=1, step_us=80.0),
            dict(model="m", n=1, kv_len=100, world=2, step_us=50.0),
            dict(model="m", n=1, kv_len=200, world=1, error="out of memory"),
            dict(model="m", n=1, kv_len=200, world=4, step_us=50.0)]
    bd.add_scaling(rows)
    assert rows[1]["speedup"] == 1.6 and rows[1]["efficiency"] == 0.8
    # L = 200 did not fit one GPU: the longest that did, scaled by L (80 us x 2)
    assert rows[3]["speedup"] == 3.2 and rows[3]["efficiency"] == 0.8
    assert "speedup" not in rows[0] and "speedup" not in rows[2]


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_two_rank_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "skattn.bench.dist", "--dry-run", "--kv-lens", "40", "--q-lens", "1,3",
           "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    rows = list(csv.DictReader((tmp_path / "dist.csv").open()))
    cells = [(r["n"], r["world"], r["comm"]) for r in rows]
    assert cells == [(n, w, c) for n in ("1", "3")
                     for w, c in (("1", "single"), ("2", "allgather"), ("2", "ring"))]
    for r in rows:
        assert float(r["step_us"]) > 0 and r["backend"] == "gloo" and not r["error"]
        if r["world"] == "2":
            assert float(r["local_us"]) > 0 and float(r["exchange_us"]) > 0
            assert float(r["efficiency"]) > 0 and int(r["received_bytes"]) > 0
    prov = json.loads((tmp_path / "dist.json").read_text())["provenance"]
    assert prov["dry_run"] and prov["interpreter"] and prov["ranks"] == 2
    assert (tmp_path / "dist.png").stat().st_size > 0
    assert " eff" in run.stdout and run.stdout.strip().splitlines()[-1].startswith("wrote ")
