"""skattn.transformers.FP8Cache and Q8_0Cache under the interpreter on a tiny Llama: quantized K/V read in place."""
import copy

import pytest
import torch

import skattn
import skattn.reference

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
import skattn.transformers as skt  # noqa: E402
from skattn.transformers_fp8 import FP8Layer  # noqa: E402
from skattn.transformers_q8_0 import Q8_0Layer  # noqa: E402
from helpers import capturing_compile_config, write_path  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

FP8 = torch.float8_e4m3fn
VOCAB = 128
# as tests/test_transformers.py: 2 layers, heads 4/2 of 16, weights 0.3 so attention matters
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.3)


@pytest.fixture(scope="module", autouse=True)
def registered():
    return skt.register()


def model(seed=0, impl="skattn"):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**TINY), attn_implementation=impl, dtype=torch.float16).eval()
    m.generation_config.eos_token_id = None
    return m


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def kernel_and_reference(monkeypatch, m, ids, make_cache, use_reference):
    """(logits over the quantized cache, over an f16 cache, the skattn calls seen, then the
    same two with skattn.attention replaced by `use_reference()`'s float64 reference)."""
    with torch.no_grad():
        ours8, ours16, seen = spied_steps(monkeypatch, m, ids, make_cache)
        use_reference()
        ref8 = steps(m, ids, make_cache())
        ref16 = steps(m, ids, transformers.DynamicCache(config=m.config))
    return ours8, ours16, seen, ref8, ref16


def reference_attention(monkeypatch, calls):
    """skattn.attention -> the float64 reference on the same (FP8) inputs, cast to q's dtype."""
    def ref(q, k, v, **kw):
        calls.append(dict(k=k, v=v, **kw))
        kw.pop("plan", None)
        return skattn.reference.attention(q, k, v, **kw).to(q.dtype)

    monkeypatch.setattr(skattn, "attention", ref)


def quantizing_reference(monkeypatch, prefill):
    """skattn.attention on f16 K/V -> the float64 reference on K/V quantized here, as FP8Cache
    documents it: per KV head, scale = amax / 448 over the first `prefill` tokens."""
    def ref(q, k, v, **kw):
        kw.pop("plan", None)
        pair = []
        for x in (k, v):
            amax = x[:, :prefill].float().abs().amax(dim=(0, 1, 3))
            scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
            pair += [(x.float() / scale[:, None]).clamp(-448, 448).to(FP8), scale]
        return skattn.reference.attention(q, pair[0], pair[2], k_scale=pair[1], v_scale=pair[3],
                                          **kw).to(q.dtype)

    monkeypatch.setattr(skattn, "attention", ref)


def steps(m, ids, cache, n=3):
    """Prefill ids[:, :-n], then n decode steps of one token each; logits of every step [., V]."""
    out = m(ids[:, :-n], past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1]]
    for i in range(n, 0, -1):
        out = m(ids[:, -i:ids.shape[1] - i + 1], past_key_values=out.past_key_values)
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


