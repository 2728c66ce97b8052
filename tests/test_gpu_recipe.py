"""On a GPU: repeat calls replay their recipes (`skattn.recipe`) through skattn's C launcher
(`skattn.launcher`). Each replayed output equals the first call's (`launch.run`, Triton's
launcher) bit for bit and matches float64, with fresh inputs, other alignments, a replaced
workspace pool, a CUDA graph and a thread with no CUDA context yet; the C launcher's
parameter blocks equal what Triton's launch functions would pack for the compiled kernels'
own signatures."""
import threading

import numpy as np
import pytest
import torch

import skattn
from skattn import api, launch, launcher, reference
from skattn import buffers as ws
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
H = dict(q_heads=32, kv_heads=8, head_dim=128)


def make(Lq, Lk, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Lq, 32, 128, device="cuda", generator=g).half()
    k = torch.randn(1, Lk, 8, 128, device="cuda", generator=g).half()
    v = torch.randn(1, Lk, 8, 128, device="cuda", generator=g).half()
    return q, k, v


def poisoned(q):
    return torch.full_like(q, float("nan"))


def served(p) -> bool:
    """Whether a remembered signature of plan `p` has learned launches it replays, each
    alignment's through the C launcher."""
    return any(r.serves and r.by_align and all(spec is not None for spec, _ in r.by_align.values())
               for r in api._CHECKED.values() if r.plan is p)


def plan(kind, Lq, Lk):
    kw = dict(batch=1, q_len=Lq, kv_len=Lk, causal=True, **H)
    return {"uniform": lambda: skattn.plan(policy="llamacpp", **kw),
            "general": lambda: skattn.plan(policy="llamacpp-before", **kw),
            "fused": lambda: skattn.plan(policy="llamacpp", fixup="fused", **kw),
            "none": lambda: skattn.plan(programs=8, **kw)}[kind]()


@pytest.mark.parametrize("kind", ["uniform", "general", "fused", "none"])
def test_replays_equal_the_first_call_and_float64(kind):
    q, k, v = make(4, 3000, seed=20)
    p = plan(kind, 4, 3000)
    assert p.fixup == kind
    outs = []
    for _ in range(3):  # the first learns the recipe through launch.run; the others replay
        out = poisoned(q)
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
        outs.append(out)
    assert served(p)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert rel_err(outs[0], reference.attention(q, k, v, causal=True)) <= bound(q, k, v,
                                                                                 causal=True)


def test_replays_with_every_optional_tensor():
    # lse, mask, sinks, ALiBi slopes and softcap: each an argument slot of its own
    q, k, v = make(4, 3000, seed=21)
    p = plan("uniform", 4, 3000)
    g = torch.Generator(device="cuda").manual_seed(22)
    mask = torch.randn(1, 4, 3000, device="cuda", generator=g).half()
    sinks = torch.randn(32, device="cuda", generator=g)
    slopes = skattn.alibi_slopes(32, 8.0).cuda()
    kw = dict(causal=True, mask=mask, sinks=sinks, alibi_slopes=slopes, softcap=30.0)
    results = []
    for _ in range(3):
        out = poisoned(q)
        _, lse = skattn.attention(q, k, v, plan=p, out=out, return_lse=True, **kw)
        results.append((out, lse))
    assert served(p)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    assert rel_err(results[0][0], ref) <= bound(q, k, v, causal=True) + 2e-3
    assert (results[0][1].double() - ref_lse).abs().max() < 0.05


def test_fresh_and_misaligned_inputs_read_their_own_addresses():
    p = plan("uniform", 1, 3000)
    for seed in range(30, 34):  # new tensors each call: a stale address would show
        q, k, v = make(1, 3000, seed)
        out = poisoned(q)
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
        assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v,
                                                                                causal=True)
    q, k, v = make(1, 3000, seed=35)
    buf = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    q_off = buf[1:].view_as(q)  # 2 bytes past a 16-byte boundary: other compiled kernels
    q_off.copy_(q)
    for _ in range(2):
        out = poisoned(q)
        skattn.attention(q_off, k, v, causal=True, plan=p, out=out)
        assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v,
                                                                                causal=True)
    assert served(p)


