"""Ragged and paged attention on a CUDA GPU: serving sizes, page sizes, CUDA graphs."""
import random

import pytest
import torch

import skattn
from skattn import reference, serving
from skattn.bench.graph import capture
from skattn.bench.serving_mixes import mix
from serving_inputs import paged_cache, ragged_bound, sequences_kvcache, sequences_varlen
from tolerance import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NAN = float("nan")
I32 = torch.int32


def gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def rand(shape, g, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def kvcache_case(lens, *, Hq=32, Hkv=8, D=128, page_size=None, dtype=torch.float16, seed=0):
    g = gen(seed)
    B = len(lens)
    q = rand((B, 1, Hq, D), g, dtype)
    if page_size:
        k, v, table = paged_cache(lens, page_size=page_size, hkv=Hkv, d=D, dtype=dtype,
                                  seed=seed, device="cuda")
    else:
        L = max(lens)
        k, v, table = rand((B, L, Hkv, D), g, dtype), rand((B, L, Hkv, D), g, dtype), None
    return q, k, v, table, torch.tensor(lens, dtype=I32, device="cuda")


def run_kvcache(q, k, v, table, lens_t, p=None, **kw):
    out = torch.full((*q.shape[:3], v.shape[-1]), NAN, device="cuda", dtype=q.dtype)
    skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table, plan=p,
                                  out=out, **kw)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    return out


def plans_for(q, k, table, lens_t, page_size):
    B, _, Hq, D = q.shape
    cap = table.shape[1] * page_size if page_size else k.shape[1]
    pages = dict(page_size=page_size, max_pages=table.shape[1]) if page_size else {}
    kw = dict(batch=B, q_len=1, max_kv_len=cap, q_heads=Hq, kv_heads=k.shape[2], head_dim=D,
              dtype=k.dtype, **pages)
    return {"auto": None, "split": skattn.serving_plan(policy="split", **kw),
            "general": skattn.serving_plan(fixup="general", **kw),
            "fused, tail": skattn.serving_plan(fixup="fused", tail=40, **kw),
            "llamacpp": skattn.serving_plan(policy="llamacpp", **kw)}


@pytest.mark.parametrize("page_size", [None, 16, 64])
@pytest.mark.parametrize("name", ["equal", "one-long", "lognormal"])
def test_serving_sizes(name, page_size):
    # the benchmark's decode mixes, llama-8b's heads, dense and paged caches, every policy
    lens = list(mix(name, seed=1).kv_lens)
    lens[5] = 0 if name == "lognormal" else lens[5]  # an empty sequence in the batch
    q, k, v, table, lens_t = kvcache_case(lens, page_size=page_size, seed=len(lens) + (page_size or 0))
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table)
    tol = ragged_bound(sequences_kvcache(q, k, v, lens, table))
    for kind, p in plans_for(q, k, table, lens_t, page_size).items():
        err = rel_err(run_kvcache(q, k, v, table, lens_t, p), ref)
        assert err <= tol, f"{name} page {page_size} {kind}: {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("page_size", [16, 64])
def test_head_pairs_serving_sizes(page_size):
    # gpt-oss's heads (64 query heads, 8 KV heads of 64) read in pairs as 4 of 128: the
    # one-long mix, every policy with pairs asked for, sinks and lse, against float64; then
    # a CUDA graph replayed after the lengths change in place
    lens = list(mix("one-long", seed=2).kv_lens)
    q, k, v, table, lens_t = kvcache_case(lens, Hq=64, Hkv=8, D=64, page_size=page_size, seed=3)
    sinks = torch.randn(64, device="cuda", generator=gen(4))
    ref, ref_lse = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t,
                                                    block_table=table, sinks=sinks,
                                                    return_lse=True)
    tol = ragged_bound(sequences_kvcache(q, k, v, lens, table))
    kw = dict(batch=len(lens), q_len=1, max_kv_len=table.shape[1] * page_size, q_heads=64,
              kv_heads=8, head_dim=64, page_size=page_size, max_pages=table.shape[1],
              head_pairs=True)
    for kind, p in {"auto": skattn.serving_plan(**kw),
                    "general": skattn.serving_plan(fixup="general", **kw),
                    "split": skattn.serving_plan(policy="split", **kw)}.items():
        assert p.head_pairs
        out, lse = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                                 plan=p, sinks=sinks, return_lse=True)
        assert rel_err(out, ref) <= tol, (kind, rel_err(out, ref), tol)
        assert (lse.double() - ref_lse).abs().max() <= 20 * tol, kind
    p = skattn.serving_plan(**kw)
    ws = serving.workspace(p)
    graph, (out,) = capture([lambda: skattn.attention_with_kvcache(
        q, k, v, cache_seqlens=lens_t, block_table=table, plan=p, workspace=ws, sinks=sinks)])
    lens_t.copy_(torch.tensor(lens[::-1], dtype=I32))
    table_r = table.flip(0).contiguous()
    table.copy_(table_r)
    graph.replay()
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                           sinks=sinks)
    assert rel_err(out, ref) <= tol


