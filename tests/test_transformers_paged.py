"""skattn under transformers' continuous batching ("paged|skattn"), under the interpreter."""
import copy

import numpy as np

import pytest
import torch

import skattn

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
import skattn.transformers as skt  # noqa: E402
from skattn.transformers_paged import paged_attention_forward  # noqa: E402
from test_transformers import CONFIGS, TINY, VOCAB  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]


@pytest.fixture(scope="module", autouse=True)
def registered():
    return skt.register()


def batch_models(kind, seed):
    """skattn and the paged reference ("paged|sdpa", or "paged|eager" for gpt-oss), f16, equal
    weights."""
    cls_name, extra, ref_impl = CONFIGS[kind]
    cfg = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(seed)
    ours = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="skattn", dtype=torch.float16).eval()
    ref = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=f"paged|{ref_impl}", dtype=torch.float16).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


# a small paged cache: sized by default from the free memory, which on a CPU is the
# machine's RAM (two test workers doing that at once run out of memory)
SMALL_CACHE = dict(block_size=16, num_blocks=64, max_batch_tokens=64)


def generate(model, prompts, new_tokens=4, **cache):
    cfg = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                        eos_token_id=-1, pad_token_id=0)
    cb = transformers.ContinuousBatchingConfig(**dict(SMALL_CACHE, **cache))
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=cfg, progress_bar=False,
                                   continuous_batching_config=cb, warmup=False)
    return [out[k].generated_tokens for k in sorted(out, key=lambda r: int(r.split("_")[-1]))]


@pytest.mark.parametrize("kind", ["llama", "gpt-oss"])
def test_generate_batch_matches_paged_reference(kind, monkeypatch):
    # requests of different lengths: prompt chunks and decode steps in one packed batch
    calls, calls_q = [], []
    real = skattn.attention_varlen

    def spy(*args, **kwargs):
        calls.append(kwargs)
        calls_q.append((args[3].clone(),))
        return real(*args, **kwargs)

    monkeypatch.setattr(skattn, "attention_varlen", spy)
    ours, ref = batch_models(kind, seed=2)
    g = torch.Generator().manual_seed(3)
    # 16-row pages: the longest request spans three, the shortest part of one
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (37, 3, 16)]
    got, want = generate(ours, prompts), generate(ref, prompts)
    assert calls, "skattn's paged forward never ran"
    # full-attention layers of steps that read the cache read its pages in place (a block
    # table); the first step's fresh prompts and the window layers get packed keys
    tables = [c["block_table"] for c in calls]
    assert any(t is not None for t in tables) and any(t is None for t in tables)
    assert max(t.shape[1] for t in tables if t is not None) >= 3
    # packed batches of prompts (several queries a request) and of decode steps (one)
    lens = [(c[0][1:] - c[0][:-1]).tolist() for c in calls_q]
    assert any(max(x) > 1 for x in lens) and any(min(x) == 1 for x in lens)
    if kind == "gpt-oss":  # sinks on every layer, a 5-token window on the first
        assert all(c["sinks"] is not None for c in calls)
        assert {c["window"] for c in calls} == {5, None}
    assert got == want, (got, want)


def test_generate_batch_chunked_prefill_and_shared_prefix():
    # prompts longer than a batch (prefilled in chunks that read the earlier chunks' pages)
    # sharing a 48-token prefix (transformers' block sharing: whole shared pages first)
    ours, ref = batch_models("llama", seed=5)
    g = torch.Generator().manual_seed(6)
    prefix = torch.randint(1, VOCAB, (48,), generator=g).tolist()
    prompts = [prefix + torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 1)]
    prompts.append(prefix[:32])
    cache = dict(max_batch_tokens=24, allow_block_sharing=True, num_blocks=96)
    assert generate(ours, prompts, **cache) == generate(ref, prompts, **cache)


def test_paged_forward_refuses():
    module = torch.nn.Module()
    q = torch.zeros(1, 4, 3, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="without transformers' paged cache"):
        paged_attention_forward(module, q, q, q, None)
    with pytest.raises(ValueError, match="no attention mask"):
        paged_attention_forward(module, q, q, q, torch.zeros(1, 1, 3, 3), cache=object())
    with pytest.raises(ValueError, match="ragged-batch form"):
        paged_attention_forward(module, q, q, q, None, cache=object(), policy="round-4x")


