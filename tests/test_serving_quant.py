"""FP8 e4m3 K/V in the serving entry points under TRITON_INTERPRET=1 (docs/quant.md, "Serving"):
paged and packed caches against float64 on the dequantized K/V, the input rules, the plan."""
import pytest
import torch

import skattn
from skattn import quant, reference, serving_launch
from skattn.config import shared_bytes
from skattn.reference_serving import dequantize, gather_keys
from serving_inputs import (paged_cache, ragged_bound, randn, sequences_kvcache,
                            sequences_varlen, varlen_inputs)
from tolerance import rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

FP8 = torch.float8_e4m3fn
SMS, OCC = 4, 2  # a pretend GPU of 8 programs: tiles get cut into partials
NAN = float("nan")


def _fp8(x, per_head):
    """An fp8 cache of any layout [..., Hkv, D] and its scale ([1] or [Hkv])."""
    flat = x.reshape(1, -1, *x.shape[-2:])
    xq, s = quant.fp8(flat, per_head=per_head)
    return xq.reshape(x.shape), s


def _dequantized(x, s, dtype):
    """What the kernel multiplies (fp8 values are exact in f16) times the scale: the
    tolerance's inputs, in q's dtype."""
    return dequantize(x, s).to(dtype)


def _kv_plan(B, Lq, cap, Hq, Hkv, D, *, page_size=None, **kw):
    pages = dict(page_size=page_size, max_pages=cap // page_size) if page_size else {}
    return skattn.serving_plan(batch=B, q_len=Lq, max_kv_len=cap, q_heads=Hq, kv_heads=Hkv,
                               head_dim=D, sms=SMS, occupancy=OCC, block_n=16, dtype=FP8,
                               **pages, **kw)


@pytest.mark.parametrize("k_head, v_head", [(False, False), (True, True), (True, False)])
def test_paged_decode(k_head, v_head):
    # n = 1 over a paged fp8 cache: per-tensor, per-head and mixed scales; partials merged
    lens, Hq, Hkv, D = [37, 0, 50], 4, 2, 32
    k, v, bt = paged_cache(lens, page_size=16, hkv=Hkv, d=D, seed=1)
    (k8, ks), (v8, vs) = _fp8(k * 3, k_head), _fp8(v * 0.5, v_head)
    q = randn((3, 1, Hq, D), torch.Generator().manual_seed(2), torch.float16, "cpu")
    p = _kv_plan(3, 1, bt.shape[1] * 16, Hq, Hkv, D, page_size=16)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((3, 1, Hq, D), NAN, dtype=q.dtype)
    kept = [x.clone() for x in (q, k8.view(torch.uint8), v8.view(torch.uint8), ks, vs)]
    out, lse = skattn.attention_with_kvcache(q, k8, v8, cache_seqlens=lens_t, block_table=bt,
                                             plan=p, out=out, return_lse=True, k_scale=ks,
                                             v_scale=vs)
    ref, ref_lse = reference.attention_with_kvcache(q, k8, v8, cache_seqlens=lens_t,
                                                    block_table=bt, return_lse=True,
                                                    k_scale=ks, v_scale=vs)
    assert not torch.isnan(out).any()
    for a, b in zip(kept, (q, k8.view(torch.uint8), v8.view(torch.uint8), ks, vs)):
        assert torch.equal(a, b), "an input was modified"
    kd, vd = _dequantized(k8, ks, q.dtype), _dequantized(v8, vs, q.dtype)
    tol = ragged_bound(sequences_kvcache(q, kd, vd, lens, bt))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 20 * tol
    assert out[1].abs().max() == 0  # no key: 0


@pytest.mark.parametrize("paged", [False, True])
def test_varlen(paged):
    # mixed prefill and decode, packed or paged fp8 K/V, bf16 q, per-head K, per-tensor V
    lq, lk, Hq, Hkv, D = [3, 1], [20, 33], 4, 2, 32
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=Hq, hkv=Hkv, d=D, dtype=torch.bfloat16,
                                        seed=3)
    bt = None
    if paged:
        k, v, bt = paged_cache(lk, page_size=16, hkv=Hkv, d=D, dtype=torch.bfloat16, seed=4)
    (k8, ks), v8 = _fp8(k, True), v.to(FP8)
    p = skattn.serving_plan(batch=2, max_q_len=3, total_q=q.shape[0], max_kv_len=48,
                            q_heads=Hq, kv_heads=Hkv, head_dim=D, sms=SMS, occupancy=OCC,
                            block_n=16, dtype=FP8, total_k=None if paged else k.shape[0],
                            **(dict(page_size=16, max_pages=bt.shape[1]) if paged else {}))
    out = torch.full((q.shape[0], Hq, D), NAN, dtype=q.dtype)
    vs = torch.tensor(0.75) if paged else 0.75  # a 0-dim tensor, or a float
    out = skattn.attention_varlen(q, k8, v8, cu_q, cu_k, 3, 48, block_table=bt, plan=p,
                                  out=out, k_scale=ks, v_scale=vs)
    ref = reference.attention_varlen(q, k8, v8, cu_q, cu_k, 3, 48, block_table=bt,
                                     k_scale=ks, v_scale=vs)
    assert not torch.isnan(out).any()
    kd, vd = _dequantized(k8, ks, q.dtype), _dequantized(v8, 0.75, q.dtype)
    tol = ragged_bound(sequences_varlen(q, kd, vd, cu_q, cu_k, bt))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