MIXED_HEADS = (32, 8, 128)  # Hq, Hkv, D of the mixed batches


def mixed_batch(page_size, seed):
    """(d): one 512-token prompt chunk and 31 decode sequences, llama-8b heads: the mix, packed
    q, K/V (packed, or paged with its block table) and cu_seqlens."""
    m = mix("mixed", seed=2)
    g = gen(seed)
    Hq, Hkv, D = MIXED_HEADS
    cu_q = torch.tensor([0, *torch.tensor(m.q_lens).cumsum(0).tolist()], dtype=I32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(m.kv_lens).cumsum(0).tolist()], dtype=I32, device="cuda")
    q = rand((int(cu_q[-1]), Hq, D), g)
    if page_size:
        k, v, table = paged_cache(list(m.kv_lens), page_size=page_size, hkv=Hkv, d=D,
                                  seed=seed + 1, device="cuda")
    else:
        k, v, table = rand((int(cu_k[-1]), Hkv, D), g), rand((int(cu_k[-1]), Hkv, D), g), None
    return m, q, k, v, table, cu_q, cu_k


@pytest.mark.parametrize("page_size", [None, 16])
def test_mixed_prefill_and_decode(page_size):
    # (d): one 512-token prompt chunk and 31 decode sequences in one varlen batch: unplanned
    # (two halves, the default), planned with the fused merge, and in one plan (q_split=None:
    # decode rows in prompt tiles)
    m, q, k, v, table, cu_q, cu_k = mixed_batch(page_size, seed=3)
    Hq, Hkv, D = MIXED_HEADS
    mq, mk = max(m.q_lens), max(m.kv_lens)
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table)
    tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, table))
    for fixup, q_split in ((None, "auto"), ("fused", "auto"), (None, None), ("fused", None)):
        out = torch.full((q.shape[0], Hq, D), NAN, device="cuda", dtype=q.dtype)
        p = None
        if fixup or q_split is None:
            bounds = (dict(page_size=page_size, max_pages=table.shape[1]) if page_size
                      else dict(total_k=k.shape[0]))
            p = skattn.serving_plan(batch=m.batch, max_q_len=mq, total_q=q.shape[0],
                                    max_kv_len=mk, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                    fixup=fixup, q_split=q_split, **bounds)
            assert isinstance(p, skattn.MixedPlan) == (q_split is not None)
        skattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table, plan=p, out=out)
        assert not torch.isnan(out).any()
        assert rel_err(out, ref) <= tol, (fixup, q_split, rel_err(out, ref), tol)


