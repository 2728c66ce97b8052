"""The e2e benchmark's quantized K/V providers (FP8, q8_0) on a CUDA GPU: rows in eager and
graph mode, and a graph replay that writes the step's tokens into the quantized cache."""
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from skattn.bench import e2e, e2e_model  # noqa: E402

# llama-8b's attention (32/8 heads of 128) in a 2-layer model with a small MLP and vocabulary
LLAMA = dict(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=8192)
DEPTH = 4096
KINDS = ("skattn-fp8", "skattn-q8_0")


def _fp8_gpu() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


def _kinds() -> tuple[str, ...]:
    """The quantized kinds this GPU runs: FP8 K/V need compute capability 8.9+ (skattn refuses
    them below)."""
    return KINDS if _fp8_gpu() else tuple(k for k in KINDS if k != "skattn-fp8")


def test_rows_eager_and_graph_within_their_bound(tmp_path):
    seed = random.randrange(1 << 20)  # fresh inputs each run; printed to reproduce one
    print(f"seed {seed}")
    kinds = _kinds()
    opts = e2e.E2EOptions(ns=(1, 16), depths=(DEPTH,), shape=dict(LLAMA), model="llama-2l",
                          providers=("sdpa", "skattn:auto", *(f"{k}:auto" for k in kinds)),
                          warmup=1, reps=3, seed=seed, progress=False)
    _, _, rows = e2e.run_e2e(opts, out_dir=tmp_path, tag="gpu", device="cuda")
    assert len(rows) == 2 * (2 + len(kinds)) * 2
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["err"]) <= float(row["tol"]), row
    f16 = {(int(r["n"]), r["mode"]): float(r["err"]) for r in rows if r["provider"] == "skattn"}
    for kind in kinds:
        errs = {(int(r["n"]), r["mode"]): float(r["err"]) for r in rows if r["provider"] == kind}
        for key, err in errs.items():
            print(kind, key, f"err {err:.3e}, f16 skattn err {f16[key]:.3e}")
            assert err > f16[key]  # the quantized rows read rounded K/V: further from f16 sdpa
        for n in (1, 16):  # the graph replays the eager step's computation
            assert errs[n, "graph"] == pytest.approx(errs[n, "eager"], rel=0.05, abs=1e-3)


def _poison(layer, kind: str) -> None:
    """Fill the step's slots of a fixed-depth layer with what a replay must overwrite: e4m3fn's
    NaN for FP8; q8_0 values of 127 and NaN block scales."""
    if kind == "skattn-fp8":
        for stored in (layer.k_fp8, layer.v_fp8):
            stored[:, DEPTH:].view(torch.uint8).fill_(0x7F)
        return
    for values, scales in layer.caches:
        values[:, DEPTH:].fill_(127)
        scales[:, DEPTH:].fill_(float("nan"))


@pytest.mark.parametrize("kind", KINDS)
def test_graph_replay_writes_the_step_into_the_quantized_cache(kind):
    if kind == "skattn-fp8" and not _fp8_gpu():
        pytest.skip("FP8 K/V need compute capability 8.9+ (skattn refuses them below)")
    seed = random.randrange(1 << 20)
    print(f"seed {seed}")
    torch.manual_seed(seed)
    model = e2e_model.build_model(LLAMA, torch.float16, "cuda")
    cache = e2e_model.FixedDepthCache(2, 8, 128, DEPTH, 16, dtype=torch.float16, device="cuda", seed=seed)
    implementation = e2e_model.implementation(f"{kind}:auto")
    quantized = e2e.depth_class(kind)(model, cache, implementation)
    assert quantized.error is None
    # sdpa over the same K/V values
    want = e2e_model.reference(model, e2e_model.Step(model, quantized.rounded, 16, seed))
    model.set_attn_implementation(implementation)
    step = quantized.step(model, 16, seed)
    with torch.no_grad():
        mask = step.mask()
        assert mask is None
        replay, out, graph = e2e.capture(lambda: step.graph_step(mask), warmup=1)
        for layer in quantized.cache.layers:
            _poison(layer, kind)
        out.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    err = e2e_model.rel_err(out[:, -1], want)
    print(f"{kind} graph replay vs sdpa on the rounded K/V: {err:.3e}")
    assert err < 1e-2
    del graph
