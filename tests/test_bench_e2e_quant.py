"""The e2e benchmark's quantized K/V providers (FP8, q8_0) on a CPU: their caches, one eager
step, their check, errors, the report."""
import csv

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
import skattn.transformers as skt  # noqa: E402
from skattn import quant  # noqa: E402
from skattn.bench import e2e, e2e_fp8, e2e_model, e2e_q8_0  # noqa: E402
from skattn.bench.e2e_report import e2e_report, table  # noqa: E402
from skattn.transformers_fp8 import FP8_MAX, quantize  # noqa: E402
from helpers import write_path  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

FP8 = torch.float8_e4m3fn
# each quantized provider kind: its caches at one depth and the transformers cache they hold
KINDS = {"skattn-fp8": (e2e_fp8.FP8Depth, skt.FP8Cache),
         "skattn-q8_0": (e2e_q8_0.Q8_0Depth, skt.Q8_0Cache)}
HEAD = e2e.TINY["head_dim"]


def _bytes(x):
    return x.view(torch.uint8)


@pytest.mark.parametrize("one", [True, False])
def test_fp8_layer_holds_the_depth_in_fp8_and_writes_the_step_after_it(monkeypatch, one):
    calls = write_path(monkeypatch, e2e_fp8, one)
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
    assert len(calls) == (3 if one else 0)  # the depth, then two steps
    assert layer.get_seq_length() == 10 and layer.get_mask_sizes(3) == (13, 0)
    with pytest.raises(ValueError, match="room for 4"):
        layer.update(torch.randn(1, 2, 5, 16, dtype=torch.float16), new)


@pytest.mark.parametrize("one", [True, False])
def test_q8_0_layer_holds_the_depth_as_quant_q8_0_and_writes_the_step_after_it(monkeypatch, one):
    calls = write_path(monkeypatch, e2e_q8_0, one)
    cache = e2e_model.FixedDepthCache(1, 2, 64, depth=10, room=4, dtype=torch.float16, device="cpu")
    keys, values = cache.keys[0], cache.values[0]
    layer = e2e_q8_0.FixedDepthQ8_0Layer(keys, values, depth=10)
    for (stored, scales), states in zip(layer.caches, (keys, values)):
        assert stored.shape == (1, 14, 2, 64) and stored.dtype == torch.int8
        assert scales.shape == (1, 14, 2, 2) and scales.dtype == torch.float16
        want = quant.q8_0(states[:, :, :10].transpose(1, 2))
        assert torch.equal(stored[:, :10], want.values) and torch.equal(scales[:, :10], want.scales)
    depth = [t[:, :10].clone() for pair in layer.caches for t in pair]
    new = torch.randn(1, 2, 3, 64, dtype=torch.float16)
    new[0, 1, 0, 0] = 1000  # far beyond the depth's range: its own block's scale, no saturation
    first = None
    for _ in range(2):  # a repeated step writes the same slots and sees the same keys
        k, v = layer.update(new, new + 1)
        assert first is None or (k is first[0] and v is first[1])  # views made once per n
        first = k, v
        for view, states, (stored, scales) in zip((k, v), (new, new + 1), layer.caches):
            assert view.shape == (1, 2, 13, 64) and view.dtype == torch.int8
            want = quant.q8_0(states.transpose(1, 2))
            assert torch.equal(view[:, :, 10:].transpose(1, 2), want.values)
            assert torch.equal(view.skattn_scale, scales[:, :13].transpose(1, 2))
            blocks = view.skattn_blocks  # skattn's layout, over the layer's own buffers
            assert isinstance(blocks, quant.Q8_0) and blocks.shape == (1, 13, 2, 64)
            assert blocks.values.data_ptr() == stored.data_ptr()
            assert blocks.scales.data_ptr() == scales.data_ptr()
            assert torch.equal(blocks.values[:, 10:], want.values)
            assert torch.equal(blocks.scales[:, 10:], want.scales)
        assert all(torch.equal(t[:, :10], d)
                   for t, d in zip((t for pair in layer.caches for t in pair), depth))
    assert k[0, 1, 10, 0] == 127
    assert len(calls) == (3 if one else 0)  # the depth, then two steps
    assert k.skattn_blocks.dequantize()[0, 10, 1, 0] == pytest.approx(1000, rel=1e-3)
    assert layer.get_seq_length() == 10 and layer.get_mask_sizes(3) == (13, 0)
    k1, _ = layer.update(new[:, :, :1], new[:, :, :1])  # another n: views of depth + 1 tokens
    assert k1.shape == (1, 2, 11, 64) and k1.skattn_blocks.shape == (1, 11, 2, 64)
    with pytest.raises(ValueError, match="room for 4"):
        layer.update(torch.randn(1, 2, 5, 64, dtype=torch.float16), new)


