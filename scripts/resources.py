"""Registers, spills and shared memory of skattn's kernels for sm_90, compiled here (no GPU).

  python3 scripts/resources.py llama-8b 1 32768 [nblocks=128] [fixup=fused] [num_stages=4]
                                             [stamps=1]  # with the per-program time stamps
  python3 scripts/resources.py --shape 256 256 4     # D Dv n, 16 query heads on 1 KV head

Runs the planner and the launcher with CPU tensors, captures each kernel launch, compiles it
ahead of time for an H100/H200 (sm_90a) and runs Triton's own ptxas -v on the PTX.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import skattn
from skattn import launch
from skattn.kernels import attention, fixup
from skattn.models import MODELS

TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
         torch.int32: "*i32", torch.int64: "*i64"}


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
    for i, name in enumerate(names):
        v = values[name] if name in values else fn.params[i].default  # (defaulted diagnostics)
        if isinstance(v, torch.Tensor):  # (a keyword tensor too: the stamps)
            sig[name] = TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v is None or name in fn.constexprs or i in fn.constexprs or names[i] in kw:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0 and v != 0:
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


def compile_launch(fn, args, kw):
    sig, consts, attrs = signature(fn, args, kw)
    opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options=opts)
    return dict(shared=ck.metadata.shared, **ptxas(ck.asm["ptx"]))


def main_kernel(D: int, Dv: int, n: int, *, heads: int = 16, kv_len: int = 3000) -> dict:
    """Resources of the default main kernel for one KV head of `heads` query heads."""
    p = skattn.plan(batch=1, q_len=n, kv_len=kv_len, q_heads=heads, kv_heads=1, head_dim=D,
                    head_dim_v=Dv, causal=True, sms=132, blocks_per_sm=2)
    q = torch.zeros(1, n, heads, D, dtype=torch.float16)
    k = torch.empty(1, kv_len, 1, D, dtype=torch.float16)
    v = torch.empty(1, kv_len, 1, Dv, dtype=torch.float16)
    cap = Capture(attention.attention_kernel, "main")
    saved, attention.attention_kernel = attention.attention_kernel, cap
    try:
        launch.run(p, q, k, v, torch.empty(1, n, heads, Dv, dtype=torch.float16), None,
                   scale=0.1, main_only=True)
    finally:
        attention.attention_kernel = saved
    _, args, kw = cap.calls[0]
    return dict(compile_launch(saved, args, kw), num_stages=p.geometry.num_stages)


def main(argv):
    if argv[0] == "--shape":  # D Dv n: one JSON line
        import json

        print(json.dumps(main_kernel(*map(int, argv[1:4]))))
        return
    model, n, L = argv[0], int(argv[1]), int(argv[2])
    extra = {}
    for a in argv[3:]:
        k, v = a.split("=")
        extra[k] = int(v) if v.isdigit() else v
    stamps = (torch.zeros(1, dtype=torch.int64),) * 2 if extra.pop("stamps", 0) else None
    if stamps is not None:
        launch._check_stamps = lambda *a: None  # launches are only captured: nothing is written
    Hq, Hkv, D = MODELS[model][:3]
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=True, sms=132, blocks_per_sm=2, **extra)
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
            print(f"{name:22s} grid {grid}: {compile_launch(cap.fn, args, kw)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
