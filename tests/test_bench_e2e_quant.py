"""The e2e benchmark's FP8 K/V provider on a CPU: its cache, one eager step, its check, errors."""
import csv

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
import skattn.transformers as skt  # noqa: E402
from skattn.bench import e2e, e2e_fp8, e2e_model  # noqa: E402
from skattn.bench.e2e_report import e2e_report, table  # noqa: E402
from skattn.transformers_fp8 import FP8_MAX, quantize  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

FP8 = torch.float8_e4m3fn


def _bytes(x):
    return x.view(torch.uint8)


def test_layer_holds_the_depth_in_fp8_and_writes_the_step_after_it():
    cache = e2e_model.FixedDepthCache(1, 2, 16, depth=10, room=4, dtype=torch.float16, device="cpu")
    keys, values = cache.keys[0], cache.values[0]
    layer = e2e_fp8.FixedDepthFP8Layer(keys, values, depth=10)
    scale = keys[:, :, :10].float().abs().amax(dim=(0, 2, 3)) / FP8_MAX
    torch.testing.assert_close(layer.k_scale, scale, rtol=0, atol=0)
    assert layer.k_fp8.shape == (1, 14, 2, 16) and layer.k_fp8.dtype == FP8
    assert torch.equal(_bytes(layer.k_fp8[:, :10]),
                       _bytes(quantize(keys[:, :, :10], scale).transpose(1, 2)))
    depth_bytes = _bytes(layer.v_fp8[:, :10]).clone()
    new = torch.randn(1, 2, 3, 16, dtype=torch.float16)
    new[0, 1, 0, 0] = 1000 * scale[1]  # beyond the depth's range: saturates at 448 x scale
    for _ in range(2):  # a repeated step writes the same slots and sees the same keys
        k, v = layer.update(new, new + 1)
        assert k.shape == (1, 2, 13, 16) and v.shape == (1, 2, 13, 16) and k.dtype == FP8
        assert k.skattn_scale is layer.k_scale and v.skattn_scale is layer.v_scale
        assert torch.equal(_bytes(k[:, :, 10:]), _bytes(quantize(new, layer.k_scale)))
        assert torch.equal(_bytes(v[:, :, 10:]), _bytes(quantize(new + 1, layer.v_scale)))
        assert torch.equal(_bytes(layer.v_fp8[:, :10]), depth_bytes)
    assert k[0, 1, 10, 0].float() == FP8_MAX
    assert layer.get_seq_length() == 10 and layer.get_mask_sizes(3) == (13, 0)
    with pytest.raises(ValueError, match="room for 4"):
        layer.update(torch.randn(1, 2, 5, 16, dtype=torch.float16), new)


def test_e4m3_rounding_of_gaussian_kv_is_about_3_percent():
    # the figure FP8Depth.bound's comment gives: 2^-4 at most per element, ~3% in norm
    x = torch.randn(1, 2, 4096, 64, generator=torch.Generator().manual_seed(0))
    scale = x.abs().amax(dim=(0, 2, 3)) / FP8_MAX
    r = e2e_fp8.rounded(x, scale)
    rel = ((r - x).norm() / x.norm()).item()
    assert 0.02 < rel < 0.04, rel
    normal = x.abs() >= 2 ** -6 * scale[None, :, None, None]  # e4m3's normal range
    assert ((r - x).abs() <= 2 ** -4 * x.abs())[normal].all()


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, its f16 cache and the FP8 provider's caches at depth 24."""
    torch.manual_seed(0)
    model = e2e_model.build_model(e2e.TINY, torch.float16, "cpu")
    cache = e2e_model.FixedDepthCache(2, 2, 16, depth=24, room=3, dtype=torch.float16, device="cpu",
                                seed=24)
    return model, cache, e2e_fp8.FP8Depth(model, cache, e2e_model.implementation("skattn-fp8:auto"))


def test_fp8_step_is_sdpa_on_the_rounded_kv(tiny):
    model, cache, fp8 = tiny
    assert fp8.error is None and isinstance(fp8.cache, skt.FP8Cache)
    step = fp8.step(model, 3, seed=3)
    with torch.no_grad():
        model.set_attn_implementation(e2e_model.implementation("skattn-fp8:auto"))
        assert step.mask() is None  # bottom-right causal over depth + n keys, as for f16
        out = step.eager()[:, -1]
    ref = e2e_model.reference(model, e2e_model.Step(model, cache, 3, seed=3))
    rounded_ref = e2e_model.reference(model, e2e_model.Step(model, fp8.rounded, 3, seed=3))
    # same K/V values as sdpa over the rounded cache: f16-kernel agreement, the f16 rows' 1e-2
    assert e2e_model.rel_err(out, rounded_ref) < 1e-2
    # against f16 sdpa the FP8 rounding shows (so the FP8 bytes were read), within the bound
    err, bound = e2e_model.rel_err(out, ref), fp8.bound(model, 3, 3, ref)
    assert 5 * e2e_model.rel_err(out, rounded_ref) < err <= bound
    assert bound == pytest.approx(e2e.WRONG_ABOVE + e2e_model.rel_err(rounded_ref, ref))


