"""Compile the serving kernels for sm_90 on any machine (no GPU): registers, spills, shared memory.

  python3 scripts/compile_serving.py            # every case below, one JSON line per kernel
  python3 scripts/compile_serving.py paged64    # one case
  python3 scripts/compile_serving.py --specialization  # Triton's keys over batch sizes

Runs `skattn.serving`'s launcher with CPU tensors, captures each launch (work list, main
kernel, fixup) and compiles it ahead of time for an H100/H200 through ptxas
(scripts/resources.py), so a kernel that does not compile for the GPU fails here. Run
without TRITON_INTERPRET.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resources  # noqa: E402
from resources import compile_launch  # noqa: E402

import skattn  # noqa: E402
from skattn import quant, serving, serving_launch, serving_recipe  # noqa: E402

F16 = torch.float16
resources.TYPES.setdefault(torch.float64, "*fp64")  # the work list's cost model
# name -> (plan bounds, layout, page size, Lq / varlen, features, PDL)
CASES = {
    "dense": dict(kw=dict(q_len=1, max_kv_len=4096), layout="dense"),
    "paged16": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged"),
    "paged64-fused": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=64, fixup="fused"),
                          layout="paged", lse=True),
    "paged48-split": dict(kw=dict(q_len=4, max_kv_len=4800, page_size=48, policy="split"),
                          layout="paged", pdl=True),
    "varlen-packed": dict(kw=dict(max_q_len=512, total_q=543, max_kv_len=8192, total_k=40000,
                                   q_split=None), layout="packed", pdl=True),  # one plan
    "paged16-features": dict(kw=dict(q_len=4, max_kv_len=4096, page_size=16, window=128,
                                     policy="llamacpp"),
                             layout="paged", heads=(64, 8, 64), sinks=True, softcap=30.0),
    # a mixed batch in two halves: decode tiles, then prompt tiles (their work lists filter)
    "varlen-mixed": dict(kw=dict(max_q_len=512, total_q=543, max_kv_len=8192, page_size=16,
                                 q_split="auto"), layout="paged"),
    "paged16-fp8": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                        kv=torch.float8_e4m3fn),
    "mla-paged64": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=64), layout="paged",
                        heads=(16, 1, 576, 512)),
    # llama.cpp's blocks: int8 values (q8_0) or bytes of nibbles (q4_0), one f16 scale per 32
    "paged16-q8_0": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                         kv="q8_0"),
    "paged16-q4_0": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                         kv="q4_0"),
    # three an SM (a serving plan's default for q8_0 and q4_0 decode tiles): under the
    # register cap, at the GQA ratio (5) whose build took 194 registers without it (q8_0)
    "paged16-q8_0-3": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                           kv="q8_0", occupancy=3, heads=(40, 8, 128)),
    "paged16-q4_0-3": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                           kv="q4_0", occupancy=3, heads=(40, 8, 128)),
    # Tuning(pdl_wait=False): the main kernel launched plainly, without griddepcontrol.wait
    "paged16-nowait": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16), layout="paged",
                           wait=False),
    # gpt-oss's shape at n = 1: two KV heads of 64 read as one of 128 (head_pairs)
    "paged16-pairs": dict(kw=dict(q_len=1, max_kv_len=4096, page_size=16, head_pairs=True),
                          layout="paged", heads=(64, 8, 64)),
    # a prompt-sized tile over q8_0 blocks
    "varlen-packed-q8_0": dict(kw=dict(max_q_len=512, total_q=543, max_kv_len=8192,
                                       total_k=40000, q_split=None), layout="packed",
                               kv="q8_0"),
}


def _cache(kvd, shape):
    """An empty K or V cache of `shape` in `kvd` (a dtype, or "q8_0" / "q4_0": a block cache)."""
    if isinstance(kvd, str):
        return getattr(quant, kvd)(torch.zeros(shape, dtype=F16))
    return torch.empty(shape, dtype=kvd)


def capture(name: str, case: dict) -> list:
    hq, hkv, d, *rest = case.get("heads", (32, 8, 128))
    dv = rest[0] if rest else d
    B = case.get("batch", 64 if "q_len" in case["kw"] else 32)
    kvd = case.get("kv", F16)
    p = skattn.serving_plan(batch=B, q_heads=hq, kv_heads=hkv, head_dim=d, head_dim_v=dv,
                            causal=True, dtype=kvd, sms=132, occupancy=case.get("occupancy", 2),
                            smem_limit=232448, **case["kw"])
    plan = p
    for half in getattr(p, "halves", (p,)):
        b = serving_launch.bind(half, torch.device("cpu"))
        if case.get("pdl") and b.fix_kernel:  # what a Hopper GPU launches
            b.main_const["USE_PDL"] = 2
            b.fix_const["USE_PDL"] = True
        # what a Hopper GPU builds by default (Tuning.pdl_wait): the main kernel waits on
        # the work list (gdc_wait)
        b.main_const["WAIT_PDL"] = case.get("wait", True)
    p = getattr(p, "long", p)  # the bounds of the tensors
    calls = []
    saved = serving_launch._launch
    serving_launch._launch = (lambda kernel, key, args, const, grid, stream, record=None:
                              calls.append((kernel, args, dict(const))))
    try:
        if p.varlen:
            q = torch.empty(p.total_q, hq, d, dtype=F16)
            cu = torch.zeros(B + 1, dtype=torch.int32)
            seq_k, seq_q = cu, cu
        else:
            q = torch.empty(B, p.q_len, hq, d, dtype=F16)
            seq_k, seq_q = torch.zeros(B, dtype=torch.int32), None
        table = None
        if case["layout"] == "paged":
            rows = (case.get("pages", 1000), p.page_size)
            table = torch.zeros(B, p.max_pages, dtype=torch.int32)
        elif case["layout"] == "packed":
            rows = (p.total_k,)
        else:
            rows = (B, p.max_kv_len)
        k, v = (_cache(kvd, (*rows, hkv, x)) for x in (d, dv))
        out = torch.empty(*q.shape[:-1], dv, dtype=F16)
        lse = None
        if case.get("lse"):
            lse = torch.empty(hq, p.total_q, dtype=torch.float32) if p.varlen else \
                torch.empty(B, hq, p.q_len, dtype=torch.float32)
        sinks = torch.zeros(hq) if case.get("sinks") else None
        fp8 = kvd == torch.float8_e4m3fn  # scales per KV head for K, per tensor for V
        k_scale, v_scale = (torch.ones(hkv), torch.ones(1)) if fp8 else (None, None)
        if isinstance(kvd, str):  # a block cache: its values, and its scales as the kernel's
            (k, k_scale), (v, v_scale) = (k.values, k.scales), (v.values, v.scales)
        serving_recipe.run_halves(plan, q, k, v, out, lse, seq_k=seq_k, seq_q=seq_q,
                                  block_table=table, scale=0.1, sinks=sinks,
                                  softcap=case.get("softcap", 0.0), alibi_slopes=None,
                                  workspace=None, work_list=None, k_scale=k_scale,
                                  v_scale=v_scale)
    finally:
        serving_launch._launch = saved
    return calls


# batches of one plan family a serving step moves between (size, packed tokens, key rows):
# the kernels must not be specialised on them (kernels/worklist.py SHAPE_INTS), and their
# compile-time constants stay in one bucket (serving_launch._bind)
STEPS = {
    "varlen-packed": [dict(batch=b, total_q=tq, total_k=tk) for b, tq, tk in
                      ((1, 1, 17), (3, 48, 4096), (7, 129, 5001), (16, 512, 40000),
                       (64, 512, 40000))],
    # paged: the block table's width (max_pages, its stride) and the pool's page count too
    "varlen-paged": [dict(batch=b, total_q=tq, max_kv_len=kv, pages=n) for b, tq, kv, n in
                     ((1, 1, 256, 1), (3, 48, 4096, 17), (7, 129, 4352, 33),
                      (16, 512, 8192, 1000), (64, 512, 8192, 4096))]}
FAMILIES = {"varlen-packed": CASES["varlen-packed"],
            "varlen-paged": dict(kw=dict(max_q_len=512, total_q=543, max_kv_len=8192,
                                         page_size=256), layout="paged")}


def specialization(kernel, args: tuple, const: dict) -> list:
    """What Triton keys the compiled kernel on for these arguments, besides constexprs: per
    parameter its type and specialisation (== 1, divisible by 16), as a sm_90 build would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    bind = create_function_from_signature(kernel.signature, kernel.params,
                                          make_backend(GPUTarget("cuda", 90, 32)))
    _, spec, _ = bind(*args, **{k: v for k, v in const.items() if k in kernel.arg_names})
    return [str(s) for s, p in zip(spec, kernel.params) if not p.is_constexpr]


