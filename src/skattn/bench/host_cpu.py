"""The host path of an attention call on a CPU: Python time with the GPU launches stubbed.

`stub_gpu()` makes plans bound inside it take the CUDA path on CPU tensors: every kernel
"compiles" to a `FakeCompiled` whose launcher is Triton's own Python launcher class
(`CudaLauncher.__call__`) around a C launch function replaced by a counter. So a call runs
all of skattn's Python (checks, signatures, recipes, packing) and Triton's Python wrapper,
and none of the GPU's work nor the C launcher's (pointer lookups, `cuLaunchKernel`).
`stub_gpu(c_launcher=...)` lets recipes use skattn's C launcher (`skattn.launcher`) with
its driver call left out: "prepare" packs every launch's parameter block as a real call does
(for timing), "decode" also turns each launch back into the argument tuple Triton's launch
function would get (for tests: the same log as the Triton path). `measure()` times calls
under it; `tools/host_cpu.py` prints the table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import statistics
import struct
import time
from types import SimpleNamespace

import torch
from triton.backends.nvidia.driver import CudaLauncher

from skattn import launch, launcher, serving_launch, serving_recipe
from skattn.kernels import attention as _main
from skattn.kernels import dequant as _dequant
from skattn.kernels import fixup as _fixup
from skattn.kernels import ragged as _ragged
from skattn.kernels import ragged_fixup as _ragged_fixup
from skattn.kernels import worklist as _worklist

# llama-8b decode, n = 1, L = 256 on an H200's grid: a uniform plan, two launches a call
SHAPE = dict(batch=1, q_len=1, kv_len=256, q_heads=32, kv_heads=8, head_dim=128)
GRID = dict(sms=132, occupancy=2)
# llama-8b decode over a paged cache: 64 sequences of 4096 keys, pages of 16
SERVING = dict(batch=64, kv_len=4096, page_size=16, q_heads=32, kv_heads=8, head_dim=128)


class Counter:
    """The stand-in for the C launch function: counts calls, and keeps their arguments in
    `log` when that is a list."""

    def __init__(self):
        self.calls = 0
        self.log: list | None = None
        self.compiled: dict = {}  # function -> FakeCompiled

    def __call__(self, *args):
        self.calls += 1
        if self.log is not None:
            self.log.append(args)


@dataclasses.dataclass
class FakeCompiled:
    """What skattn reads of a Triton `CompiledKernel`."""

    run: CudaLauncher
    function: int
    packed_metadata: tuple
    const: dict
    src: object = None  # what the C launcher reads: the signature, in the kernel's order


class FakeKernel:
    """A stand-in for a `@triton.jit` function: `kernel[grid](*args, **const)` 'compiles'
    (a new `FakeCompiled` each call, as Triton's launcher returns its compiled kernel, with
    `function` a number unique to it) and launches."""

    def __init__(self, real, counter: Counter, first: int):
        self.arg_names = real.arg_names
        # the parameters with their defaults, as a JITFunction's `params` (an interpreted
        # function has none)
        self.params = getattr(real, "params", None) or [
            SimpleNamespace(name=p.name, default=p.default)
            for p in inspect.signature(real.fn).parameters.values()]
        self.counter = counter
        self.first = first
        self.compiles = 0

    def __getitem__(self, grid):
        def compile_and_launch(*args, **const):
            self.compiles += 1
            function = self.first + self.compiles
            r = CudaLauncher.__new__(CudaLauncher)  # Triton's Python wrapper, without a module
            r.num_ctas, r.launch = 1, self.counter
            r.global_scratch_size = r.global_scratch_align = 0
            r.profile_scratch_size = r.profile_scratch_align = 0
            r.launch_cooperative_grid, r.launch_pdl = False, bool(const.get("launch_pdl"))
            sig = {name: _type_of(a) for name, a in zip(self.arg_names, args)}
            sig.update({name: "constexpr" for name in self.arg_names[len(args):]})
            # the constants as the kernel sees them: a parameter left out at its default
            full = dict({p.name: p.default for p in self.params[len(args):]}, **const)
            ck = FakeCompiled(r, function, (const.get("num_warps", 4), 1, 0), full,
                              SimpleNamespace(signature=sig))
            self.counter.compiled[function] = ck
            self.counter(*grid, 0, function, *args)  # the JIT launcher's own launch
            return ck
        return compile_and_launch


def _type_of(a) -> str:
    """A stand-in kernel's parameter type: pointers, i1/i32/i64 by value, floats as fp64 (so
    that a decoded launch gives back the very number)."""
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -(1 << 31) <= a < (1 << 31) else "i64"
    if isinstance(a, float):
        return "fp64"
    return "*fp16"


DECODE = {"i1": "=b", "i32": "=i", "i64": "=q", "fp64": "=d"}


def c_launcher_stand_in(counter: Counter, decode: bool):
    """The function recipes launch their C launcher spec with: the real C module with its
    driver call left out; with `decode`, every launch is logged as Triton's launch tuple."""
    m = launcher.module()
    if m is None:
        raise RuntimeError("skattn's C launcher could not be built here")

    def prepare(spec, *values):
        done = m.prepare(spec, *values)
        if done:
            counter.calls += struct.unpack_from("=I", spec, 4)[0]
        return done

    def describe(spec, *values):
        launches = m.describe(spec, *values)
        if launches is None:  # pointers of another alignment
            return None
        for d in launches:
            counter.calls += 1
            ck = counter.compiled[d["function"]]
            params = iter(d["params"])
            args = []
            for name, ty in ck.src.signature.items():
                if ty == "constexpr":
                    args.append(ck.const.get(name))
                elif ty.startswith("*"):
                    args.append(struct.unpack("=Q", next(params))[0])
                else:
                    v = struct.unpack(DECODE[ty], next(params))[0]
                    args.append(bool(v) if ty == "i1" else v)
            assert [next(params), next(params)] == [bytes(8)] * 2  # no scratch
            if counter.log is not None:
                counter.log.append((*d["grid"], d["stream"], d["function"],
                                    bool(d["cooperative"]), bool(d["pdl"]), None, None,
                                    (d["block"] // 32, 1, d["shared"]), None, None, None, *args))
        return True

    return describe if decode else prepare


@contextlib.contextmanager
def stub_gpu(c_launcher: str | None = None):
    """Within: plans bound on CPU tensors take the CUDA path (dense and serving plans),
    kernels are `FakeKernel`s
    counting into one `Counter` (yielded), the current stream is 0 and the current device a CPU's (index None).
    Only plans first bound inside the context take the CUDA path. Recipes launch through
    Triton's C launch functions (stand-ins), or with `c_launcher` "prepare" or "decode"
    through skattn's C launcher (`c_launcher_stand_in`)."""
    counter = Counter()
    kernels = {(_main, "attention_kernel"): 1 << 20, (_fixup, "uniform_fixup_kernel"): 2 << 20,
               (_fixup, "general_fixup_kernel"): 3 << 20, (_dequant, "dequant_kernel"): 4 << 20,
               (_worklist, "work_list_kernel"): 5 << 20,
               (_ragged, "ragged_attention_kernel"): 6 << 20,
               (_ragged_fixup, "ragged_uniform_fixup_kernel"): 7 << 20,
               (_ragged_fixup, "ragged_general_fixup_kernel"): 8 << 20}
    saved = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    c_saved = {name: getattr(torch._C, name, None)
               for name in ("_cuda_getCurrentRawStream", "_cuda_getDevice")}
    real_bind, real_serving_bind = launch._bind, serving_launch._bind
    real_function = launcher.function
    compiled = dict(launch._COMPILED)
    try:
        if c_launcher is None:
            launcher.function = lambda: None
        else:
            fast = c_launcher_stand_in(counter, decode=c_launcher == "decode")
            launcher.function = lambda: fast
        for (mod, name), fn in kernels.items():
            setattr(mod, name, FakeKernel(getattr(mod, name), counter, fn))
        torch._C._cuda_getCurrentRawStream = lambda index: 0
        torch._C._cuda_getDevice = lambda: None  # a CPU device's index
        launch._bind = lambda plan, device: dataclasses.replace(real_bind(plan, device), cuda=True)
        serving_launch._bind = lambda plan, device: dataclasses.replace(
            real_serving_bind(plan, device), cuda=True)
        launch._COMPILED.clear()
        yield counter
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for name, fn in c_saved.items():
            if fn is None:
                delattr(torch._C, name)
            else:
                setattr(torch._C, name, fn)
        launch._bind, serving_launch._bind = real_bind, real_serving_bind
        launcher.function = real_function
        launch._COMPILED.clear()
        launch._COMPILED.update(compiled)


def per_call_us(fn, calls: int = 2000, reps: int = 7) -> float:
    """Median over `reps` runs of the mean microseconds per call of `fn` (after a warm-up)."""
    for _ in range(50):
        fn()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def launches(plan) -> int:
    """A plan's launches a call: the main kernel, a separate fixup, and the dequant route's
    pass over K and V before its 16-bit plan's; a serving plan's work-list step and its
    whole-tile build first."""
    if hasattr(plan, "work_list_words"):
        return 2 + (plan.fixup in ("uniform", "general")) + bool(plan.whole_tiles)
    runs = plan.dequant if getattr(plan, "dequant", None) is not None else plan
    return 1 + (runs.fixup in ("uniform", "general")) + 2 * (runs is not plan)


def measure(calls: int = 2000, reps: int = 7) -> dict:
    """Microseconds of Python per call on CPU tensors with the launches stubbed:
    `skattn.attention` planned and unplanned (the plan made for the interpreter's pretend
    GPU) through Triton's C launch functions (stand-ins) and through skattn's C launcher
    (its driver call left out), planned calls over FP8 K/V (as read, and on the dequant
    route: the pass's two launches first), `launch.run` alone (the path without a recipe),
    the custom op `torch.ops.skattn.attention` (dispatcher, remembered checks, `launch.run`
    with a workspace of its own), and the planned call's fixup and launches. Raises
    RuntimeError when a call does not make its plan's launches."""
    import skattn
    from skattn import api, ops, quant

    q = torch.randn(1, SHAPE["q_len"], SHAPE["q_heads"], SHAPE["head_dim"], dtype=torch.float16)
    k = torch.randn(1, SHAPE["kv_len"], SHAPE["kv_heads"], SHAPE["head_dim"], dtype=torch.float16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    scale = SHAPE["head_dim"] ** -0.5
    (k8, ks), (v8, vs) = quant.fp8(k), quant.fp8(v)
    result: dict = {}
    for c_launcher in (None, "prepare"):
        api._CHECKED.clear()  # recipes learned under the other stand-in
        with torch.no_grad(), stub_gpu(c_launcher) as counter:
            p = skattn.plan(causal=True, **SHAPE, **GRID)
            fp8 = {route: skattn.plan(causal=True, **SHAPE, **GRID, dtype=torch.float8_e4m3fn,
                                      tuning=skattn.Tuning(quant_route=route))
                   for route in ("native", "dequant")}
            rows = {
                "attention planned": (p, lambda: skattn.attention(q, k, v, causal=True, plan=p,
                                                                  out=out)),
                "attention unplanned": (None, lambda: skattn.attention(q, k, v, causal=True,
                                                                       out=out)),
                **{f"fp8 {'planned' if route == 'native' else 'route'}": (
                    pf, lambda pf=pf: skattn.attention(q, k8, v8, causal=True, plan=pf, out=out,
                                                       k_scale=ks, v_scale=vs))
                   for route, pf in fp8.items()},
            }
            if c_launcher is None:
                rows["launch.run"] = (p, lambda: launch.run(p, q, k, v, out, None, scale=scale))
                rows["custom op"] = ("op", lambda: torch.ops.skattn.attention(
                    q, k, v, None, None, None, None, True, None, 0.0, "auto", None, None))
            rows.update(_serving_rows())
            result.update(fixup=p.fixup, launches=launches(p))
            for name, (plan, fn) in rows.items():
                fn()
                before = counter.calls
                fn()
                made = counter.calls - before
                if plan is None:  # the plan the unplanned call made (cached per shape)
                    plan = next(r.plan for r in api._CHECKED.values() if r.plan is not p)
                elif plan == "op":  # the op's plan (cached per shape and policy)
                    plan = ops.plan_for(q, k, v, causal=True)
                elif plan == "serving":  # the plan an unplanned serving call made (cached)
                    plan = next(r.plan for r in serving_recipe.CHECKED.values()
                                if r.plan is not rows["serving planned"][0])
                if made != launches(plan):
                    raise RuntimeError(f"{name}: {made} launches for a {plan.fixup} plan")
                label = name if c_launcher is None else f"{name}, C launcher"
                result[label] = per_call_us(fn, calls, reps)
    api._CHECKED.clear()
    serving_recipe.CHECKED.clear()
    return result


def _serving_rows() -> dict:
    """`attention_with_kvcache` rows: llama-8b decode over 64 sequences of 4096 keys in pages
    of 16 (`SERVING`), planned with the caller's out and workspace, unplanned (the stream's
    pool), and through the custom op (a workspace of its own each call). A first call checks
    the values of the CPU lengths and page ids; repeat calls replay their recipes, as on a
    GPU."""
    import skattn
    import skattn.ops

    s = SERVING
    B, L, ps = s["batch"], s["kv_len"], s["page_size"]
    k = torch.zeros(B * L // ps, ps, s["kv_heads"], s["head_dim"], dtype=torch.float16)
    v = torch.zeros_like(k)
    table = torch.arange(B * L // ps, dtype=torch.int32).view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32)
    q = torch.zeros(B, 1, s["q_heads"], s["head_dim"], dtype=torch.float16)
    out = torch.empty_like(q)
    p = skattn.serving_plan(batch=B, q_len=1, max_kv_len=L, page_size=ps, max_pages=L // ps,
                            q_heads=s["q_heads"], kv_heads=s["kv_heads"],
                            head_dim=s["head_dim"], sms=GRID["sms"])
    wsb = skattn.serving.workspace(p, "cpu")
    kw = dict(cache_seqlens=lens, block_table=table)
    serving_recipe.CHECKED.clear()  # recipes learned under the other stand-in
    return {"serving planned": (p, lambda: skattn.attention_with_kvcache(
        q, k, v, **kw, plan=p, out=out, workspace=wsb)),
            "serving unplanned": ("serving", lambda: skattn.attention_with_kvcache(q, k, v, **kw)),
            "serving custom op": ("serving", lambda: skattn.ops.attention_with_kvcache(
                q, k, v, **kw))}
