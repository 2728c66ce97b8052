"""Whole prompts at once (queries = keys, causal) and long prompt chunks: which plan runs
them fastest, against SDPA's flash kernel where the masks agree, same run.

    PYTHONPATH=src python3 tools/prompt_square.py [--cells llama-8b:2048:2048,...] [--reps 10]

f16, one sequence; a cell is model:n:L (n new tokens over L keys, bottom-right causal).
Default cells: llama-8b whole prompts of 2048-16384 tokens, the seed grid's 512-token chunk
over 8192 keys, and qwen3-14b chunks of 1024 and 2048 over 32768 keys. Per cell: skattn's
default plan, a cut plan of one program per SM (fixup general), whole tiles (fixup none;
longest tiles first, and in index order: `Tuning.tile_order`), the Hopper kernels
(`Tuning(prefill="tma")` with the default plan and with whole tiles in both orders,
`Tuning(prefill="ws")` with whole tiles; the default plan runs "ws" where it takes it), and
the default plan without the causal mask (twice the work or more: TFLOP/s comparable).
Every output is checked against SDPA's (flash where n = L, else math with the mask) before
timing. Prints µs (CUDA events, median of reps, warm L2, the stream held by a spin kernel
while the host queues the call) and TFLOP/s of the visible (query, key) pairs; writes the
same rows to $OUT/prompt_square.csv with provenance in prompt_square.json (default
benchmarks/results/latest/prompt).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import skattn
from skattn.bench.models import MODELS
from skattn.bench.records import write_table
from skattn.bench.run import provenance
from skattn.tuning import Tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from varlen_prefill import timed  # noqa: E402

CELLS = ("llama-8b:2048:2048,llama-8b:4096:4096,llama-8b:8192:8192,llama-8b:16384:16384,"
         "llama-8b:512:8192,qwen3-14b:1024:32768,qwen3-14b:2048:32768")


def variants(tiles: int, sms: int) -> dict:
    """name -> skattn.plan keyword arguments (beyond the shape)."""
    whole = dict(programs=tiles, fixup="none")
    index = Tuning(tile_order="index")
    return {"default": {}, f"cut ({sms})": dict(programs=sms, fixup="general"),
            f"whole tiles ({tiles})": whole,
            "whole tiles, index order": dict(whole, tuning=index),
            "tma": dict(tuning=Tuning(prefill="tma")),
            "tma, whole tiles": dict(whole, tuning=Tuning(prefill="tma")),
            "tma, whole tiles, index order": dict(whole, tuning=Tuning(prefill="tma",
                                                                        tile_order="index")),
            "ws, whole tiles": dict(whole, tuning=Tuning(prefill="ws")),
            "non-causal": dict(causal=False)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=CELLS)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev, f16 = "cuda", torch.float16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def row(model, n, L, name, t, tflops, p=None):
        g = p.geometry if p is not None else None
        rows.append(dict(model=model, n=n, L=L, variant=name, us=f"{t:.1f}", tflops=f"{tflops:.1f}",
                         programs=p.programs if p else "", fixup=p.fixup if p else "",
                         rows_per_tile=g.block_m if g else "", block_n=g.block_n if g else "",
                         warps=g.num_warps if g else "", stages=g.num_stages if g else "",
                         kernel=p.tuning.prefill if p else ""))
    print(f"{'model':9} {'n':>5} {'L':>6} {'variant':22} {'us':>9} {'TFLOP/s':>8}  plan")
    for cell in args.cells.split(","):
        model, n, L = cell.split(":")
        n, L = int(n), int(L)
        HQ, HKV, D = MODELS[model][:3]
        q = torch.randn(1, n, HQ, D, device=dev, dtype=f16)
        k = torch.randn(1, L, HKV, D, device=dev, dtype=f16)
        v = torch.randn(1, L, HKV, D, device=dev, dtype=f16)
        pairs = sum(min(L, L - n + i + 1) for i in range(n))  # bottom-right causal
        flop = 4 * HQ * D * pairs
        if n == L:
            def sdpa():
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=True)
            ref = sdpa().transpose(1, 2)
            t = timed(sdpa, args.reps)
            print(f"{model:9} {n:5d} {L:6d} {'sdpa (flash)':22} {t:9.1f} {flop / t / 1e6:8.1f}")
            row(model, n, L, "sdpa (flash)", t, flop / t / 1e6)
        else:  # bottom-right causal through an explicit mask
            keep = torch.ones(n, L, dtype=torch.bool, device=dev).tril(L - n)
            ref = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                enable_gqa=True).transpose(1, 2)
        tiles = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=HQ, kv_heads=HKV, head_dim=D,
                            dtype=f16, causal=True).ntiles_dst
        for name, kw in variants(tiles, sms).items():
            causal = kw.pop("causal", True)
            try:
                p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=HQ, kv_heads=HKV,
                                head_dim=D, dtype=f16, causal=causal, **kw)
            except ValueError as e:
                print(f"{model:9} {n:5d} {L:6d} {name:22} {'-':>9} {'-':>8}  not planned: {e}")
                continue
            out = torch.full_like(q, float("nan"))

            def run():
                return skattn.attention(q, k, v, causal=causal, plan=p, out=out)
            run()
            want = ref if causal else F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                enable_gqa=True).transpose(1, 2)
            err = (out.float() - want.float()).abs().max().item()
            assert err < 2e-2, (n, L, name, err)
            t = timed(run, args.reps)
            g = p.geometry
            work = flop if causal else 4 * HQ * D * n * L
            row(model, n, L, name, t, work / t / 1e6, p)
            print(f"{model:9} {n:5d} {L:6d} {name:22} {t:9.1f} {work / t / 1e6:8.1f}  "
                  f"programs {p.programs}, fixup {p.fixup}, rows {g.block_m}, block_n "
                  f"{g.block_n}, warps {g.num_warps}, stages {g.num_stages}, "
                  f"kernel {p.tuning.prefill}")
    meta = dict(provenance(sms), command="python3 tools/prompt_square.py " + " ".join(sys.argv[1:]),
                timer="CUDA events, median of reps, warm L2, the stream held by a spin kernel")
    write_table(rows, os.environ.get("OUT", "benchmarks/results/latest/prompt"), "prompt_square",
                meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
