"""Whole prompt tiles of serving plans on the Hopper kernel (`Tuning(prefill="ws")`,
kernels/ragged_ws.py) against float64: paged caches of every page size it takes and dense
caches, head sizes 128 and 64, sinks and lse, bf16, NaN and Inf in the caches' rows past the
sequences' lengths, and a CUDA graph whose steps move between whole tiles and stream-K. Each
check counts the kernel's launches, so a call that fell back to the base kernel fails."""
import pytest
import torch

import skattn
from skattn import reference, serving, serving_launch
from skattn.bench.graph import capture
from skattn.kernels.worklist import WHOLE_FLAG
from serving_inputs import (paged_cache, ragged_bound, sequences_kvcache, sequences_varlen,
                            varlen_inputs)
from tolerance import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU"),
]
NAN = float("nan")
I32 = torch.int32
WS = skattn.Tuning(prefill="ws")
LQ = [700, 300, 0, 129, 1]   # an empty sequence and a decode row among prompts
LK = [1500, 300, 50, 1129, 777]


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """The Hopper kernel's launches in this test (serving_launch._launch_ws, counted)."""
    calls = []
    real = serving_launch._launch_ws

    def spy(*args, **kw):
        calls.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(serving_launch, "_launch_ws", spy)
    return calls


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device="cuda")


def _inputs(page_size, hq, hkv, d, dtype, seed):
    q, _, _, cu_q, _ = varlen_inputs(LQ, LK, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=seed,
                                     device="cuda")
    k, v, table = paged_cache(LK, page_size=page_size, hkv=hkv, d=d, dtype=dtype, seed=seed,
                              device="cuda")
    return q, k, v, cu_q, table


def _run(p, q, k, v, cu_q, cu_k, table, **kw):
    """One call on a work list built first, so its whole-tile flag can be read."""
    wl = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = torch.full((q.shape[0], q.shape[1], v.shape[-1]), NAN, device="cuda", dtype=q.dtype)
    res = skattn.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), max(LK), block_table=table,
                                  plan=p, out=out, work_list=wl, **kw)
    return wl, out, res


def check_whole_step(p, q, k, v, cu_q, cu_k, table, max_q, max_k, launches):
    """One call of plan p on a work list built first: the step in whole tiles on the Hopper
    kernel, every row written, within the tolerance of float64."""
    wl = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert wl[WHOLE_FLAG.value].item() == 1, "the step should run in whole tiles"
    out = torch.full_like(q, NAN)
    ran = len(launches)
    skattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, block_table=table, plan=p,
                            out=out, work_list=wl)
    assert len(launches) == ran + 1, "the Hopper kernel did not run"
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, block_table=table)
    assert not torch.isnan(out).any(), torch.isnan(out).any(-1).any(-1).nonzero()[:8].tolist()
    tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, table))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


@pytest.mark.parametrize("page_size, hq, d, dtype", [
    (16, 32, 128, torch.float16), (64, 32, 128, torch.float16), (256, 32, 128, torch.bfloat16),
    (16, 64, 64, torch.bfloat16), (128, 40, 128, torch.float16)])
