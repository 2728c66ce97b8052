"""The custom op under torch.compile + CUDA graphs, and transformers models, on a CUDA GPU."""
import copy

import pytest
import torch

from helpers import Block

try:
    import transformers

    import skattn.transformers as skt
except ImportError:  # the transformers tests below say so; the op's test still runs
    transformers = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_compile_reduce_overhead_replays_and_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    block = Block(1024, 8, 2, 128).cuda().half().requires_grad_(False)
    kc, vc = torch.randn(2, 1, 3000, 2, 128, device="cuda", dtype=torch.float16)
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for i in range(5):  # record, then replays on fresh inputs
            x = torch.randn(1, 4, 1024, device="cuda", dtype=torch.float16)
            got = compiled(x, kc, vc).clone()
            want = block(x, kc, vc)
            assert not torch.isnan(got).any()
            assert rel(got, want) < 1e-2, i
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, no break, no recompile


def test_serving_op_in_cuda_graphs_follows_lengths_and_pages():
    # a paged decode step through torch.ops.skattn.attention_with_kvcache under
    # mode="reduce-overhead": one graph, replayed while the lengths grow and the block table
    # changes in place, each replay against the eager entry point and float64
    from torch._dynamo.utils import counters

    from serving_inputs import paged_cache
    from skattn import reference_serving
    import skattn.ops

    torch._dynamo.reset()
    counters.clear()
    lens = [3000, 17, 900, 2047]
    k, v, table = paged_cache([n + 6 * 16 for n in lens], page_size=16, hkv=8, d=128,
                              device="cuda")   # pages for six steps of growth
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")

    def step(q, lens_t, table):
        return skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens_t,
                                                 block_table=table)

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for i in range(6):
            q = torch.randn(4, 1, 32, 128, device="cuda", generator=g).half()
            got = compiled(q, lens_t, table).clone()
            want = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table)
            ref = reference_serving.attention_with_kvcache(q, k, v, cache_seqlens=lens_t,
                                                           block_table=table)
            assert not torch.isnan(got).any() and rel(got, want) < 1e-3, i
            assert rel(got, ref) < 1e-2, i
            lens_t += 16   # the next step: more keys, and sequence 1 reads another page
            table[1, 1] = table[3, i]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] == 1


needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")
# llama-8b's attention (32/8 heads of 128) in a 2-layer model with a small MLP and vocabulary
LLAMA = dict(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=8192)
# gpt-oss's attention (64/8 heads of 64, sinks, a 128-token window on the first layer)
GPT_OSS = dict(vocab_size=1024, hidden_size=1024, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
               layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
               num_experts_per_tok=2, max_position_embeddings=8192)


def models(cls_name, shape, ref_impl, dtypes=(torch.float16,), seed=0):
    """skattn f16 and the reference implementation in each of `dtypes`, equal weights."""
    skt.register()
    cfg = getattr(transformers, cls_name)(**shape)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        ours = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(cfg), attn_implementation="skattn", dtype=torch.float16)
        refs = [transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(cfg), attn_implementation=ref_impl, dtype=d) for d in dtypes]
    state = ours.state_dict()
    for m, d in zip(refs, dtypes):
        m.load_state_dict({k: v.to(d) for k, v in state.items()})
    for m in (ours, *refs):
        m.eval().requires_grad_(False)
        m.generation_config.eos_token_id = None  # 32 tokens, never stopped early
    return ours, *refs


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "gpt-oss"])
def test_logits_close_prefill_and_decode(kind):
    cls_name, shape, ref_impl = {"llama": ("LlamaConfig", LLAMA, "sdpa"),
                                 "gpt-oss": ("GptOssConfig", GPT_OSS, "eager")}[kind]
    ours, ref16, ref32 = models(cls_name, shape, ref_impl, (torch.float16, torch.float32))
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 1024, (1, 1500), device="cuda", generator=g)
    with torch.no_grad():
        # prefill of 1500 tokens (prompt chunk, causal), then decode 1 token at depth 1500
        logits = []
        for m in (ours, ref16, ref32):
            out = m(ids[:, :-1], use_cache=True)
            step = m(ids[:, -1:], past_key_values=out.past_key_values).logits
            logits.append((out.logits[0, -64:].float(), step[0].float()))
    for part in range(2):
        o, r16, r32 = (x[part] for x in logits)
        theirs = (r16 - r32).abs().max().item()
        floor = 2e-3 * r32.abs().max().item()
        assert not torch.isnan(o).any()
        assert (o - r32).abs().max().item() <= 2 * theirs + floor, part
        assert (o - r16).abs().max().item() <= 3 * theirs + floor, part


def assert_greedy_equal(got, want, ref, prompt_len, tol=1e-2):
    """Greedy tokens equal; where they differ, tie-tolerant: under teacher forcing on our
    tokens, each of ours is within tol x max |logit| of sdpa's best (a near-tie that f16
    rounding may break either way), checked at every generated position."""
    if torch.equal(got, want):
        return
    with torch.no_grad():
        logits = ref(got).logits[0, prompt_len - 1:-1].float()
    chosen = logits.gather(1, got[0, prompt_len:, None])[:, 0]
    gap = logits.max(1).values - chosen
    assert gap.max().item() <= tol * logits.abs().max().item(), (got, want, gap)


