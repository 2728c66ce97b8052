"""The e2e benchmark's FP8 K/V provider on a CUDA GPU: rows in eager and graph mode, and a
graph replay that writes the step's tokens into the FP8 cache."""
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from skattn.bench import e2e, e2e_fp8, e2e_model  # noqa: E402

# llama-8b's attention (32/8 heads of 128) in a 2-layer model with a small MLP and vocabulary
LLAMA = dict(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=8192)
DEPTH = 4096


@pytest.fixture(autouse=True)
def fp8_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 K/V need compute capability 8.9+ (skattn refuses them below)")


def test_rows_eager_and_graph_within_their_bound(tmp_path):
    seed = random.randrange(1 << 20)  # fresh inputs each run; printed to reproduce one
    print(f"seed {seed}")
    opts = e2e.E2EOptions(ns=(1, 16), depths=(DEPTH,), shape=dict(LLAMA), model="llama-2l",
                          providers=("sdpa", "skattn:auto", "skattn-fp8:auto"), warmup=1,
                          reps=3, seed=seed, progress=False)
    _, _, rows = e2e.run_e2e(opts, out_dir=tmp_path, tag="gpu", device="cuda")
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["err"]) <= float(row["tol"]), row
    fp8 = {(int(r["n"]), r["mode"]): float(r["err"]) for r in rows if r["provider"] == "skattn-fp8"}
    f16 = {(int(r["n"]), r["mode"]): float(r["err"]) for r in rows if r["provider"] == "skattn"}
    for key, err in fp8.items():
        print(key, f"fp8 err {err:.3e}, f16 skattn err {f16[key]:.3e}")
        assert err > f16[key]  # the FP8 rows read rounded K/V: further from f16 sdpa
    for n in (1, 16):  # the graph replays the eager step's computation
        assert fp8[n, "graph"] == pytest.approx(fp8[n, "eager"], rel=0.05, abs=1e-3)


def test_graph_replay_writes_the_step_into_the_fp8_cache():
    seed = random.randrange(1 << 20)
    print(f"seed {seed}")
    torch.manual_seed(seed)
    model = e2e_model.build_model(LLAMA, torch.float16, "cuda")
    cache = e2e_model.FixedDepthCache(2, 8, 128, DEPTH, 16, dtype=torch.float16, device="cuda", seed=seed)
    implementation = e2e_model.implementation("skattn-fp8:auto")
    fp8 = e2e_fp8.FP8Depth(model, cache, implementation)
    assert fp8.error is None
    want = e2e_model.reference(model, e2e_model.Step(model, fp8.rounded, 16, seed))  # sdpa, same K/V values
    model.set_attn_implementation(implementation)
    step = fp8.step(model, 16, seed)
    with torch.no_grad():
        mask = step.mask()
        assert mask is None
        replay, out, graph = e2e.capture(lambda: step.graph_step(mask), warmup=1)
        for layer in fp8.cache.layers:  # e4m3fn's NaN in the step's slots and in the output
            layer.k_fp8[:, DEPTH:].view(torch.uint8).fill_(0x7F)
            layer.v_fp8[:, DEPTH:].view(torch.uint8).fill_(0x7F)
        out.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    err = e2e_model.rel_err(out[:, -1], want)
    print(f"graph replay vs sdpa on the rounded K/V: {err:.3e}")
    assert err < 1e-2
    del graph
