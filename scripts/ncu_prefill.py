"""One prompt chunk through `auto`'s plan (the warp-specialised kernel), three calls, for Nsight
Compute to profile the second (PERF.md, "Open questions" 3):

    ncu -k regex:ws_prefill --launch-skip 1 --launch-count 1 \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --print-details all \\
        python3 scripts/ncu_prefill.py gpt-oss
    ncu ... --section SourceCounters --page source --print-source sass --csv ...  # per instruction

Any seed-grid model (`prefill/ncu.txt`: gpt-oss and llama-8b), n = 512, L = 16384, f16.
"""
import argparse
import sys

import torch

import skattn
from skattn.bench.models import MODELS


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--kv-len", type=int, default=16384)
    args = ap.parse_args(argv)
    hq, hkv, d = MODELS[args.model][:3]
    q = torch.randn(1, args.n, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, args.kv_len, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    p = skattn.plan(batch=1, q_len=args.n, kv_len=args.kv_len, q_heads=hq, kv_heads=hkv,
                    head_dim=d, dtype=torch.float16, causal=True)
    print(args.model, "kernel", p.tuning.prefill, flush=True)
    for _ in range(3):
        skattn.attention(q, k, v, causal=True, plan=p)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
