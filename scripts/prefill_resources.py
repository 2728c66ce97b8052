"""What the prompt-chunk kernel compiles to for sm_90, here, without a GPU.

  python3 scripts/prefill_resources.py llama-8b [n=512] [L=8192] [dtype=bf16] [fixup=fused]
      [policy=llamacpp] [programs=131] [block_n=64] [num_warps=4] [num_stages=3]
      [occupancy=1] [causal=0] [device_desc=1] [ir=DIR]

Plans the shape with `Tuning(prefill="tma")`, captures the prompt-chunk kernel's launch,
compiles it ahead of time for an H100/H200 (sm_90a) and prints one JSON line: registers and
spills (Triton's ptxas -v), shared memory, and counts in the GPU IR of what the schedule is
made of: TMA copies, warpgroup MMAs and barrier waits. `ir=DIR` writes the TTGIR and PTX
there.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resources  # noqa: E402  (scripts/resources.py: signature, ptxas)

import skattn  # noqa: E402
from skattn import launch, prefill_launch  # noqa: E402
from skattn.kernels import prefill  # noqa: E402
from skattn.bench.models import MODELS  # noqa: E402

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16"}
COUNTS = {"tma_loads": r"async_tma_copy_global_to_local", "wgmma": r"ttng\.warp_group_dot ",
          "wgmma_waits": r"ttng\.warp_group_dot_wait", "barrier_waits": r"ttng\.wait_barrier",
          "convert_layout": r"ttg\.convert_layout", "local_alloc": r"ttg\.local_alloc"}


def capture(model: str, n: int, L: int, dtype, **kw) -> tuple:
    """(plan, args, constants) of the prompt-chunk kernel's launch for one shape."""
    Hq, Hkv, D = MODELS[model][:3]
    tuning = skattn.Tuning(prefill="tma", prefill_device_desc=bool(kw.pop("device_desc", 0)))
    kw.setdefault("occupancy", 2)
    kw["causal"] = bool(kw.get("causal", 1))
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    dtype=dtype, sms=132, tuning=tuning, **kw)
    calls = []

    class Capture:
        arg_names = prefill.prefill_kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **const: calls.append((args, const))

    saved = prefill.prefill_kernel, prefill_launch.interpreting
    prefill.prefill_kernel, prefill_launch.interpreting = Capture(), lambda: True
    try:  # CPU tensors: the launch is only captured; Hopper is pretended for the binding
        q = torch.zeros(1, n, Hq, D, dtype=dtype)
        k = torch.zeros(1, L, Hkv, D, dtype=dtype)
        launch.run(p, q, k, k, torch.empty_like(q), None, scale=D ** -0.5, main_only=True)
    finally:
        prefill.prefill_kernel, prefill_launch.interpreting = saved
    if not calls:
        raise RuntimeError(f"the plan runs the base kernel: {prefill_launch.refusal(p)}")
    args, const = calls[0]
    return p, args, dict(const, INTERPRET=False)


def signature(fn, args, const):
    """resources.signature, with tensor descriptors."""
    plain = [None if hasattr(a, "block_shape") else a for a in args]
    sig, consts, attrs = resources.signature(fn, plain, const)
    for name, a in zip(fn.arg_names, args):
        if hasattr(a, "block_shape"):
            sig[name] = f"tensordesc<{_TY[a.base.dtype]}{list(a.block_shape)}>"
            consts.pop(name, None)
    return sig, consts, attrs


def compile_sm90(model: str, n: int = 512, L: int = 8192, dtype=torch.float16, ir=None,
                 **kw) -> dict:
    t0 = time.time()
    p, args, const = capture(model, n, L, dtype, **kw)
    fn = prefill.prefill_kernel
    sig, consts, attrs = signature(fn, args, const)
    opts = {k: const[k] for k in ("num_warps", "num_stages")}
    ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options=opts)
    ttgir = ck.asm["ttgir"]
    if ir:
        Path(ir).mkdir(parents=True, exist_ok=True)
        g = p.geometry
        stem = Path(ir) / f"prefill-{model}-{g.block_n}-{g.num_warps}-{g.num_stages}"
        Path(f"{stem}.ttgir").write_text(ttgir)
        Path(f"{stem}.ptx").write_text(ck.asm["ptx"])
    g = p.geometry
    out = dict(model=model, n=n, L=L, dtype=str(dtype).split(".")[-1], causal=p.causal,
               fixup=p.fixup,
               geometry=[g.block_m, g.block_n, g.num_warps, g.num_stages],
               device_desc=const["DEVICE_DESC"],
               shared=ck.metadata.shared, **resources.ptxas(ck.asm["ptx"]),
               **{name: len(re.findall(pat, ttgir)) for name, pat in COUNTS.items()},
               seconds=round(time.time() - t0, 1))
    return out


def main(argv):
    if argv[:1] in ([], ["-h"], ["--help"]):  # (no arguments: the usage)
        print(__doc__.strip())
        return 0
    model, kw = argv[0], {}
    for a in argv[1:]:
        key, value = a.split("=", 1)
        kw[key] = value if key in ("fixup", "ir", "dtype", "policy") else int(value)
    if "dtype" in kw:
        kw["dtype"] = {"bf16": torch.bfloat16, "f16": torch.float16}[kw["dtype"]]
    print(json.dumps(compile_sm90(model, **kw)), flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main(sys.argv[1:])
