"""skattn as a transformers attention implementation, under the interpreter on tiny models."""
import copy

import pytest
import torch

import skattn
from skattn import ops

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
import skattn.transformers as skt  # noqa: E402
from helpers import capturing_compile_config  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

VOCAB, TOKENS = 128, 12
# 2 layers, hidden 64, heads 4/2, head size 16; weights 0.3 (not transformers' 0.02, under
# which attention barely moves the logits); window 5 < TOKENS so sliding layers differ
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.3)
CONFIGS = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "qwen2": ("Qwen2Config", {}, "sdpa"),  # q/k/v biases
    # q/k norms; the second layer a 5-token sliding window
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
              "sdpa"),
    # sinks on every layer, the first a sliding window; no sdpa in transformers: eager
    "gpt-oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                     layer_types=["sliding_attention", "full_attention"]), "eager"),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return skt.register()


def models(kind, seed=0):
    """(skattn f16, the reference implementation in f16, the same in f32), equal weights."""
    cls_name, extra, ref_impl = CONFIGS[kind]
    cfg = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(seed)
    ours = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="skattn", dtype=torch.float16).eval()
    state = ours.state_dict()
    out = [ours]
    for dtype in (torch.float16, torch.float32):
        m = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(cfg), attn_implementation=ref_impl, dtype=dtype).eval()
        m.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        out.append(m)
    return out


def count_calls(monkeypatch):
    calls = []
    real = skattn.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(skattn, "attention", spy)
    return calls


def assert_close_to_reference(ours, ref16, ref32, rows=slice(None)):
    """ours within 2x the reference implementation's own f16 error (vs f32) plus a floor."""
    ours, ref16, ref32 = (x[rows].float() for x in (ours, ref16, ref32))
    theirs = (ref16 - ref32).abs().max().item()
    floor = 2e-3 * ref32.abs().max().item()
    assert (ours - ref32).abs().max().item() <= 2 * theirs + floor
    assert (ours - ref16).abs().max().item() <= 3 * theirs + floor


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_close_to_reference(kind, monkeypatch):
    ours, ref16, ref32 = models(kind)
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        logits = [m(ids).logits for m in (ours, ref16, ref32)]
    assert len(calls) == 2  # one skattn call per layer
    assert all(c["mask"] is None and c["causal"] for c in calls)  # plain causal: no mask
    windows = [c["window"] for c in calls]
    assert windows == {"llama": [None, None], "qwen2": [None, None], "qwen3": [None, 5],
                       "gpt-oss": [5, None]}[kind]
    assert all((c["sinks"] is not None) == (kind == "gpt-oss") for c in calls)
    assert not torch.isnan(logits[0]).any()
    assert_close_to_reference(*logits)


def test_left_padding_becomes_a_mask(monkeypatch):
    ours, ref16, ref32 = models("llama", seed=2)
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, TOKENS, dtype=torch.long)
    padding[0, :4] = 0
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        logits = [m(ids, attention_mask=padding).logits for m in (ours, ref16, ref32)]
    assert calls and all(c["mask"] is not None and not c["causal"] for c in calls)
    mask = calls[0]["mask"]
    assert mask.shape == (2, TOKENS, TOKENS) and torch.isinf(mask[0, :, :4]).all()
    # padded query rows see nothing (skattn: 0, sdpa: its own convention): compare the rest
    assert_close_to_reference(*logits, rows=(slice(None), slice(4, None)))
    assert_close_to_reference(*logits, rows=1)


@pytest.mark.parametrize("kind,cache", [("llama", "dynamic"), ("llama", "static"),
                                        ("gpt-oss", "dynamic")])
def test_greedy_generate_matches_reference(kind, cache):
    # dynamic: decode steps run causal=True with no mask (gpt-oss's window layer from a
    # cache that keeps the last window - 1 tokens); static: a mask hides the unwritten tail
    ours, ref16, _ = models(kind, seed=4)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation=cache)
    with torch.no_grad():
        got, want = ours.generate(ids, **kw), ref16.generate(ids, **kw)
    assert got.shape == (1, 12)
    assert torch.equal(got, want), (got, want)


def test_policy_is_explicit_per_name(monkeypatch):
    assert skt.register(policy="llamacpp-before", name="skattn-before") == "skattn-before"
    ours, _, _ = models("llama")
    seen = []
    real = ops.plan_for

    def spy(*args, **kwargs):
        seen.append(kwargs["policy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "plan_for", spy)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        ours(ids)
        ours.set_attn_implementation("skattn-before")
        ours(ids)
    assert seen == ["auto", "auto", "llamacpp-before", "llamacpp-before"]


@pytest.mark.parametrize("kw,match", [
    (dict(policy="fastest"), "policy must be one of"),
    (dict(name="me/skattn"), "hub kernel"),
    (dict(name="skattn-sdpa"), "transformers' own"),
])
def test_register_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        skt.register(**kw)


def test_f32_model_gets_skattns_error():
    cfg = transformers.LlamaConfig(**TINY)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="skattn").eval()
    with torch.no_grad(), pytest.raises(TypeError, match="k must have dtype"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_mask_function():
    causal = dict(batch_size=1, q_length=4, kv_length=20, mask_function=None, dtype=torch.float16)
    # a dynamic cache: 16 cached tokens, the last query at the last key
    assert skt.attention_mask(q_offset=16, kv_offset=0, **causal) is None
    # a sliding-window cache keeps the last window - 1 keys: still bottom-right
    cfg = transformers.Qwen3Config(**TINY, use_sliding_window=True, sliding_window=17)
    assert skt.attention_mask(q_offset=100, kv_offset=84, local_size=17, config=cfg, **causal) is None
    # a static cache: the offset is a tensor and keys past it are unwritten
    mask = skt.attention_mask(q_offset=torch.tensor(10), kv_offset=0, **causal)
    assert mask.shape == (1, 1, 4, 20) and mask.dtype == torch.float16
    visible = torch.isfinite(mask[0, 0])
    assert visible.sum(1).tolist() == [11, 12, 13, 14] and (mask[0, 0][visible] == 0).all()
    # padding: a mask even where the geometry is bottom-right
    padding = torch.ones(1, 20, dtype=torch.bool)
    padding[0, 3] = False
    mask = skt.attention_mask(q_offset=16, kv_offset=0, attention_mask=padding, **causal)
    assert torch.isinf(mask[0, 0, :, 3]).all() and torch.isfinite(mask[0, 0, :, 4:17]).all()


def test_static_cache_compiled_fullgraph():
    # generate's compiled decode step (fullgraph) with a static cache: the attention is the
    # custom op inside the one graph, its mask hides the cache's unwritten tail
    torch._dynamo.reset()
    ours, ref16, _ = models("llama", seed=6)
    for m in (ours, ref16):
        m.generation_config.eos_token_id = None
    config, targets = capturing_compile_config()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        got = ours.generate(ids, cache_implementation="static", compile_config=config, **kw)
        want = ref16.generate(ids, **kw)
    assert targets.count("skattn.attention") == 2  # one per layer, one graph
    assert torch.equal(got, want), (got, want)