def test_cb_bench_tool_tiny(tmp_path, monkeypatch):
    # tools/cb_bench.py end to end on a toy model: both providers run, same greedy tokens
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cb_bench.py"
    spec = importlib.util.spec_from_file_location("cb_bench", path)
    cb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert cb.main(["--tiny", "--requests", "2", "--prompt", "5", "--new", "2", "--reps", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "cb_bench.csv")))
    assert [r["provider"] for r in rows] == ["paged|skattn", "paged|sdpa"]
    assert all(r["same_tokens_as_first"] == "2/2" and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (tmp_path / "cb_bench.json").exists()
    # --profile: the attention calls wrapped from generate_batch's own thread
    assert cb.main(["--tiny", "--requests", "2", "--prompt", "5", "--new", "2", "--reps", "1",
                    "--providers", "paged|skattn", "--profile", "--kernels"]) == 0
    head = (tmp_path / "cb_profile-paged_skattn.txt").read_text().splitlines()[0]
    # 2 layers x 2 steps (the prompts, then one decode step for the second new token)
    assert head.startswith("paged|skattn: 4 attention calls"), head
    # --kernels (on the CPU, the step shapes alone): the prompts, then the decode step
    steps = list(csv.DictReader(open(tmp_path / "cb_step_shapes.csv")))
    assert [(s["requests"], s["longest_q"], s["max_seqlen_q"]) for s in steps] == [
        ("2", "5", "5"), ("2", "1", "1")], steps
    from transformers.generation.continuous_batching import input_outputs
    ios = input_outputs.ContinuousBatchingIOs  # the step log took its wrapper off again
    assert ios.get_model_kwargs.__qualname__ == "ContinuousBatchingIOs.get_model_kwargs"


def test_cb_bench_warmup_only_when_asked(monkeypatch):
    # transformers' graph warm-up runs a full step against the whole cache (one provider can
    # skip it by failing): cb_bench passes warmup=True only with --warmup and --graphs
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cb_bench.py"
    spec = importlib.util.spec_from_file_location("cb_bench", path)
    cb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb)
    seen = []

    class Model:
        def generate_batch(self, reqs, **kw):
            seen.append((kw["warmup"], kw["continuous_batching_config"].use_cuda_graph))
            return {}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for graphs, warmup in ((True, False), (True, True), (False, True)):
        cb.run(Model(), [[1]], 1, graphs=graphs, tiny=True, warmup=warmup)
    assert seen == [(False, True), (True, True), (False, False)]


def test_cb_steps_tool_records_the_schedule_and_plans_it():
    # tools/cb_steps.py: transformers' schedule through a stand-in attention, and the work
    # skattn plans for each step (eager, and padded as under CUDA graphs)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cb_steps.py"
    spec = importlib.util.spec_from_file_location("cb_steps", path)
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    steps = st.record_steps(3, 40, 2, blocks=8, step_tokens=256)
    prompt = sum(map(len, st.prompts(3, 40, 1024)))
    assert steps[0]["cu_q"][-1] == prompt and steps[0]["max_q"] > 1  # one step of prompts
    assert [s["max_q"] for s in steps[1:]] == [1]  # then one decode step of the 3 requests
    assert steps[1]["cu_q"] == [0, 1, 2, 3]
    e = st.planned(steps[1]["cu_q"], steps[1]["cu_k"], 1, steps[1]["max_k"])
    lk = [b - a for a, b in zip(steps[1]["cu_k"], steps[1]["cu_k"][1:])]
    assert e["B"] == 3 and e["tokens"] == "1"
    g = st.padded(steps[1])
    assert g["total"] == 64 and g["max_q"] == 64 and len(g["cu_q"]) == 33
    p = st.planned(g["cu_q"], g["cu_k"], g["max_q"], g["max_k"])
    assert p["tokens"] != "1" and p["useful"] == e["useful"] and p["pairs"] > e["pairs"]
    # registered with q_split="auto": the padded step's decode rows in the short half alone
    h = st.planned(g["cu_q"], g["cu_k"], g["max_q"], g["max_k"], "auto")
    assert "/" in h["tokens"] and h["useful"] == e["useful"] and h["pairs"] < p["pairs"]
    # one token a sequence: one row block each, ceil(Lk / BLOCK_N) items per KV head
    assert e["work"] == sum(-(-k // st.serving_plan(
        batch=3, max_q_len=1, total_q=3, max_kv_len=st.pow2(max(16, max(lk))), q_heads=32,
        kv_heads=8, head_dim=128, page_size=256, max_pages=1, sms=132, occupancy=2,
        smem_limit=232448).geometry.block_n) * 8 for k in lk)


class _Cache:
    """transformers' PagedAttentionCache.update, reduced: the new K/V are all the keys."""

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        return key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)


@pytest.mark.parametrize("layer_type,policy", [("full_attention", "auto"),
                                               ("sliding_attention", "auto"),
                                               ("full_attention", "llamacpp-before")])
def test_paged_forward_padding_rows_and_layer_types(layer_type, policy):
    # 2 padded rows past the last request come back zero; the config's layer type decides
    # whether the sliding_window keyword applies (a model may pass it to every layer)
    from types import SimpleNamespace

    from skattn import reference

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 7, 16, generator=g).half()
    k, v = (torch.randn(1, 2, 7, 16, generator=g).half() for _ in range(2))
    module = torch.nn.Module()
    module.layer_idx, module.config = 0, SimpleNamespace(layer_types=[layer_type])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    lens_k = {"full_attention": cu, "sliding_attention": cu}
    out, _ = paged_attention_forward(module, q, k, v, None, cache=_Cache(), cu_seq_lens_q=cu,
                                     cu_seq_lens_k=lens_k, max_seqlen_q=3,
                                     max_seqlen_k={"full_attention": 3, "sliding_attention": 3},
                                     read_index=None, write_index=None, sliding_window=2,
                                     scaling=0.25, policy=policy)
    assert out.shape == (1, 7, 4, 16)
    assert torch.equal(out[0, 5:], torch.zeros_like(out[0, 5:]))
    window = 2 if layer_type == "sliding_attention" else None
    ref = reference.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                     v[0].transpose(0, 1), cu, cu, 3, 3, causal=True,
                                     window=window, scale=0.25)
    assert (out[0, :5].double() - ref[:5]).abs().max() < 5e-3
    with pytest.raises(NotImplementedError, match="block table"):
        paged_attention_forward(module, q, k, v, None, cache=_Cache(), block_table=cu)


