"""llama.cpp's block forms (q8_0, q4_0: `skattn.quant.Q8_0`, `Q4_0`) in the serving entry points
under TRITON_INTERPRET=1: paged, dense and packed caches against float64 on the dequantized
K/V (docs/quant.md, "Serving")."""
import pytest
import torch

import skattn
from skattn import Tuning, quant, reference, serving_launch
from skattn.reference_serving import gather_keys
from serving_inputs import (paged_cache, ragged_bound, randn, sequences_kvcache,
                            sequences_varlen, varlen_inputs)
from tolerance import rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

SMS, OCC = 4, 2  # a pretend GPU of 8 programs: tiles get cut into partials
NAN = float("nan")
FORMS = ("q8_0", "q4_0")


def _pack(form, x):
    return getattr(quant, form)(x)


def _check(out, ref, seqs, kept, now):
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    for a, b in zip(kept, now):
        assert torch.equal(a, b), "an input was modified"
    # Triton 3.6's interpreter truncates f32 -> bf16 (the GPU rounds to nearest): K/V
    # dequantized to bf16 carry twice the rounding error here (as tests/test_quant.py)
    tol = ragged_bound(seqs, k_factor=6.0 if out.dtype == torch.bfloat16 else 3.0)
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)


def _tensors(*caches):
    return [t for c in caches for t in (c.values, c.scales)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("page_size, lq, d, fixup, occ, v_blocks", [(16, 1, 64, None, 3, False),
                                                                    (32, 3, 96, None, OCC, False),
                                                                    (48, 1, 64, "fused", OCC, False),
                                                                    (16, 2, 96, None, OCC, True)])
def test_paged(form, page_size, lq, d, fixup, occ, v_blocks):
    # a paged block cache in a random page order: an empty sequence, a long one, cut tiles
    # merged by the general or the fused fixup; head size 96 masks columns of its 128-wide
    # tiles; three programs an SM (the main kernel built under a register cap); q8_0 V as
    # int8 pairs with its scales on p (`Tuning.q8_0_v_blocks`)
    lens, hq, hkv = [37, 0, 90, 5], 4, 2
    k, v, bt = paged_cache(lens, page_size=page_size, hkv=hkv, d=d, seed=1)
    kq, vq = _pack(form, k * 2), _pack(form, v)
    q = randn((4, lq, hq, d), torch.Generator().manual_seed(2), torch.float16, "cpu")
    p = skattn.serving_plan(batch=4, q_len=lq, max_kv_len=bt.shape[1] * page_size, q_heads=hq,
                            kv_heads=hkv, head_dim=d, sms=SMS, occupancy=occ, block_n=16,
                            dtype=form, page_size=page_size, max_pages=bt.shape[1], fixup=fixup,
                            tuning=Tuning(q8_0_v_blocks=v_blocks))
    assert p.dtype == form and form in p.describe()
    main_const = serving_launch.bind(p, q.device).main_const
    assert main_const["V_PAIRS"] == (v_blocks and form == "q8_0")
    assert ("maxnreg" in serving_launch.bind(p, q.device).main_const) == (occ == 3)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kept = [x.clone() for x in (q, *_tensors(kq, vq))]
    out = torch.full((4, lq, hq, d), NAN, dtype=q.dtype)
    out, lse = skattn.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t, block_table=bt,
                                             plan=p, out=out, return_lse=True)
    ref, ref_lse = reference.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t,
                                                    block_table=bt, return_lse=True)
    kd, vd = kq.dequantize(q.dtype), vq.dequantize(q.dtype)
    _check(out, ref, sequences_kvcache(q, kd, vd, lens, bt), kept, (q, *_tensors(kq, vq)))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert out[1].abs().max() == 0  # no key: 0


@pytest.mark.parametrize("form", FORMS)
def test_dense_cache_unplanned(form):
    # a dense [B, Lmax, Hkv, D] block cache with lengths below its capacity; the plan made
    # from the call (cached per shape)
    g = torch.Generator().manual_seed(3)
    k, v = (randn((2, 40, 2, 64), g, torch.float16, "cpu") for _ in range(2))
    kq, vq = _pack(form, k), _pack(form, v)
    q = randn((2, 1, 4, 64), g, torch.float16, "cpu")
    lens = [40, 17]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = skattn.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t)
    ref = reference.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t)
    kd, vd = kq.dequantize(q.dtype), vq.dequantize(q.dtype)
    _check(out, ref, sequences_kvcache(q, kd, vd, lens), [], [])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("paged", [False, True])
def test_varlen(form, paged):
    # mixed prefill and decode rows, packed or paged block K/V, bf16 q (dequantized to bf16)
    lq, lk, hq, hkv, d = [3, 1, 0], [20, 33, 4], 4, 2, 64
    q, k, v, cu_q, cu_k = varlen_inputs(lq, lk, hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16,
                                        seed=4)
    bt = None
    if paged:
        k, v, bt = paged_cache(lk, page_size=16, hkv=hkv, d=d, dtype=torch.bfloat16, seed=5)
    kq, vq = _pack(form, k), _pack(form, v)
    out = torch.full((q.shape[0], hq, d), NAN, dtype=q.dtype)
    out = skattn.attention_varlen(q, kq, vq, cu_q, cu_k, 3, 48, block_table=bt, out=out)
    ref = reference.attention_varlen(q, kq, vq, cu_q, cu_k, 3, 48, block_table=bt)
    kd, vd = kq.dequantize(q.dtype), vq.dequantize(q.dtype)
    _check(out, ref, sequences_varlen(q, kd, vd, cu_q, cu_k, bt), [], [])


@pytest.mark.parametrize("form", FORMS)
def test_reference_dequantizes_by_blocks(form):
    # the float64 reference gathers a sequence's values and scales, then dequantizes them
    k, v, bt = paged_cache([20], page_size=16, hkv=2, d=32, seed=6)
    kq, vq = _pack(form, k), _pack(form, v)
    q = randn((1, 2, 4, 32), torch.Generator().manual_seed(7), torch.float16, "cpu")
    lens = torch.tensor([20], dtype=torch.int32)
    a = reference.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, block_table=bt)
    kd = gather_keys(kq.dequantize(torch.float64), 20, block_table=bt)[None]
    vd = gather_keys(vq.dequantize(torch.float64), 20, block_table=bt)[None]
    assert torch.equal(a, reference.attention(q, kd, vd, causal=True))


def test_plan_rules():
    kw = dict(batch=8, q_len=1, max_kv_len=4096, q_heads=32, kv_heads=8, page_size=16,
              sms=132, occupancy=2)
    for form in FORMS:
        assert skattn.serving_plan(head_dim=128, dtype=form, **kw).dtype == form
        with pytest.raises(ValueError, match="multiples of 32"):
            skattn.serving_plan(head_dim=80, dtype=form, **kw)