def _run(tmp_path, providers, modes=("eager",)):
    opts = e2e.E2EOptions(ns=(3,), depths=(24,), modes=modes, shape=dict(e2e.TINY), model="tiny",
                          providers=providers, warmup=0, reps=1, progress=False)
    return e2e.run_e2e(opts, out_dir=tmp_path, tag="t", device="cpu")


def test_run_writes_fp8_rows_checked_within_their_bound(tmp_path):
    csv_path, _, rows = _run(tmp_path, ("sdpa", "skattn-fp8:auto"), modes=("eager", "graph"))
    fp8 = {r["mode"]: r for r in rows if r["provider"] == "skattn-fp8"}
    assert fp8["eager"]["status"] == "ok" and fp8["eager"]["policy"] == "auto"
    assert float(fp8["eager"]["tokens_per_s"]) > 0
    assert 0 < float(fp8["eager"]["err"]) <= float(fp8["eager"]["tol"])
    assert float(fp8["eager"]["tol"]) > e2e.WRONG_ABOVE  # the cell's rounding effect added
    assert fp8["graph"]["status"] == "error: RuntimeError: CUDA graphs need a GPU"
    with open(csv_path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["provider"], r["tol"]) for r in written][0] == ("sdpa", "1.000e-01")
    md = e2e_report([csv_path], plots=False)
    assert "skattn-fp8 auto vs sdpa" in md and "1-byte K/V" in md and "f16 sdpa" in md


def test_check_fails_an_fp8_read_that_ignores_the_scales(tmp_path, monkeypatch):
    # the kernel fed scales of 1 reads e4m3 codes as values (~100x too large): a wrong row
    monkeypatch.setattr(skt, "_fp8_scales", lambda key, value: dict(
        k_scale=torch.ones(key.shape[1]), v_scale=torch.ones(value.shape[1])))
    _, _, rows = _run(tmp_path, ("skattn-fp8:auto",))
    assert rows[0]["status"].startswith("wrong: last-token logits"), rows[0]


def test_bad_providers_and_a_cache_that_cannot_be_made(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="skattn-fp8:<policy>"):
        e2e_model.implementation("skattn-fp8")
    with pytest.raises(ValueError, match="FP8 K/V are read by skattn only"):
        e2e_model.implementation("sdpa-fp8")
    with pytest.raises(ValueError, match="policy"):
        e2e_model.implementation("skattn-fp8:fastest")
    assert e2e.main(["--tiny", "--providers", "sdpa,skattn-fp8", "--out", str(tmp_path)]) == 2
    assert "skattn-fp8:<policy>" in capsys.readouterr().err
    # FP8Cache refuses a model run by sdpa (it would receive float8 K/V): the rows say so
    torch.manual_seed(0)
    model = e2e_model.build_model(e2e.TINY, torch.float16, "cpu")
    cache = e2e_model.FixedDepthCache(2, 2, 16, depth=8, room=1, dtype=torch.float16, device="cpu")
    assert "FP8Cache needs a skattn attention implementation" in e2e_fp8.FP8Depth(
        model, cache, "sdpa").error

    def no_memory(*args):
        raise torch.OutOfMemoryError("no room for the FP8 cache")

    monkeypatch.setattr(e2e_fp8, "FixedDepthFP8Cache", no_memory)
    _, _, rows = _run(tmp_path, ("sdpa", "skattn-fp8:auto"))
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error: OutOfMemoryError: no room for the FP8 cache"


def test_table_puts_fp8_beside_the_others():
    def row(provider, policy, tps):
        return dict(provider=provider, policy=policy, mode="graph", model="llama-8b", n="1",
                    depth="8192", status="ok", tokens_per_s=str(tps))

    rows = [row("sdpa", "", 100.0), row("skattn", "llamacpp-before", 150.0),
            row("skattn", "llamacpp", 180.0), row("skattn", "auto", 250.0),
            row("skattn-fp8", "auto", 300.0)]
    head, _, line = table(rows).splitlines()
    assert head.split(" | ")[6:] == ["auto tok/s", "skattn-fp8 auto tok/s", "llamacpp vs before",
                                     "auto vs sdpa", "skattn-fp8 auto vs sdpa",
                                     "best skattn vs sdpa |"]
    # best skattn is over the f16 policies (2.50x), the FP8 provider has its own ratio
    assert line.split(" | ")[6:] == ["250.0", "300.0", "1.20x", "2.50x", "3.00x", "2.50x |"]
    rows[-1]["status"] = "error: boom"
    assert line != (line := table(rows).splitlines()[2])
    assert line.split(" | ")[6:] == ["250.0", "error", "1.20x", "2.50x", "—", "2.50x |"]
