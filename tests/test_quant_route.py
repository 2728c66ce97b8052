"""`Tuning(quant_route="dequant")`: FP8 and q8_0 K/V written in q's dtype first, then the
16-bit plan of the same call (`Plan.dequant`) runs; under the interpreter, against float64
on the dequantized K/V, and the one pass's values bit for bit."""
from dataclasses import replace

import pytest
import torch

import skattn
from skattn import launch, quant, reference
from tolerance import bound, rel_err

FP8 = torch.float8_e4m3fn
DEQUANT = skattn.Tuning(quant_route="dequant")


def _plan(q, Lk, Hkv, dtype, **kw):
    B, Lq, Hq, D = q.shape
    return skattn.plan(batch=B, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                       dtype=dtype, sms=4, occupancy=2, causal=True, **kw)


def test_plan_carries_the_16_bit_plan():
    q = torch.zeros(1, 64, 8, 64, dtype=torch.float16)
    for dtype in (FP8, "q8_0"):
        p = _plan(q, 300, 2, dtype, tuning=DEQUANT, programs=3)
        f16 = _plan(q, 300, 2, torch.float16)
        assert p.dtype == quant_name(dtype) and p.programs == 3 and p.tuning == DEQUANT
        assert p.dequant == f16  # the call's plan in f16, not the caller's program count
        assert skattn.workspace(p, device="cpu").numel() >= f16.workspace_bytes
    assert _plan(q, 300, 2, "q4_0", tuning=DEQUANT).dequant is None  # FP8 and q8_0 only
    assert _plan(q, 300, 2, FP8).dequant is None  # by default: 256 rows a KV head, native
    assert "route: K and V written" in p.describe() and f16.describe() in p.describe()
    with pytest.raises(ValueError, match="quant_route"):
        skattn.Tuning(quant_route="fast")
    # the 16-bit plan keeps the call's GPU, fastdiv and tuning (but the route)
    t = skattn.Tuning(quant_route="dequant", pdl=False, tile_order="index")
    B, Lq, Hq, D = q.shape
    p = skattn.plan(batch=B, q_len=Lq, kv_len=300, q_heads=Hq, kv_heads=2, head_dim=D,
                    dtype=FP8, sms=4, blocks_per_sm=3, causal=True, fastdiv=False, tuning=t)
    assert p.dequant.occupancy == 3 and p.dequant.fastdiv is False
    assert p.dequant.tuning == skattn.Tuning(pdl=False, tile_order="index")


def test_auto_routes_long_chunks_whose_16_bit_plan_runs_a_prompt_kernel():
    from skattn.quant_route import ROUTE_KEYS, ROUTE_ROWS

    rows, L = ROUTE_ROWS // 4, ROUTE_KEYS  # query rows a KV head: q_len x 4
    q = torch.zeros(1, rows, 8, 128, dtype=torch.float16)
    for dtype in (FP8, "q8_0"):
        p = _plan(q, L, 2, dtype)
        assert p.dequant == _plan(q, L, 2, torch.float16)
        assert p.dequant.tuning.prefill == "ws" and p.tuning == skattn.Tuning()
        assert p == replace(_plan(q, L, 2, dtype, tuning=DEQUANT), tuning=skattn.Tuning())
        native = skattn.Tuning(quant_route="native")
        assert _plan(q, L, 2, dtype, tuning=native).dequant is None
    assert _plan(q[:, 1:], L, 2, FP8).dequant is None              # a row short
    assert _plan(q, L - 1, 2, FP8).dequant is None                 # a key short
    assert _plan(q, L, 2, "q4_0").dequant is None                  # q4_0 stays native
    assert _plan(q, L, 2, FP8, programs=8).dequant is None         # the caller's launch
    assert _plan(q, L, 2, FP8, block_n=32).dequant is None
    assert _plan(q, L, 2, FP8, num_warps=4).dequant is None
    assert _plan(q, L, 2, FP8, policy="llamacpp").dequant is None  # not auto
    assert _plan(q, L, 2, FP8, policy="llamacpp-master").dequant is None
    # no prompt kernel in 16 bits: a window, a mask, head sizes it does not take, other
    # tuning (the 16-bit plan keeps it: the base kernel), a prompt kernel asked for but refused
    assert _plan(q, L, 2, FP8, window=512).dequant is None
    assert _plan(q, L, 2, FP8, has_mask=True).dequant is None
    assert _plan(q[..., :96], L, 2, "q8_0").dequant is None
    assert _plan(q, L, 2, FP8, tuning=skattn.Tuning(pdl=False)).dequant is None
    assert _plan(q, L, 2, FP8, window=512, tuning=skattn.Tuning(prefill="ws")).dequant is None
    # arguments the planner refuses get its own errors, not the route's
    with pytest.raises(ValueError, match="q_heads"):
        _plan(q[:, :, :7], L, 2, FP8)
    with pytest.raises(ValueError, match="positive|q_len"):
        skattn.plan(batch=1, q_len=None, kv_len=L, q_heads=8, kv_heads=2, head_dim=128,
                    dtype=FP8, sms=4, occupancy=2)