def spied_steps(monkeypatch, m, ids, cache):
    """`steps` of m over a fresh `cache()` and over an f16 DynamicCache, skattn.attention
    spied on: (logits over the quantized cache, over the f16 one, each call's (k, kw))."""
    seen = []
    real = skattn.attention

    def spy(q, k, v, **kw):
        seen.append((k, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(skattn, "attention", spy)
    quantized = steps(m, ids, cache())
    f16 = steps(m, ids, transformers.DynamicCache(config=m.config))
    monkeypatch.setattr(skattn, "attention", real)
    return quantized, f16, seen


@pytest.mark.parametrize("one", [True, False])
def test_layer_scales_quantize_and_saturate(monkeypatch, one):
    # both write paths (one launch; torch operations) write the same bytes
    calls = write_path(monkeypatch, skattn.transformers_fp8, one)
    layer = FP8Layer(max_cache_len=8)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 3, 4, 16, generator=g, dtype=torch.float32).half()
    k[:, 1] *= 10
    k[:, 2] = 0  # a head of zeros: scale 1, not 0
    v = torch.randn(1, 3, 4, 16, generator=g).half()
    keys, values = layer.update(k, v)
    assert keys.dtype == FP8 and keys.shape == (1, 3, 8, 16) and layer.k_fp8.shape == (1, 8, 3, 16)
    amax = k.float().abs().amax(dim=(0, 2, 3))
    want = torch.where(amax > 0, amax / 448, torch.ones(3))
    assert torch.equal(layer.k_scale, want) and keys.skattn_scale is layer.k_scale
    assert values.skattn_scale is layer.v_scale
    got = keys[:, :, :4].float() * layer.k_scale[None, :, None, None]
    assert torch.allclose(got, k.float(), rtol=2 ** -4, atol=0)  # e4m3: 3 mantissa bits
    assert (keys[:, :, 4:].float() == 0).all()
    # a later token keeps the prefill's scales and saturates at 448 x scale
    k2 = torch.full((1, 3, 1, 16), 1000.0, dtype=torch.float16)
    layer.update(k2, k2)
    assert torch.equal(layer.k_scale, want) and int(layer.cumulative_length) == 5
    assert torch.equal(keys[:, :, 4].float(), torch.full((1, 3, 16), 448.0))
    assert len(calls) == (2 if one else 0)
    with pytest.raises(ValueError, match="9 tokens in a cache layer of max_cache_len 8"):
        layer.update(torch.zeros(1, 3, 4, 16).half(), torch.zeros(1, 3, 4, 16).half())
    assert int(layer.cumulative_length) == 5  # refused before any write
    layer.reset()
    assert not layer.scales_set and int(layer.cumulative_length) == 0
    layer.update(torch.zeros(1, 3, 8, 16).half(), torch.zeros(1, 3, 8, 16).half())  # room again


def test_logits_match_float64_reference_on_the_same_fp8_cache(monkeypatch):
    # the kernel against the float64 reference on the same FP8 values and scales, within 3x
    # what the f16 cache's kernel shows against the reference on f16 K/V (the rest is f16
    # rounding of the model, amplified by its 0.3 weights); the FP8 cache against the f16
    # cache: e4m3's quantization error, loose
    m = model(seed=1)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    calls = []
    ours8, ours16, seen, ref8, ref16 = kernel_and_reference(
        monkeypatch, m, ids, lambda: skt.FP8Cache(m.config, max_cache_len=16),
        lambda: reference_attention(monkeypatch, calls))
    with torch.no_grad():
        quantizing_reference(monkeypatch, prefill=9)
        own8 = steps(m, ids, transformers.DynamicCache(config=m.config))  # quantized by the test
    seen = [kw for _, kw in seen]
    fp8_calls = [c for c in seen if "k_scale" in c]
    assert len(fp8_calls) == 8 and all(c["k_scale"].shape == (2,) for c in fp8_calls)
    assert all(c["k"].dtype == FP8 and c["k"].shape == (1, 16, 2, 16) for c in calls[:8])
    kernel8, kernel16 = rel_err(ours8, ref8), rel_err(ours16, ref16)
    quant = rel_err(ours8, ours16)
    own = rel_err(ours8, own8)
    assert kernel8 <= 3 * kernel16 + 1e-3, (kernel8, kernel16)
    assert own <= 3 * kernel16 + 1e-3, (own, kernel16)
    assert quant < 0.15, quant  # e4m3 steps of 2^-4 relative on every K/V value
    assert kernel8 < quant / 5, (kernel8, quant)


@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_greedy_generate_matches_reference(monkeypatch, form):
    # the kernel's greedy tokens are the float64 reference's on the same quantized cache
    m = model(seed=4) if form == "fp8" else q8_0_model(seed=13)
    cache = skt.FP8Cache if form == "fp8" else skt.Q8_0Cache
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        got = m.generate(ids, past_key_values=cache(m.config, max_cache_len=16), **kw)
        reference_attention(monkeypatch, [])
        want = m.generate(ids, past_key_values=cache(m.config, max_cache_len=16), **kw)
    assert got.shape == (1, 11)
    assert torch.equal(got, want), (got, want)


def test_refuses_other_implementations_and_layers():
    with pytest.raises(ValueError, match="FP8Cache needs a skattn attention implementation"):
        skt.FP8Cache(model(impl="sdpa").config, max_cache_len=16)
    m = model()
    cache = skt.FP8Cache(m.config, max_cache_len=16)
    m.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(ValueError, match="'sdpa', which would receive float8"):
        m(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache)
    cfg = transformers.Qwen3Config(**TINY, use_sliding_window=True, sliding_window=5,
                                   max_window_layers=1)
    with pytest.raises(ValueError, match="full-attention layers only.*sliding_attention"):
        skt.FP8Cache(cfg, max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        skt.FP8Cache(model().config, max_cache_len=0)


def test_fp8_without_scales_is_refused():
    q = torch.randn(1, 4, 1, 16, dtype=torch.float16)
    k = torch.zeros(1, 2, 5, 16, dtype=FP8)
    with pytest.raises(TypeError, match="without their scales: use skattn.transformers.FP8Cache"):
        skt.attention_forward(torch.nn.Module(), q, k, k.clone(), None)


@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_compiled_fullgraph_decode_reads_the_scales(form):
    # generate's compiled decode step (fullgraph): the scales (FP8's per head, q8_0's block
    # scales), attributes of the cache's K/V views, reach the custom op inside the one graph
    torch._dynamo.reset()
    m = model(seed=6) if form == "fp8" else q8_0_model(seed=15)
    cache = skt.FP8Cache if form == "fp8" else skt.Q8_0Cache
    config, targets = capturing_compile_config()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        got = m.generate(ids, past_key_values=cache(m.config, max_cache_len=12),
                         compile_config=config, **kw)
        want = m.generate(ids, past_key_values=cache(m.config, max_cache_len=12), **kw)
    assert targets.count("skattn.attention") == 2  # one per layer, one graph
    assert torch.equal(got, want), (got, want)


# -- Q8_0Cache
@pytest.mark.parametrize("one", [True, False])
def test_q8_0_layer_writes_blocks_per_token(monkeypatch, one):
    calls = write_path(monkeypatch, skattn.transformers_q8_0, one)
    layer = Q8_0Layer(max_cache_len=8)
    g = torch.Generator().manual_seed(10)
    k = torch.randn(1, 2, 3, 32, generator=g).half()
    v = torch.randn(1, 2, 3, 32, generator=g).half() * 50
    keys, values = layer.update(k, v)
    assert keys.dtype == torch.int8 and keys.shape == (1, 2, 8, 32)
    assert keys.skattn_scale.shape == (1, 2, 8, 1) and keys.skattn_scale.dtype == torch.float16
    for view, new in ((keys, k), (values, v)):
        want = skattn.quant.q8_0(new.transpose(1, 2))  # every token scaled on its own
        got = skattn.quant.Q8_0(view.transpose(1, 2), view.skattn_scale.transpose(1, 2))
        assert torch.equal(got.values[:, :3], want.values)
        assert torch.equal(got.scales[:, :3], want.scales)
        assert (got.values[:, 3:] == 0).all() and (got.scales[:, 3:] == 0).all()
    big = torch.full((1, 2, 1, 32), 1000.0, dtype=torch.float16)  # no range fixed by the prefill
    layer.update(big, big)
    assert int(layer.cumulative_length) == 4
    got = skattn.quant.Q8_0(keys.transpose(1, 2), keys.skattn_scale.transpose(1, 2))
    assert torch.equal(got.dequantize()[:, 3], big[:, :, 0].float().half())
    assert len(calls) == (2 if one else 0)
    with pytest.raises(ValueError, match="9 tokens in a cache layer of max_cache_len 8"):
        layer.update(torch.zeros(1, 2, 5, 32).half(), torch.zeros(1, 2, 5, 32).half())
    layer.reset()
    assert int(layer.cumulative_length) == 0 and (keys == 0).all()
    with pytest.raises(ValueError, match="multiples of 32"):
        Q8_0Layer(max_cache_len=4).update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))


