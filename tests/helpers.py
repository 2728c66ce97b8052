"""Helpers shared by test files: bad FP8 arguments, random q, k, v on the GPU, a small
model block that calls skattn's custom op, GPU builds compiled in a subprocess, the
quantized caches' two write paths, and the stubbed GPU of the recipe tests."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import skattn
import skattn.ops
from tolerance import rel_err


def fp8_case(change: dict, q, k, v):
    """q, k, v and the keyword arguments of one bad-input case for FP8 K/V: `change` maps
    "q"/"k"/"v" to a function of that tensor and any other name to a keyword's value, over
    k_scale [1] and v_scale [2] that are right for two KV heads."""
    kw = dict(k_scale=torch.ones(1), v_scale=torch.ones(2))
    args = dict(q=q, k=k, v=v)
    for name, value in change.items():
        if name in args:
            args[name] = value(args[name])
        else:
            kw[name] = value
    return args["q"], args["k"], args["v"], kw


# bad FP8 arguments that skattn.attention and the custom op refuse alike, as (change for
# `fp8_case`, error type, message pattern), for two KV heads
FP8_ARG_ERRORS = [
    (dict(k_scale=None), ValueError, "k_scale is required"),
    (dict(v_scale=None), ValueError, "v_scale is required"),
    (dict(k_scale=torch.ones(3)), ValueError, r"shape \[\], \[1\] or \[2\]"),
    (dict(v_scale=torch.ones(2, dtype=torch.float16)), TypeError, "v_scale must have dtype"),
    (dict(k_scale=torch.ones(4)[::2]), ValueError, "contiguous"),
    (dict(k_scale=-1.0), ValueError, "positive and finite"),
    (dict(k_scale="1"), TypeError, "k_scale must be a float32 tensor"),
    (dict(q=lambda q: q.float()), TypeError, "q must be float16 or bfloat16 with quantized"),
    (dict(v=lambda v: v.half()), TypeError, "v must have k's dtype"),
    (dict(k=lambda k: k.view(torch.float8_e5m2), v=lambda v: v.view(torch.float8_e5m2)),
     TypeError, "float8_e5m2 K/V are not supported"),
    (dict(k=lambda k: k.view(torch.int8), v=lambda v: v.view(torch.int8)), TypeError,
     "int8 K/V are not supported"),
]


def cuda_qkv(B, Lq, Lk, Hq, Hkv, D, dtype=torch.float16, seed=0):
    """q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] of `dtype` on the GPU, standard normal."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, device="cuda", generator=g).to(dtype)
    return q, k, v


class Block(nn.Module):
    """QKV projection, skattn attention over a KV cache plus the new tokens, output projection."""

    def __init__(self, hidden, q_heads, kv_heads, head_dim):
        super().__init__()
        self.shape = q_heads, kv_heads, head_dim
        self.qkv = nn.Linear(hidden, (q_heads + 2 * kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(q_heads * head_dim, hidden, bias=False)

    def forward(self, x, k_cache, v_cache):
        hq, hkv, d = self.shape
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        k = torch.cat([k_cache, k.view(B, L, hkv, d)], dim=1)
        v = torch.cat([v_cache, v.view(B, L, hkv, d)], dim=1)
        o = skattn.ops.attention(q.view(B, L, hq, d), k, v, causal=True)
        return self.out(o.reshape(B, L, hq * d))


class FP8Block(Block):
    """`Block` over an FP8 KV cache: the new tokens' K/V are quantized with the cache's scales
    (f32 [1] or [Hkv]) and appended, and attention reads FP8 K/V with k_scale, v_scale."""

    def forward(self, x, k_cache, v_cache, k_scale, v_scale):
        hq, hkv, d = self.shape
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        fp8 = k_cache.dtype
        k8 = (k.view(B, L, hkv, d).float() / k_scale.reshape(-1, 1)).clamp(-448, 448).to(fp8)
        v8 = (v.view(B, L, hkv, d).float() / v_scale.reshape(-1, 1)).clamp(-448, 448).to(fp8)
        k = torch.cat([k_cache, k8], dim=1)
        v = torch.cat([v_cache, v8], dim=1)
        o = skattn.ops.attention(q.view(B, L, hq, d), k, v, causal=True, k_scale=k_scale,
                                 v_scale=v_scale)
        return self.out(o.reshape(B, L, hq * d))


def poisoned_call(q, k, v, p, **kw):
    """skattn.attention with plan p into an output poisoned with NaN (causal unless
    `causal=False`); fails where an element was not written."""
    out = torch.full((*q.shape[:3], v.shape[3]), float("nan"), device=q.device, dtype=q.dtype)
    skattn.attention(q, k, v, causal=kw.pop("causal", True), plan=p, out=out, **kw)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten output elements"
    return out


def check_plans(q, k, v, plans: dict, runs, ref, tol, label: str) -> set:
    """Each named plan's causal call (`poisoned_call`) within `tol` of `ref`, after
    `runs(p, q, k, v)` says it runs the kernel under test; the plans' fixup kinds."""
    kinds = set()
    for name, p in plans.items():
        assert runs(p, q, k, v), name
        err = rel_err(poisoned_call(q, k, v, p), ref)
        assert err <= tol, f"{label} {name} N={p.programs} {p.fixup}: {err:.2e} > {tol:.2e}"
        kinds.add(p.fixup)
    return kinds


@contextlib.contextmanager
def replays_only():
    """Within: a call of `skattn.launch.run` fails the test (every call must replay a
    recipe its signature learned before)."""
    from skattn import launch

    def no_launch_run(*args, **kw):
        raise AssertionError("a call went through launch.run, not its recipe")

    saved = launch.run
    launch.run = no_launch_run
    try:
        yield
    finally:
        launch.run = saved


def assert_graph_replay_matches(q, k, v, p, replayed: bool = False):
    """A CUDA graph of the causal call with plan p, replayed into a poisoned output, equals
    the direct call bit for bit. With `replayed`, the call's signature learns its recipe
    before the capture and the captured call must replay it (`replays_only`)."""
    ws = skattn.workspace(p)
    out = torch.empty_like(q)
    direct = skattn.attention(q, k, v, causal=True, plan=p).clone()
    for _ in range(2 if replayed else 0):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=ws)
    g = torch.cuda.CUDAGraph()
    with replays_only() if replayed else contextlib.nullcontext():
        with torch.cuda.graph(g):
            skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=ws)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, direct)


