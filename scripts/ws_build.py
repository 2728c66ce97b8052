"""What the warp-specialised prompt-chunk kernel (`kernels/prefill_ws.py`) compiles to for
sm_90a, here, without a GPU.

  python3 scripts/ws_build.py [--head-dim 128] [--q-heads 32] [--dtype f16] [--sum-mma auto]
      [--ptx FILE]

Plans llama-8b-like n = 512, L = 8192 with `Tuning(prefill="ws")` (8 KV heads), builds the
Gluon kernel for an H100/H200 and prints one JSON line: shared memory, registers and spills
(ptxas -v), and counts in the PTX of warpgroup MMAs, their waits, TMA copies and register
reallocations. Run it without TRITON_INTERPRET (the interpreter replaces the functions Gluon
compiles).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resources  # noqa: E402  (scripts/resources.py: ptxas)

import skattn  # noqa: E402
from skattn import prefill_launch  # noqa: E402
from skattn.kernels.prefill_ws import ws_prefill_kernel  # noqa: E402


def compile_sm90(fn, args, kw):
    """Triton's sm_90a build of a Gluon kernel for these arguments (the JIT's own binder)."""
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kw)
    options, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, options)
    return triton.compile(GluonASTSource(fn, sig, consts, attrs), target=target,
                          options=options.__dict__)


def build_counts(ptx: str) -> dict:
    """ptxas -v's registers and spills of a Gluon build, and counts in its PTX: warpgroup
    MMAs, TMA copies, async-proxy fences, register reallocations, local-memory accesses."""
    return dict(**resources.ptxas(ptx), wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                fences=len(re.findall(r"fence\.proxy\.async", ptx)),
                setmaxnreg=len(re.findall(r"setmaxnreg", ptx)),
                local=len(re.findall(r"\.local", ptx)))


def build(head_dim=128, q_heads=32, dtype=torch.float16, sum_mma=None):
    n, L = 512, 8192
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=q_heads, kv_heads=8, head_dim=head_dim,
                    dtype=dtype, causal=True, sms=132, occupancy=2,
                    tuning=skattn.Tuning(prefill="ws", prefill_sum_mma=sum_mma))
    pb = prefill_launch.PrefillBound(prefill_launch.ws_constants(p),
                                     (1, p.geometry.block_n, 1, head_dim), False, "ws")
    q = torch.zeros(1, n, q_heads, head_dim, dtype=dtype)
    k = torch.zeros(1, L, 8, head_dim, dtype=dtype)
    kd, vd = prefill_launch.descriptors(pb, k, k)
    lse, small = torch.zeros(1, q_heads, n), torch.zeros(16)
    segs = torch.zeros(8, dtype=torch.int32)
    args = (q, *q.stride()[:3], kd, vd, q, *q.stride()[:3], lse, *lse.stride()[:2], small,
            small, small, small, segs, segs, n, L, q_heads // 8, 0.1)
    return p, compile_sm90(ws_prefill_kernel, args, dict(pb.const, HAS_SINKS=True,
                                                         RETURN_LSE=True))


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--q-heads", type=int, default=32, help="a multiple of 8")
    ap.add_argument("--dtype", default="f16", choices=("f16", "bf16"))
    ap.add_argument("--sum-mma", choices=("auto", "on", "off"), default="auto",
                    help="Tuning.prefill_sum_mma (auto: at head size 64)")
    ap.add_argument("--ptx", help="write the PTX there")
    args = ap.parse_args(argv)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    p, ck = build(args.head_dim, args.q_heads, dtype,
                  {"auto": None, "on": True, "off": False}[args.sum_mma])
    ptx = ck.asm["ptx"]
    if args.ptx:
        Path(args.ptx).write_text(ptx)
    info = dict(head_dim=p.head_dim, block_n=p.geometry.block_n, shared=ck.metadata.shared,
                programs_per_sm=prefill_launch.ws_registers(p.head_dim, p.geometry.block_n)[0],
                **build_counts(ptx),
                wgmma_wait_partial=len(re.findall(r"wgmma\.wait_group\.sync\.aligned [12];",
                                                  ptx)))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