def steps() -> None:
    """One JSON line per family, step and kernel: the packed and paged varlen cases at each
    of their STEPS, each in one plan (q_split=None; a MixedPlan's halves are two such plans)."""
    for family, family_steps in STEPS.items():
        base = FAMILIES[family]
        for step in family_steps:
            kw = {k: v for k, v in step.items() if k not in ("batch", "pages")}
            case = dict(base, kw=dict(base["kw"], q_split=None, **kw), batch=step["batch"],
                        pages=step.get("pages", 1000))
            for kernel, args, const in capture(family, case):
                consts = {k: v for k, v in sorted(const.items())
                          if isinstance(v, (bool, int, float, str))}
                print(json.dumps(dict(family=family, step=step, kernel=kernel.fn.__name__,
                                      const=consts, spec=specialization(kernel, args, const))),
                      flush=True)


def main(argv) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if argv[:1] == ["--specialization"]:
        steps()
        return 0
    names = argv or list(CASES)
    for name in names:
        for kernel, args, const in capture(name, CASES[name]):
            t0 = time.time()
            const.pop("launch_pdl", None)
            info = compile_launch(kernel, args, const,
                                  loops=kernel.fn.__name__ == "ragged_attention_kernel")
            print(json.dumps(dict(case=name, kernel=kernel.fn.__name__, seconds=round(time.time() - t0, 1),
                                  **info)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
