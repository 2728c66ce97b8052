"""The kernel at real sizes on a CUDA GPU: seed-grid shapes, every fixup kind, CUDA graphs."""
import math

import pytest
import torch

import skattn
from skattn import reference
from skattn.bench.models import MODELS
from helpers import cuda_qkv as make
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEPTHS = (8192, 32768, 12345)  # 12345: Lk not a multiple of any block size
NS = (1, 4, 16, 512)


def variants(B, n, L, Hq, Hkv, D, dtype):
    """Plans covering every fixup kind that applies to this cell."""
    kw = dict(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=dtype,
              causal=True)
    out = {}
    for policy in ("llamacpp", "llamacpp-before", "split"):
        p = skattn.plan(policy=policy, **kw)
        out.setdefault(p.fixup, p)
    p = skattn.plan(policy="llamacpp-before", fixup="fused", **kw)
    out.setdefault(p.fixup, p)
    if p.programs > 1 and p.programs - 1 > p.ntiles_dst:  # one program fewer: general
        p = skattn.plan(policy="llamacpp-before", programs=p.programs - 1, **kw)
        out.setdefault(p.fixup, p)
    p = skattn.plan(policy="llamacpp-before", programs=max(1, min(p.work, p.ntiles_dst)), **kw)
    out.setdefault(p.fixup, p)
    p = skattn.plan(policy="auto", **kw)  # prompt chunks: one whole causal tile a program
    out["auto " + p.fixup + (" whole tiles" if p.per_tile_ranges else "")] = p
    return out


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("model", list(MODELS))
def test_seed_grid(model, n):
    Hq, Hkv, D = MODELS[model][:3]
    seen = set()
    for L in DEPTHS:
        q, k, v = make(1, n, L, Hq, Hkv, D, seed=L + n)
        ref = reference.attention(q, k, v, causal=True)
        tol = bound(q, k, v, causal=True)
        for kind, p in variants(1, n, L, Hq, Hkv, D, k.dtype).items():
            out = torch.full((1, n, Hq, D), float("nan"), device="cuda", dtype=q.dtype)
            skattn.attention(q, k, v, causal=True, plan=p, out=out)
            assert not torch.isnan(out).any(), f"{kind}: unwritten output elements"
            err = rel_err(out, ref)
            assert err <= tol, f"{model} n={n} L={L} {kind} N={p.programs}: {err:.2e} > {tol:.2e}"
            seen.add(kind)
    assert {"fused", "general"} <= seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_features_on_gpu(dtype):
    # bf16 tensor-core dots (not testable under the interpreter), sinks, window, mask, softcap
    q, k, v = make(2, 7, 5000, 16, 2, 64, dtype=dtype, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    sinks = torch.randn(16, device="cuda", generator=g)
    mask = torch.randn(2, 7, 5000, device="cuda", generator=g)
    mask[torch.rand(2, 7, 5000, device="cuda", generator=g) < 0.2] = float("-inf")
    cases = [dict(causal=True, sinks=sinks), dict(causal=True, window=128, sinks=sinks),
             dict(mask=mask.to(dtype), softcap=20.0),
             dict(alibi_slopes=skattn.alibi_slopes(16, 8.0).cuda(), causal=True)]
    for kw in cases:
        ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
        for fixup in (None, "fused"):
            p = skattn.plan(batch=2, q_len=7, kv_len=5000, q_heads=16, kv_heads=2, head_dim=64,
                            dtype=dtype, causal=kw.get("causal", False), window=kw.get("window"),
                            policy="llamacpp-before", fixup=fixup, has_mask="mask" in kw)
            out, lse = skattn.attention(q, k, v, plan=p, return_lse=True, **kw)
            assert rel_err(out, ref) <= bound(q, k, v), (kw.keys(), fixup)
            assert (lse.double() - ref_lse).abs().max() < 0.05


@pytest.mark.parametrize("D,Dv", [(80, 80), (96, 96), (256, 256), (192, 128), (576, 512)])
def test_head_sizes(D, Dv):
    q, k, v = make(1, 4, 3000, 16, 1, D, seed=D)
    v = v[..., :Dv].contiguous() if Dv != D else v
    ref = reference.attention(q, k, v, causal=True)
    for fixup in (None, "fused"):
        p = skattn.plan(batch=1, q_len=4, kv_len=3000, q_heads=16, kv_heads=1, head_dim=D,
                        head_dim_v=Dv, causal=True, fixup=fixup, policy="llamacpp-before")
        out = skattn.attention(q, k, v, causal=True, plan=p)
        assert rel_err(out, ref) <= bound(q, k, v, causal=True) + 2e-3, (D, Dv, fixup)


@pytest.mark.parametrize("fixup", [None, "fused"])
def test_cuda_graph_replay(fixup):
    # a planned call allocates, syncs and autotunes nothing: capture it, replay with new inputs
    B, n, L, Hq, Hkv, D = 1, 4, 16384, 32, 8, 128
    p = skattn.plan(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=True, policy="llamacpp", fixup=fixup)
    q, k, v = make(B, n, L, Hq, Hkv, D, seed=10)
    out = torch.empty(B, n, Hq, D, device="cuda", dtype=q.dtype)
    skattn.attention(q, k, v, causal=True, plan=p, out=out)  # warm-up: compile, buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
    for seed in (11, 12, 13):
        q2, k2, v2 = make(B, n, L, Hq, Hkv, D, seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.attention(q2, k2, v2, causal=True)
        assert rel_err(out, ref) <= bound(q2, k2, v2, causal=True)


def test_pdl_wait_chain():
    # Tuning(pdl_wait=True): each call's main kernel starts early and waits on the GPU, so a
    # call whose q is the previous call's output (written by its fixup, the kernel just before
    # it) reads it complete: five chained calls eager, then in a CUDA graph, against float64
    B, n, L, Hq, Hkv, D = 1, 1, 8192, 32, 8, 128
    p = skattn.plan(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=True, tuning=skattn.Tuning(pdl_wait=True))
    assert p.fixup in ("uniform", "general")  # a second kernel the next main kernel follows
    q, k, v = make(B, n, L, Hq, Hkv, D, seed=20)
    outs = [torch.empty_like(q) for _ in range(5)]

    def chain():
        x = q
        for out in outs:
            x = skattn.attention(x, k, v, causal=True, plan=p, out=out)

    def check():
        x = q
        for i, out in enumerate(outs):
            ref = reference.attention(x, k, v, causal=True)
            assert rel_err(out, ref) <= bound(x, k, v, causal=True), i
            x = out

    chain()
    torch.cuda.synchronize()
    check()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for seed in (21, 22):
        q.copy_(make(B, n, L, Hq, Hkv, D, seed=seed)[0])
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check()


def test_time_stamps():
    # launch.run(stamps=...): every program stamps start <= first KV loop done <= end; the
    # fixup sees the partials only after the last main program ended; the output is unchanged
    from skattn import launch

    q, k, v = make(1, 1, 8192, 32, 8, 128)
    p = skattn.plan(batch=1, q_len=1, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128,
                    causal=True, programs=128)
    assert p.fixup == "uniform"
    main = torch.zeros(p.programs, 4, device="cuda", dtype=torch.int64)
    nfix = math.prod(launch.fixup_grid(p))
    fix = torch.zeros(nfix, 4, device="cuda", dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    launch.run(p, q, k, v, out, None, scale=128 ** -0.5, stamps=(main, fix))
    assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v, causal=True)
    m, f = main.cpu(), fix.cpu()
    assert (m[:, 0] > 0).all() and (m[:, 0] <= m[:, 1]).all() and (m[:, 1] <= m[:, 2]).all()
    assert (f[:, 0] <= f[:, 1]).all() and (f[:, 1] <= f[:, 2]).all()
    assert f[:, 1].min() >= m[:, 2].max()
    assert (m[:, 2].max() - m[:, 0].min()) < 1e6  # under a millisecond