@pytest.mark.parametrize("page_size", [None, 16])
def test_mixed_plan_halves(page_size):
    # (d) through a MixedPlan (q_split="auto"): decode rows in decode tiles, the chunk in
    # prompt tiles, one output; then a CUDA graph whose query counts move between the halves
    m, q, k, v, table, cu_q, cu_k = mixed_batch(page_size, seed=5)
    Hq, Hkv, D = MIXED_HEADS
    mq, mk = max(m.q_lens), max(m.kv_lens)
    bounds = (dict(page_size=page_size, max_pages=table.shape[1]) if page_size
              else dict(total_k=k.shape[0]))
    p = skattn.serving_plan(batch=m.batch, max_q_len=mq, total_q=q.shape[0], max_kv_len=mk,
                            q_heads=Hq, kv_heads=Hkv, head_dim=D, q_split="auto", **bounds)
    assert isinstance(p, skattn.MixedPlan) and p.q_split == 4
    ws, wl = serving.workspace(p), torch.empty(p.work_list_words, dtype=I32, device="cuda")
    out = torch.full((q.shape[0], Hq, D), NAN, device="cuda", dtype=q.dtype)
    lens_q = list(m.q_lens)

    def step():
        serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, out=wl)
        return skattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table, plan=p,
                                       out=out, workspace=ws, work_list=wl)

    graph, _ = capture([step])
    rng = random.Random(6)
    # the same 543 rows of q cut differently: the chunk at another sequence, sequences of
    # 4 (short half) and 5 (long half) queries, a chunk split in two
    cuts = [list(m.q_lens), [505, 5, 4] + [1] * 29, [257, 246, 4, 5, 4] + [1] * 27]
    for i in range(12):
        if i:
            lens_q = cuts[i % 3][:]
            rng.shuffle(lens_q)
            cu_q.copy_(torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=I32))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table)
        tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, table))
        assert not torch.isnan(out).any(), f"step {i}: unwritten rows"
        assert rel_err(out, ref) <= tol, (i, rel_err(out, ref), tol)


def test_whole_tile_prompt_steps_in_a_graph():
    # one graph, steps of a serving loop that switch between whole prompts (whole tiles handed
    # out longest first) and decode or chunk steps (stream-K) as the lengths change
    from skattn.kernels.worklist import WHOLE_FLAG
    from skattn.serving_worklist import host_work_list

    B, (Hq, Hkv, D), ps, T = 8, MIXED_HEADS, 64, 4096
    g = gen(21)
    max_pages = 2 * T // ps
    k, v = rand((B * max_pages, ps, Hkv, D), g), rand((B * max_pages, ps, Hkv, D), g)
    table = torch.randperm(B * max_pages, device="cuda", generator=g).to(I32).reshape(B, max_pages)
    q = rand((T, Hq, D), g)
    cu_q, cu_k = (torch.zeros(B + 1, dtype=I32, device="cuda") for _ in range(2))
    p = skattn.serving_plan(batch=B, max_q_len=T, total_q=T, max_kv_len=2 * T, q_heads=Hq,
                            kv_heads=Hkv, head_dim=D, page_size=ps, max_pages=max_pages,
                            q_split=None)  # one plan: its work list's flag is read below
    assert p.whole_tiles
    ws, wl = serving.workspace(p), torch.empty(p.work_list_words, dtype=I32, device="cuda")
    outs = [torch.full((T, Hq, D), NAN, device="cuda", dtype=q.dtype) for _ in range(2)]

    def step():  # one work list, two layers' calls (the first call's last fetch resets it)
        serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, out=wl)
        for out in outs:
            skattn.attention_varlen(q, k, v, cu_q, cu_k, T, 2 * T, block_table=table, plan=p,
                                    out=out, workspace=ws, work_list=wl)

    graph, _ = capture([step])
    steps = [  # (query tokens, keys) per sequence; whether the step runs in whole tiles
        ([T], [T], True), ([1] * B, [T + 100 * i for i in range(B)], False),
        ([1024] * 4, [1024, 2048, 3072, 4096], True), ([512] + [1] * 7, [2048] + [3000] * 7, False),
        ([512] * B, [512] * B, True), ([1] * B, [2 * T] * B, False),
        ([2000, 96], [2000, 8000], False)]  # tiles of 63 blocks beside the prompt's 1-16: cut
    for i, (lq, lk, whole) in enumerate(steps * 2):
        lq, lk = lq + [0] * (B - len(lq)), lk + [0] * (B - len(lk))
        cu_q.copy_(torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=I32))
        cu_k.copy_(torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=I32))
        for out in outs:
            out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        cu = (cu_q.tolist(), cu_k.tolist())
        assert bool(wl[WHOLE_FLAG.value]) == host_work_list(p, cu_q=cu[0], cu_k=cu[1]).whole
        if p.sms == 132:  # an H100 / H200: the expected choice
            assert bool(wl[WHOLE_FLAG.value]) == whole, (i, lq)
        rows = sum(lq)
        ref = reference.attention_varlen(q[:rows], k, v, cu_q, cu_k, T, 2 * T, block_table=table)
        tol = ragged_bound(sequences_varlen(q[:rows], k, v, cu_q, cu_k, table))
        for layer, out in enumerate(outs):
            assert not torch.isnan(out[:rows]).any(), f"step {i} layer {layer}: unwritten rows"
            assert rel_err(out[:rows], ref) <= tol, (i, layer, rel_err(out[:rows], ref), tol)


