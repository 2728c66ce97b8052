"""Bad input to the serving entry points, drawn at random: a valid call (dense or paged
`attention_with_kvcache`, packed or paged `attention_varlen`; 16-bit, FP8 or q8_0 K/V)
with a fault applied must raise TypeError or ValueError before anything is launched (the
work-list step and the kernels are watched), never another exception: every fault alone on
every call it applies to, then one to three at a time, drawn at random; the call without
them runs."""
import pytest
import torch
from hypothesis import HealthCheck, given, reject, seed, settings
from hypothesis import strategies as st

import skattn
from skattn import quant, serving_launch

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]
I32, F16 = torch.int32, torch.float16
B, LQ, HQ, HKV, D, PS = 2, 2, 4, 2, 32, 16
LENS = [20, 32]


def valid(api: str, paged: bool, form: str) -> dict:
    """Every argument of a valid call by name."""
    g = torch.Generator().manual_seed(0)
    if paged:
        shape = (5, PS, HKV, D)
    else:
        shape = (B, 40, HKV, D) if api == "kvcache" else (sum(LENS), HKV, D)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = dict(block_table=torch.tensor([[3, 1], [0, 4]], dtype=I32) if paged else None,
             causal=True)
    if form == "fp8":
        (k8, ks), (v8, vs) = quant.fp8(k.reshape(1, -1, HKV, D)), quant.fp8(
            v.reshape(1, -1, HKV, D), per_head=True)
        a.update(k=k8.reshape(shape), v=v8.reshape(shape), k_scale=ks, v_scale=vs)
    elif form == "q8_0":
        a.update(k=quant.q8_0(k.half()), v=quant.q8_0(v.half()))
    else:
        a.update(k=k.half(), v=v.half())
    if api == "kvcache":
        a.update(q=torch.randn(B, LQ, HQ, D, generator=g).half(),
                 cache_seqlens=torch.tensor(LENS, dtype=I32))
    else:
        a.update(q=torch.randn(2 * LQ, HQ, D, generator=g).half(),
                 cu_seqlens_q=torch.tensor([0, LQ, 2 * LQ], dtype=I32),
                 cu_seqlens_k=torch.tensor([0, LENS[0], sum(LENS)], dtype=I32),
                 max_seqlen_q=LQ, max_seqlen_k=max(LENS))
    return a