def test_a_mask_is_checked_against_the_plan_that_runs(monkeypatch):
    # the 16-bit plan's tiles may need more shared memory for a mask than the quantized
    # plan's: the checks ask both
    from skattn import checks

    q = torch.zeros(1, 64, 8, 64, dtype=torch.float16)
    p = _plan(q, 300, 2, FP8, tuning=DEQUANT)
    asked = []
    monkeypatch.setattr(checks, "plan_mask", lambda plan, mask, dev: asked.append(plan))
    k = torch.zeros(1, 300, 2, 64, dtype=FP8)
    skattn.attention(q, k, k, causal=True, plan=p, mask=torch.zeros(1, 64, 300),
                     k_scale=1.0, v_scale=1.0)
    assert asked == [p, p.dequant]


def quant_name(dtype):
    return "float8_e4m3fn" if dtype is FP8 else dtype


@pytest.mark.parametrize("form, per_head, qdtype", [("fp8", False, torch.float16),
                                                    ("fp8", True, torch.float16),
                                                    ("q8_0", None, torch.float16),
                                                    ("q8_0", None, torch.bfloat16)])
def test_dequant_route_against_float64(monkeypatch, form, per_head, qdtype):
    # a strided view of a larger cache (the pass reads rows at the cache's strides); lse too
    passes = []
    real = launch.dequantize
    monkeypatch.setattr(launch, "dequantize", lambda *a: passes.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 96, generator=g).to(qdtype)
    k, v = (torch.randn(2, 70, 2, 96, generator=g).half() * 3 for _ in range(2))
    if form == "fp8":
        (kq, ks), (vq, vs) = (quant.fp8(x, per_head=per_head) for x in (k, v))
        big = torch.zeros(2, 90, 2, 96, dtype=FP8)
        big[:, :70] = kq
        kq, scales = big[:, :70], dict(k_scale=ks, v_scale=vs)
    else:
        kq, vq, scales = quant.q8_0(k), quant.q8_0(v), {}
    p = _plan(q, 70, 2, FP8 if form == "fp8" else "q8_0", tuning=DEQUANT)
    out = torch.full_like(q, float("nan"))
    out, lse = skattn.attention(q, kq, vq, causal=True, plan=p, out=out, return_lse=True,
                                **scales)
    assert passes == [p.dtype, p.dtype]  # K and V, one pass each
    ref, ref_lse = reference.attention(q, kq, vq, causal=True, return_lse=True, **scales)
    kd, vd = quant.dequantize_kv(kq, vq, scales.get("k_scale"), scales.get("v_scale"),
                                 dtype=qdtype)
    k_factor = 6.0 if qdtype == torch.bfloat16 else 3.0  # the interpreter's bf16 truncation
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True, k_factor=k_factor)
    native = _plan(q, 70, 2, p.dtype if form == "q8_0" else FP8)
    _, lse_native = skattn.attention(q, kq, vq, causal=True, plan=native, return_lse=True,
                                     **scales)
    err = (lse - ref_lse).abs().max().item()
    assert err <= max(2e-3, 2 * (lse_native - ref_lse).abs().max().item()), err


@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_the_pass_rounds_once(form):
    # FP8: x times its f32 scale rounded to f32 then to q's dtype (the exact product rounded
    # as an f32 multiply does); q8_0: int8 times the f16 block scale, exact in f32, one rounding
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 33, 3, 64, generator=g).half() * 7
    x[:, :, 1] *= 40
    if form == "fp8":
        xq, s = quant.fp8(x, per_head=True)
        vals, scales, want = xq, s, quant.dequantize_fp8(xq, s)
    else:
        xq = quant.q8_0(x)
        vals, scales, want = xq.values, xq.scales, xq.dequantize(torch.float64)
    got = launch.dequantize(vals, scales, quant_name(FP8) if form == "fp8" else "q8_0",
                            torch.float16)
    assert got.is_contiguous() and torch.equal(got, want.float().half())


