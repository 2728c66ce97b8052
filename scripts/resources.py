"""Registers, spills and shared memory of skattn's kernels for sm_90, compiled here (no GPU).

  python3 scripts/resources.py llama-8b 1 32768 [programs=128] [fixup=fused] [num_stages=4]
                                             [stamps=1]  # with the per-program time stamps
                                             [pdl_wait=0]  # main kernel as Tuning(pdl_wait=False)
  python3 scripts/resources.py --shape 256 256 4     # D Dv n, 16 query heads on 1 KV head
  python3 scripts/resources.py --shape 128 128 1 q8_0        # K/V float8_e4m3fn, q8_0, q4_0
  python3 scripts/resources.py --grid [--jobs=2] [--heads=128,192/128] [--features=mask,window]
                                      [--kv=float8_e4m3fn]
      # shared memory of every distinct main-kernel configuration the planner picks over
      # head sizes x features x query tokens x GQA ratios (JSON lines, then a summary)

Runs the planner and the launcher with CPU tensors, captures each kernel launch, compiles it
ahead of time for an H100/H200 (sm_90a) and runs Triton's own ptxas -v on the PTX. `--grid`
compiles only as far as Triton's shared-memory allocation (what `OutOfResources` compares
with the device's limit at launch), a few seconds a configuration.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import skattn
from skattn import launch
from skattn.config import SM90_SHARED_LIMIT, shared_bytes
from skattn.kernels import attention, fixup
from skattn.bench.models import MODELS

TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
         torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8",
         torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv"}
KV_FORMATS = ("float16", "float8_e4m3fn", "q8_0", "q4_0")
BLOCK_FORMATS = {"q8_0": (torch.int8, 1), "q4_0": (torch.uint8, 2)}  # values' dtype, values a byte


def kv_inputs(kv: str, L: int, H: int, D: int, Dv: int) -> tuple:
    """(k, v, launch.run's k_scale/v_scale keywords, the plan's dtype) of K/V in form `kv`."""
    if kv in BLOCK_FORMATS:
        dt, per_byte = BLOCK_FORMATS[kv]
        k, v = (torch.empty(1, L, H, d // per_byte, dtype=dt) for d in (D, Dv))
        scales = dict(k_scale=torch.empty(1, L, H, D // 32, dtype=torch.float16),
                      v_scale=torch.empty(1, L, H, Dv // 32, dtype=torch.float16))
        return k, v, scales, kv
    dtype = getattr(torch, kv)
    k, v = (torch.empty(1, L, H, d, dtype=dtype) for d in (D, Dv))
    if kv == "float16":
        return k, v, {}, dtype
    return k, v, dict(k_scale=torch.ones(1), v_scale=torch.ones(1)), dtype


class Capture:
    def __init__(self, fn, name):
        self.fn, self.name, self.calls = fn, name, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def signature(fn, args, kw):
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kw.items() if k in names})
    if "INTERPRET" in values:  # captured from CPU tensors, compiled for the GPU
        values["INTERPRET"] = False
    for i, name in enumerate(names):
        v = values[name] if name in values else fn.params[i].default  # (defaulted diagnostics)
        if isinstance(v, torch.Tensor):  # (a keyword tensor too: the stamps)
            sig[name] = TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v is None or name in fn.constexprs or i in fn.constexprs or names[i] in kw:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and fn.params[i].do_not_specialize:
            sig[name] = "i32"
        elif isinstance(v, int) and v == 1:  # as Triton: an argument of 1 is a constant
            sig[name], consts[name] = "constexpr", 1
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0:  # as Triton: 0 is divisible by 16 too
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, consts, attrs


def ptxas(ptx: str) -> dict:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    res = subprocess.run([os.path.join(bin_dir, "ptxas"), f"-arch={arch}", "-v", f.name, "-o",
                          os.devnull], capture_output=True, text=True)
    text = res.stderr + res.stdout
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    return dict(regs=int(regs[-1]) if regs else None, spill_bytes=int(spill[-1]) if spill else None)


def build(fn, args, kw):
    """Triton's sm_90a build of one captured launch (its warps, stages and register cap)."""
    sig, consts, attrs = signature(fn, args, kw)
    opts = {k: kw[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kw}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=opts)


