"""What the Hopper whole-tile kernel of serving plans (`kernels/ragged_ws.py`) compiles to for
sm_90a, here, without a GPU.

  python3 scripts/ragged_ws_build.py [--head-dim 128] [--layout paged|dense] [--page-size 16]
      [--dtype f16] [--ptx FILE]

Plans a varlen prompt step of llama-8b's heads (gpt-oss's at head size 64) with
`Tuning(prefill="ws")`, builds the Gluon kernel for an H100/H200 and prints one JSON line:
shared memory, registers and spills (ptxas -v), and counts in the PTX of warpgroup MMAs,
TMA copies and register reallocations. Run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ws_build import build_counts, compile_sm90  # noqa: E402

import skattn  # noqa: E402
from skattn import serving_ws  # noqa: E402
from skattn.kernels.ragged_ws import ragged_ws_kernel  # noqa: E402


def build(head_dim=128, layout="paged", page_size=16, dtype=torch.float16, regs="",
          block_n=None):
    hq, hkv = (32, 8) if head_dim == 128 else (64, 8)
    batch, max_q, max_k = 4, 2048, 8192
    paged = layout == "paged"
    p = skattn.serving_plan(batch=batch, max_q_len=max_q, total_q=batch * max_q,
                            max_kv_len=max_k, q_heads=hq, kv_heads=hkv, head_dim=head_dim,
                            dtype=dtype, layout=layout, page_size=page_size if paged else None,
                            sms=132, occupancy=2, tuning=skattn.Tuning(prefill="ws"),
                            q_split=None, block_n=block_n)
    assert serving_ws.refusal(p) is None, serving_ws.refusal(p)
    wb = serving_ws.bound(p)
    if regs:
        wb.const["CONSUMER_REGS"], wb.const["LOADER_REGS"] = map(int, regs.split(","))
    q = torch.zeros(batch * max_q, hq, head_dim, dtype=dtype)
    if paged:
        k = torch.zeros(batch * max_k // page_size, page_size, hkv, head_dim, dtype=dtype)
    else:
        k = torch.zeros(batch, max_k, hkv, head_dim, dtype=dtype)
    kd, vd = serving_ws.descriptors(wb, k, k)
    lse, f32 = torch.zeros(hq, batch * max_q), torch.zeros(16)
    ints = torch.zeros(64, dtype=torch.int32)
    args = (q, 0, *q.stride()[:2], kd, vd, q, 0, *q.stride()[:2], lse, 0, lse.stride(0), f32,
            f32, f32, f32, ints, 8, ints, batch, p.rb_max, hq // hkv, p.ntiles_z, p.hz,
            k.shape[0], 0.1)
    return p, compile_sm90(ragged_ws_kernel, args, dict(wb.const, HAS_SINKS=True,
                                                        RETURN_LSE=True))


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--layout", default="paged", choices=("paged", "dense"))
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="f16", choices=("f16", "bf16"))
    ap.add_argument("--ptx", help="write the PTX there")
    ap.add_argument("--regs", default="", help="CONSUMER,LOADER registers (default: the plan's)")
    ap.add_argument("--block-n", type=int, choices=(64, 128),
                    help="keys a KV block (default: the plan's, 64 at head size 64)")
    args = ap.parse_args(argv)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    p, ck = build(args.head_dim, args.layout, args.page_size, dtype, args.regs, args.block_n)
    ptx = ck.asm["ptx"]
    if args.ptx:
        Path(args.ptx).write_text(ptx)
    info = dict(head_dim=p.head_dim, block_n=p.geometry.block_n, layout=args.layout,
                page_size=args.page_size if args.layout == "paged" else None,
                shared=ck.metadata.shared, **build_counts(ptx))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
