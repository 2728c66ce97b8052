"""Steps of a continuous batch, side by side: `attention_varlen` over a paged cache in one
plan a step (`q_split=None`; pages of 256, or --page; with max_seqlen_q as given, and as
skattn's transformers forward would plan it under CUDA graphs: the token count padded to a
multiple of 64, rounded up to a power of two; the padded tokens and sequences themselves
are not added; with `Tuning()`, whole tiles on the base kernel instead of the Hopper
kernel; and with policy "split", whole tiles where the step has more tiles than programs)
against the dense path
(`skattn.attention`, one call a request) and SDPA's flash kernel (causal, one call a
request; fresh prompts only), same inputs, same run.

    PYTHONPATH=src python3 tools/varlen_prefill.py [--page 256] [--reps 10]

Cases (llama-8b heads, f16): the prompts of one 8192-token step as transformers' continuous
batching packs them (1 x 8192, 4 x 2048, 16 x 512 fresh prompts) and a 1024-token chunk
after 2048 keys among 31 decode rows. Each varlen output is checked against the dense path's
before timing. Prints µs per call (CUDA events, median of reps, warm L2), the varlen
plan's geometry and whether the GPU ran the step in whole tiles (docs/serving.md, "Whole
tiles"); writes the same rows to $OUT/varlen_steps.csv with provenance in varlen_steps.json
(default benchmarks/results/latest/cb).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import skattn
from skattn.bench.records import write_table
from skattn.bench.run import provenance
from skattn.kernels.worklist import WHOLE_FLAG

HQ, HKV, D = 32, 8, 128
# name -> (query tokens, key tokens) per request: the prompts of one 8192-token step, and a
# step of continuous batching that mixes a prompt chunk with decode rows
CASES = {"1x8192": ([8192], [8192]), "4x2048": ([2048] * 4, [2048] * 4),
         "16x512": ([512] * 16, [512] * 16),
         "chunk+31": ([1024] + [1] * 31, [3072] + [2048 + 64 * i for i in range(31)])}


def timed(fn, reps: int) -> float:
    """µs of GPU time of fn(), median of reps: the stream is held by a spin kernel while the
    host queues the calls, so host overhead between them (the dense and SDPA columns make one
    call a request) does not count."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10 ms
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
    print(f"{'case':9} {'varlen':>9} {'base':>9} {'max_q=pad':>9} {'split':>9} {'':12} {'dense':>9} "
          f"{'sdpa':>9} {'whole':>5}  plan")
    rows = []
    for name, (lq, lk) in CASES.items():
        B, total, total_k = len(lq), sum(lq), sum(lk)
        q = torch.randn(total, HQ, D, device=dev, dtype=f16)
        k = torch.randn(total_k, HKV, D, device=dev, dtype=f16)
        v = torch.randn(total_k, HKV, D, device=dev, dtype=f16)
        cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
        pages_per = -(-max(lk) // args.page)
        kc = torch.zeros(B * pages_per, args.page, HKV, D, device=dev, dtype=f16)
        vc = torch.zeros_like(kc)
        table = torch.randperm(B * pages_per, device=dev).view(B, pages_per).to(torch.int32)
        for b, L in enumerate(lk):
            s = int(cu_k[b])
            for j in range(-(-L // args.page)):
                n = min(args.page, L - j * args.page)
                kc[table[b, j], :n] = k[s + j * args.page:s + j * args.page + n]
                vc[table[b, j], :n] = v[s + j * args.page:s + j * args.page + n]
        cu_q, cu_k = cu_q.to(dev), cu_k.to(dev)
        out = torch.empty_like(q)

        def one_plan(max_q):  # each step in one plan (q_split=None), as the rows are labelled
            return skattn.serving._cached_plan(q.device, q_split=None, **dict(
                batch=B, max_q_len=max_q, total_q=total, max_kv_len=max(lk),
                page_size=args.page, max_pages=pages_per, q_heads=HQ, kv_heads=HKV, head_dim=D,
                head_dim_v=D, dtype=f16, causal=True, window=None))

        def varlen(max_q, plan=None):
            plan = one_plan(max_q) if plan is None else plan
            return lambda: skattn.attention_varlen(q, kc, vc, cu_q, cu_k, max_q, max(lk),
                                                   block_table=table, out=out, plan=plan)

        # the same plan with whole tiles on the base kernel (Tuning(): no Hopper kernel)
        base_plan = skattn.serving_plan(
            batch=B, max_q_len=max(lq), total_q=total, max_kv_len=max(lk), page_size=args.page,
            max_pages=pages_per, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=f16, causal=True,
            q_split=None, tuning=skattn.Tuning())
        # policy "split" with one piece a tile: every real tile whole, one program each
        whole = skattn.serving_plan(
            batch=B, max_q_len=max(lq), total_q=total, max_kv_len=max(lk), page_size=args.page,
            max_pages=pages_per, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=f16, causal=True,
            policy="split", q_split=None)

        qs = [q[int(cu_q[b]):int(cu_q[b + 1])][None] for b in range(B)]
        ks = [k[int(cu_k[b]):int(cu_k[b + 1])][None] for b in range(B)]
        vs = [v[int(cu_k[b]):int(cu_k[b + 1])][None] for b in range(B)]

        def dense():  # bottom-right causal, one call a request
            return [skattn.attention(a, b_, c, causal=True) for a, b_, c in zip(qs, ks, vs)]

        def sdpa():  # top-left causal: the same masks only where every request is a fresh prompt
            return [F.scaled_dot_product_attention(
                a.transpose(1, 2), b_.transpose(1, 2), c.transpose(1, 2), is_causal=True,
                enable_gqa=True) for a, b_, c in zip(qs, ks, vs)]

        ref = torch.cat([o[0] for o in dense()])
        padded = 1 << (-(-total // 64) * 64 - 1).bit_length()  # as transformers_paged sees it
        runs = dict(varlen=varlen(max(lq)), padded=varlen(padded), split=varlen(max(lq), whole),
                    base=varlen(max(lq), base_plan))
        for label, run in runs.items():
            out.fill_(float("nan"))
            run()
            err = (out.float() - ref.float()).abs().max().item()
            assert err < 2e-2, (name, label, err, out.isnan().any(-1).any(-1).nonzero()[:4].tolist())
        plan = one_plan(max(lq))
        g = plan.geometry
        wl = skattn.serving.work_list(plan, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        r = dict(case=name, page=args.page, varlen_us=timed(varlen(max(lq)), args.reps),
                 varlen_max_q_padded_us=timed(varlen(padded), args.reps),
                 split_whole_tiles_us=timed(varlen(max(lq), whole), args.reps),
                 varlen_base_us=timed(varlen(max(lq), base_plan), args.reps),
                 dense_us=timed(dense, args.reps),
                 sdpa_flash_us=timed(sdpa, args.reps) if lq == lk else None,
                 whole_tiles=bool(wl[WHOLE_FLAG.value]),
                 plan=f"tokens/tile {g.tokens_per_tile}, heads/tile {g.heads_per_tile}, block_n "
                      f"{g.block_n}, warps {g.num_warps}, stages {g.num_stages}, programs "
                      f"{plan.programs}, fixup {plan.fixup}")
        rows.append({k: round(x, 1) if isinstance(x, float) else x for k, x in r.items()})
        t_sdpa = f"{r['sdpa_flash_us']:9.1f}" if r["sdpa_flash_us"] is not None else f"{'-':>9}"
        print(f"{name:9} {r['varlen_us']:9.1f} {r['varlen_base_us']:9.1f} {r['varlen_max_q_padded_us']:9.1f} "
              f"{r['split_whole_tiles_us']:9.1f} ({whole.split} a tile) {r['dense_us']:9.1f} "
              f"{t_sdpa} {'yes' if r['whole_tiles'] else 'no':>5}  {r['plan']}")
    meta = dict(provenance(torch.cuda.get_device_properties(0).multi_processor_count),
                command="python3 tools/varlen_prefill.py " + " ".join(sys.argv[1:]),
                timer="CUDA events, median of reps, warm L2, the stream held by a spin kernel",
                columns="varlen: policy auto, one plan a step (q_split=None; whole_tiles: the GPU "
                        "ran the step in whole tiles, on the Hopper kernel where the plan "
                        "takes it); varlen_base: the same with Tuning(), whole tiles on the "
                        "base kernel; "
                        "max_q_padded: max_seqlen_q as transformers' graphs pad it; split: "
                        "policy split, one piece a tile in tile order; dense: skattn.attention a "
                        "request at a time; sdpa_flash: SDPA's flash kernel, fresh prompts only")
    write_table(rows, os.environ.get("OUT", "benchmarks/results/latest/cb"), "varlen_steps", meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