def test_a_replaced_pool_is_followed():
    small, big = plan("uniform", 1, 3000), plan("uniform", 16, 20000)
    q, k, v = make(1, 3000, seed=40)
    skattn.attention(q, k, v, causal=True, plan=small)
    skattn.attention(q, k, v, causal=True, plan=small)
    torch.cuda.synchronize()
    ws.release()  # only uncaptured work used the pools
    qb, kb, vb = make(16, 20000, seed=41)
    skattn.attention(qb, kb, vb, causal=True, plan=big)  # a new pool, sized for `big`
    out = poisoned(q)
    skattn.attention(q, k, v, causal=True, plan=small, out=out)
    assert served(small)
    assert rel_err(out, reference.attention(q, k, v, causal=True)) <= bound(q, k, v, causal=True)


def test_cuda_graph_of_a_replayed_call_with_a_caller_workspace():
    p = plan("uniform", 4, 3000)
    q, k, v = make(4, 3000, seed=50)
    out = torch.empty_like(q)
    buf = skattn.workspace(p)
    for _ in range(2):  # learn, then replay once before the capture
        skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=buf)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=buf)
    for seed in (51, 52):
        q2, k2, v2 = make(4, 3000, seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference.attention(q2, k2, v2, causal=True)) <= bound(
            q2, k2, v2, causal=True)


NUMPY = {"i1": np.int8, "i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64,
         "u1": np.uint8, "u8": np.uint8, "u16": np.uint16, "u32": np.uint32, "u64": np.uint64,
         "fp16": np.float16, "fp32": np.float32, "fp64": np.float64}


def triton_params(args):
    """The parameter bytes Triton's launch function packs for its argument tuple `args`
    (the compiled kernel's own signature; numpy's encodings), scratch pointers last."""
    ck = next(ck for ck, _ in launch._COMPILED.values() if ck.function == args[4])
    out = []
    for ty, a in zip(ck.src.signature.values(), args[13:], strict=True):
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            out.append(np.uint64(a or 0).tobytes())
        elif ty == "bf16":
            out.append((np.array([a], np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes())
        else:
            out.append(NUMPY[ty](a).tobytes())
    return out + [bytes(8), bytes(8)]


@pytest.mark.parametrize("kind", ["uniform", "general", "fused"])
def test_c_launcher_packs_what_triton_packs(kind):
    q, k, v = make(4, 3000, seed=60)
    p = plan(kind, 4, 3000)
    g = torch.Generator(device="cuda").manual_seed(61)
    mask = torch.randn(1, 4, 3000, device="cuda", generator=g).half()
    sinks = torch.randn(32, device="cuda", generator=g)
    out = poisoned(q)
    kw = dict(causal=True, plan=p, out=out, mask=mask, sinks=sinks, softcap=30.0, scale=0.1)
    for _ in range(2):
        skattn.attention(q, k, v, **kw)
    (rec,) = [r for r in api._CHECKED.values() if r.plan is p]
    stream = torch.cuda.current_stream().cuda_stream
    (spec, launches), vals = rec.values(stream, q, k, v, out, None, mask, sinks, None, None,
                                        None, None)
    described = launcher.module().describe(spec, *vals)
    assert len(described) == len(launches) == 1 + (kind != "fused")
    for d, (_, make_args) in zip(described, launches):
        args = make_args(vals)
        assert d["params"] == triton_params(args)
        warps, _, shared = args[9]
        assert (d["grid"], d["stream"], d["function"], d["block"], d["shared"], d["pdl"]) == (
            tuple(args[:3]), stream, args[4], 32 * warps, shared, int(bool(args[6])))


def test_a_thread_without_a_cuda_context_gets_a_correct_result():
    # a new thread has no current CUDA context until it makes one: the C launcher then
    # declines and the recipe launches through Triton's launch functions
    q, k, v = make(1, 3000, seed=70)
    p = plan("uniform", 1, 3000)
    skattn.attention(q, k, v, causal=True, plan=p)
    torch.cuda.synchronize()
    outs, errors = [], []

    def work():
        try:
            for _ in range(2):
                out = poisoned(q)
                skattn.attention(q, k, v, causal=True, plan=p, out=out)
                outs.append(out)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    ref = reference.attention(q, k, v, causal=True)
    for out in outs:
        assert rel_err(out, ref) <= bound(q, k, v, causal=True)