def call(api: str, a: dict):
    a = dict(a)
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    if api == "kvcache":
        return skattn.attention_with_kvcache(q, k, v, **a)
    pos = [a.pop(n) for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    return skattn.attention_varlen(q, k, v, *pos, **a)


def _set(**kw):
    return lambda a: dict(a, **kw)


def _with(name, fn):
    return lambda a: dict(a, **{name: fn(a[name])})


def _lens(a) -> str:
    return "cache_seqlens" if "cache_seqlens" in a else "cu_seqlens_k"


def _plain(a) -> bool:
    return isinstance(a["k"], torch.Tensor) and a["k"].dtype == F16


# (name, applies to (api, paged, form), the fault)
FAULTS = [
    ("q float64", None, _with("q", lambda q: q.double())),
    ("q int32", None, _with("q", lambda q: q.int())),
    ("q one dimension short", None, _with("q", lambda q: q[0])),
    ("q head size", None, _with("q", lambda q: q[..., :16])),
    ("q heads not a multiple", None, _with("q", lambda q: q[..., :3, :])),
    ("q last dim strided", None, _with("q", lambda q: torch.cat([q, q], -1)[..., ::2])),
    ("q requires grad", None, _with("q", lambda q: q.float().requires_grad_())),
    ("q a list", None, _with("q", lambda q: q.tolist())),
    ("k float32", "plain", _with("k", lambda k: k.float())),
    ("v bf16", "plain", _with("v", lambda v: v.bfloat16())),
    ("v head count", "plain", _with("v", lambda v: v[..., :1, :])),
    ("k none", None, _set(k=None)),
    ("k and v forms differ", "q8_0", lambda a: dict(a, v=a["v"].dequantize(F16))),
    ("fp8 without scales", "fp8", _set(k_scale=None, v_scale=None)),
    ("fp8 scale of 3 heads", "fp8", _set(k_scale=torch.ones(3))),
    ("fp8 scale f16", "fp8", _set(v_scale=torch.ones(1, dtype=F16))),
    ("scales with 16-bit K/V", "plain", _set(k_scale=torch.ones(1), v_scale=torch.ones(1))),
    ("q f32 over quantized K/V", "quantized", _with("q", lambda q: q.float())),
    ("lengths int64", None, lambda a: dict(a, **{_lens(a): a[_lens(a)].long()})),
    ("lengths a list", None, lambda a: dict(a, **{_lens(a): a[_lens(a)].tolist()})),
    ("lengths one short", None, lambda a: dict(a, **{_lens(a): a[_lens(a)][:-1]})),
    ("a length negative", "kvcache", _set(cache_seqlens=torch.tensor([-1, 3], dtype=I32))),
    ("a length past the cache", "kvcache", _set(cache_seqlens=torch.tensor([20, 41], dtype=I32))),
    ("offsets decreasing", "varlen", _set(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=I32))),
    ("offsets past q", "varlen", _set(cu_seqlens_q=torch.tensor([0, 2, 9], dtype=I32))),
    ("offsets start negative", "varlen", _set(cu_seqlens_q=torch.tensor([-1, 2, 4], dtype=I32))),
    ("max_seqlen_k too small", "varlen", _set(max_seqlen_k=31)),
    ("max_seqlen_q a float", "varlen", _set(max_seqlen_q=2.0)),
    ("max_seqlen_q zero", "varlen", _set(max_seqlen_q=0)),
    ("table int64", "paged", _with("block_table", lambda t: t.long())),
    ("table one row", "paged", _with("block_table", lambda t: t[:1])),
    ("table id past the pages", "paged", _with("block_table", lambda t: t * 0 + 5)),
    ("table id negative", "paged", _with("block_table", lambda t: t * 0 - 1)),
    ("table strided", "paged", _with("block_table", lambda t: torch.cat([t, t], 1)[:, ::2])),
    ("page size 24", "paged", lambda a: dict(a, k=_pages24(a["k"]), v=_pages24(a["v"]))),
    ("window 0", None, _set(window=0)),
    ("window without causal", None, _set(window=4, causal=False)),
    ("window a float", None, _set(window=4.5)),
    ("causal an int", None, _set(causal=1)),
    ("softcap nan", None, _set(softcap=float("nan"))),
    ("softcap negative", None, _set(softcap=-1.0)),
    ("scale nan", None, _set(scale=float("nan"))),
    ("scale inf", None, _set(scale=float("inf"))),
    ("sinks 3 heads", None, _set(sinks=torch.zeros(3))),
    ("sinks int", None, _set(sinks=torch.zeros(HQ, dtype=I32))),
    ("alibi 5 heads", None, _set(alibi_slopes=torch.ones(5))),
    ("return_lse an int", None, _set(return_lse=1)),
    ("out of another shape", None, lambda a: dict(a, out=torch.empty(3, 1, HQ, D, dtype=F16))),
    ("out of another dtype", None, lambda a: dict(a, out=torch.empty_like(a["q"]).float())),
    ("out in k's memory", "plain", lambda a: dict(a, out=_view_of(a["k"], a["q"]))),
    ("out overlaps itself", None,
     lambda a: dict(a, out=a["q"].new_empty(a["q"].shape[-1]).expand(a["q"].shape))),
    ("out partly over q", None, lambda a: dict(a, **_shifted(a["q"]))),
    ("k on the meta device", "plain", _with("k", lambda k: k.to("meta"))),
    ("lengths on the meta device", None,
     lambda a: dict(a, **{_lens(a): a[_lens(a)].to("meta")})),
    ("plan of another batch", None, lambda a: dict(a, plan=_other_plan(a))),
    ("plan a string", None, _set(plan="auto")),
    ("workspace a list", None, _set(workspace=[0])),
    ("work list int64", None, _set(work_list=torch.zeros(4096, dtype=torch.int64))),
]


def _pages24(x):
    """A paged cache of the same heads and size in pages of 24 keys."""
    if isinstance(x, quant.BLOCK_FORMS):
        return type(x)(torch.zeros(4, 24, *x.values.shape[2:], dtype=x.values.dtype),
                       torch.zeros(4, 24, *x.scales.shape[2:], dtype=x.scales.dtype))
    return torch.zeros(4, 24, *x.shape[2:], dtype=x.dtype)


