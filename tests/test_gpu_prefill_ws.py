"""The warp-specialised prompt-chunk kernel (`Tuning(prefill="ws")`, Gluon) on a Hopper GPU.

Every call is checked against the float64 reference with its output poisoned with NaN, on
fresh random inputs; the call must run the Gluon kernel.
"""
import pytest
import torch

import skattn
from skattn import api, launch, prefill_launch, reference
from skattn.bench.models import MODELS
from helpers import cuda_qkv as make
from helpers import assert_graph_replay_matches, check_plans, replays_only
from helpers import poisoned_call as check
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                       reason="warp specialisation and TMA need sm_90"),
]

WS = skattn.Tuning(prefill="ws")


def runs_ws(p, q, k, v) -> bool:
    b = launch.bind(p, q.device)
    features = (False, False, False, False, False, False, False)
    return (b.prefill is not None and b.prefill.kind == "ws"
            and prefill_launch.usable(b.prefill, features, k, v))


def plans(B, n, L, Hq, Hkv, D, dtype, causal=True):
    kw = dict(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=dtype,
              causal=causal, tuning=WS)
    out = {"auto": skattn.plan(**kw)}
    p = skattn.plan(policy="llamacpp-before", **kw)
    out[p.fixup] = p
    out["ping-pong"] = skattn.plan(**dict(kw, tuning=skattn.Tuning(prefill="ws",
                                                                   prefill_pingpong=True)))
    # the rows' sums of P the other way than by default (by MMA at head size 64)
    out["sums flipped"] = skattn.plan(**dict(kw, tuning=skattn.Tuning(prefill="ws",
                                                                      prefill_sum_mma=D > 64)))
    return out


@pytest.mark.parametrize("model", ["llama-8b", "qwen3-14b", "gpt-oss"])
@pytest.mark.parametrize("L", [8192, 12345])  # 12345: Lk not a multiple of any block size
def test_seed_shapes(model, L):
    Hq, Hkv, D = MODELS[model][:3]
    q, k, v = make(1, 512, L, Hq, Hkv, D, seed=L)
    ref = reference.attention(q, k, v, causal=True)
    tol = bound(q, k, v, causal=True)
    kinds = check_plans(q, k, v, plans(1, 512, L, Hq, Hkv, D, k.dtype), runs_ws, ref, tol,
                        f"{model} L={L}")
    assert kinds & {"general", "uniform"}, kinds