def test_reference_dequantizes_exactly():
    k, v, bt = paged_cache([20], page_size=16, hkv=2, d=32, seed=5)
    (k8, ks), (v8, vs) = _fp8(k, True), _fp8(v, False)
    assert torch.equal(dequantize(k8, ks), k8.double() * ks.double()[:, None])
    assert torch.equal(dequantize(v8, vs), v8.double() * vs.double())
    q = randn((1, 2, 4, 32), torch.Generator().manual_seed(6), torch.float16, "cpu")
    lens = torch.tensor([20], dtype=torch.int32)
    a = reference.attention_with_kvcache(q, k8, v8, cache_seqlens=lens, block_table=bt,
                                         k_scale=ks, v_scale=vs)
    kd = gather_keys(dequantize(k8, ks), 20, block_table=bt)[None]
    vd = gather_keys(dequantize(v8, vs), 20, block_table=bt)[None]
    assert torch.equal(a, reference.attention(q, kd, vd, causal=True))


# -- the plan
def test_plan_knows_one_byte_kv():
    kw = dict(batch=8, q_len=1, max_kv_len=4096, q_heads=32, kv_heads=8, head_dim=128,
              page_size=16, sms=132, occupancy=2)
    p16, p8 = skattn.serving_plan(**kw), skattn.serving_plan(dtype=FP8, **kw)
    assert (p16.dtype, p8.dtype) == ("float16", "float8_e4m3fn")
    assert "float8_e4m3fn" in p8.describe()
    assert p8.geometry == p16.geometry  # the f16 tile configuration, half the K/V bytes
    assert shared_bytes(p8.geometry, kv_format=p8.dtype) < shared_bytes(p16.geometry)
    # a limit the default f16 configuration passes but its fp8 estimate fits: only fp8 keeps it
    tight = shared_bytes(p16.geometry, kv_format="float8_e4m3fn")
    t16, t8 = (skattn.serving_plan(dtype=d, smem_limit=tight, **kw) for d in (torch.float16, FP8))
    assert t8.geometry == p16.geometry and t16.geometry != p16.geometry
    with pytest.raises(ValueError, match="dtype is K/V's"):
        skattn.serving_plan(dtype=torch.float8_e5m2, **kw)


# -- bad input: clear errors before any launch
def _bad_case():
    lens, Hkv, D = [20], 2, 32
    k, v, bt = paged_cache(lens, page_size=16, hkv=Hkv, d=D, seed=7)
    q = randn((1, 1, 4, D), torch.Generator().manual_seed(8), torch.float16, "cpu")
    return q, k.to(FP8), v.to(FP8), bt, torch.tensor(lens, dtype=torch.int32)


def _at_odd_address(x):
    """x's values in a buffer that starts 1 byte past an allocation's start."""
    buf = torch.empty(x.numel() * x.element_size() + 1, dtype=torch.uint8)[1:]
    y = buf.view(x.dtype).view(x.shape)
    y.copy_(x)
    return y


