"""The custom op torch.ops.skattn.attention under the interpreter: opcheck, fake shapes, compile."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import skattn
import skattn.ops
from skattn import reference
from helpers import Block
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]


def make(B=1, Lq=3, Lk=40, Hq=4, Hkv=2, D=32, Dv=None, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, D if Dv is None else Dv, generator=g).to(dtype)
    return q, k, v


def op_args(q, k, v, mask=None, sinks=None, scale=None, causal=True, window=None, softcap=0.0,
            policy="auto"):
    return (q, k, v, mask, sinks, None, scale, causal, window, softcap, policy)


def test_opcheck():
    # sinks, a mask and a window together, so every optional argument is a real tensor
    q, k, v = make(Lk=20, D=16, seed=1)
    mask = torch.randn(1, 3, 20).clamp_max(0.5).to(torch.float16)
    mask[0, 1, :7] = float("-inf")
    args = op_args(q, k, v, mask=mask, sinks=torch.randn(4), window=9, scale=0.3)
    result = torch.library.opcheck(torch.ops.skattn.attention.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_inputs_that_want_a_gradient_are_refused_as_by_attention():
    # no autograd kernel: the dispatcher's fallback reaches the kernel, whose checks refuse
    # an input that requires grad while grad mode is on (skattn.attention's error); with
    # grad off the call runs and gives the plain call's output, with no graph
    q, k, v = make(Lk=20, D=16, seed=3)
    plain = skattn.ops.attention(q, k, v, causal=True)
    assert plain.grad_fn is None and not plain.requires_grad
    for wanting in ((q.clone().requires_grad_(), k, v), (q, k, v.clone().requires_grad_())):
        with pytest.raises(ValueError, match="requires grad: skattn's kernels are forward-only"):
            skattn.ops.attention(*wanting, causal=True)
    with torch.no_grad():
        off = skattn.ops.attention(q.clone().requires_grad_(), k, v, causal=True)
    with torch.inference_mode():
        inf = skattn.ops.attention(q, k, v, causal=True)
    for out in (off, inf):
        assert out.grad_fn is None and torch.equal(out, plain)


def test_op_matches_reference_and_eager_entry():
    q, k, v = make(Lq=5, Lk=37, Hq=10, Hkv=2, seed=2)  # ratio 5, Lk not a multiple of a block
    sinks = torch.randn(10)
    for policy in ("auto", "llamacpp", "llamacpp-before"):
        out = skattn.ops.attention(q, k, v, causal=True, sinks=sinks, policy=policy)
        ref = reference.attention(q, k, v, causal=True, sinks=sinks)
        assert out.shape == (1, 5, 10, 32) and out.dtype == q.dtype
        assert not torch.isnan(out).any()
        assert rel_err(out, ref) <= bound(q, k, v, causal=True), policy
    eager = skattn.attention(q, k, v, causal=True, sinks=sinks)
    assert rel_err(out, eager.double()) <= bound(q, k, v, causal=True)


def test_op_holds_no_workspace():
    # CUDA graphs of torch.compile own what the op allocates: no pool may keep it alive
    from skattn import buffers

    q, k, v = make(Lq=1, Lk=200, Hq=4, Hkv=1, D=16, seed=5)
    buffers.release()
    for policy in ("llamacpp", "llamacpp-before"):
        assert skattn.ops.plan_for(q, k, v, causal=True, policy=policy).fixup != "none"
        out = skattn.ops.attention(q, k, v, causal=True, policy=policy)
        assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v, causal=True)
    assert buffers.held_bytes() == 0


def test_policy_reaches_the_plan():
    q, k, v = make(Lq=1, Lk=64, Hq=4, Hkv=1, D=16)
    before = skattn.ops.plan_for(q, k, v, causal=True, policy="llamacpp-before")
    after = skattn.ops.plan_for(q, k, v, causal=True, policy="llamacpp")
    assert before.policy != after.policy
    assert skattn.ops.plan_for(q, k, v, causal=True, policy="llamacpp") is after  # cached


def test_fake_kernel_shapes():
    # Dk != Dv: the output takes v's head size; GQA ratio 3 (not a power of two)
    with FakeTensorMode():
        q = torch.empty(2, 7, 12, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 100, 4, 64, dtype=torch.bfloat16)
        v = torch.empty(2, 100, 4, 48, dtype=torch.bfloat16)
        out = torch.ops.skattn.attention(*op_args(q, k, v))
        assert out.shape == (2, 7, 12, 48) and out.dtype == torch.bfloat16
        q32 = torch.empty(2, 7, 12, 64, dtype=torch.float32)  # q in f32: out in f32
        assert torch.ops.skattn.attention(*op_args(q32, k, v)).dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.zeros(1, 40, 3, 32, dtype=torch.float16),
          v=torch.zeros(1, 40, 3, 32, dtype=torch.float16)), "multiple of k/v heads"),
    (dict(k=torch.zeros(1, 40, 2, 32), v=torch.zeros(1, 40, 2, 32)), "k must have dtype"),
    (dict(sinks=torch.zeros(3)), "sinks must have shape"),
    (dict(policy="fastest"), "policy must be one of"),
])
def test_bad_input_same_errors(bad, match):
    q, k, v = make()
    kw = dict(k=k, v=v, sinks=None, policy="auto")
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        skattn.ops.attention(q, kw["k"], kw["v"], causal=True, sinks=kw["sinks"],
                             policy=kw["policy"])
    if "policy" not in bad:  # skattn.attention raises the same
        with pytest.raises((ValueError, TypeError), match=match):
            skattn.attention(q, kw["k"], kw["v"], causal=True, sinks=kw["sinks"])
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises((ValueError, TypeError), match=match):
        torch.ops.skattn.attention(*op_args(q, kw["k"], kw["v"], sinks=kw["sinks"],
                                            policy=kw["policy"]))


def test_repeat_calls_are_checked_once(monkeypatch):
    # the op remembers checked signatures (as skattn.attention does): a repeat call skips
    # the checks, and anything the checks read (dtype, shape, options) makes a new one
    from skattn import checks

    calls = []
    real = checks.attention_args
    monkeypatch.setattr(checks, "attention_args", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make(Lk=24, D=16, seed=4)
    for _ in range(3):
        torch.ops.skattn.attention(*op_args(q, k, v, scale=0.25))
    assert len(calls) == 1
    torch.ops.skattn.attention(*op_args(q, k, v, scale=0.5))
    assert len(calls) == 2
    with pytest.raises((ValueError, TypeError), match="k must have dtype"):
        torch.ops.skattn.attention(*op_args(q, k.float(), v.float(), scale=0.25))
    with pytest.raises(ValueError, match="scale"):
        torch.ops.skattn.attention(*op_args(q, k, v, scale=float("nan")))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_no_graph_break(backend):
    torch.manual_seed(3)
    block = Block(64, 4, 2, 16).to(torch.float16)
    x = torch.randn(1, 3, 64, dtype=torch.float16)
    kc, vc = torch.randn(2, 1, 29, 2, 16, dtype=torch.float16)
    torch._dynamo.reset()
    with torch.no_grad():  # the op has no backward: the weights' gradients are refused
        explained = torch._dynamo.explain(block)(x, kc, vc)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        want = block(x, kc, vc)
        got = compiled(x, kc, vc)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the compiled graph runs the op again on fresh inputs (same shapes: no recompile)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x2, kc, vc), block(x2, kc, vc), rtol=0, atol=0)
    # with grad on, tracing reaches the op's checks: the same error as an eager call
    with pytest.raises(Exception, match="requires grad: skattn's kernels are forward-only"):
        torch.compile(block, fullgraph=True, backend=backend)(x, kc, vc)


def test_compile_with_a_symbolic_window():
    # torch.compile(dynamic=True) makes the window a symbolic int: the fake kernel traces
    # it without guarding on its value, so new windows reuse the graph
    from torch._dynamo.utils import counters

    q, k, v = make(Lk=40, D=16, seed=11)

    def step(q, k, v, window):
        return skattn.ops.attention(q, k, v, causal=True, window=window)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for window in (5, 9, 33):
        assert torch.equal(compiled(q, k, v, window), step(q, k, v, window))
    assert counters["stats"]["unique_graphs"] == 1
