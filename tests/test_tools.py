"""tools/timeline.py and tools/tuning_ab.py on the CPU: variant parsing, the dry runs, and the
timeline's own kernels compiled for sm_90 (their GPU runs are the lead's)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import skattn

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tuning_ab = _load("tuning_ab")
timeline = _load("timeline")


def test_variants_parse_into_plan_keywords_and_tuning():
    assert tuning_ab.parse_variant("default") == ({}, skattn.Tuning())
    plan_kw, t = tuning_ab.parse_variant("fixup=fused, fused_merge_elements=64,pdl=0")
    assert plan_kw == {"fixup": "fused"}
    assert t == skattn.Tuning(fused_merge_elements=64, pdl=False)
    assert tuning_ab.parse_variant("pdl_trigger=start,fused_dv=32,policy=llamacpp") == (
        {"policy": "llamacpp"}, skattn.Tuning(pdl_trigger="start", fused_dv=32))
    assert tuning_ab.parse_variant("fused_dv=none")[1].fused_dv is None


@pytest.mark.parametrize("text, match", [
    ("no_such_field=1", "unknown variant key"),
    ("pdl=maybe", "pdl takes 0/1"),
    ("fixup_rows=3", "power of two"),  # Tuning's own check
    ("pdl", "not key=value"),
])
def test_bad_variants_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        tuning_ab.parse_variant(text)


def test_tuning_ab_plan_only_lists_every_variant(capsys):
    variants = "default;merge_loads_first=0;fixup=fused"
    assert tuning_ab.main(["--plan-only", "--cells", "decode", "--variants", variants]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 * 3  # decode cells x variants
    assert sum("{'merge_loads_first': False}" in line for line in lines) == 6
    assert all(" fused " in line for line in lines if "fixup=fused" in line)
    # a forced N the plan refuses is left out, not fatal (llama-8b n=1 L=8192: 8 x 128 items)
    assert tuning_ab.main(["--plan-only", "--cells", "decode", "--programs", "2048"]) == 0
    assert "skip llama-8b n=1 L=8192 N=2048" in capsys.readouterr().err


def test_tuning_ab_refuses_bad_variants_before_any_work():
    with pytest.raises(SystemExit) as err:
        tuning_ab.main(["--plan-only", "--variants", "default;pdl=2"])
    assert err.value.code == 2


def test_timeline_plan_only_stamps_the_uniform_fixup(capsys):
    assert timeline.main(["attention", "--plan-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(timeline.ATTENTION_CELLS)
    assert all("uniform" in line and "(stamped)" in line for line in lines)
    with pytest.raises(SystemExit):
        timeline.main(["bogus", "--plan-only"])


def test_timeline_kernels_compile_for_sm90():
    # the stream-only and empty kernels, compiled ahead of time as scripts/resources.py does
    code = (
        "import json, sys, torch\n"
        "sys.path[:0] = ['scripts', 'tools']\n"
        "import resources, timeline\n"
        "L, H, D, N = 8192, 8, 128, 128\n"
        "q = torch.zeros(16, D, dtype=torch.float16)\n"
        "k = torch.zeros(1, L, H, D, dtype=torch.float16)\n"
        "out, st = torch.zeros(N, 16, D), torch.zeros(N, 4, dtype=torch.int64)\n"
        "args = (q, k, k, out, st, H * (L // 64), N, L // 64, k.stride(1), k.stride(2))\n"
        "kw = dict(D=D, BLOCK_N=64, BLOCK_M=16, STAGES=4, num_warps=4)\n"
        "print(json.dumps([resources.compile_launch(timeline.stream_kernel, args, kw),\n"
        "                  resources.compile_launch(timeline.empty_kernel, (st,), {})]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stream, empty = json.loads(res.stdout.splitlines()[-1])
    assert stream["spill_bytes"] == 0 and 0 < stream["shared"] <= 232448, stream
    assert empty["regs"] > 0 and empty["shared"] == 0, empty


def test_prompt_square_variants_plan_every_default_cell():
    # tools/prompt_square.py (GPU): every variant of every default cell plans on the CPU, the
    # cut and whole-tile variants are what they say, and the default plan of a whole prompt
    # is whole tiles on the Hopper prompt kernel
    import torch

    import skattn
    from skattn.bench.models import MODELS

    ps = _load("prompt_square")
    for cell in ps.CELLS.split(","):
        model, n, L = cell.split(":")
        hq, hkv, d = MODELS[model][:3]
        shape = dict(batch=1, q_len=int(n), kv_len=int(L), q_heads=hq, kv_heads=hkv, head_dim=d,
                     dtype=torch.float16, sms=132, occupancy=2)
        tiles = skattn.plan(causal=True, **shape).ntiles_dst
        for name, kw in ps.variants(tiles, 132).items():
            kw = dict(kw)
            p = skattn.plan(causal=kw.pop("causal", True), **shape, **kw)
            if name.startswith("cut"):
                assert (p.programs, p.fixup) == (132, "general")
            if "whole" in name:
                assert (p.programs, p.fixup) == (tiles, "none")
        if n == L:
            p = skattn.plan(causal=True, **shape)
            assert (p.programs, p.tuning.prefill) == (tiles, "tma")


def test_write_table_writes_rows_and_provenance(tmp_path):
    # the CSV + JSON pair the GPU tools leave under $OUT
    import csv
    import json

    from skattn.bench.records import write_table

    rows = [dict(case="a", us=1.5, whole=True), dict(case="b", us=None, whole=False)]
    path = write_table(rows, tmp_path / "new", "steps", {"gpu": "x", "commit": "c"})
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert [r["case"] for r in back] == ["a", "b"]
    assert back[0]["us"] == "1.5" and back[1]["us"] == ""
    assert json.loads((tmp_path / "new" / "steps.json").read_text()) == {"gpu": "x", "commit": "c"}