@pytest.mark.parametrize("change, err, match", [
    (dict(v=lambda v: v[..., :18]), ValueError, "head size and strides must be multiples of 4"),
    (dict(v=_at_odd_address), ValueError, "multiple of 4 bytes"),
    (dict(k_scale=None), ValueError, "k_scale is required"),
    (dict(v_scale=None), ValueError, "v_scale is required"),
    (dict(k_scale=torch.ones(3)), ValueError, r"shape \[\], \[1\] or \[2\]"),
    (dict(v_scale=torch.ones(1, 2)), ValueError, "v_scale must have shape"),
    (dict(k_scale=torch.ones(2, dtype=torch.float16)), TypeError, "k_scale must have dtype"),
    (dict(k_scale=0.0), ValueError, "positive and finite"),
    (dict(v=lambda v: v.half()), TypeError, "v must have k's dtype"),
    (dict(k=lambda k: k.half(), v=lambda v: v.half()), ValueError,
     "k_scale applies to float8_e4m3fn K/V only"),
    (dict(q=lambda q: q.float()), TypeError, "q must be float16 or bfloat16 with quantized"),
    (dict(k=lambda k: k.view(torch.float8_e5m2), v=lambda v: v.view(torch.float8_e5m2)),
     TypeError, "float8_e5m2 K/V are not supported"),
    (dict(k=lambda k: quant.q8_0(k.half()), v=lambda v: quant.q8_0(v.half()), v_scale=None),
     ValueError, "k_scale must be None with q8_0 K/V"),
    (dict(k=lambda k: quant.q4_0(k.half()), v=lambda v: v.half(), k_scale=None,
          v_scale=None), TypeError, "k and v must both be skattn.quant.Q4_0 or neither"),
])
def test_kvcache_errors(monkeypatch, change, err, match):
    def no_launch(*a, **kw):
        raise AssertionError("launched")

    monkeypatch.setattr(serving_launch, "_launch", no_launch)
    q, k, v, bt, lens = _bad_case()
    args = dict(q=q, k=k, v=v)
    kw = dict(k_scale=torch.ones(1), v_scale=torch.ones(2))
    for name, value in change.items():
        if name in args:
            args[name] = value(args[name])
        else:
            kw[name] = value
    with pytest.raises(err, match=match):
        skattn.attention_with_kvcache(args["q"], args["k"], args["v"], cache_seqlens=lens,
                                      block_table=bt, **kw)
    if "scale" in match:  # the float64 reference has the same rules
        with pytest.raises(err, match=match):
            reference.attention_with_kvcache(args["q"], args["k"], args["v"],
                                             cache_seqlens=lens, block_table=bt, **kw)


def test_varlen_errors_and_plan_mixups(monkeypatch):
    monkeypatch.setattr(serving_launch, "_launch", lambda *a, **kw: pytest.fail("launched"))
    q, k, v, cu_q, cu_k = varlen_inputs([2], [20], hq=4, hkv=2, d=32, seed=9)
    k8, v8 = k.to(FP8), v.to(FP8)
    with pytest.raises(ValueError, match="v_scale is required"):
        skattn.attention_varlen(q, k8, v8, cu_q, cu_k, 2, 20, k_scale=1.0)
    with pytest.raises(ValueError, match=r"k_scale must have shape \[\], \[1\] or \[2\]"):
        skattn.attention_varlen(q, k8, v8, cu_q, cu_k, 2, 20, k_scale=torch.ones(4),
                                v_scale=1.0)
    with pytest.raises(TypeError, match="v must have k's dtype"):
        skattn.attention_varlen(q, k.half(), v8, cu_q, cu_k, 2, 20)
    with pytest.raises(ValueError, match="k must have 3 dimensions"):
        skattn.attention_varlen(q, k8[None], v8[None], cu_q, cu_k, 2, 20, k_scale=1.0,
                                v_scale=1.0)
    kw = dict(batch=1, max_q_len=2, total_q=2, max_kv_len=20, total_k=20, q_heads=4,
              kv_heads=2, head_dim=32, sms=SMS, occupancy=OCC)
    p16, p8 = skattn.serving_plan(**kw), skattn.serving_plan(dtype=FP8, **kw)
    with pytest.raises(ValueError, match="plan was made for dtype='float16'.*float8_e4m3fn"):
        skattn.attention_varlen(q, k8, v8, cu_q, cu_k, 2, 20, plan=p16, k_scale=1.0,
                                v_scale=1.0)
    with pytest.raises(ValueError, match="plan was made for dtype='float8_e4m3fn'.*float16"):
        skattn.attention_varlen(q, k, v, cu_q, cu_k, 2, 20, plan=p8)


def test_reference_takes_fp8_v_of_any_head_size():
    # the word-load rule (head size, strides, address multiples of 4) is the kernel's: the
    # float64 reference reads an FP8 V of head size 18 the kernel refuses
    q, k, v, bt, lens = _bad_case()
    v18 = v[..., :18]
    kw = dict(cache_seqlens=lens, block_table=bt, k_scale=torch.ones(1), v_scale=torch.ones(2))
    ref = reference.attention_with_kvcache(q, k, v18, **kw)
    assert ref.shape == (1, 1, 4, 18) and torch.isfinite(ref).all()
    with pytest.raises(ValueError, match="multiples of 4"):
        skattn.attention_with_kvcache(q, k, v18, **kw)