def compile_launch(fn, args, kw, loops: bool = False):
    """Shared memory, registers, spills and PDL wait of one launch's sm_90a build; with
    `loops`, also its innermost MMA loops (`sass_loop.mma_loops`: the KV loop's variants,
    unmasked blocks first) as `loop_instructions`, and the local-memory accesses (spills)
    inside them, `loop_spills`."""
    ck = build(fn, args, kw)
    info = dict(shared=ck.metadata.shared, **ptxas(ck.asm["ptx"]),
                pdl_wait="griddepcontrol.wait" in ck.asm["ptx"])
    if loops:
        import sass_loop  # (it imports this module)

        bodies = sass_loop.mma_loops(sass_loop.disassemble(ck.asm["cubin"]), innermost=True)
        info["loop_instructions"] = [len(b) for b in bodies]
        info["loop_spills"] = sum(n for b in bodies for op, n in sass_loop.opcodes(b).items()
                                  if op.startswith(("STL", "LDL")))
    return info


def _main_launch(D: int, Dv: int, n: int, heads: int, kv_len: int, kv: str, **overrides):
    """(plan, kernel, args, kwargs) of the default main kernel's launch for one KV head, at two
    programs an SM (a named occupancy: q8_0 decode tiles keep four warps, as PERF.md's loop
    counts were taken). `overrides`: `skattn.plan` keywords (block_n, num_warps, occupancy,
    tuning, ...)."""
    k, v, scales, dtype = kv_inputs(kv, kv_len, 1, D, Dv)
    p = skattn.plan(batch=1, q_len=n, kv_len=kv_len, q_heads=heads, kv_heads=1, head_dim=D,
                    head_dim_v=Dv, causal=True, sms=132, dtype=dtype,
                    **{"occupancy": 2, **overrides})
    q = torch.zeros(1, n, heads, D, dtype=torch.float16)
    kernel, args, kw = _capture_main(p, q, k, v, Dv, None, scales)
    return p, kernel, args, kw


def _capture_main(p, q, k, v, Dv, lse, kw):
    """(the main kernel, its launch arguments, its keyword arguments) of `launch.run`."""
    B, n, Hq, _ = q.shape
    cap = Capture(attention.attention_kernel, "main")
    saved, attention.attention_kernel = attention.attention_kernel, cap
    try:
        launch.run(p, q, k, v, torch.empty(B, n, Hq, Dv, dtype=torch.float16), lse,
                   scale=0.1, main_only=True, **kw)
    finally:
        attention.attention_kernel = saved
    return (saved, *cap.calls[0][1:])


def main_kernel(D: int, Dv: int, n: int, *, heads: int = 16, kv_len: int = 3008,
                kv: str = "float16") -> dict:
    """Resources of the default main kernel for one KV head of `heads` query heads (compiled
    through ptxas), with the allocation-only count and the planner's estimate beside them."""
    p, fn, args, kw = _main_launch(D, Dv, n, heads, kv_len, kv)
    # `allocated`: the allocation-only compile of --grid; `estimate`: the planner's
    return dict(compile_launch(fn, args, kw), num_stages=p.geometry.num_stages,
                allocated=shared_memory(fn, args, kw),
                estimate=shared_bytes(p.geometry, kv_format=p.dtype))


def allocation(D: int, Dv: int, n: int, *, heads: int = 16, kv_len: int = 3008,
               kv: str = "float16") -> dict:
    """Shared memory Triton allocates for the default main kernel (compiled no further) and
    the planner's estimate."""
    p, fn, args, kw = _main_launch(D, Dv, n, heads, kv_len, kv)
    return dict(shared=shared_memory(fn, args, kw),
                estimate=shared_bytes(p.geometry, kv_format=p.dtype))


# -- the grid of issue-sized shapes: every configuration the planner picks, compiled for sm_90
HEADS = ((32, 32), (64, 64), (72, 72), (80, 80), (96, 96), (128, 128), (160, 160), (192, 128),
         (256, 256), (512, 512), (576, 512))
Q_LENS = (*range(1, 17), 32, 64, 75, 128, 512)
RATIOS = (1, 4, 5, 8, 12, 16)
# a mask comes without causal (as transformers passes it), in the widest dtype (f32);
# "fused+lse": the code paths a caller can add to any of them (fixup="fused", return_lse)
FEATURES = {"none": dict(causal=True), "mask": dict(mask=True),
            "sinks": dict(causal=True, sinks=True),
            "sinks+softcap": dict(causal=True, sinks=True, softcap=20.0),
            "alibi+mask": dict(mask=True, alibi=True), "window": dict(causal=True, window=64),
            "fused+lse": dict(causal=True, fixup="fused", lse=True)}
GRID_KV_LEN = 1024
# 16 KV heads: every row stride is a multiple of 16 elements, as in real caches, so Triton
# may pipeline every K/V load through shared memory (the most it allocates)
GRID_KV_HEADS = 16


