"""On a GPU: the direct launch path, bounded memory, two streams, determinism, 64-bit
offsets and the planned call's host time."""

import pytest
import torch

import skattn
from skattn import api, buffers, launch, launcher, reference
from skattn.bench.host import per_call_us
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SHAPE = dict(q_heads=32, kv_heads=8, head_dim=128)


def make(B, Lq, Lk, seed=0, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Lq, 32, 128, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Lk, 8, 128, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Lk, 8, 128, device="cuda", generator=g).to(dtype)
    return q, k, v


def plans(Lq, Lk):
    kw = dict(batch=1, q_len=Lq, kv_len=Lk, causal=True, **SHAPE)
    return {"uniform": skattn.plan(policy="llamacpp", **kw),
            "general": skattn.plan(policy="llamacpp-before", **kw),
            "fused": skattn.plan(policy="llamacpp", fixup="fused", **kw),
            "none": skattn.plan(programs=8, **kw)}


@pytest.mark.parametrize("kind", ["uniform", "general", "fused", "none"])
def test_direct_launch_matches_triton_launcher(kind):
    # the second call of a key launches the compiled kernel directly; its bytes equal the
    # first (Triton's launcher); a transposed q view is a new key, also right
    q, k, v = make(1, 4, 5000, seed=1)
    p = plans(4, 5000)[kind]
    assert p.fixup == kind
    outs = [skattn.attention(q, k, v, causal=True, plan=p) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    out_t = skattn.attention(qt, k, v, causal=True, plan=p)
    assert torch.equal(out_t, outs[0])
    ref = reference.attention(q, k, v, causal=True)
    assert rel_err(outs[0], ref) <= bound(q, k, v, causal=True)


def test_memory_stays_bounded_over_two_thousand_kv_lengths():
    # a decode loop: a new KV length (so a new plan) every step; what skattn holds must not grow
    q, k, v = make(1, 1, 4096 + 2000, seed=2)
    torch.cuda.synchronize()
    held = buffers.held_bytes()  # pools may already hold larger plans of other tests
    for step in range(2000):
        Lk = 4096 + step
        skattn.attention(q, k[:, :Lk], v[:, :Lk], causal=True)
        if step == 20:
            torch.cuda.synchronize()
            early = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - early < 16 << 20
    assert buffers.held_bytes() <= max(held, 16 << 20)


@pytest.mark.parametrize("kind", ["uniform", "fused"])
def test_two_streams_run_one_plan_at_once(kind):
    # per-stream workspace pools: partials and fused counters are never shared by streams
    p = plans(2, 20000)[kind]
    inputs = [make(1, 2, 20000, seed=10 + i) for i in range(2)]
    refs = [reference.attention(*x, causal=True) for x in inputs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(10):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(skattn.attention(*inputs[i], causal=True, plan=p))
    torch.cuda.synchronize()
    for i in range(2):
        for o in outs[i]:
            assert rel_err(o, refs[i]) <= bound(*inputs[i], causal=True)


@pytest.mark.parametrize("kind", ["uniform", "general", "fused", "none"])
def test_each_fixup_is_bitwise_deterministic(kind):
    # 20 runs, the same bits; every other one with out in place of q (each piece of a tile
    # reads q before the tile's rows of out are written, by its merge after all pieces)
    q, k, v = make(1, 8, 12345, seed=3)
    p = plans(8, 12345)[kind]
    first = skattn.attention(q, k, v, causal=True, plan=p)
    for i in range(19):
        q2 = q.clone()
        out = q2 if i % 2 else None
        assert torch.equal(skattn.attention(q2, k, v, causal=True, plan=p, out=out), first)


def test_cache_larger_than_two_to_the_31_elements():
    # [64, 65536, 8, 128] f16 = 2**32 elements: batch 32 and up start past 2**31
    B, Lk = 64, 65536
    kv = torch.empty(B, Lk, 8, 128, device="cuda", dtype=torch.float16)
    g = torch.Generator(device="cuda").manual_seed(4)
    for b in (0, 33, 63):
        kv[b].normal_(generator=g)
    q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.float16, generator=g)
    out = torch.full((B, 1, 32, 128), float("nan"), device="cuda", dtype=torch.float16)
    skattn.attention(q, kv, kv, causal=True, out=out)
    for b in (0, 33, 63):
        qb, kb = q[b:b + 1], kv[b:b + 1]
        ref = reference.attention(qb, kb, kb, causal=True)
        assert rel_err(out[b:b + 1], ref) <= bound(qb, kb, kb, causal=True), b
    del kv


@pytest.mark.serial
def test_planned_call_host_time():
    # a repeat planned call replays its recipe (skattn.recipe): signature lookup, addresses,
    # one call of skattn's C launcher (skattn.launcher) for all its launches
    q, k, v = make(1, 1, 256, seed=5)
    p = skattn.plan(batch=1, q_len=1, kv_len=256, causal=True, **SHAPE)
    out = torch.empty_like(q)

    us = per_call_us(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out))
    rec = next(r for r in api._CHECKED.values() if r.plan is p)
    assert rec.serves and rec.by_align, "the planned call did not learn a recipe"
    stream = torch.cuda.current_stream().cuda_stream
    tensors = (q, k, v, out, None, None, None, None, None, None, None)
    (spec, launches), vals = rec.values(stream, *tensors)
    assert spec is not None, "the recipe has no C launcher spec"
    assert len(launches) == 1 + (p.fixup in ("uniform", "general"))
    values_us = per_call_us(lambda: rec.values(stream, *tensors))
    fast = launcher.module().launch
    launch_us = per_call_us(lambda: fast(spec, *vals))
    run_us = per_call_us(lambda: launch.run(p, q, k, v, out, None, scale=128 ** -0.5))
    print(f"planned call host time: {us:.1f} us (addresses {values_us:.1f} us; the C launcher's "
          f"{len(launches)} launches {launch_us:.1f} us; launch.run without a recipe "
          f"{run_us:.1f} us)")
    assert us <= 30.0  # a regression bound: Triton's JIT launcher alone cost ~180 us here
