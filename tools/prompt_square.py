"""A whole prompt at once (queries = keys, causal) against a prompt chunk of the seed grid:
which plan runs it fastest, against SDPA's flash kernel, same run.

    PYTHONPATH=src python3 tools/prompt_square.py [--lens 2048,8192] [--reps 10]

llama-8b heads (32 / 8, head size 128), f16, one sequence. Per length: skattn's default plan,
then the same with other program counts, whole tiles (fixup none), the Hopper kernel
(`Tuning(prefill="tma")`), other KV block sizes and warps; causal and, for the default plan,
non-causal (twice the work: a slowdown of ~2x says the causal structure costs nothing).
Reference cells: a 512-token chunk over 8192 keys (the seed grid's prompt chunk). Every
output is checked against SDPA's (flash, causal top-left = bottom-right here) before
timing. Prints µs (CUDA events, median of reps, warm L2, the stream held by a spin kernel
while the host queues the call) and TFLOP/s of the visible (query, key) pairs.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import skattn
from skattn.tuning import Tuning

HQ, HKV, D = 32, 8, 128


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def variants(n: int, L: int) -> dict:
    """name -> skattn.plan keyword arguments (beyond the shape)."""
    whole = -(-n // 32) * HKV  # tiles of 32 tokens x 4 heads, one per program
    return {"default": {}, "programs 132": dict(programs=132),
            "programs 528": dict(programs=528),
            f"whole tiles ({whole})": dict(programs=whole, fixup="none"),
            "tma": dict(tuning=Tuning(prefill="tma")),
            "block_n 64": dict(block_n=64), "warps 4": dict(num_warps=4),
            "non-causal": dict(causal=False)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="2048,8192")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev, f16 = "cuda", torch.float16
    cells = [(512, 8192)] + [(L, L) for L in map(int, args.lens.split(","))]
    print(f"{'n':>5} {'L':>6} {'variant':22} {'us':>9} {'TFLOP/s':>8}  plan")
    for n, L in cells:
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
            print(f"{n:5d} {L:6d} {'sdpa (flash)':22} {t:9.1f} {flop / t / 1e6:8.1f}")
        else:  # bottom-right causal through an explicit mask
            keep = torch.ones(n, L, dtype=torch.bool, device=dev).tril(L - n)
            ref = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                enable_gqa=True).transpose(1, 2)
        for name, kw in variants(n, L).items():
            causal = kw.pop("causal", True)
            try:
                p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=HQ, kv_heads=HKV,
                                head_dim=D, dtype=f16, causal=causal, **kw)
            except ValueError as e:
                print(f"{n:5d} {L:6d} {name:22} {'-':>9} {'-':>8}  not planned: {e}")
                continue
            out = torch.full_like(q, float("nan"))

            def run():
                return skattn.attention(q, k, v, causal=causal, plan=p, out=out)
            run()
            if causal:
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 2e-2, (n, L, name, err)
            t = timed(run, args.reps)
            g = p.geometry
            work = flop if causal else 4 * HQ * D * n * L
            print(f"{n:5d} {L:6d} {name:22} {t:9.1f} {work / t / 1e6:8.1f}  "
                  f"programs {p.programs}, fixup {p.fixup}, rows {g.block_m}, block_n "
                  f"{g.block_n}, warps {g.num_warps}, stages {g.num_stages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
