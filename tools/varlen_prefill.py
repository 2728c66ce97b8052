"""Prompt steps of a continuous batch, side by side: `attention_varlen` over a paged cache
against the dense prompt path (`skattn.attention`, one call a request) and SDPA's flash
kernel (causal, one call a request), same inputs, same run.

    PYTHONPATH=src python3 tools/varlen_prefill.py [--page 256] [--reps 10]

Cases (llama-8b heads, f16): the prompts of one 8192-token step as transformers' continuous
batching packs them: 1 x 8192, 4 x 2048, 16 x 512 fresh prompts. Each skattn output is
checked against SDPA's before timing. Prints µs per call (CUDA events, median of reps, warm
L2) and the varlen plan's geometry.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import skattn

HQ, HKV, D = 32, 8, 128
CASES = {"1x8192": [8192], "4x2048": [2048] * 4, "16x512": [512] * 16}


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev, f16 = "cuda", torch.float16
    print(f"{'case':8} {'varlen paged':>13} {'dense skattn':>13} {'sdpa flash':>11}  plan")
    for name, lens in CASES.items():
        B, total = len(lens), sum(lens)
        q = torch.randn(total, HQ, D, device=dev, dtype=f16)
        k = torch.randn(total, HKV, D, device=dev, dtype=f16)
        v = torch.randn(total, HKV, D, device=dev, dtype=f16)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev,
                          dtype=torch.int32)
        pages_per = -(-max(lens) // args.page)
        kc = torch.zeros(B * pages_per, args.page, HKV, D, device=dev, dtype=f16)
        vc = torch.zeros_like(kc)
        perm = torch.randperm(B * pages_per, device=dev)
        table = perm.view(B, pages_per).to(torch.int32)
        for b, L in enumerate(lens):
            s = int(cu[b])
            for j in range(-(-L // args.page)):
                n = min(args.page, L - j * args.page)
                kc[table[b, j], :n] = k[s + j * args.page:s + j * args.page + n]
                vc[table[b, j], :n] = v[s + j * args.page:s + j * args.page + n]
        out = torch.empty_like(q)
        plan = skattn.serving_plan(batch=B, max_q_len=max(lens), total_q=total,
                                   max_kv_len=max(lens), q_heads=HQ, kv_heads=HKV, head_dim=D,
                                   page_size=args.page, max_pages=pages_per, dtype=f16)

        def varlen():
            skattn.attention_varlen(q, kc, vc, cu, cu, max(lens), max(lens), block_table=table,
                                    plan=plan, out=out)

        qs = [q[int(cu[b]):int(cu[b + 1])][None] for b in range(B)]
        ks = [k[int(cu[b]):int(cu[b + 1])][None] for b in range(B)]
        vs = [v[int(cu[b]):int(cu[b + 1])][None] for b in range(B)]

        def dense():
            return [skattn.attention(a, b_, c, causal=True) for a, b_, c in zip(qs, ks, vs)]

        def sdpa():
            return [F.scaled_dot_product_attention(
                a.transpose(1, 2), b_.transpose(1, 2), c.transpose(1, 2), is_causal=True,
                enable_gqa=True) for a, b_, c in zip(qs, ks, vs)]

        varlen()
        ref = torch.cat([o[0].transpose(0, 1) for o in sdpa()])
        err = (out.float() - ref.float()).abs().max().item()
        derr = max((o[0].float() - r.float()).abs().max().item()
                   for o, r in zip(dense(), ref.split(lens)))
        assert err < 2e-2 and derr < 2e-2, (name, err, derr)
        g = plan.geometry
        print(f"{name:8} {timed(varlen, args.reps):13.1f} {timed(dense, args.reps):13.1f} "
              f"{timed(sdpa, args.reps):11.1f}  tokens/tile {g.tokens_per_tile}, heads/tile "
              f"{g.heads_per_tile}, block_n {g.block_n}, warps {g.num_warps}, stages "
              f"{g.num_stages}, programs {plan.programs}, fixup {plan.fixup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
