"""Property-based differential test of quantized K/V under the interpreter: `skattn.attention`
over FP8 (per-tensor or per-head scales) and q8_0 K/V against float64 on the dequantized K/V,
over random small shapes, head sizes (multiples of 32, so 96 masks a block of a 128-wide
tile), GQA ratios, features, program counts, the V-reading switches (`Tuning.fp8_v_pairs`,
`Tuning.q8_0_v_blocks`), the dequant route (`Tuning.quant_route`: K/V written in f16 first,
then the 16-bit plan) and V magnitudes over five decades (small q8_0 scales are where p
times the scale could fall into f16's subnormals). Errors are bounded as in `test_fuzz.py`,
relative to PyTorch's own error on the dequantized K/V, for the whole output and row by row.
Runs from a fixed seed."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import skattn
from skattn import quant, reference
from tolerance import bounds, rel_err, row_rel_err

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter profile")


@st.composite
def cases(draw):
    form = draw(st.sampled_from(["fp8", "q8_0"]))
    hkv = draw(st.integers(1, 2))
    c = dict(form=form, B=draw(st.integers(1, 2)), Lq=draw(st.integers(1, 3)), Hkv=hkv,
             Hq=hkv * draw(st.sampled_from([1, 2, 4])), D=draw(st.sampled_from([32, 64, 96, 128])),
             Lk=draw(st.integers(1, 80)), causal=draw(st.booleans()),
             sinks=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 0.0, 20.0])),
             programs=draw(st.integers(1, 7)), pairs=draw(st.sampled_from([None, True, False])),
             v_size=draw(st.sampled_from([1e-3, 1e-2, 1.0, 30.0])),
             per_head=draw(st.booleans()), seed=draw(st.integers(0, 2**20)),
             route=draw(st.sampled_from(["native", "native", "dequant"])))
    if c["causal"] and c["Lq"] > c["Lk"]:
        c["Lq"] = c["Lk"]
    return c


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["B"], c["Lq"], c["Hq"], c["D"], generator=g).half()
    k = torch.randn(c["B"], c["Lk"], c["Hkv"], c["D"], generator=g).half()
    v = (torch.randn(c["B"], c["Lk"], c["Hkv"], c["D"], generator=g) * c["v_size"]).half()
    if c["form"] == "q8_0":
        return q, quant.q8_0(k), quant.q8_0(v), {}, skattn.Tuning(
            q8_0_v_blocks=c["pairs"], quant_route=c["route"])
    (kq, ks), (vq, vs) = (quant.fp8(x, per_head=c["per_head"]) for x in (k, v))
    tuning = skattn.Tuning(fp8_v_pairs=c["pairs"] is not False, quant_route=c["route"])
    return q, kq, vq, dict(k_scale=ks, v_scale=vs), tuning


@seed(20261203)
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_quantized_kv_against_float64(c):
    q, k, v, scales, tuning = _inputs(c)
    dtype = torch.float8_e4m3fn if c["form"] == "fp8" else "q8_0"
    feats = dict(causal=c["causal"], softcap=c["softcap"],
                 sinks=torch.randn(c["Hq"], generator=torch.Generator().manual_seed(c["seed"]))
                 if c["sinks"] else None)
    shape = dict(batch=c["B"], q_len=c["Lq"], kv_len=c["Lk"], q_heads=c["Hq"],
                 kv_heads=c["Hkv"], head_dim=c["D"], dtype=dtype, sms=4, occupancy=2,
                 causal=c["causal"], tuning=tuning)
    work = skattn.plan(**shape).work  # W: the program count may be up to it
    p = skattn.plan(**shape, programs=min(c["programs"], work))
    out = torch.full_like(q, float("nan"))
    skattn.attention(q, k, v, plan=p, out=out, **scales, **feats)
    ref = reference.attention(q, k, v, **scales, **feats)
    kd, vd = quant.dequantize_kv(k, v, scales.get("k_scale"), scales.get("v_scale"),
                                 dtype=torch.float16)
    assert not torch.isnan(out).any(), f"unwritten or NaN output ({c})"
    tol, row_tol = bounds(q, kd, vd, causal=c["causal"], ref=ref)
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.2e} ({c})"
    worst = row_rel_err(out, ref).max().item()
    assert worst <= row_tol, f"row error {worst:.2e} > {row_tol:.2e} ({c})"