def test_the_pass_compiles_for_sm90():
    # the pass's kernel for an H100/H200, compiled here without a GPU: FP8 and q8_0 rows of
    # head size 128 into f16
    from helpers import run_gpu_build

    code = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from skattn.kernels.dequant import dequant_kernel\n"
        "for fmt, x, s in ((1, '*fp8e4nv', '*fp32'), (2, '*i8', '*fp16')):\n"
        "    sig = dict(X=x, XS=s, O='*fp16', rows='i32', L='i32', H='i32', sxb='i64',\n"
        "               sxl='i64', sxh='i64', **dict.fromkeys(\n"
        "                   ('D', 'BLOCK_D', 'FORMAT', 'HEAD_SCALES', 'BLOCK_R'), 'constexpr'))\n"
        "    consts = dict(D=128, BLOCK_D=128, FORMAT=fmt, HEAD_SCALES=1, BLOCK_R=16)\n"
        "    ck = triton.compile(ASTSource(dequant_kernel, sig, consts),\n"
        "                        target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))\n"
        "    print(fmt, ck.asm['ptx'].count('st.global'))\n")
    lines = run_gpu_build(code).split("\n")[-3:-1]
    assert [line.split()[0] for line in lines] == ["1", "2"], lines
    assert all(int(line.split()[1]) > 0 for line in lines), lines


@pytest.mark.parametrize("entry", ["attention", "op"])
def test_unplanned_calls_take_the_route_by_default(monkeypatch, entry):
    # 128 rows x 4 heads a KV head: `auto` routes (here from 64 keys, to keep the interpreter
    # short); the custom op too
    import skattn.ops
    from skattn import api, quant_route

    monkeypatch.setattr(quant_route, "ROUTE_KEYS", 64)
    for mod, names in ((api, ("_CHECKED",)), (skattn.ops, ("_CHECKED", "_RECIPES"))):
        for name in names:  # recipes of their own, dropped after the test
            monkeypatch.setattr(mod, name, {})
    for cached in (api._cached_plan, skattn.ops._cached_plan):  # plans made before the patch
        cached.cache_clear()
    passes = []
    real = launch.dequantize
    monkeypatch.setattr(launch, "dequantize", lambda *a: passes.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 128, 8, 64, generator=g).half()
    (kq, ks), (vq, vs) = (quant.fp8(torch.randn(1, 96, 2, 64, generator=g).half())
                          for _ in range(2))
    call = skattn.attention if entry == "attention" else skattn.ops.attention
    out = call(q, kq, vq, causal=True, k_scale=ks, v_scale=vs)
    for cached in (api._cached_plan, skattn.ops._cached_plan):  # no routed plan kept
        cached.cache_clear()
    assert passes == ["float8_e4m3fn"] * 2
    ref = reference.attention(q, kq, vq, causal=True, k_scale=ks, v_scale=vs)
    kd, vd = quant.dequantize_kv(kq, vq, ks, vs, dtype=q.dtype)
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True, k_factor=3.0)


def test_run_plan_follows_the_plan_that_runs():
    # the float64 stream-K replay of a routed plan walks its 16-bit plan (the workspace the
    # routed plan reports is that plan's)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 64, 8, 64, generator=g).double()
    k, v = (torch.randn(1, 300, 2, 64, generator=g).double() for _ in range(2))
    p = _plan(q, 300, 2, FP8, tuning=DEQUANT)
    assert p.dequant.workspace_floats != replace(p, dequant=None).workspace_floats
    got = reference.run_plan(p, q, k, v, causal=True)
    assert torch.allclose(got, reference.attention(q, k, v, causal=True), atol=1e-12)


def test_the_route_keeps_the_call_s_features():
    # sinks, softcap, ALiBi slopes, lse and a caller's strided `out` reach the 16-bit plan
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 9, 4, 64, generator=g).half()
    k, v = (torch.randn(1, 80, 2, 64, generator=g).half() for _ in range(2))
    (kq, ks), (vq, vs) = quant.fp8(k), quant.fp8(v)
    extra = dict(sinks=torch.randn(4, generator=g), softcap=15.0,
                 alibi_slopes=torch.rand(4, generator=g) * 0.1)
    p = _plan(q, 80, 2, FP8, tuning=DEQUANT)
    big = torch.full((1, 9, 4, 128), float("nan"), dtype=q.dtype)
    out = big[..., :64]  # rows 128 apart: a strided output
    _, lse = skattn.attention(q, kq, vq, causal=True, plan=p, out=out, return_lse=True,
                              k_scale=ks, v_scale=vs, **extra)
    ref, ref_lse = reference.attention(q, kq, vq, causal=True, return_lse=True, k_scale=ks,
                                       v_scale=vs, **extra)
    kd, vd = quant.dequantize_kv(kq, vq, ks, vs, dtype=q.dtype)
    assert torch.isnan(big[..., 64:]).all()  # nothing written beside the view
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True, k_factor=3.0)
    assert (lse - ref_lse).abs().max().item() <= 2e-3