def test_bf16_sinks_lse_batch():
    # bf16, sinks and lse, two sequences, a cut plan (general fixup) where programs take two
    # tiles: pieces in both partial slots
    q, k, v = make(2, 300, 5000, 32, 4, 128, dtype=torch.bfloat16, seed=1)
    sinks = torch.randn(32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    p = skattn.plan(batch=2, q_len=300, kv_len=5000, q_heads=32, kv_heads=4, head_dim=128,
                    dtype=k.dtype, causal=True, programs=131,
                    tuning=skattn.Tuning(prefill="ws", prefill_pingpong=True))
    assert p.fixup == "general" and runs_ws(p, q, k, v)
    out = torch.full_like(q, float("nan"))
    out, lse = skattn.attention(q, k, v, causal=True, sinks=sinks, plan=p, out=out,
                                return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    tol = bound(q, k, v, causal=True)
    assert rel_err(out, ref) <= tol
    assert (lse.double() - ref_lse).abs().max() <= 20 * tol


def test_not_causal_and_f32_q():
    q, k, v = make(1, 256, 3000, 64, 8, 64, seed=3)
    for name, p in plans(1, 256, 3000, 64, 8, 64, k.dtype, causal=False).items():
        assert runs_ws(p, q, k, v), name
        for qq in (q, q.float()):
            out = check(qq, k, v, p, causal=False)
            ref = reference.attention(qq, k, v)
            assert rel_err(out, ref) <= bound(qq, k, v), name


@pytest.mark.parametrize("D, dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_growing_scores(D, dtype):
    # scores that climb along the keys: by 3 (log2 units) a 128-key block over the first
    # half, by 12 a block after, flat over the last 256 keys: every block rescales O and
    # the row sums; a rescale skipped or applied twice would overflow or shift lse
    B, n, L, Hkv = 1, 512, 8192, 8
    Hq = 64 if D == 64 else 32
    q, k, v = make(B, n, L, Hq, Hkv, D, dtype=dtype, seed=11)
    q[..., 0] = 4.0
    j = torch.arange(L, device="cuda", dtype=torch.float64)
    per_key = torch.where(j < L // 2, 3.0, 12.0) * (j < L - 256) / 128
    k[..., 0] = (torch.cumsum(per_key, 0) / (4.0 * D ** -0.5 * 1.4426950408889634)).to(
        dtype)[None, :, None]
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    tol = bound(q, k, v)
    p = skattn.plan(batch=B, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=dtype, causal=False, tuning=WS)
    assert runs_ws(p, q, k, v)
    out = torch.full_like(q, float("nan"))
    out, lse = skattn.attention(q, k, v, plan=p, out=out, return_lse=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= tol
    assert (lse.double() - ref_lse).abs().max() <= 20 * tol


@pytest.mark.parametrize("model, n, L", [("gpt-oss", 16, 8192), ("gpt-oss", 16, 12345),
                                         ("llama-70b", 12, 8192), ("qwen3-14b", 16, 9000),
                                         ("qwen3moe-30b-a3b", 16, 8192)])
def test_auto_decode_tiles_of_128_rows(model, n, L):
    # `auto` without a plan or Tuning: decode tiles of 128 rows run the warp-specialised
    # kernel, tiles cut into equal pieces (uniform fixup); sinks and lse (gpt-oss has both),
    # bf16 for one shape, a CUDA graph of a planned call
    Hq, Hkv, D = MODELS[model][:3]
    dtype = torch.bfloat16 if model == "llama-70b" else torch.float16
    q, k, v = make(1, n, L, Hq, Hkv, D, dtype=dtype, seed=L + n)
    sinks = torch.randn(Hq, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=dtype, causal=True)
    assert p.tuning.prefill == "ws" and p.fixup == "uniform" and runs_ws(p, q, k, v)
    ref, ref_lse = reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    tol = bound(q, k, v, causal=True)
    out = torch.full_like(q, float("nan"))
    out, lse = skattn.attention(q, k, v, causal=True, sinks=sinks, plan=p, out=out,
                                return_lse=True)
    assert rel_err(out, ref) <= tol and (lse.double() - ref_lse).abs().max() <= 20 * tol
    unplanned = skattn.attention(q, k, v, causal=True, sinks=sinks)
    assert rel_err(unplanned, ref) <= tol
    if model == "gpt-oss" and L == 8192:
        assert_graph_replay_matches(q, k, v, p)


def test_cuda_graph_replay():
    q, k, v = make(1, 512, 8192, 32, 8, 128, seed=4)
    p = skattn.plan(batch=1, q_len=512, kv_len=8192, q_heads=32, kv_heads=8, head_dim=128,
                    causal=True, tuning=WS)
    assert runs_ws(p, q, k, v)
    assert_graph_replay_matches(q, k, v, p)


def _keys(first, last=None) -> set:
    """The direct-launch keys (launch._COMPILED) that start with `first` (a bound plan's key
    number, or "dequant") and end with `last`."""
    return {key for key in launch._COMPILED
            if key[0] == first and (last is None or key[-1] == last)}


@pytest.mark.serial
def test_repeat_calls_launch_the_compiled_kernels():
    # after a key's first call the prompt kernel and the dequant pass of a routed quantized
    # call launch their compiled kernels directly (each call through its recipe), not
    # through Triton's JIT launcher: the same output
    # bit for bit, a new key for a misaligned q, and host time well below the JIT launcher's
    # (measured in the same test with a launch hook set, which sends every launch through it)
    from triton import knobs
    from skattn import quant
    from skattn.bench.host import per_call_us

    Hq, Hkv, D, n, L = 32, 8, 128, 128, 2072  # a shape no other test plans (its own keys)
    q, k, v = make(1, n, L, Hq, Hkv, D, seed=6)
    kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True)
    p = skattn.plan(**kw, dtype=k.dtype, tuning=WS)
    assert runs_ws(p, q, k, v)
    (kq, ks), (vq, vs) = quant.fp8(k), quant.fp8(v)
    routed = skattn.plan(**kw, dtype=torch.float8_e4m3fn,
                         tuning=skattn.Tuning(quant_route="dequant"))
    assert routed.dequant is not None
    calls = {
        "f16": (lambda: skattn.attention(q, k, v, causal=True, plan=p), k, v, {}),
        "fp8 routed": (lambda: skattn.attention(q, kq, vq, causal=True, plan=routed,
                                                k_scale=ks, v_scale=vs), *quant.dequantize_kv(
                                                    kq, vq, ks, vs, q.dtype), {}),
    }
    kid = launch.bind(p, q.device).kid
    firsts = {name: call() for name, (call, *_) in calls.items()}
    learned = len(_keys(kid, "ws"))
    assert learned >= 1 and _keys("dequant")
    for name, (call, kr, vr, _) in calls.items():
        ref = reference.attention(q, kr, vr, causal=True)
        assert rel_err(firsts[name], ref) <= bound(q, kr, vr, causal=True), name
        for _ in range(5):
            assert torch.equal(call(), firsts[name]), name
    # q 2 bytes off 16-byte alignment: a key of its own, still right
    q_off = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q)
    q_off.copy_(q)
    out = skattn.attention(q_off, k, v, causal=True, plan=p)
    assert len(_keys(kid, "ws")) == learned + 1
    assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v, causal=True)

    direct = {name: per_call_us(call, n=200, warmup=5) for name, (call, *_) in calls.items()}
    def hook(*args):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        jit = {name: per_call_us(call, n=200, warmup=5) for name, (call, *_) in calls.items()}
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    # measured on an H200, same run: f16 28.8 against 154.9 µs, the route 54.4 against 257.7
    # (each replaying its recipe)
    for name, most in (("f16", 0.5), ("fp8 routed", 0.5)):
        print(f"{name}: host {direct[name]:.1f} us a call, {jit[name]:.1f} through Triton's "
              f"JIT launcher")
        assert direct[name] < most * jit[name], name


def test_repeat_prompt_calls_replay_their_recipe():
    # the first planned call learns the recipe (launch.run); repeat calls replay it through
    # Triton's C launch functions, the K/V tensor maps made from each call's addresses: the
    # same output bit for bit, fresh K/V at other addresses right, the first K/V again (maps
    # made before) right, a misaligned q learned as a pattern of its own, CUDA graphs (of a
    # replayed call, and of a call that learns its recipe while captured)
    Hq, Hkv, D, n, L = 32, 8, 128, 192, 3000
    q, k, v = make(1, n, L, Hq, Hkv, D, seed=7)
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=k.dtype, causal=True, tuning=WS)
    assert runs_ws(p, q, k, v)
    first = skattn.attention(q, k, v, causal=True, plan=p)
    rec = next(r for r in api._CHECKED.values() if r.plan is p)
    assert rec.serves and len(rec.by_align) == 1
    (spec, launches), = rec.by_align.values()
    assert spec is None and len(launches) == 1 + (p.fixup in ("uniform", "general"))
    tol = bound(q, k, v, causal=True)
    assert rel_err(first, reference.attention(q, k, v, causal=True)) <= tol

    with replays_only():
        for _ in range(3):
            assert torch.equal(skattn.attention(q, k, v, causal=True, plan=p), first)
        for seed in (8, 9):
            q2, k2, v2 = make(1, n, L, Hq, Hkv, D, seed=seed)  # the same signature
            out = skattn.attention(q2, k2, v2, causal=True, plan=p)
            assert rel_err(out, reference.attention(q2, k2, v2, causal=True)) <= tol, seed
            del k2, v2
        assert torch.equal(skattn.attention(q, k, v, causal=True, plan=p), first)
    q_off = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q)
    q_off.copy_(q)
    for _ in range(2):  # learned through launch.run, then replayed
        out = skattn.attention(q_off, k, v, causal=True, plan=p)
        assert rel_err(out, reference.attention(q, k, v, causal=True)) <= tol
    assert len(rec.by_align) == 2
    assert_graph_replay_matches(q, k, v, p)  # its signature (out=, workspace=) learned captured
    assert_graph_replay_matches(q, k, v, p, replayed=True)


