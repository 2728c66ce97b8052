"""The serving custom ops (torch.ops.skattn.attention_with_kvcache, attention_varlen) under
the interpreter: opcheck, agreement with the eager entry points and float64, a workspace of
the call's own, policies, errors, and torch.compile(fullgraph=True) over a paged cache
whose lengths change between calls."""
import pytest
import torch

import skattn
import skattn.ops
from skattn import quant, reference_serving, serving, serving_recipe
from serving_inputs import paged_cache, ragged_bound, sequences_kvcache, varlen_inputs
from tolerance import rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]
I32 = torch.int32
LENS = [37, 0, 50, 1]
HQ, HKV, D = 4, 2, 32


def kvcache_case(page_size=16, lq=2, seed=0):
    k, v, table = paged_cache(LENS, page_size=page_size, hkv=HKV, d=D, seed=seed)
    q = torch.randn(len(LENS), lq, HQ, D, generator=torch.Generator().manual_seed(seed + 1)).half()
    return q, k, v, torch.tensor(LENS, dtype=I32), table


def kv_args(q, k, v, lens, table, *, sinks=None, scale=None, causal=True, window=None,
            softcap=0.0, policy="auto"):
    return (q, k, v, lens, table, sinks, None, scale, causal, window, softcap, policy)


VARLEN_Q, VARLEN_K = [3, 0, 20, 1], [20, 5, 40, 9]   # a prompt (two halves) and decode rows


def varlen_args(q, k, v, cu_q, cu_k, table=None, *, policy="auto", window=None):
    return (q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), table, None, None, None, True,
            window, 0.0, policy)


def test_opcheck_kvcache():
    q, k, v, lens, table = kvcache_case()
    args = kv_args(q, k, v, lens, table, sinks=torch.randn(HQ), scale=0.3, window=20)
    result = torch.library.opcheck(torch.ops.skattn.attention_with_kvcache.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_varlen():
    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, pad_q=2)
    result = torch.library.opcheck(torch.ops.skattn.attention_varlen.default,
                                   varlen_args(q, k, v, cu_q, cu_k))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("form", ["fp8", "q8_0", "q4_0"])
def test_opcheck_quantized(form):
    # a paged kvcache and a packed varlen batch over quantized K/V, at the ops: FP8 values
    # with their f32 scales, a block cache as its values with its f16 block scales
    q, k, v, lens, table = kvcache_case(seed=9)
    q2, k2, v2, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, seed=9)
    utils = None
    if form == "fp8":
        (k, ks), (v, vs) = quant.fp8(k, per_head=True), quant.fp8(v)
        (k2, ks2), (v2, vs2) = quant.fp8(k2[None]), quant.fp8(v2[None], per_head=True)
        k2, v2 = k2[0], v2[0]
        scales, scales2 = (ks, vs), (ks2, vs2)
        # (opcheck's test_schema compares inputs with torch.allclose, which float8 lacks on
        # the CPU: tests/test_ops_quant.py checks that part by hand)
        utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    else:
        make = quant.q8_0 if form == "q8_0" else quant.q4_0
        kq, vq, kq2, vq2 = (make(x) for x in (k, v, k2, v2))
        k, v, scales = kq.values, vq.values, (kq.scales, vq.scales)
        k2, v2, scales2 = kq2.values, vq2.values, (kq2.scales, vq2.scales)
    ops = [(torch.ops.skattn.attention_with_kvcache.default,
            (*kv_args(q, k, v, lens, table), *scales)),
           (torch.ops.skattn.attention_varlen.default,
            (*varlen_args(q2, k2, v2, cu_q, cu_k), *scales2))]
    for op, args in ops:
        result = torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("page_size", [16, 32])