def _shifted(q) -> dict:
    """q, and an out of its shape one row further into the same memory."""
    row = q[:1].numel()
    buf = torch.empty(q.numel() + row, dtype=q.dtype)
    buf[:q.numel()] = q.flatten()
    return dict(q=buf[:q.numel()].view(q.shape), out=buf[row:].view(q.shape))


def _view_of(x, like):
    """A tensor of `like`'s shape and dtype in x's memory (the front of its storage)."""
    need = like.numel() * like.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage())
    if raw.numel() < need:
        raise IndexError("too small")   # (the fault does not apply: rejected)
    return raw[:need].view(like.dtype).view(like.shape)


def _other_plan(a):
    kw = dict(batch=3, q_heads=HQ, kv_heads=HKV, head_dim=D, max_kv_len=64, sms=4, occupancy=2)
    if "cache_seqlens" in a:
        return skattn.serving_plan(q_len=LQ, **kw)
    return skattn.serving_plan(max_q_len=LQ, total_q=2 * LQ, **kw)


def applies(where, api: str, paged: bool, form: str) -> bool:
    quantized = form != "f16"
    return where in (None, api, form) or (where == "paged" and paged) or (
        where == "plain" and not quantized) or (where == "quantized" and quantized)


@pytest.fixture
def watched(monkeypatch):
    """Launches of the serving path (the work-list step, the kernels), counted."""
    seen = []
    for name in ("build", "run"):
        real = getattr(serving_launch, name)
        monkeypatch.setattr(serving_launch, name,
                            lambda *a, _real=real, **kw: (seen.append(1), _real(*a, **kw))[1])
    return seen


@pytest.mark.parametrize("api, paged", [("kvcache", False), ("kvcache", True),
                                        ("varlen", False), ("varlen", True)])
@pytest.mark.parametrize("form", ["f16", "fp8", "q8_0"])
def test_valid_calls_run(api, paged, form, watched):
    out = call(api, valid(api, paged, form))
    assert torch.isfinite(out).all() and watched


CONFIGS = [(api, paged, form) for api in ("kvcache", "varlen") for paged in (False, True)
           for form in ("f16", "fp8", "q8_0")]


@pytest.mark.parametrize("fault", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_alone(fault, watched):
    name, where, apply = fault
    tried = 0
    for api, paged, form in CONFIGS:
        if not applies(where, api, paged, form):
            continue
        try:
            a = apply(valid(api, paged, form))
        except IndexError:   # (a view that the call's tensors are too small to hold)
            continue
        watched.clear()
        with pytest.raises((TypeError, ValueError)):
            call(api, a)
        assert not watched, f"{name}: launched before refusing ({api}, paged={paged}, {form})"
        tried += 1
    assert tried, f"{name} applies to no call"


@seed(31)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_faults_raise_before_any_launch(data, watched):
    api = data.draw(st.sampled_from(("kvcache", "varlen")))
    paged = data.draw(st.booleans())
    form = data.draw(st.sampled_from(("f16", "fp8", "q8_0")))
    faults = [f for f in FAULTS if applies(f[1], api, paged, form)]
    chosen = data.draw(st.lists(st.sampled_from(faults), min_size=1, max_size=3,
                                unique_by=lambda f: f[0]))
    a = valid(api, paged, form)
    try:
        for _, _, fault in chosen:
            a = fault(a)
    except (AttributeError, TypeError, IndexError, RuntimeError):
        reject()   # a fault that cannot apply after another (q a list, then q float64)
    watched.clear()
    names = [f[0] for f in chosen]
    try:
        call(api, a)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"no error for {names} ({api}, paged={paged}, {form})")
    assert not watched, f"launched before refusing {names}"


@pytest.mark.parametrize("api", ["kvcache", "varlen"])
def test_out_may_be_q_but_not_in_k(api):
    # each tile's rows of q are read before its rows of out are written (a cut tile's by its
    # merge, after every piece), so q may take the output in place; K/V may not
    a = valid(api, True, "f16")
    want = call(api, a)
    q = a["q"].clone()
    assert torch.equal(call(api, dict(a, q=q, out=q)), want) and torch.equal(q, want)
    with pytest.raises(ValueError, match="out shares memory with k"):
        call(api, dict(a, out=_view_of(a["k"], a["q"])))