class _Allocated(Exception):
    """Raised once Triton has allocated shared memory: the rest of the compile is not needed."""


def _stop_after_allocation(backend, stages, options, language, capability):
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    def allocate(mod, metadata):
        # the first passes of the backend's make_llir, up to the shared-memory allocation
        pm = ir.pass_manager(mod.context)
        passes.ttgpuir.add_combine_tensor_select_and_if(pm)
        passes.ttgpuir.add_allocate_warp_groups(pm)
        passes.convert.add_scf_to_cf(pm)
        passes.gluon.add_inliner(pm)
        ptx_version = get_ptx_version_from_options(options, backend.target.arch)
        nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, ptx_version)
        pm.run(mod, "shared_memory")
        raise _Allocated(mod.get_int_attr("ttg.shared"))

    stages["llir"] = allocate


def shared_memory(fn, args, kw) -> int:
    """Bytes of shared memory Triton allocates for this launch on sm_90 (its `shared` metadata),
    compiled no further than that."""
    knobs.runtime.add_stages_inspection_hook = _stop_after_allocation
    always, knobs.compilation.always_compile = knobs.compilation.always_compile, True
    try:  # (no cache lookup: a full compile cached before would answer instead)
        build(fn, args, kw)
    except _Allocated as done:
        return done.args[0]
    finally:
        knobs.runtime.add_stages_inspection_hook = None
        knobs.compilation.always_compile = always
    raise RuntimeError("the compile ended before allocating shared memory")


def _grid_plan(D, Dv, n, ratio, feature, kv="float16"):
    f = FEATURES[feature]
    dtype = kv if kv in BLOCK_FORMATS else getattr(torch, kv)
    return skattn.plan(batch=1, q_len=n, kv_len=GRID_KV_LEN, q_heads=ratio * GRID_KV_HEADS,
                       kv_heads=GRID_KV_HEADS, head_dim=D, head_dim_v=Dv, dtype=dtype,
                       causal=f.get("causal", False), window=f.get("window"), sms=132,
                       occupancy=2, fixup=f.get("fixup"), has_mask=f.get("mask", False),
                       smem_limit=SM90_SHARED_LIMIT)


def _grid_launch(D, Dv, n, ratio, feature, kv="float16"):
    """The main kernel's launch for one grid point, as `skattn.attention` makes it."""
    f = FEATURES[feature]
    p = _grid_plan(D, Dv, n, ratio, feature, kv)
    L, H, Hq = GRID_KV_LEN, GRID_KV_HEADS, ratio * GRID_KV_HEADS
    q = torch.empty(1, n, Hq, D, dtype=torch.float16)
    k, v, scales, _ = kv_inputs(kv, L, H, D, Dv)
    kw = dict(**scales, mask=torch.empty(1, n, L) if f.get("mask") else None,
              sinks=torch.zeros(Hq) if f.get("sinks") else None,
              alibi_slopes=torch.zeros(Hq) if f.get("alibi") else None,
              softcap=f.get("softcap", 0.0))
    lse = torch.empty(1, Hq, n) if f.get("lse") else None
    return p, _capture_main(p, q, k, v, Dv, lse, kw)


def grid_configs(heads=HEADS, features=tuple(FEATURES), kv="float16") -> dict:
    """Distinct main-kernel configurations over heads x features x Q_LENS x RATIOS:
    {key: (D, Dv, n, ratio, feature) of its first grid point}. The key is what shapes the
    kernel's tiles and loops: the geometry except its row packing (heads and tokens a tile
    holds only change integer index math on the rows), the head sizes (masked loads) and
    the feature flags; the points and their count go with it."""
    out = {}
    for D, Dv in heads:
        for feature in features:
            for n in Q_LENS:
                for ratio in RATIOS:
                    if kv in BLOCK_FORMATS and (D % 32 or Dv % 32):
                        continue
                    g = _grid_plan(D, Dv, n, ratio, feature, kv).geometry
                    key = (D, Dv, feature, g.block_m, g.block_n, g.block_dk, g.dk_chunks,
                           g.block_dv, g.num_warps, g.num_stages)
                    out.setdefault(key, [(D, Dv, n, ratio, feature, kv), 0])[1] += 1
    return out