@needs_transformers
def test_greedy_generate_32_tokens_matches_sdpa():
    ours, ref = models("LlamaConfig", LLAMA, "sdpa")
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, 1024, (1, 700), device="cuda", generator=g)
    kw = dict(max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        got, want = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert got.shape == (1, 732)
    assert_greedy_equal(got, want, ref, 700)


@needs_transformers
def test_static_cache_and_compile():
    from torch._dynamo.utils import counters
    from transformers.generation import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    ours, ref = models("LlamaConfig", LLAMA, "sdpa", seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.randint(0, 1024, (1, 300), device="cuda", generator=g)
    kw = dict(max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        # static cache: decode steps run compiled (fullgraph, CUDA graphs) with a mask over
        # the cache's unwritten tail
        got = ours.generate(ids, cache_implementation="static",
                            compile_config=CompileConfig(fullgraph=True), **kw)
        want = ref.generate(ids, **kw)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert got.shape == (1, 332)
    assert_greedy_equal(got, want, ref, 300)


@needs_transformers
@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_quantized_cache_first_step_and_greedy_32_tokens(monkeypatch, form):
    # llama-8b's attention with FP8Cache or Q8_0Cache against the f16 cache: the first step's
    # logits within the form's error, the same logits as the float64 reference on the same
    # quantized K/V (q8_0 blocks dequantized to f16, as the kernel rounds them: kernel error
    # only), greedy agreement over 32 tokens (printed; the first must agree)
    import skattn
    import skattn.reference

    if form == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 K/V need compute capability 8.9+ (the dense path refuses them below)")
    ours, = models("LlamaConfig", LLAMA, "sdpa", dtypes=(), seed=5)
    g = torch.Generator(device="cuda").manual_seed(6)
    ids = torch.randint(0, 1024, (1, 700), device="cuda", generator=g)
    kind = skt.FP8Cache if form == "fp8" else skt.Q8_0Cache

    def cache():
        return kind(ours.config, max_cache_len=800)

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    kw = dict(max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        first8 = ours(ids, past_key_values=cache()).logits[0, -1]
        first16 = ours(ids).logits[0, -1]
        got = ours.generate(ids, past_key_values=cache(), **kw)
        want = ours.generate(ids, **kw)
        real = skattn.attention

        def reference(q, k, v, **kw):
            kw.pop("plan", None)
            if form == "q8_0":
                k, v = (x.dequantize(q.dtype) for x in (k, v))
            return skattn.reference.attention(q, k, v, **kw).to(q.dtype)

        monkeypatch.setattr(skattn, "attention", reference)
        first_ref = ours(ids, past_key_values=cache()).logits[0, -1]
        monkeypatch.setattr(skattn, "attention", real)
    agree = (got[0, 700:] == want[0, 700:]).float().mean().item()
    print(f"{form} vs f16 cache: first-step logits rel err {err(first8, first16):.2e}, kernel "
          f"vs float64 on the same K/V {err(first8, first_ref):.2e}, greedy agreement "
          f"{agree:.2f} of 32 tokens")
    assert not torch.isnan(first8).any()
    assert err(first8, first_ref) < 5e-3
    assert err(first8, first16) < (0.1 if form == "fp8" else 0.05)
    assert got.shape == (1, 732) and got[0, 700] == want[0, 700]


@needs_transformers
@pytest.mark.parametrize("graphs,halves", [(False, False), (True, False), (True, True)])
def test_continuous_batching_generate_batch(graphs, halves, monkeypatch):
    # transformers' continuous batching ("paged|skattn", named explicitly: transformers would
    # switch a plain name to flash-attn where that is installed): requests of different
    # lengths packed into varlen batches; graphs: transformers captures its steps in CUDA
    # graphs (padded batches) around skattn's calls; halves: the default q_split="auto"
    # (steps in two halves, MixedPlan), else registered with q_split=None (one plan a step)
    import skattn

    calls = []
    real = skattn.attention_varlen
    monkeypatch.setattr(skattn, "attention_varlen",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours, ref = models("LlamaConfig", LLAMA, "sdpa")
    name = "skattn" if halves else skt.register(name="skattn_one", q_split=None)
    ours.set_attn_implementation(f"paged|{name}")
    ref.set_attn_implementation("paged|sdpa")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (700, 37, 1, 300)]
    cfg = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)
    results = []
    for m in (ours, ref):
        # a bounded cache: by default transformers takes a share of the free GPU memory,
        # which the suite's parallel tests need
        cb = transformers.ContinuousBatchingConfig(use_cuda_graph=graphs, num_blocks=32,
                                                   max_batch_tokens=1024)
        with torch.no_grad():
            out = m.generate_batch(prompts, generation_config=cfg, continuous_batching_config=cb,
                                   warmup=graphs)
        results.append([out[k].generated_tokens
                        for k in sorted(out, key=lambda r: int(r.split("_")[-1]))])
    assert calls, "skattn did not run"
    got, want = results
    assert all(len(t) == 16 for t in got)
    for i, (a, b) in enumerate(zip(got, want)):  # tie-tolerant, as for generate
        prompt = torch.tensor([prompts[i] + a], device="cuda")
        assert_greedy_equal(prompt, torch.tensor([prompts[i] + b], device="cuda"),
                            ref_plain(ref), len(prompts[i]))


def ref_plain(ref):
    """The reference model with its plain (not paged) sdpa, for teacher forcing."""
    ref.set_attn_implementation("sdpa")
    return ref