def q8_0_model(seed, impl="skattn"):
    """TINY with head size 32 (q8_0 blocks)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**dict(TINY, hidden_size=128, head_dim=32))
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl,
                                                      dtype=torch.float16).eval()
    m.generation_config.eos_token_id = None
    return m


def reference_on_dequantized(monkeypatch):
    """skattn.attention -> the float64 reference on q8_0 K/V dequantized to q's dtype (what
    the kernel multiplies: each value times its scale, rounded once), cast to q's dtype."""
    def ref(q, k, v, **kw):
        kw.pop("plan", None)
        k, v = (x.dequantize(q.dtype) if isinstance(x, skattn.quant.Q8_0) else x for x in (k, v))
        return skattn.reference.attention(q, k, v, **kw).to(q.dtype)

    monkeypatch.setattr(skattn, "attention", ref)


def test_q8_0_logits_match_float64_reference_on_the_same_cache(monkeypatch):
    # the kernel against the float64 reference on the same q8_0 blocks (dequantized to f16,
    # as the kernel rounds them), within 3x what the f16 cache's kernel shows against the
    # reference on f16 K/V; the q8_0 cache against the f16 cache: the 8-bit quantization
    # error, small
    m = q8_0_model(seed=11)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(12))
    ours8, ours16, seen, ref8, ref16 = kernel_and_reference(
        monkeypatch, m, ids, lambda: skt.Q8_0Cache(m.config, max_cache_len=16),
        lambda: reference_on_dequantized(monkeypatch))
    seen = [type(k).__name__ for k, _ in seen]
    assert seen.count("Q8_0") == 8  # 2 layers x 4 steps
    kernel8, kernel16 = rel_err(ours8, ref8), rel_err(ours16, ref16)
    quant_err = rel_err(ours8, ours16)
    assert kernel8 <= 3 * kernel16 + 1e-3, (kernel8, kernel16)
    assert quant_err < 0.05, quant_err  # 8 bits a value, a scale per 32 values of a token


def test_q8_0_cache_refuses_other_implementations_and_bare_int8():
    with pytest.raises(ValueError, match="Q8_0Cache needs a skattn attention implementation"):
        skt.Q8_0Cache(q8_0_model(0, impl="sdpa").config, max_cache_len=16)
    m = q8_0_model(0)
    cache = skt.Q8_0Cache(m.config, max_cache_len=16)
    m.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(ValueError, match="'sdpa', which would receive q8_0"):
        m(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache)
    q = torch.randn(1, 4, 1, 32, dtype=torch.float16)
    k = torch.zeros(1, 2, 5, 32, dtype=torch.int8)
    with pytest.raises(TypeError, match="without their block scales: use skattn.transformers.Q8_0"):
        skt.attention_forward(torch.nn.Module(), q, k, k.clone(), None)