@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
def test_page_sizes(page_size):
    lens = list(mix("lognormal", seed=page_size, scale=0.25).kv_lens[:12])
    q, k, v, table, lens_t = kvcache_case(lens, page_size=page_size, seed=page_size)
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table)
    tol = ragged_bound(sequences_kvcache(q, k, v, lens, table))
    assert rel_err(run_kvcache(q, k, v, table, lens_t), ref) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_features_paged(dtype):
    # gpt-oss's heads: sinks and a 128-key window; Lq = 4 per sequence (speculative steps)
    lens = [1, 4, 300, 5000, 77, 2048]
    g = gen(5)
    k, v, table = paged_cache(lens, page_size=16, hkv=8, d=64, dtype=dtype, seed=6, device="cuda")
    q = rand((len(lens), 4, 64, 64), g, dtype)
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    sinks = torch.randn(64, device="cuda", generator=g)
    tol = ragged_bound(sequences_kvcache(q, k, v, lens, table))
    for kw in (dict(window=128, sinks=sinks), dict(softcap=30.0),
               dict(alibi_slopes=skattn.alibi_slopes(64, 8.0).cuda())):
        ref, ref_lse = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t,
                                                        block_table=table, return_lse=True, **kw)
        out = torch.full_like(q, NAN)
        out, lse = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                                 out=out, return_lse=True, **kw)
        assert rel_err(out, ref) <= tol, (kw.keys(), rel_err(out, ref), tol)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 20 * tol


def test_large_heads():
    # 576/512 (latent attention): the QK product in chunks of the head size
    lens = [700, 1, 3000, 64]
    g = gen(7)
    k, v, table = paged_cache(lens, page_size=64, hkv=1, d=576, dv=512, seed=7, device="cuda")
    q = rand((4, 1, 16, 576), g)
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table)
    out = run_kvcache(q, k, v, table, lens_t)
    assert rel_err(out, ref) <= ragged_bound(sequences_kvcache(q, k, v, lens, table))


