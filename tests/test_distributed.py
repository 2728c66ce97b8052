"""skattn.distributed: the shard decomposition and the merge in float64, then 2 and 3 gloo ranks
running the kernels under the interpreter against the float64 reference of the whole sequence."""
import json
import random

import pytest
import torch

from skattn import distributed as skd
from skattn import reference
from skattn.shard import ShardCall, even_shards, shard_calls

NEG_INF = float("-inf")


def shards_from_cuts(L, cuts):
    cuts = sorted(cuts)
    return list(zip([0] + cuts, cuts + [L]))


def merged_reference(q, k, v, shards, **kw):
    """Every shard's float64 partial (the reference as the attention function), merged."""
    sinks = kw.pop("sinks", None)
    parts = [skd.partial(q, k[:, s:e], v[:, s:e], shard_offset=s, kv_len=k.shape[1],
                         attend=reference.attention, **kw) for s, e in shards]
    return skd.merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
                     sinks)


def test_shard_calls_match_the_whole_sequence():
    # random sequences, shard cuts (empty shards, shards shorter than Lq) and windows
    # (1: only the diagonal; 20: past several shards): the merged float64 partials are the
    # float64 attention of the whole sequence, -inf rows included
    rng = random.Random(0)
    for i in range(60):
        Lq = rng.choice([1, 1, 2, 3, 5, 8])
        L = rng.randint(1, 40)
        causal = rng.random() < 0.85
        window = rng.choice([None, 1, 2, 3, 7, 20]) if causal else None
        shards = shards_from_cuts(L, [rng.randint(0, L) for _ in range(rng.randint(0, 4))])
        B = 2 if i % 4 == 0 else 1
        q = torch.randn(B, Lq, 4, 8, dtype=torch.float64)
        k, v = torch.randn(2, B, L, 2, 8, dtype=torch.float64)
        sinks = torch.randn(4, dtype=torch.float64) if rng.random() < 0.3 else None
        kw = dict(causal=causal, window=window, sinks=sinks)
        ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
        out, lse = merged_reference(q, k, v, shards, **kw)
        case = (Lq, L, causal, window, shards)
        assert not out.isnan().any() and not lse.isnan().any(), case
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), case
        fin = torch.isfinite(ref_lse)
        assert torch.allclose(out, ref, atol=1e-12, rtol=0), case
        assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-12, rtol=0), case


def test_shard_calls_shapes():
    # decode: one call a shard, never a mask: causal on the last shard, plain elsewhere, the
    # window a slice of keys, a shard before the window no call at all
    assert shard_calls(q_len=1, kv_len=100, start=60, stop=100, causal=True, window=None) == [
        ShardCall((0, 1), (0, 40), True, None)]
    assert shard_calls(q_len=1, kv_len=100, start=0, stop=60, causal=True, window=None) == [
        ShardCall((0, 1), (0, 60), False)]
    assert shard_calls(q_len=1, kv_len=100, start=0, stop=60, causal=True, window=45) == [
        ShardCall((0, 1), (55, 60), False)]
    assert shard_calls(q_len=1, kv_len=100, start=0, stop=50, causal=True, window=45) == []
    # a 4-token chunk whose first query is the shard's last key: one causal row, then a band
    # of 3 rows whose window starts inside the shard (the masked fallback)
    assert shard_calls(q_len=4, kv_len=40, start=0, stop=37, causal=True, window=5) == [
        ShardCall((0, 1), (0, 37), True, 5), ShardCall((1, 4), (33, 37), False, band=True)]
    assert shard_calls(q_len=3, kv_len=10, start=4, stop=4, causal=True, window=None) == []
    with pytest.raises(ValueError, match="shard"):
        shard_calls(q_len=1, kv_len=10, start=5, stop=11, causal=True, window=None)


def test_even_shards():
    assert even_shards(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_shards(2, 3) == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="world"):
        even_shards(10, 0)


