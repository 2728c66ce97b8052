"""Tensor parallelism with transformers' own plan (`DistributedConfig(tp_plan="auto")`, torchrun):
each rank runs skattn on its share of the heads, and greedy decoding gives the tokens of a
single-process run. CPU: 2 gloo ranks under the interpreter; GPU: 2 NCCL ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
pytest.importorskip("accelerate", reason="transformers' tp_plan loading needs accelerate "
                                         "(pip install 'skattn[transformers]')")

HERE = Path(__file__).parent
# 4 query / 2 KV heads (2 / 1 a rank), head size 16; weights 0.3 so attention moves the logits
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.3)


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(path)
    return path


def torchrun(ckpt: Path, out: Path, nproc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HERE / "tp_worker.py"), str(ckpt), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode and "terminate called without an active exception" in run.stderr:
        # a rank's C++ runtime aborted (gloo's threads on a loaded CPU; seen once in ~20
        # runs of the suite, not reproduced alone): run again once, the results still checked
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text())


def single(ckpt: Path, device):
    import tp_worker

    return tp_worker.greedy(tp_worker.load(ckpt, tensor_parallel=False, device=device), device)


def check(tp: dict, one, world: int):
    tokens, logits, heads = one
    # every skattn call of the TP run saw 1/world of the heads; the single run all of them
    assert set(map(tuple, tp["heads"])) == {(TINY["num_attention_heads"] // world,
                                             TINY["num_key_value_heads"] // world)}
    assert set(heads) == {(TINY["num_attention_heads"], TINY["num_key_value_heads"])}
    # TP sums the rowwise projections in another order: logits agree to f16 rounding
    diff = (torch.tensor(tp["logits"]) - torch.tensor(logits)).abs().max().item()
    assert diff < 2e-2 * torch.tensor(logits).abs().max().item(), diff
    assert tp["tokens"] == tokens


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks run the interpreter on CPUs")
def test_tp_gloo_cpu(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    tp = torchrun(ckpt, tmp_path / "tp.json", 2)
    assert tp["device"] == "cpu"
    check(tp, single(ckpt, torch.device("cpu")), 2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="tensor parallelism over NCCL needs 2 CUDA GPUs")
def test_tp_nccl_two_gpus(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    tp = torchrun(ckpt, tmp_path / "tp.json", 2)
    assert tp["device"].startswith("cuda")
    check(tp, single(ckpt, torch.device("cuda", 0)), 2)