def _compile_point(point) -> dict:
    t0 = time.time()
    p, (fn, args, kw) = _grid_launch(*point)
    D, Dv, n, ratio, feature, kv = point
    g = p.geometry
    return dict(head_dim=D, head_dim_v=Dv, q_len=n, ratio=ratio, feature=feature, kv=kv,
                geometry=[g.block_m, g.heads_per_tile, g.tokens_per_tile, g.block_n, g.block_dk,
                          g.dk_chunks, g.block_dv, g.num_warps, g.num_stages],
                estimate=shared_bytes(g, has_mask=FEATURES[feature].get("mask", False),
                                      kv_format=p.dtype),
                shared=shared_memory(fn, args, kw), seconds=round(time.time() - t0, 1))


def run_grid(jobs: int, heads=HEADS, features=tuple(FEATURES), kv="float16") -> None:
    """Compile every distinct configuration of the grid in `jobs` processes; one JSON line
    each, then a summary line."""
    configs = grid_configs(heads, features, kv)
    t0 = time.time()
    worst, over, under = 0, [], []
    with ProcessPoolExecutor(jobs) as pool:
        # the largest tiles first, so that the slowest compiles do not come last
        order = sorted(configs.values(), key=lambda c: -c[0][0] * c[0][2])
        for (point, count), row in zip(order, pool.map(_compile_point, [c[0] for c in order])):
            row["points"] = count
            print(json.dumps(row), flush=True)
            worst = max(worst, row["shared"])
            if row["shared"] > SM90_SHARED_LIMIT:
                over.append(point)
            if row["estimate"] < row["shared"]:
                under.append(point)
    print(json.dumps(dict(summary=True, configs=len(configs),
                          points=sum(c[1] for c in configs.values()), max_shared=worst,
                          limit=SM90_SHARED_LIMIT, over_limit=over, estimate_below=under,
                          seconds=round(time.time() - t0, 1))), flush=True)


def main(argv):
    if argv[:1] in ([], ["-h"], ["--help"]):  # (no arguments: the usage)
        print(__doc__.strip())
        return 0
    if argv[0] == "--shape":  # D Dv n: one JSON line
        kv = argv[4] if len(argv) > 4 else "float16"
        print(json.dumps(main_kernel(*map(int, argv[1:4]), kv=kv)))
        return
    if argv[0] == "--grid":
        opts = dict(a[2:].split("=", 1) for a in argv[1:])
        heads = HEADS
        if "heads" in opts:
            heads = tuple((int(h.split("/")[0]), int(h.split("/")[-1]))
                          for h in opts["heads"].split(","))
        features = tuple(opts["features"].split(",")) if "features" in opts else tuple(FEATURES)
        run_grid(int(opts.get("jobs", os.cpu_count() or 1)), heads, features,
                 opts.get("kv", "float16"))
        return
    model, n, L = argv[0], int(argv[1]), int(argv[2])
    extra = {}
    for a in argv[3:]:
        k, v = a.split("=")
        extra[k] = int(v) if v.isdigit() else v
    stamps = (torch.zeros(1, dtype=torch.int64),) * 2 if extra.pop("stamps", 0) else None
    wait = extra.pop("pdl_wait", 1)  # the main kernel as sm_90 builds it (Tuning.pdl_wait)
    if stamps is not None:
        launch._check_stamps = lambda *a: None  # launches are only captured: nothing is written
    Hq, Hkv, D = MODELS[model][:3]
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=True, sms=132, occupancy=2, **extra)
    q = torch.zeros(1, n, Hq, D, dtype=torch.float16)
    k = torch.empty(1, L, Hkv, D, dtype=torch.float16)
    caps = {"attention_kernel": Capture(attention.attention_kernel, "main"),
            "uniform_fixup_kernel": Capture(fixup.uniform_fixup_kernel, "uniform"),
            "general_fixup_kernel": Capture(fixup.general_fixup_kernel, "general")}
    saved = {name: getattr(attention if name == "attention_kernel" else fixup, name)
             for name in caps}
    try:
        attention.attention_kernel = caps["attention_kernel"]
        fixup.uniform_fixup_kernel = caps["uniform_fixup_kernel"]
        fixup.general_fixup_kernel = caps["general_fixup_kernel"]
        launch.run(p, q, k, k, torch.empty_like(q), None, scale=D ** -0.5, stamps=stamps)
    finally:
        attention.attention_kernel = saved["attention_kernel"]
        fixup.uniform_fixup_kernel = saved["uniform_fixup_kernel"]
        fixup.general_fixup_kernel = saved["general_fixup_kernel"]
    print(p.describe().splitlines()[0])
    for name, cap in caps.items():
        for grid, args, kw in cap.calls:
            if wait and name == "attention_kernel":
                kw = dict(kw, WAIT_PDL=True)
            print(f"{name:22s} grid {grid}: {compile_launch(cap.fn, args, kw)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