def test_e4m3_rounding_of_gaussian_kv_is_about_3_percent():
    # the figure FP8Depth's notes give: 2^-4 at most per element, ~3% in norm
    x = torch.randn(1, 2, 4096, 64, generator=torch.Generator().manual_seed(0))
    scale = x.abs().amax(dim=(0, 2, 3)) / FP8_MAX
    r = e2e_fp8.rounded(x, scale)
    rel = ((r - x).norm() / x.norm()).item()
    assert 0.02 < rel < 0.04, rel
    normal = x.abs() >= 2 ** -6 * scale[None, :, None, None]  # e4m3's normal range
    assert ((r - x).abs() <= 2 ** -4 * x.abs())[normal].all()


def test_q8_0_rounding_of_gaussian_kv_is_about_half_a_percent():
    # the figure Q8_0Depth's notes give: about half a block scale at most, ~0.5% in norm
    x = torch.randn(1, 2, 4096, 64, generator=torch.Generator().manual_seed(0))
    r = e2e_q8_0.rounded(x)
    assert r.shape == x.shape and r.dtype == x.dtype
    rel = ((r - x).norm() / x.norm()).item()
    assert 0.003 < rel < 0.008, rel
    block_scale = x.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True) / 127
    # half a scale, plus the scale's f16 rounding times up to 127
    assert ((r - x).unflatten(-1, (-1, 32)).abs() <= 0.57 * block_scale).all()


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny model and its f16 cache at depth 24."""
    torch.manual_seed(0)
    model = e2e_model.build_model(e2e.TINY, torch.float16, "cpu")
    cache = e2e_model.FixedDepthCache(2, 2, HEAD, depth=24, room=3, dtype=torch.float16,
                                      device="cpu", seed=24)
    return model, cache


@pytest.fixture(scope="module", params=list(KINDS))
def tiny(request, tiny_model):
    """A quantized provider's kind, the tiny model, its f16 cache and the kind's caches."""
    kind, (model, cache) = request.param, tiny_model
    return kind, model, cache, KINDS[kind][0](model, cache, e2e_model.implementation(f"{kind}:auto"))


def test_step_is_sdpa_on_the_rounded_kv(tiny):
    kind, model, cache, quantized = tiny
    assert quantized.error is None and isinstance(quantized.cache, KINDS[kind][1])
    step = quantized.step(model, 3, seed=3)
    with torch.no_grad():
        model.set_attn_implementation(e2e_model.implementation(f"{kind}:auto"))
        assert step.mask() is None  # bottom-right causal over depth + n keys, as for f16
        out = step.eager()[:, -1]
    ref = e2e_model.reference(model, e2e_model.Step(model, cache, 3, seed=3))
    rounded_ref = e2e_model.reference(model, e2e_model.Step(model, quantized.rounded, 3, seed=3))
    # same K/V values as sdpa over the rounded cache: f16-kernel agreement, the f16 rows' 1e-2
    assert e2e_model.rel_err(out, rounded_ref) < 1e-2
    # against f16 sdpa the rounding shows (so the quantized bytes were read), within the bound
    err, bound = e2e_model.rel_err(out, ref), quantized.bound(model, 3, 3, ref)
    assert 5 * e2e_model.rel_err(out, rounded_ref) < err <= bound
    assert bound == pytest.approx(e2e.WRONG_ABOVE + e2e_model.rel_err(rounded_ref, ref))


def _run(tmp_path, providers, modes=("eager",)):
    opts = e2e.E2EOptions(ns=(3,), depths=(24,), modes=modes, shape=dict(e2e.TINY), model="tiny",
                          providers=providers, warmup=0, reps=1, progress=False)
    return e2e.run_e2e(opts, out_dir=tmp_path, tag="t", device="cpu")


@pytest.mark.parametrize("kind", list(KINDS))
def test_run_writes_rows_checked_within_their_bound(tmp_path, kind):
    csv_path, _, rows = _run(tmp_path, ("sdpa", f"{kind}:auto"), modes=("eager", "graph"))
    quantized = {r["mode"]: r for r in rows if r["provider"] == kind}
    assert quantized["eager"]["status"] == "ok" and quantized["eager"]["policy"] == "auto"
    assert float(quantized["eager"]["tokens_per_s"]) > 0
    assert 0 < float(quantized["eager"]["err"]) <= float(quantized["eager"]["tol"])
    assert float(quantized["eager"]["tol"]) > e2e.WRONG_ABOVE  # the cell's rounding effect added
    assert quantized["graph"]["status"] == "error: RuntimeError: CUDA graphs need a GPU"
    with open(csv_path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["provider"], r["tol"]) for r in written][0] == ("sdpa", "1.000e-01")
    md = e2e_report([csv_path], plots=False)
    assert f"{kind} auto vs sdpa" in md and f"{kind}:<policy> rows" in md and "f16 sdpa" in md


def test_one_run_holds_both_kinds_each_over_its_own_cache(tmp_path):
    csv_path, _, rows = _run(tmp_path, ("sdpa", "skattn-fp8:auto", "skattn-q8_0:auto"))
    assert [r["provider"] for r in rows] == ["sdpa", "skattn-fp8", "skattn-q8_0"]
    assert all(r["status"] == "ok" for r in rows), rows
    fp8, q8_0 = ({k: float(rows[i][k]) for k in ("err", "tol")} for i in (1, 2))
    # q8_0 rounds K/V about 6x finer than e4m3: each row is as far from f16 sdpa as its own
    # cache's rounding makes it (a row read from the other kind's cache would not be)
    assert q8_0["err"] < fp8["err"] and q8_0["tol"] < fp8["tol"]
    assert fp8["err"] <= fp8["tol"] and q8_0["err"] <= q8_0["tol"]
    md = e2e_report([csv_path], plots=False)
    assert "skattn-fp8 auto vs sdpa | skattn-q8_0 auto vs sdpa" in md
    assert "1-byte K/V" in md and "1.0625 bytes a K/V value" in md


def _fp8_scales_of_one(monkeypatch):
    # the kernel fed scales of 1 reads e4m3 codes as values (~100x too large)
    monkeypatch.setattr(skt, "_fp8_scales", lambda key, value: dict(
        k_scale=torch.ones(key.shape[1]), v_scale=torch.ones(value.shape[1])))


def _q8_0_scales_of_one(monkeypatch):
    # the kernel fed block scales of 1 reads the int8 values as values (~100x too large)
    quantized_kv = skt._quantized_kv

    def ones(k, v, key, value):
        k, v, scales = quantized_kv(k, v, key, value)
        return (*(quant.Q8_0(b.values, torch.ones_like(b.scales)) for b in (k, v)), scales)

    monkeypatch.setattr(skt, "_quantized_kv", ones)


@pytest.mark.parametrize("kind, misread", [("skattn-fp8", _fp8_scales_of_one),
                                           ("skattn-q8_0", _q8_0_scales_of_one)])
def test_check_fails_a_read_that_ignores_the_scales(tmp_path, monkeypatch, kind, misread):
    misread(monkeypatch)
    _, _, rows = _run(tmp_path, (f"{kind}:auto",))
    assert rows[0]["status"].startswith("wrong: last-token logits"), rows[0]


def test_bad_providers(tmp_path, capsys):
    for kind, form in (("skattn-fp8", "FP8"), ("skattn-q8_0", "q8_0")):
        with pytest.raises(ValueError, match=f"{kind}:<policy>"):
            e2e_model.implementation(kind)
        with pytest.raises(ValueError, match=f"{form} K/V are read by skattn only"):
            e2e_model.implementation(f"sdpa-{form.lower()}")
        with pytest.raises(ValueError, match="policy"):
            e2e_model.implementation(f"{kind}:fastest")
        assert e2e.main(["--tiny", "--providers", f"sdpa,{kind}", "--out", str(tmp_path)]) == 2
        assert f"{kind}:<policy>" in capsys.readouterr().err
    assert e2e_model.implementation("skattn-q8_0:auto") == e2e_model.implementation("skattn:auto")


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_cache_that_cannot_be_made(tmp_path, monkeypatch, tiny_model, kind):
    model, cache = tiny_model
    depth_class, cache_class = KINDS[kind]
    # the quantized caches refuse a model run by sdpa (it would receive their bytes)
    assert (f"{cache_class.__name__} needs a skattn attention implementation"
            in depth_class(model, cache, "sdpa").error)

    def no_memory(*args):
        raise torch.OutOfMemoryError("no room for the cache")

    monkeypatch.setattr(depth_class, "CACHE", no_memory)
    _, _, rows = _run(tmp_path, ("sdpa", f"{kind}:auto", "skattn:auto"))
    assert rows[0]["status"] == "ok" and rows[2]["status"] == "ok"
    assert rows[1]["status"] == "error: OutOfMemoryError: no room for the cache"


def test_q8_0_rows_say_why_a_head_size_cannot_be_held(tmp_path):
    # q8_0 blocks are 32 values of a head: heads of 16 cannot be held, the f16 rows still run
    opts = e2e.E2EOptions(ns=(3,), depths=(24,), modes=("eager",), model="tiny-16",
                          shape=dict(e2e.TINY, head_dim=16),
                          providers=("skattn:auto", "skattn-q8_0:auto"), warmup=0, reps=1,
                          progress=False)
    _, _, rows = e2e.run_e2e(opts, out_dir=tmp_path, tag="t", device="cpu")
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("error: ValueError: Q8_0Cache needs head sizes that are "
                                        "multiples of 32"), rows[1]


def test_table_puts_the_quantized_providers_beside_the_others():
    def row(provider, policy, tps):
        return dict(provider=provider, policy=policy, mode="graph", model="llama-8b", n="1",
                    depth="8192", status="ok", tokens_per_s=str(tps))

    rows = [row("sdpa", "", 100.0), row("skattn", "llamacpp-before", 150.0),
            row("skattn", "llamacpp", 180.0), row("skattn", "auto", 250.0),
            row("skattn-q8_0", "auto", 200.0), row("skattn-fp8", "auto", 300.0)]
    head, _, line = table(rows).splitlines()
    assert head.split(" | ")[6:] == ["auto tok/s", "skattn-fp8 auto tok/s",
                                     "skattn-q8_0 auto tok/s", "llamacpp vs before",
                                     "auto vs sdpa", "skattn-fp8 auto vs sdpa",
                                     "skattn-q8_0 auto vs sdpa", "best skattn vs sdpa |"]
    # best skattn is over the f16 policies (2.50x), each quantized provider has its own ratio
    assert line.split(" | ")[6:] == ["250.0", "300.0", "200.0", "1.20x", "2.50x", "3.00x",
                                     "2.00x", "2.50x |"]
    rows[-2]["status"] = "error: boom"
    assert line != (line := table(rows).splitlines()[2])
    assert line.split(" | ")[6:] == ["250.0", "300.0", "error", "1.20x", "2.50x", "3.00x", "—",
                                     "2.50x |"]