@pytest.mark.parametrize("q_split,step_tokens,lens", [("auto", 64, (37, 3, 16)),
                                                     (2, 24, (37, 3, 16)), (2, 64, (3, 1))])
def test_generate_batch_in_two_halves(q_split, step_tokens, lens, monkeypatch):
    # register(q_split=...): steps whose longest request has more new tokens than q_split
    # run as a MixedPlan (decode tiles for the short requests); tokens as the reference's
    plans = []
    real = skattn.attention_varlen

    def spy(*args, **kwargs):
        plans.append(kwargs["plan"])
        return real(*args, **kwargs)

    monkeypatch.setattr(skattn, "attention_varlen", spy)
    name = skt.register(name="skattn_halves", q_split=q_split)
    ours, ref = batch_models("llama", seed=2)
    ours.set_attn_implementation(name)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lens]
    # (3, 1): a step whose longest request barely exceeds the split, where both halves would
    # get the same tiles: one plan for it, not an error (generate_batch would only log it
    # and return no tokens); "auto" splits at 8 new tokens here (16 rows, 2 query heads a KV head): the first
    # step's 37-token prompt goes to the long half; with q_split=2 and 24 tokens a step the
    # prompt is prefilled in chunks beside decode steps
    cache = dict(max_batch_tokens=step_tokens)
    assert generate(ours, prompts, **cache) == generate(ref, prompts, **cache)
    kinds = {type(p).__name__ for p in plans}
    assert kinds <= {"MixedPlan", "ServingPlan"}, kinds
    assert ("MixedPlan" in kinds) == (lens != (3, 1)), kinds


def test_register_refuses_a_bad_q_split():
    assert skt.register(name="skattn_np", q_split=np.int64(8)) == "skattn_np"
    for bad in (0, -1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="q_split"):
            skt.register(name="skattn_bad", q_split=bad)


def test_block_table_kept_for_a_step_and_made_anew_after_a_write():
    # every full-attention layer of a step reads one read index: its table is made once;
    # an in-place write to the index (or new lengths) makes a new one, with the new pages
    from skattn.transformers_paged import _TABLE, block_table

    _TABLE.clear()
    read = torch.arange(64) + 32          # rows of the cache, pages of 16: pages 2, 3, ...
    cu_k = torch.tensor([0, 20, 36], dtype=torch.int32)
    first = block_table(read, cu_k, 32, 16)
    assert first.tolist() == [[2, 3], [3, 4]] and first.dtype == torch.int32
    assert block_table(read, cu_k, 32, 16) is first             # the next layer's
    read.add_(16)                                                # the next step, in place
    again = block_table(read, cu_k, 32, 16)
    assert again is not first and again.tolist() == [[3, 4], [4, 5]]
    cu_k[1] = 4                                                  # new lengths, in place
    assert block_table(read, cu_k, 32, 16).tolist() == [[3, 4], [3, 4]]
    assert block_table(read.clone(), cu_k, 32, 16) is not block_table(read, cu_k, 32, 16)
    with torch.inference_mode():                                 # no version counters
        r, c = read.clone(), cu_k.clone()
        assert block_table(r, c, 32, 16).tolist() == block_table(read, cu_k, 32, 16).tolist()


def test_sinks_cast_once_and_again_after_a_write():
    from skattn.transformers_paged import float_sinks

    s = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16), requires_grad=False)
    first = float_sinks(s)
    assert first.dtype == torch.float32 and torch.equal(first, s.float())
    assert float_sinks(s) is first                      # the next layer's call
    with torch.no_grad():
        s.add_(1)                                       # new weights, in place
    again = float_sinks(s)
    assert again is not first and torch.equal(again, s.float())
    s.data = torch.randn(8).to(torch.float16)           # another tensor under the parameter
    assert torch.equal(float_sinks(s), s.float())
    f32 = torch.randn(8)
    assert float_sinks(f32) is f32 and float_sinks(None) is None


def test_block_table_does_not_keep_a_finished_steps_tensors():
    import gc
    import weakref

    from skattn.transformers_paged import block_table

    read, cu_k = torch.arange(64), torch.tensor([0, 20, 36], dtype=torch.int32)
    block_table(read, cu_k, 32, 16)
    gone = weakref.ref(read)
    del read
    gc.collect()
    assert gone() is None
    read = torch.arange(64) + 16   # a new step's index, perhaps at the old one's address
    assert block_table(read, cu_k, 32, 16).tolist() == [[1, 2], [2, 3]]