def test_whole_tiles_on_the_hopper_kernel(page_size, hq, d, dtype, launches):
    hkv = 8
    q, k, v, cu_q, table = _inputs(page_size, hq, hkv, d, dtype, seed=page_size)
    cu_k = _cu(LK)
    p = skattn.serving_plan(batch=len(LQ), max_q_len=max(LQ), total_q=q.shape[0],
                            max_kv_len=max(LK), q_heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype,
                            tuning=WS, q_split=None, page_size=page_size,
                            max_pages=table.shape[1])
    assert serving_launch.bind(p, q.device).ws is not None, "the plan should take the kernel"
    sinks = torch.randn(hq, device="cuda") if d == 64 else None
    wl, out, (_, lse) = _run(p, q, k, v, cu_q, cu_k, table, sinks=sinks, return_lse=True)
    assert wl[WHOLE_FLAG.value].item() == 1, "the step should run in whole tiles"
    assert launches, "the Hopper kernel did not run"
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, max(LQ), max(LK),
                                              block_table=table, sinks=sinks, return_lse=True)
    tol = ragged_bound(sequences_varlen(q, k, v, cu_q, cu_k, table))
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    rows = ~torch.isinf(ref_lse)
    assert torch.equal(rows, ~torch.isinf(lse))
    assert torch.allclose(lse[rows].double(), ref_lse[rows], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("lens, page_size", [([2048] * 4, 16), ([2048] * 4, 256),
                                             ([700, 1000, 333], 16), ([700, 1000, 333], 64),
                                             ([700, 1000, 333], 256)])
def test_fresh_prompts(lens, page_size, launches):
    # fresh prompts (a step of continuous batching), every tile whole; each sequence's last
    # page holds NaN in K and Inf in V past its length, as a freed page's old rows may: they
    # must not reach the output
    hq, hkv, d = 32, 8, 128
    q, _, _, cu_q, cu_k = varlen_inputs(lens, lens, hq=hq, hkv=hkv, d=d, seed=page_size,
                                        device="cuda")
    k, v, table = paged_cache(lens, page_size=page_size, hkv=hkv, d=d, seed=9, device="cuda")
    for b, n in enumerate(lens):
        last, used = (n - 1) // page_size, n % page_size
        if used:
            k[table[b, last], used:] = float("nan")
            v[table[b, last], used:] = float("inf")
    p = skattn.serving_plan(batch=len(lens), max_q_len=max(lens), total_q=q.shape[0],
                            max_kv_len=max(lens), q_heads=hq, kv_heads=hkv, head_dim=d,
                            page_size=page_size, max_pages=table.shape[1], tuning=WS,
                            q_split=None)
    check_whole_step(p, q, k, v, cu_q, cu_k, table, max(lens), max(lens), launches)


def test_dense_cache_prompt_chunks(launches):
    # attention_with_kvcache: 512 new tokens of each sequence over a dense cache
    B, Lq, hq, hkv, d = 3, 512, 32, 8, 128
    lens = [600, 2000, 512]
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(B, Lq, hq, d, device="cuda", generator=g).half()
    k, v = (torch.randn(B, max(lens), hkv, d, device="cuda", generator=g).half() for _ in "kv")
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    p = skattn.serving_plan(batch=B, q_len=Lq, max_kv_len=max(lens), q_heads=hq, kv_heads=hkv,
                            head_dim=d, tuning=WS)
    assert serving_launch.bind(p, q.device).ws is not None
    wl = serving.work_list(p, cache_seqlens=lens_t)
    assert wl[WHOLE_FLAG.value].item() == 1
    out = torch.full_like(q, NAN)
    skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, plan=p, out=out, work_list=wl)
    assert launches, "the Hopper kernel did not run"
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t)
    assert not torch.isnan(out).any()
    tol = ragged_bound(sequences_kvcache(q, k, v, lens))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