def test_merge_masked_shards_and_sinks():
    # shard 1 saw nothing (lse -inf, O 0): the merge is shard 0 alone; row 1 saw nothing
    # anywhere: 0 and -inf without sinks, 0 and the sink with one, never NaN; a sink counts
    # once however many shards there are
    outs = torch.randn(3, 1, 2, 2, 4, dtype=torch.float64)
    lses = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    outs[1], lses[1] = 0, NEG_INF
    outs[:, :, 1], lses[:, :, :, 1] = 0, NEG_INF
    out, lse = skd.merge(outs, lses)
    alone, alone_lse = skd.merge(outs[[0, 2]], lses[[0, 2]])
    assert torch.equal(out, alone) and torch.equal(lse, alone_lse)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.isneginf(lse[..., 1]).all()
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out_s, lse_s = skd.merge(outs, lses, sinks)
    assert not out_s.isnan().any()
    assert torch.equal(lse_s[0, :, 1], sinks)
    expect = torch.logaddexp(torch.logsumexp(lses[:, 0, :, 0], 0), sinks)
    assert torch.allclose(lse_s[0, :, 0], expect, atol=1e-14, rtol=0)


def test_argument_errors_before_any_collective():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float16)
    k = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="comm"):
        skd.attention(q, k, k, shard_offset=0, kv_len=8, comm="tree")
    with pytest.raises(ValueError, match="together"):
        skd.attention(q, k, k, shard_offset=0)
    with pytest.raises(ValueError, match="kv_len"):
        skd.attention(q, k, k, shard_offset=4, kv_len=8, causal=True)
    with pytest.raises(ValueError, match="window"):
        skd.attention(q, k, k, shard_offset=0, kv_len=8, window=4)
    with pytest.raises(TypeError, match="k must have dtype"):
        skd.attention(q, k.float(), k.float(), shard_offset=0, kv_len=8)


# -- gloo ranks under the interpreter; tiny shapes (a kernel call costs about 0.5 s here)
BASE = dict(B=1, heads=(4, 2), D=16, comm="allgather")
CASES = {
    2: [
        # decode over even shards; the last shard causal, the first plain
        dict(BASE, name="decode", seed=1, Lq=1, L=40, shards=[(0, 20), (20, 40)]),
        # a 5-token chunk across the border of uneven shards, GQA ratio 3, sinks, ring
        dict(BASE, name="chunk-uneven", seed=2, Lq=5, L=37, heads=(6, 2), sinks=True,
             comm="ring", shards=[(0, 33), (33, 37)]),
        # the window hides shard 0 entirely: its lse is -inf, the merge must not make NaN
        dict(BASE, name="masked-shard", seed=3, Lq=1, L=40, window=6, comm="ring",
             shards=[(0, 30), (30, 40)]),
        # window rows past shard 0 that start inside it: the masked band; softcap, bf16
        dict(BASE, name="band", seed=4, Lq=4, L=40, window=5, softcap=20.0, dtype="bf16",
             shards=[(0, 37), (37, 40)]),
        # an empty shard, offsets found by all-gather, batch 2, no causal mask
        dict(BASE, name="empty-shard", seed=5, B=2, Lq=2, L=24, causal=False,
             find_offsets=True, shards=[(0, 24), (24, 24)]),
    ],
    3: [
        # uneven decode, GQA ratio 3, sinks, ring of 3
        dict(BASE, name="decode-3", seed=6, Lq=1, L=45, heads=(6, 2), sinks=True, comm="ring",
             shards=[(0, 7), (7, 30), (30, 45)]),
        # a 6-token chunk over a 3-key middle shard: queries in two shards
        dict(BASE, name="chunk-3", seed=7, Lq=6, L=26, shards=[(0, 20), (20, 23), (23, 26)]),
        # two shards fully masked by the window, all-gather
        dict(BASE, name="masked-3", seed=8, Lq=2, L=40, window=4, sinks=True,
             shards=[(0, 10), (10, 30), (30, 40)]),
    ],
}