@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_routed_calls_replay_their_recipe(form):
    # a plan that dequantizes K/V first: repeat calls replay the pass's launches and the
    # 16-bit plan's (launch.run patched to raise), the same output bit for bit, fresh K/V at
    # other addresses right, a CUDA graph of a replayed call equal to the direct call and
    # right after new inputs are written into its tensors
    from skattn import quant

    Hq, Hkv, D, n, L = 32, 8, 128, 128, 2200
    pack = {"fp8": lambda x: quant.fp8(x), "q8_0": lambda x: (quant.q8_0(x), None)}[form]

    def inputs(seed):
        q, k, v = make(1, n, L, Hq, Hkv, D, seed=seed)
        (kq, ks), (vq, vs) = pack(k), pack(v)
        extra = {} if ks is None else dict(k_scale=ks, v_scale=vs)
        ref = reference.attention(q, *quant.dequantize_kv(kq, vq, ks, vs, q.dtype), causal=True)
        return q, kq, vq, extra, ref

    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=torch.float8_e4m3fn if form == "fp8" else "q8_0", causal=True,
                    tuning=skattn.Tuning(quant_route="dequant", prefill="ws"))
    assert p.dequant is not None
    q, kq, vq, extra, ref = inputs(13)
    first = skattn.attention(q, kq, vq, causal=True, plan=p, **extra)
    rec = next(r for r in api._CHECKED.values() if r.plan is p)
    assert rec.route and rec.serves and len(rec.by_align) == 1
    (_, launches), = rec.by_align.values()
    assert len(launches) == 3 + (p.dequant.fixup in ("uniform", "general"))
    tol = bound(q, *quant.dequantize_kv(kq, vq, extra.get("k_scale"), extra.get("v_scale"),
                                        q.dtype), causal=True)
    assert rel_err(first, ref) <= tol
    with replays_only():
        for _ in range(3):
            assert torch.equal(skattn.attention(q, kq, vq, causal=True, plan=p, **extra), first)
        q2, kq2, vq2, extra2, ref2 = inputs(14)
        out = skattn.attention(q2, kq2, vq2, causal=True, plan=p, **extra2)
        assert rel_err(out, ref2) <= tol
    ws, out = skattn.workspace(p), torch.empty_like(q)
    for _ in range(2):  # learns the signature with out= and workspace=, then replays it
        skattn.attention(q, kq, vq, causal=True, plan=p, out=out, workspace=ws, **extra)
    g = torch.cuda.CUDAGraph()
    with replays_only(), torch.cuda.graph(g):
        skattn.attention(q, kq, vq, causal=True, plan=p, out=out, workspace=ws, **extra)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)
    # new inputs written in place (a decode loop's pattern): the graph reads them
    pairs = [(q, q2), *((extra[name], extra2[name]) for name in extra)]
    for x, x2 in ((kq, kq2), (vq, vq2)):
        pairs += [(x.values, x2.values), (x.scales, x2.scales)] if form == "q8_0" else [(x, x2)]
    for x, x2 in pairs:
        x.copy_(x2)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref2) <= tol


def test_replays_with_sinks_lse_bf16():
    # bf16 (another element type in the tensor maps), sinks and lse (optional tensors among
    # the recipe's per-call addresses): the replay equals the first call bit for bit
    q, k, v = make(1, 160, 2500, 32, 8, 128, dtype=torch.bfloat16, seed=11)
    sinks = torch.randn(32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(12))
    p = skattn.plan(batch=1, q_len=160, kv_len=2500, q_heads=32, kv_heads=8, head_dim=128,
                    dtype=k.dtype, causal=True, tuning=WS)
    assert runs_ws(p, q, k, v)
    call = dict(causal=True, sinks=sinks, plan=p, return_lse=True)
    first, first_lse = skattn.attention(q, k, v, **call)

    with replays_only():
        out, lse = skattn.attention(q, k, v, **call)
    assert torch.equal(out, first) and torch.equal(lse, first_lse)
    ref, ref_lse = reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    tol = bound(q, k, v, causal=True)
    assert rel_err(out, ref) <= tol
    assert (lse.double() - ref_lse).abs().max() <= 20 * tol
