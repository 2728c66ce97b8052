"""The custom op torch.ops.skattn.attention with quantized K/V under the interpreter: FP8 with
k_scale/v_scale and q8_0 caches; opcheck, float64 on the dequantized K/V, compile, errors."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import skattn
import skattn.ops
from skattn import quant, reference
from helpers import FP8_ARG_ERRORS, FP8Block, fp8_case
from tolerance import bound, rel_err

FP8 = torch.float8_e4m3fn

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]


def make(Lq=3, Lk=40, Hq=4, Hkv=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Lq, Hq, D, generator=g).half()
    k = torch.randn(1, Lk, Hkv, D, generator=g) * (1 + torch.arange(Hkv))[:, None]  # head scales differ
    v = torch.randn(1, Lk, Hkv, D, generator=g)
    return q, k, v


def op_args(q, k, v, k_scale, v_scale, mask=None, sinks=None, scale=None, window=None):
    return (q, k, v, mask, sinks, None, scale, True, window, 0.0, "auto", k_scale, v_scale)


def check(out, q, k, v, k_scale=None, v_scale=None, **kw):
    """The op's output vs float64 on the dequantized K/V, with the tolerance of q's dtype."""
    ref = reference.attention(q, k, v, k_scale=k_scale, v_scale=v_scale, causal=True, **kw)
    kd, vd = quant.dequantize_kv(k, v, k_scale, v_scale, q.dtype)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True)


def test_opcheck_fp8():
    # per-head k_scale, per-tensor [] v_scale, with a mask and sinks so every optional is real
    q, k, v = make(Lk=20, seed=1)
    (k8, ks), (v8, vs) = quant.fp8(k, per_head=True), quant.fp8(v)
    mask = torch.randn(1, 3, 20).clamp_max(0.5).half()
    args = op_args(q, k8, v8, ks, vs.reshape(()), mask=mask, sinks=torch.randn(4), scale=0.3)
    # opcheck's test_schema compares inputs with torch.allclose, which float8 lacks on the
    # CPU: the other three here, and what test_schema checks (no input written, the output
    # aliases none) by hand below
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(torch.ops.skattn.attention.default, args, test_utils=utils)
    assert set(result.values()) == {"SUCCESS"} and len(result) == 3, result
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.view(torch.uint8).clone() if a.dtype == FP8 else a.clone() for a in tensors]
    out = torch.ops.skattn.attention(*args)
    for a, b in zip(tensors, before):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b)
        assert out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_opcheck_q8_0():
    # a q8_0 cache at the op: int8 values in k/v, their f16 block scales in k_scale/v_scale
    q, k, v = make(Lk=20, seed=2)
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    args = op_args(q, kq.values, vq.values, kq.scales, vq.scales)
    result = torch.library.opcheck(torch.ops.skattn.attention.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("per_head, policy", [(True, "auto"), (False, "llamacpp-before")])
def test_fp8_matches_reference(per_head, policy):
    # Lk not a multiple of a block, GQA ratio 2; llamacpp-before splits tiles (fixups carry V's scale)
    q, k, v = make(Lq=2, Lk=37, seed=3)
    (k8, ks), (v8, vs) = quant.fp8(k, per_head=per_head), quant.fp8(v, per_head=per_head)
    p = skattn.ops.plan_for(q, k8, v8, causal=True, policy=policy)
    assert p.dtype == "float8_e4m3fn"
    out = skattn.ops.attention(q, k8, v8, causal=True, k_scale=ks, v_scale=vs, policy=policy)
    check(out, q, k8, v8, ks, vs)
    eager = skattn.attention(q, k8, v8, causal=True, k_scale=ks, v_scale=vs)
    assert rel_err(out, eager.double()) <= bound(q, *quant.dequantize_kv(k8, v8, ks, vs, q.dtype),
                                                 causal=True)


def test_fp8_float_scales_and_cache_view():
    # float scales become [1] tensors; K as a strided view [:, :Lk, :Hkv] of a larger cache
    q, k, v = make(Lk=33, seed=4)
    big = torch.randn(1, 50, 3, 32).to(FP8)
    big[:, :33, :2] = k.to(FP8)
    k8, v8 = big[:, :33, :2], v.to(FP8)
    out = skattn.ops.attention(q, k8, v8, causal=True, k_scale=0.5, v_scale=2.0)
    check(out, q, k8, v8, 0.5, 2.0)
    same = skattn.ops.attention(q, k8, v8, causal=True, k_scale=torch.tensor(0.5),
                                v_scale=torch.tensor([2.0]))
    assert torch.equal(out, same)


def test_q8_0_matches_reference():
    q, k, v = make(Lk=45, D=64, seed=5)
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    assert skattn.ops.plan_for(q, kq, vq, causal=True).dtype == "q8_0"
    out = skattn.ops.attention(q, kq[:, :41], vq[:, :41], causal=True)  # a view of the cache
    check(out, q, kq[:, :41], vq[:, :41])


def test_fake_kernel_shapes_quantized():
    with FakeTensorMode():
        q = torch.empty(2, 5, 8, 64, dtype=torch.bfloat16)
        k8 = torch.empty(2, 100, 4, 64, dtype=FP8)
        v8 = torch.empty(2, 100, 4, 48, dtype=FP8)
        out = torch.ops.skattn.attention(*op_args(q, k8, v8, torch.ones(4), torch.ones(1)))
        assert out.shape == (2, 5, 8, 48) and out.dtype == torch.bfloat16
        kv = torch.empty(2, 100, 4, 64, dtype=torch.int8)
        s = torch.empty(2, 100, 4, 2, dtype=torch.float16)
        out = torch.ops.skattn.attention(*op_args(q, kv, kv, s, s))
        assert out.shape == (2, 5, 8, 64) and out.dtype == torch.bfloat16


def _fp8_pair():
    q, k, v = make(Lq=2, Lk=20)
    return q, k.to(FP8), v.to(FP8)


@pytest.mark.parametrize("change, err, match", [
    *FP8_ARG_ERRORS,
    (dict(k=lambda k: k.half(), v=lambda v: v.half()), ValueError,
     "k_scale applies to float8_e4m3fn K/V only"),
])
def test_fp8_errors_as_skattn_attention(change, err, match):
    q, k, v, kw = fp8_case(change, *_fp8_pair())
    with pytest.raises(err, match=match):
        skattn.attention(q, k, v, causal=True, **kw)
    with pytest.raises(err, match=match):
        skattn.ops.attention(q, k, v, causal=True, **kw)
    if all(isinstance(x, torch.Tensor) or x is None for x in kw.values()):
        # the fake kernel raises the same while tracing
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(err, match=match):
            torch.ops.skattn.attention(*op_args(q, k, v, kw["k_scale"], kw["v_scale"]))


def test_q8_0_errors_as_skattn_attention():
    q, k, v = make(Lq=2, Lk=20)
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    cases = [
        ((q, kq, v.half()), {}, TypeError, "both be skattn.quant.Q8_0"),
        ((q, kq, vq), dict(k_scale=torch.ones(1)), ValueError, "k_scale must be None with q8_0"),
        ((q.float(), kq, vq), {}, TypeError, "q must be float16 or bfloat16"),
    ]
    for args, kw, err, match in cases:
        for fn in (skattn.attention, skattn.ops.attention):
            with pytest.raises(err, match=match):
                fn(*args, causal=True, **kw)
    # at the op: int8 values with misshapen block scales, and a q8_0 k with an fp8 v
    with pytest.raises(ValueError, match="Q8_0 scales must have shape"):
        torch.ops.skattn.attention(*op_args(q, kq.values, vq.values, kq.scales[:, :10], vq.scales))
    with pytest.raises(TypeError, match="both be skattn.quant.Q8_0"):
        torch.ops.skattn.attention(*op_args(q, kq.values, v.to(FP8), kq.scales, torch.ones(1)))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_fp8_cache(backend):
    torch.manual_seed(6)
    block = FP8Block(64, 4, 2, 16).to(torch.float16).requires_grad_(False)
    x = torch.randn(1, 3, 64, dtype=torch.float16)
    (kc, ks), (vc, vs) = (quant.fp8(torch.randn(1, 29, 2, 16), per_head=True) for _ in range(2))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, kc, vc, ks, vs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    with torch.no_grad():
        want = block(x, kc, vc, ks, vs)
        got = compiled(x, kc, vc, ks, vs)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # new scale values: read from the tensors, not baked into the graph
        ks2, vs2 = ks * 1.5, vs * 0.5
        torch.testing.assert_close(compiled(x, kc, vc, ks2, vs2), block(x, kc, vc, ks2, vs2),
                                   rtol=0, atol=0)
        assert not torch.equal(block(x, kc, vc, ks2, vs2), want)


def test_compile_fullgraph_q8_0_cache():
    # a Q8_0 passes into compiled code as its two tensors; slicing it (a view of the cache) and
    # the op trace into one graph
    q, k, v = make(Lk=40, seed=7)
    kc, vc = quant.q8_0(k), quant.q8_0(v)

    def step(q, kc, vc, length: int):
        return skattn.ops.attention(q, kc[:, :length], vc[:, :length], causal=True) * 2

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(q, kc, vc, 30)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, kc, vc, 30)
    assert torch.equal(got, step(q, kc, vc, 30))
    check(got / 2, q, kc[:, :30], vc[:, :30])


def test_scales_that_want_a_gradient_are_refused():
    # fp8 scales and a block form's scales are inputs too: with grad on, one that requires
    # grad is refused before any launch (skattn.attention and the op alike); with grad off
    # the call runs
    from skattn import quant

    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 4, 32, generator=g).half()
    k, v = torch.randn(2, 1, 20, 2, 32, generator=g)
    (k8, ks), (v8, vs) = quant.fp8(k), quant.fp8(v)
    for call in (skattn.attention, skattn.ops.attention):
        with pytest.raises(ValueError, match="k_scale requires grad"):
            call(q, k8, v8, causal=True, k_scale=ks.clone().requires_grad_(), v_scale=vs)
        with torch.no_grad():
            call(q, k8, v8, causal=True, k_scale=ks.clone().requires_grad_(), v_scale=vs)
    kq, vq = quant.q8_0(k), quant.q8_0(v)
    wanting = quant.Q8_0(vq.values, vq.scales.clone().requires_grad_())
    with pytest.raises(ValueError, match="v.scales requires grad"):
        skattn.attention(q, kq, wanting, causal=True)