def test_kvcache_op_matches_eager_and_float64(page_size):
    q, k, v, lens, table = kvcache_case(page_size, lq=3, seed=4)
    got = skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                            softcap=20.0)
    eager = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                          softcap=20.0)
    assert torch.equal(got, eager)
    ref = reference_serving.attention_with_kvcache(q, k, v, cache_seqlens=lens,
                                                   block_table=table, softcap=20.0)
    assert rel_err(got, ref) <= ragged_bound(sequences_kvcache(q, k, v, LENS, table))
    assert torch.equal(got[1], torch.zeros_like(got[1]))   # no key: 0


@pytest.mark.parametrize("paged", [False, True])
def test_varlen_op_matches_float64_and_zeroes_rows_of_no_sequence(paged):
    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, pad_q=3, seed=5)
    table = None
    if paged:
        k, v, table = paged_cache(VARLEN_K, page_size=16, hkv=HKV, d=D, seed=5)
    got = skattn.ops.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K),
                                      block_table=table)
    ref = reference_serving.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K),
                                             block_table=table)
    n = sum(VARLEN_Q)
    assert torch.equal(got[n:], torch.zeros_like(got[n:]))
    assert rel_err(got[:n], ref[:n]) <= 1e-2
    eager = skattn.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K),
                                    block_table=table)
    assert torch.equal(got[:n], eager[:n])


def test_workspace_of_the_call_needs_nothing_zeroed(monkeypatch):
    # every torch.empty of the call (the op's workspace among them) full of garbage: the
    # work list is built and the partials written before they are read, and the work-list
    # step zeroes the fused counters. Against the eager function on a zeroed workspace of
    # its own, bit for bit, for plans of every merge
    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, seed=6)
    bounds = dict(batch=4, max_q_len=max(VARLEN_Q), total_q=q.shape[0], max_kv_len=max(VARLEN_K),
                  total_k=k.shape[0], q_heads=HQ, kv_heads=HKV, head_dim=D, sms=4, occupancy=2)
    plans = [skattn.serving_plan(**bounds, **kw) for kw in (
        {}, dict(policy="llamacpp"), dict(policy="split"), dict(q_split=None, fixup="fused"),
        dict(q_split=None, fixup="fused", tail=15), dict(q_split=None, fixup="general"),
        # tiles cut between programs: the fused merge counts their pieces
        dict(q_split=None, fixup="fused", programs=4, block_n=16),
        dict(q_split=None, fixup="fused", programs=4))]
    real = torch.empty

    def garbage(*shape, **kw):
        x = real(*shape, **kw)
        return x.view(torch.uint8).fill_(0xA5).view(x.dtype) if x.numel() else x

    for p in plans:
        want = skattn.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), plan=p,
                                       workspace=serving.workspace(p, "cpu"))
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", garbage)
            got = serving._varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), None, True,
                                  None, None, 0.0, None, None, False, p, None, None, None, None,
                                  None, own_workspace=True)
        n = sum(VARLEN_Q)
        assert torch.equal(got[:n], want[:n]), p


@pytest.mark.parametrize("policy", ["llamacpp", "llamacpp-before", "split"])
def test_policy_reaches_the_plan(monkeypatch, policy):
    seen = []
    real = serving_recipe.run_halves
    monkeypatch.setattr(serving_recipe, "run_halves",
                        lambda plan, *a, **kw: (seen.append(plan), real(plan, *a, **kw))[1])
    q, k, v, lens, table = kvcache_case()
    skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                      policy=policy)
    assert seen and seen[-1].policy == policy
    for bad in ("fastest", "round-4x"):   # (a dense plan's policy: not a serving plan's)
        with pytest.raises(ValueError, match="policy must be one of"):
            skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                              policy=bad)


def test_bad_input_same_errors():
    q, k, v, lens, table = kvcache_case()
    with pytest.raises(TypeError, match="block_table must have dtype torch.int32"):
        skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table.long())
    with pytest.raises(ValueError, match="is not a page of the cache"):
        bad = table.clone()
        bad[0, 0] = k.shape[0]
        skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=bad)
    q2, k2, v2, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D)
    with pytest.raises(ValueError, match="non-decreasing"):
        skattn.ops.attention_varlen(q2, k2, v2, cu_q.flip(0), cu_k, 20, 40)