def spawn_ranks(world, cases, tmp_path, backend, timeout=600):
    """Run the cases on `world` spawned ranks; a rank that raises ends them all (spawn's
    rule), and ranks still running after `timeout` seconds (a collective waiting for a rank
    that will never come) are killed and the test fails."""
    import time

    import torch.multiprocessing as mp

    import dist_worker

    ctx = mp.spawn(dist_worker.run, args=(world, str(tmp_path / "init"), cases, str(tmp_path),
                                          backend), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            pytest.fail(f"{world} {backend} ranks did not finish within {timeout} s (killed)")
    check_results(world, cases, tmp_path)


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks run the interpreter on CPUs")
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks(world, tmp_path):
    spawn_ranks(world, CASES[world], tmp_path, "gloo")


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks run the interpreter on CPUs")
def test_ranks_past_their_time_are_killed(tmp_path):
    # a hung collective must fail the test, not stop the run (the cases need far more than 2 s)
    with pytest.raises(pytest.fail.Exception, match="did not finish within 2 s"):
        spawn_ranks(2, CASES[2], tmp_path, "gloo", timeout=2)


def check_results(world, cases, tmp_path):
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["name"] for r in results] == [c["name"] for c in cases]
        for r in results:
            where = f"{r['name']} rank {rank}: {r}"
            assert not r["nan"], where
            assert r["lse_inf_match"] and r["partial_inf_match"], where
            assert r["err"] <= r["bound"] and r["row_err"] <= r["row_bound"], where
            assert r["lse_err"] < 2e-3 and r["partial_lse_err"] < 2e-3, where
            assert not r["partial_unwritten"] and r["partial_err"] <= r["bound"], where
            assert r["same_on_ranks"] or r["name"] in RING_CASES, where
    masked = {r["name"]: r["masked_rows"]
              for rank in range(world)
              for r in json.loads((tmp_path / f"rank{rank}.json").read_text()) if rank == 0}
    # the cases meant to mask rank 0's shard entirely do
    for name in ("masked-shard", "masked-3", "gpu-masked"):
        if name in masked:
            assert masked[name] > 0, name


# -- GPUs: model-sized heads, thousands of keys (a fresh kernel configuration per shard shape)
GPU_BASE = dict(B=1, heads=(32, 8), D=128, comm="allgather")
GPU_CASES = [
    dict(GPU_BASE, name="gpu-decode", seed=11, Lq=1, L=12000, shards=[(0, 7000), (7000, 12000)]),
    dict(GPU_BASE, name="gpu-chunk-ring", seed=12, Lq=64, L=9000, sinks=True, comm="ring",
         shards=[(0, 8970), (8970, 9000)]),  # the chunk straddles the border
    dict(GPU_BASE, name="gpu-window-band", seed=13, Lq=16, L=9000, window=500, dtype="bf16",
         shards=[(0, 8990), (8990, 9000)]),
    dict(GPU_BASE, name="gpu-masked", seed=14, Lq=1, L=9000, window=128, heads=(40, 8),
         shards=[(0, 4000), (4000, 9000)]),
]
RING_CASES = {c["name"] for cases in (*CASES.values(), GPU_CASES) for c in cases
              if c["comm"] == "ring"}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL ranks need 2 CUDA GPUs")
def test_nccl_two_gpus(tmp_path):
    spawn_ranks(2, GPU_CASES, tmp_path, "nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_rank_s_work_on_one_gpu(world):
    # what each of `world` ranks computes, run one after another on one GPU (poisoned
    # outputs), merged as the ranks would, against the float64 attention of the whole sequence
    from tolerance import bounds, rel_err

    dev = torch.device("cuda")
    L, Lq = 50_001, 8  # uneven shards
    for window in (None, 3000):
        q = torch.randn(1, Lq, 32, 128, device=dev, dtype=torch.float16)
        k, v = torch.randn(2, 1, L, 8, 128, device=dev, dtype=torch.float16)
        sinks = torch.randn(32, device=dev)
        outs, lses = [], []
        for s, e in even_shards(L, world):
            o = torch.full((1, Lq, 32, 128), float("nan"), device=dev, dtype=torch.float16)
            lse = torch.full((1, 32, Lq), float("nan"), device=dev)
            skd.partial(q, k[:, s:e], v[:, s:e], shard_offset=s, kv_len=L, causal=True,
                        window=window, out=o, lse=lse)
            assert not o.isnan().any() and not lse.isnan().any()
            outs.append(o)
            lses.append(lse)
        out, lse = skd.merge(torch.stack(outs), torch.stack(lses), sinks)
        ref, ref_lse = reference.attention(q, k, v, causal=True, window=window, sinks=sinks,
                                           return_lse=True)
        whole, _ = bounds(q, k, v, causal=True, ref=ref)
        assert rel_err(out, ref) <= whole, (world, window)
        assert (lse.double() - ref_lse).abs().max().item() < 2e-3, (world, window)