def test_graph_steps_between_whole_tiles_and_stream_k():
    # one captured step, replayed as the lengths change: prompts (whole tiles on the Hopper
    # kernel), decode steps and a short chunk (stream-K), pages of 16
    B, hq, hkv, d, ps, T = 4, 32, 8, 128, 16, 2048
    g = torch.Generator(device="cuda").manual_seed(8)
    max_pages = 2 * T // ps
    k, v = (torch.randn(B * max_pages, ps, hkv, d, device="cuda", generator=g).half() for _ in "kv")
    table = torch.randperm(B * max_pages, device="cuda", generator=g).to(I32).reshape(B, max_pages)
    q = torch.randn(T, hq, d, device="cuda", generator=g).half()
    cu_q, cu_k = (torch.zeros(B + 1, dtype=I32, device="cuda") for _ in range(2))
    p = skattn.serving_plan(batch=B, max_q_len=T, total_q=T, max_kv_len=2 * T, q_heads=hq,
                            kv_heads=hkv, head_dim=d, page_size=ps, max_pages=max_pages,
                            tuning=WS, q_split=None)
    ws, wl = serving.workspace(p), torch.empty(p.work_list_words, dtype=I32, device="cuda")
    out = torch.full((T, hq, d), NAN, device="cuda", dtype=q.dtype)

    def step():
        serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, out=wl)
        skattn.attention_varlen(q, k, v, cu_q, cu_k, T, 2 * T, block_table=table, plan=p,
                                out=out, workspace=ws, work_list=wl)

    graph, _ = capture([step])
    steps = [([T], [T], True), ([1] * B, [T + 300 * i for i in range(B)], False),
             ([1024, 1000, 24], [3000, 1000, 4096], True), ([64], [4096], False),
             ([512] * B, [512, 1024, 2048, 4096], True)]
    for i, (lq, lk, whole) in enumerate(steps * 2):
        lq, lk = lq + [0] * (B - len(lq)), lk + [0] * (B - len(lk))
        cu_q.copy_(_cu(lq))
        cu_k.copy_(_cu(lk))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        if p.sms == 132:  # an H100 / H200: the expected choice
            assert wl[WHOLE_FLAG.value].item() == int(whole), (i, lq)
        rows = sum(lq)
        ref = reference.attention_varlen(q[:rows], k, v, cu_q, cu_k, T, 2 * T, block_table=table)
        tol = ragged_bound(sequences_varlen(q[:rows], k, v, cu_q, cu_k, table))
        assert not torch.isnan(out[:rows]).any(), f"step {i}: unwritten rows"
        assert rel_err(out[:rows], ref) <= tol, (i, rel_err(out[:rows], ref), tol)


def test_one_build_for_every_batch(launches):
    # plans of one bound share the compiled kernel, launched directly: a batch of one
    # sequence first (Triton would specialise batch == 1 into the build), then of three
    hq, hkv, d, ps = 48, 8, 128, 32  # heads no other test here uses: this build is new
    for lens in ([1500], [900, 1500, 333]):
        q, _, _, cu_q, cu_k = varlen_inputs(lens, lens, hq=hq, hkv=hkv, d=d, seed=len(lens),
                                            device="cuda")
        k, v, table = paged_cache(lens, page_size=ps, hkv=hkv, d=d, seed=len(lens),
                                  device="cuda", max_pages=64)
        p = skattn.serving_plan(batch=len(lens), max_q_len=1500, total_q=q.shape[0],
                                max_kv_len=2048, q_heads=hq, kv_heads=hkv, head_dim=d,
                                page_size=ps, max_pages=64, q_split=None, tuning=WS)
        check_whole_step(p, q, k, v, cu_q, cu_k, table, 1500, 2048, launches)


@pytest.mark.parametrize("hq, d, dtype, lens", [
    (32, 128, torch.float16, [600, 2000, 530]),
    (64, 64, torch.bfloat16, [600, 2000, 530]),   # 64-key blocks
    (32, 128, torch.bfloat16, [600, 0, 2000]),    # no key: its only block's V all zeroed
    (64, 64, torch.float16, [600, 0, 2000]),
])
def test_non_finite_rows_past_the_lengths_dense(hq, d, dtype, lens, launches):
    # a dense cache [B, Lmax, Hkv, D] with NaN in K and Inf in V past each length
    # (test_fresh_prompts has the paged form)
    B, Lq, hkv = 3, 512, 8
    g = torch.Generator(device="cuda").manual_seed(13)
    q = torch.randn(B, Lq, hq, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, 2048, hkv, d, device="cuda", generator=g).to(dtype) for _ in "kv")
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = float("nan"), float("inf")
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    p = skattn.serving_plan(batch=B, q_len=Lq, max_kv_len=2048, q_heads=hq, kv_heads=hkv,
                            head_dim=d, dtype=dtype, tuning=WS)
    wl = serving.work_list(p, cache_seqlens=lens_t)
    assert wl[WHOLE_FLAG.value].item() == 1
    out = torch.full_like(q, NAN)
    skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, plan=p, out=out, work_list=wl)
    assert launches, "the Hopper kernel did not run"
    assert not torch.isnan(out).any() and torch.isfinite(out).all()
    assert all(bool((out[b] == 0).all()) for b, n in enumerate(lens) if n == 0)
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t)
    tol = ragged_bound(sequences_kvcache(q, k, v, lens))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