def test_fake_kernels_give_shapes_without_reading_lengths():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, lens, table = kvcache_case()
    q2, k2, v2, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, pad_q=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fl, ft = (mode.from_tensor(x) for x in (q, k, v, lens, table))
        out = torch.ops.skattn.attention_with_kvcache(*kv_args(fq, fk, fv, fl, ft))
        assert out.shape == q.shape and out.dtype == q.dtype
        args = [mode.from_tensor(x) for x in (q2, k2, v2, cu_q, cu_k)]
        out = torch.ops.skattn.attention_varlen(*varlen_args(*args))
        assert out.shape == (q2.shape[0], HQ, D)
        with pytest.raises(ValueError, match="policy must be one of"):
            torch.ops.skattn.attention_with_kvcache(*kv_args(fq, fk, fv, fl, ft, policy="x"))


def test_q8_0_cache_through_the_op():
    q, k, v, lens, table = kvcache_case(seed=7)
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    got = skattn.ops.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, block_table=table)
    eager = skattn.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, block_table=table)
    assert torch.equal(got, eager)


class PagedBlock(torch.nn.Module):
    """A decode step's attention over a paged cache: q projection, the op, o projection."""

    def __init__(self, hidden=64):
        super().__init__()
        self.qp = torch.nn.Linear(hidden, HQ * D, bias=False)
        self.op = torch.nn.Linear(HQ * D, hidden, bias=False)

    def forward(self, x, k, v, lens, table):
        B, L, _ = x.shape
        q = self.qp(x).view(B, L, HQ, D)
        o = skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table)
        return self.op(o.reshape(B, L, HQ * D))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_follows_new_lengths(backend):
    torch.manual_seed(8)
    block = PagedBlock().half().requires_grad_(False)
    _, k, v, lens, table = kvcache_case(seed=8)
    x = torch.randn(len(LENS), 1, 64, dtype=torch.float16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, k, v, lens, table)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    first = compiled(x, k, v, lens, table)
    assert torch.equal(first, block(x, k, v, lens, table))
    # the lengths change in place (a decode step later): the same graph follows them
    lens += torch.tensor([1, 0, 3, 2], dtype=I32)   # within each sequence's pages
    later = compiled(x, k, v, lens, table)
    assert torch.equal(later, block(x, k, v, lens, table))
    assert not torch.equal(later[0], first[0]) and torch.equal(later[1], first[1])
    with torch.no_grad():
        q = block.qp(x).view(len(LENS), 1, HQ, D)
        ref = reference_serving.attention_with_kvcache(q, k, v, cache_seqlens=lens,
                                                       block_table=table)
        got = skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table)
    assert rel_err(got, ref) <= 1e-2


def test_compile_varlen_with_symbolic_lengths_and_window():
    # varlen steps whose max_seqlen and window change from call to call under
    # torch.compile(fullgraph=True, dynamic=True): traced once, with no guard on their values
    from torch._dynamo.utils import counters

    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, seed=10)

    def step(q, k, v, cu_q, cu_k, max_q, max_k, window):
        return skattn.ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=window)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for extra, window in ((0, 7), (3, 9), (5, 30), (9, 12)):
        args = (q, k, v, cu_q, cu_k, max(VARLEN_Q) + extra, max(VARLEN_K) + extra, window)
        assert torch.equal(compiled(*args), step(*args))
    assert counters["stats"]["unique_graphs"] == 1


def test_either_module_may_be_imported_first():
    import subprocess
    import sys

    for first in ("skattn.ops_serving", "skattn.ops"):
        code = (f"import {first}, skattn.ops, torch; "
                "assert skattn.ops.attention_varlen is skattn.ops_serving.attention_varlen; "
                "torch.ops.skattn.attention_with_kvcache, torch.ops.skattn.attention")
        subprocess.run([sys.executable, "-c", code], check=True)
