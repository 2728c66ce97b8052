"""The prompt-chunk kernel (`Tuning(prefill="tma")`) on a Hopper GPU: the copy engine's loads
and bf16 tensor-core dots, which the interpreter cannot show.

Every call is checked against the float64 reference with its output poisoned with NaN, on
fresh random inputs.
"""
import pytest
import torch

import skattn
from skattn import launch, prefill_launch, reference
from skattn.bench.models import MODELS
from helpers import cuda_qkv as make
from helpers import assert_graph_replay_matches, check_plans
from helpers import poisoned_call as check
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                       reason="the copy engine (TMA) needs sm_90"),
]

TMA = skattn.Tuning(prefill="tma")


def runs_prefill(p, q, k, v) -> bool:
    """The call runs the prompt-chunk kernel."""
    b = launch.bind(p, q.device)
    features = (False, False, False, False, False, False, False)
    return b.prefill is not None and prefill_launch.usable(b.prefill, features, k, v)


def plan_for(q, k, v, **kw):
    """A plan for this call with `Tuning(prefill="tma")`; the call must run that kernel."""
    B, Lq, Hq, D = q.shape
    p = skattn.plan(batch=B, q_len=Lq, kv_len=k.shape[1], q_heads=Hq, kv_heads=k.shape[2],
                    head_dim=D, dtype=k.dtype, tuning=TMA, **kw)
    assert runs_prefill(p, q, k, v)
    return p


def plans(B, n, L, Hq, Hkv, D, dtype):
    kw = dict(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=dtype,
              causal=True)
    out = {"tma auto": skattn.plan(tuning=TMA, **kw),
           "tma fused": skattn.plan(tuning=TMA, policy="llamacpp-before", fixup="fused", **kw)}
    p = skattn.plan(tuning=TMA, policy="llamacpp-before", **kw)
    out["tma " + p.fixup] = p
    return out


@pytest.mark.parametrize("model", ["llama-8b", "qwen3-14b", "gpt-oss"])
@pytest.mark.parametrize("L", [8192, 12345])  # 12345: Lk not a multiple of any block size
def test_seed_shapes(model, L):
    Hq, Hkv, D = MODELS[model][:3]
    q, k, v = make(1, 512, L, Hq, Hkv, D, seed=L)
    ref = reference.attention(q, k, v, causal=True)
    tol = bound(q, k, v, causal=True)
    kinds = check_plans(q, k, v, plans(1, 512, L, Hq, Hkv, D, k.dtype), runs_prefill, ref, tol,
                        f"{model} L={L}")
    assert {"fused", "general"} <= kinds


def test_bf16_sinks_lse_batch():
    # bf16 tensor-core dots, sinks and lse, two sequences, a cut plan (general fixup); with
    # 152 tiles on 131 programs some programs take two tiles
    q, k, v = make(2, 300, 5000, 32, 4, 128, dtype=torch.bfloat16, seed=1)
    sinks = torch.randn(32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    p = plan_for(q, k, v, causal=True, programs=131)
    assert p.fixup == "general"
    out = torch.full_like(q, float("nan"))
    out, lse = skattn.attention(q, k, v, causal=True, sinks=sinks, plan=p, out=out,
                                return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    tol = bound(q, k, v, causal=True)
    assert rel_err(out, ref) <= tol
    assert (lse.double() - ref_lse).abs().max() <= 20 * tol


def test_not_causal_and_f32_q():
    q, k, v = make(1, 256, 3000, 64, 8, 64, seed=3)
    p = plan_for(q, k, v, causal=False)
    for qq in (q, q.float()):
        out = check(qq, k, v, p, causal=False)
        ref = reference.attention(qq, k, v)
        assert rel_err(out, ref) <= bound(qq, k, v)


def test_cuda_graph_replay():
    q, k, v = make(1, 512, 8192, 32, 8, 128, seed=4)
    p = plan_for(q, k, v, causal=True)
    assert_graph_replay_matches(q, k, v, p)


def test_dtypes_share_no_compiled_kernel():
    # the same shape in f16 then bf16 (and q in f32): the direct launch is keyed by dtypes too
    for tuning in (skattn.Tuning(), TMA):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = make(1, 128, 2048, 32, 8, 128, dtype=dtype, seed=5)
            p = skattn.plan(batch=1, q_len=128, kv_len=2048, q_heads=32, kv_heads=8,
                            head_dim=128, dtype=dtype, causal=True, tuning=tuning)
            ref = reference.attention(q, k, v, causal=True)
            for _ in range(2):  # the second call takes the direct launch
                assert rel_err(check(q, k, v, p), ref) <= bound(q, k, v, causal=True)


def test_unaligned_cache_view_runs_the_base_kernel():
    # K/V rows 136 bytes apart: not for the copy engine, so the base kernel runs, correctly
    g = torch.Generator(device="cuda").manual_seed(6)
    cache = torch.randn(1, 4000, 8, 68, device="cuda", generator=g).half()
    k = cache[..., :64]
    q = torch.randn(1, 256, 32, 64, device="cuda", generator=g).half()
    p = skattn.plan(batch=1, q_len=256, kv_len=4000, q_heads=32, kv_heads=8, head_dim=64,
                    causal=True, tuning=TMA)
    assert not runs_prefill(p, q, k, k)
    out = check(q, k, k, p)
    assert rel_err(out, reference.attention(q, k, k, causal=True)) <= bound(q, k, k, causal=True)