def test_cuda_graph_replays_new_lengths_and_pages():
    # capture once; each step writes new lengths and block tables into the same tensors and
    # replays: 50 steps against the float64 reference, stream-K plans with the fused
    # (auto's default here), general fixup and a dynamic tail, the split anchor, and the main
    # kernel launched without PDL (the default waits on the work list with
    # griddepcontrol.wait)
    B, Hq, Hkv, D, ps, max_pages = 8, 32, 8, 128, 64, 64
    g = gen(8)
    num_pages = B * max_pages
    k, v = rand((num_pages, ps, Hkv, D), g), rand((num_pages, ps, Hkv, D), g)
    q = rand((B, 1, Hq, D), g)
    lens = torch.full((B,), ps * max_pages, dtype=I32, device="cuda")
    table = torch.randperm(num_pages, device="cuda", generator=g).to(I32).reshape(B, max_pages)
    kw = dict(batch=B, q_len=1, max_kv_len=ps * max_pages, q_heads=Hq, kv_heads=Hkv,
              head_dim=D, page_size=ps, max_pages=max_pages)
    plans = [skattn.serving_plan(**kw), skattn.serving_plan(fixup="general", **kw),
             skattn.serving_plan(tail=40, **kw), skattn.serving_plan(policy="split", **kw),
             skattn.serving_plan(tuning=skattn.Tuning(pdl_wait=False), **kw)]
    spaces = [serving.workspace(p) for p in plans]
    outs = [torch.empty(B, 1, Hq, D, device="cuda", dtype=q.dtype) for _ in plans]

    def call(i):
        return lambda: skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                                     plan=plans[i], out=outs[i], workspace=spaces[i])

    graph, _ = capture([call(i) for i in range(len(plans))])
    rng = random.Random(9)
    for step in range(50):
        cap = ps * max_pages
        shape = step % 3
        new = [rng.choice([0, 1, cap, rng.randint(1, cap)]) if shape == 0 else
               (rng.randint(1, 200) if shape == 1 else rng.randint(cap // 2, cap)) for _ in range(B)]
        if shape == 1:
            new[rng.randrange(B)] = cap  # one sequence much longer than the rest
        lens.copy_(torch.tensor(new, dtype=I32))
        table.copy_(torch.randperm(num_pages, device="cuda", generator=g).to(I32).reshape(B, max_pages))
        q.copy_(rand((B, 1, Hq, D), g))
        for out in outs:
            out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table)
        tol = ragged_bound(sequences_kvcache(q, k, v, new, table))
        for p, out in zip(plans, outs):
            err = rel_err(out, ref)
            assert err <= tol, f"step {step} lengths {new} {p.policy}/{p.fixup}: {err:.2e} > {tol:.2e}"


def test_pdl_chain_of_layers_with_whole_tile_steps():
    # each layer's output is the next layer's q, every kernel launched by PDL (main kernels
    # wait with griddepcontrol.wait, the fixup too); short lengths make every tile whole, so
    # no fixup program merges: its programs must still wait, or the next layer could read q
    # before the previous main kernel's stores are visible
    from skattn import serving_launch

    lens = [10, 3, 16, 1, 7, 12, 5, 9]
    k, v, table = paged_cache(lens, page_size=16, hkv=8, d=128, seed=18, device="cuda",
                              max_pages=256)
    q = rand((8, 1, 32, 128), gen(18))
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    kw = dict(batch=8, q_len=1, max_kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
              page_size=16, max_pages=256)
    for fixup in ("general", None):  # (auto's fused merge: the main kernels alone)
        p = skattn.serving_plan(fixup=fixup, **kw)
        b = serving_launch.bind(p, q.device)
        assert b.main_const["WAIT_PDL"] and (b.fix_const["USE_PDL"] or fixup is None)
        outs = [torch.full_like(q, NAN) for _ in range(6)]
        x = q
        for out in outs:
            x = skattn.attention_with_kvcache(x, k, v, cache_seqlens=lens_t, block_table=table,
                                              plan=p, out=out)
        torch.cuda.synchronize()
        prev = q
        for i, out in enumerate(outs):
            ref = reference.attention_with_kvcache(prev, k, v, cache_seqlens=lens_t,
                                                   block_table=table)
            tol = ragged_bound(sequences_kvcache(prev, k, v, lens, table))
            assert rel_err(out, ref) <= tol, (fixup, i, rel_err(out, ref), tol)
            prev = out


def test_device_behaviour_on_bad_values():
    # lengths and page ids the host does not read: clamped and masked on the GPU, no fault
    lens = [48, 30, 20]
    k, v, table = paged_cache(lens, page_size=16, hkv=2, d=64, seed=10, device="cuda", max_pages=3)
    q = rand((3, 1, 8, 64), gen(11))
    bad_lens = torch.tensor([-5, 10**6, 20], dtype=I32, device="cuda")
    bad_table = table.clone()
    bad_table[2, 1] = 10**6  # sequence 2's keys 16..19: no page
    out = run_kvcache(q, k, v, bad_table, bad_lens)
    torch.cuda.synchronize()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    # sequence 1: its length clamps to the row's 3 pages (48 keys); the third page id is out of
    # range, so keys 32..47 are masked: attention over its first 32 keys
    ref1 = reference.attention_with_kvcache(q[1:2], k, v, block_table=table[1:2],
                                            cache_seqlens=torch.tensor([32], dtype=I32, device="cuda"))
    assert rel_err(out[1:2], ref1) <= ragged_bound(sequences_kvcache(q[1:2], k, v, [32], table[1:2]))
    ref2 = reference.attention_with_kvcache(q[2:3], k, v, block_table=table[2:3],
                                            cache_seqlens=torch.tensor([16], dtype=I32, device="cuda"))
    assert rel_err(out[2:3], ref2) <= ragged_bound(sequences_kvcache(q[2:3], k, v, [16], table[2:3]))


# -- fp8 e4m3 K/V with f32 scales (docs/quant.md, "Serving")
FP8 = torch.float8_e4m3fn


def fp8_kv(k, v, k_head=True, v_head=False):
    """fp8 caches (any layout [..., Hkv, D]), their scales, and the dequantized K/V in f16
    (what the kernel multiplies, times the scale) for the tolerance rule."""
    from skattn.quant import fp8
    from skattn.reference_serving import dequantize

    (k8, ks), (v8, vs) = (fp8(x.reshape(1, -1, *x.shape[-2:]), per_head=h)
                          for x, h in ((k, k_head), (v, v_head)))
    k8, v8 = k8.reshape(k.shape), v8.reshape(v.shape)

    def f16(x, s):  # in 16 slices: a serving cache in float64 at once would not fit
        return torch.cat([dequantize(c, s).half() for c in x.split(max(1, x.shape[0] // 16))])
    return k8, v8, ks, vs, f16(k8, ks), f16(v8, vs)


@pytest.mark.parametrize("page_size, qdtype", [(16, torch.float16), (64, torch.bfloat16),
                                               (None, torch.float16)])
def test_fp8_serving_decode(page_size, qdtype):
    # a serving-size decode batch (64 lognormal lengths, an empty one), llama-8b heads, fp8
    # K/V with per-head K and per-tensor V scales, every policy
    lens = list(mix("lognormal", seed=11).kv_lens)
    lens[3] = 0
    q, k, v, table, lens_t = kvcache_case(lens, page_size=page_size, seed=12)
    q = q.to(qdtype)
    k8, v8, ks, vs, kd, vd = fp8_kv(k * 2, v)
    ref = reference.attention_with_kvcache(q, k8, v8, cache_seqlens=lens_t, block_table=table,
                                           k_scale=ks, v_scale=vs)
    tol = ragged_bound(sequences_kvcache(q, kd.to(qdtype), vd.to(qdtype), lens, table))
    for kind, p in plans_for(q, k8, table, lens_t, page_size).items():
        out = run_kvcache(q, k8, v8, table, lens_t, p, k_scale=ks, v_scale=vs)
        err = rel_err(out, ref)
        assert err <= tol, f"fp8 page {page_size} {kind}: {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("page_size", [None, 16])
def test_fp8_mixed_prefill_and_decode(page_size):
    # one 512-token prompt chunk and 31 decode sequences over fp8 K/V, per-head scales
    m, q, k, v, table, cu_q, cu_k = mixed_batch(page_size, seed=13)
    Hq, Hkv, D = MIXED_HEADS
    k8, v8, ks, vs, kd, vd = fp8_kv(k, v, True, True)
    mq, mk = max(m.q_lens), max(m.kv_lens)
    ref = reference.attention_varlen(q, k8, v8, cu_q, cu_k, mq, mk, block_table=table,
                                     k_scale=ks, v_scale=vs)
    tol = ragged_bound(sequences_varlen(q, kd, vd, cu_q, cu_k, table))
    out = torch.full((q.shape[0], Hq, D), NAN, device="cuda", dtype=q.dtype)
    skattn.attention_varlen(q, k8, v8, cu_q, cu_k, mq, mk, block_table=table, out=out,
                            k_scale=ks, v_scale=vs)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


def test_fp8_cuda_graph_replays_new_lengths_and_scales():
    # one capture over a paged fp8 cache; each step writes new lengths, block tables and
    # scales into the captured tensors and replays against the float64 reference
    B, Hq, Hkv, D, ps, max_pages = 16, 32, 8, 128, 16, 128
    g = gen(15)
    num_pages = B * max_pages
    k8 = rand((num_pages, ps, Hkv, D), g).to(FP8)
    v8 = rand((num_pages, ps, Hkv, D), g).to(FP8)
    ks = torch.ones(Hkv, device="cuda")
    vs = torch.ones(1, device="cuda")
    q = rand((B, 1, Hq, D), g)
    cap = ps * max_pages
    lens = torch.full((B,), cap, dtype=I32, device="cuda")
    table = torch.randperm(num_pages, device="cuda", generator=g).to(I32).reshape(B, max_pages)
    p = skattn.serving_plan(batch=B, q_len=1, max_kv_len=cap, q_heads=Hq, kv_heads=Hkv,
                            head_dim=D, page_size=ps, max_pages=max_pages, dtype=FP8)
    space = serving.workspace(p)
    out = torch.empty(B, 1, Hq, D, device="cuda", dtype=q.dtype)
    graph, _ = capture([lambda: skattn.attention_with_kvcache(
        q, k8, v8, cache_seqlens=lens, block_table=table, plan=p, out=out, workspace=space,
        k_scale=ks, v_scale=vs)])
    rng = random.Random(16)
    for step in range(12):
        new = [rng.choice([0, 1, cap, rng.randint(1, cap)]) for _ in range(B)]
        lens.copy_(torch.tensor(new, dtype=I32))
        perm = torch.randperm(num_pages, device="cuda", generator=g).to(I32)
        table.copy_(perm.reshape(B, max_pages))
        ks.copy_(torch.rand(Hkv, device="cuda", generator=g) * 0.2 + 0.01)
        vs.fill_(rng.uniform(0.01, 2.0))
        q.copy_(rand((B, 1, Hq, D), g))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention_with_kvcache(q, k8, v8, cache_seqlens=lens, block_table=table,
                                               k_scale=ks, v_scale=vs)
        kd = (k8.double() * ks.double()[:, None]).half()
        vd = (v8.double() * vs.double()).half()
        tol = ragged_bound(sequences_kvcache(q, kd, vd, new, table))
        err = rel_err(out, ref)
        assert err <= tol, f"step {step} lengths {new}: {err:.2e} > {tol:.2e}"


# -- llama.cpp's q8_0 and q4_0 blocks (skattn.quant.Q8_0, Q4_0)
@pytest.mark.parametrize("form, page_size, qdtype", [("q8_0", 16, torch.float16),
                                                     ("q4_0", 64, torch.bfloat16),
                                                     ("q8_0", None, torch.bfloat16)])
def test_block_serving_decode(form, page_size, qdtype):
    # a serving-size decode batch (64 lognormal lengths, an empty one), llama-8b heads, K/V
    # in llama.cpp's blocks, every policy, against float64 on the dequantized K/V
    from skattn import quant

    lens = list(mix("lognormal", seed=15).kv_lens)
    lens[5] = 0
    q, k, v, table, lens_t = kvcache_case(lens, page_size=page_size, seed=16)
    q = q.to(qdtype)
    kq, vq = getattr(quant, form)(k * 2), getattr(quant, form)(v)
    ref = reference.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t, block_table=table)
    tol = ragged_bound(sequences_kvcache(q, kq.dequantize(qdtype), vq.dequantize(qdtype), lens,
                                         table))
    cap = table.shape[1] * page_size if page_size else k.shape[1]
    pages = dict(page_size=page_size, max_pages=table.shape[1]) if page_size else {}
    kw = dict(batch=len(lens), q_len=1, max_kv_len=cap, q_heads=32, kv_heads=8, head_dim=128,
              dtype=form, **pages)
    for kind, p in {"auto": None, "split": skattn.serving_plan(policy="split", **kw),
                    "general": skattn.serving_plan(fixup="general", **kw),
                    "fused, tail": skattn.serving_plan(fixup="fused", tail=40, **kw)}.items():
        out = run_kvcache(q, kq, vq, table, lens_t, p)
        err = rel_err(out, ref)
        assert err <= tol, f"{form} page {page_size} {kind}: {err:.2e} > {tol:.2e}"


def test_block_mixed_prefill_and_decode():
    # one 512-token prompt chunk and 31 decode sequences over a paged q8_0 cache
    from skattn import quant

    m, q, k, v, table, cu_q, cu_k = mixed_batch(16, seed=17)
    Hq, Hkv, D = MIXED_HEADS
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    mq, mk = max(m.q_lens), max(m.kv_lens)
    ref = reference.attention_varlen(q, kq, vq, cu_q, cu_k, mq, mk, block_table=table)
    tol = ragged_bound(sequences_varlen(q, kq.dequantize(q.dtype), vq.dequantize(q.dtype),
                                        cu_q, cu_k, table))
    out = torch.full((q.shape[0], Hq, D), NAN, device="cuda", dtype=q.dtype)
    skattn.attention_varlen(q, kq, vq, cu_q, cu_k, mq, mk, block_table=table, out=out)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


def test_tile_stamps():
    # serving_launch.run(stamps=(main, fixup, tiles)) (tools/serving_timeline.py --tiles):
    # each stamped tile's six times in order, its blocks those of the host work list's
    # ranges, and the output as without stamps (up to the stamped build's rounding)
    from skattn import serving_launch
    from skattn.serving_worklist import host_work_list

    lens = [3000, 700, 64, 1500, 1]
    q, k, v, table, lens_t = kvcache_case(lens, Hq=16, Hkv=2, D=128, page_size=16, seed=21)
    p = skattn.serving_plan(batch=len(lens), q_len=1, max_kv_len=table.shape[1] * 16,
                            page_size=16, max_pages=table.shape[1], q_heads=16, kv_heads=2,
                            head_dim=128, programs=24)
    assert p.fixup == "fused" and not p.tail  # every program's range from the host's shares
    ref = run_kvcache(q, k, v, table, lens_t, p)
    ws = serving.workspace(p, device=q.device)
    b = serving_launch.bind(p, q.device)
    views = serving_launch._views(p, b, ws, q.device, serving_launch._stream(b, q.device))
    rows_main, rows_fix = serving_launch.stamp_rows(p, q.device)
    main = torch.zeros(rows_main, 4, dtype=torch.int64, device="cuda")
    fix = torch.zeros(max(1, rows_fix), 4, dtype=torch.int64, device="cuda")
    tiles = torch.zeros(rows_main, 8, 8, dtype=torch.int64, device="cuda")
    out = torch.full_like(ref, NAN)
    serving_launch.build(p, views[4], seq_k=lens_t, cu_k=False, seq_q=None)
    serving_launch.run(p, q, k, v, out, None, wl=views[4], block_table=table, scale=128 ** -0.5,
                       ws_views=views[:4], stamps=(main, fix, tiles))
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max().item() <= 1e-3  # the same computation
    wl = host_work_list(p, lens_k=lens)
    t = tiles.cpu()
    stamped = 0
    for prog in range(wl.programs):
        lo, hi = wl.program_range(prog)
        got = [row for row in t[prog].tolist() if row[0] > 0]
        assert sum(row[6] for row in got) <= hi - lo
        if len(got) < 8:  # every tile of the range stamped: its blocks add up to the range
            assert sum(row[6] for row in got) == hi - lo
        for row in got:
            assert all(row[i] <= row[i + 1] for i in range(5)), row
            assert row[6] > 0 and 0 <= row[7] < p.tiles_max
        stamped += len(got)
    assert stamped >= wl.programs
    assert not t[wl.programs:].any()  # programs without a share stamp nothing
    # one tile a program, in a buffer with a row to spare: the first tile's blocks and index
    # as above, nothing written past a program's row
    spare = torch.zeros(rows_main + 1, 8, dtype=torch.int64, device="cuda")
    serving_launch.run(p, q, k, v, out, None, wl=views[4], block_table=table, scale=128 ** -0.5,
                       ws_views=views[:4], stamps=(main, fix, spare[:rows_main].view(rows_main, 1, 8)))
    torch.cuda.synchronize()
    one = spare.cpu()
    assert not one[rows_main].any()
    assert torch.equal(one[:rows_main, 6:], t[:, 0, 6:])
    with pytest.raises(ValueError, match=r"stamps\[2\]"):
        serving_launch.run(p, q, k, v, out, None, wl=views[4], block_table=table,
                           scale=128 ** -0.5, ws_views=views[:4],
                           stamps=(main, fix, tiles[:, :, :4].contiguous()))