def capturing_compile_config():
    """(generate's CompileConfig, the list that fills with the graph's node targets): a
    fullgraph compile whose backend records what the one graph calls and runs it as is."""
    from transformers.generation import CompileConfig

    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # generate compiles on GPUs only by default
    return config, targets


def run_gpu_build(code: str, timeout: int = 600) -> str:
    """Run `code` in a subprocess without the interpreter (so kernels compile for a GPU,
    here without one) with `src` and `scripts` on the path; its stdout, after asserting it
    succeeded."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "scripts"),
                                         env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def main_ptx_counts(kv: str, const: str, values: tuple, needles: tuple) -> dict:
    """The sm_90 PTX of the decode main kernel (llama-8b heads, n = 1, K/V in `kv`),
    compiled here without a GPU with its compile-time constant `const` set to each of
    `values`: {value: [count of each needle]}, a needle being a tuple of substrings whose
    counts add up."""
    code = (
        "import triton, resources\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        f"p, fn, args, kw = resources._main_launch(128, 128, 1, 4, 4096, {kv!r})\n"
        f"for value in {tuple(values)!r}:\n"
        "    sig, consts, attrs = resources.signature(fn, args, kw)\n"
        f"    consts[{const!r}] = value\n"
        "    ck = triton.compile(ASTSource(fn, sig, consts, attrs),\n"
        "                        target=GPUTarget('cuda', 90, 32),\n"
        "                        options=dict(num_warps=kw['num_warps'],\n"
        "                                     num_stages=kw['num_stages']))\n"
        "    ptx = ck.asm['ptx']\n"
        f"    print(repr(value), *(sum(ptx.count(s) for s in n) for n in {tuple(needles)!r}))\n")
    out = run_gpu_build(code)
    rows = [line.split() for line in out.splitlines()[-len(values):]]
    assert [row[0] for row in rows] == [repr(v) for v in values], out
    return {v: [int(x) for x in row[1:]] for v, row in zip(values, rows)}


def write_path(monkeypatch, module, one: bool) -> list:
    """A quantized cache layer's writes through `skattn.quant_store` (`one`: one launch,
    counted in the list returned) or through torch operations (`module.one_launch` false,
    as inside torch.compile)."""
    from skattn import quant_store

    calls = []
    if one:
        for name in ("store_fp8", "store_q8_0"):
            real = getattr(quant_store, name)
            monkeypatch.setattr(quant_store, name,
                                lambda *a, real=real: calls.append(1) or real(*a))
    else:
        monkeypatch.setattr(module, "one_launch", lambda *a: False)
    return calls


@contextlib.contextmanager
def stubbed_gpu(monkeypatch, which: str, tables=()):
    """The stubbed GPU of the recipe tests (`host_cpu.stub_gpu`): recipes launch through
    Triton's C launch functions (stand-ins, `which` "triton") or skattn's C launcher, whose
    launches are decoded back into the tuples Triton's would get ("skattn"). Yields the
    counter, with `wrapped` counting calls through Triton's Python launcher; `tables` (dicts
    of recipes) and the workspace pools are emptied before and after."""
    from triton.backends.nvidia.driver import CudaLauncher

    from skattn import buffers
    from skattn.bench import host_cpu

    wrapped = []
    real = CudaLauncher.__call__
    monkeypatch.setattr(CudaLauncher, "__call__",
                        lambda self, *a: (wrapped.append(1), real(self, *a))[1])
    for t in tables:
        t.clear()
    buffers.release()
    c_launcher = "decode" if which == "skattn" else None
    with torch.no_grad(), host_cpu.stub_gpu(c_launcher) as counter:
        counter.wrapped = wrapped
        counter.c_launcher = c_launcher
        yield counter
    for t in tables:
        t.clear()
