"""One prompt chunk through `auto`'s plan (the warp-specialised kernel), three calls, for Nsight
Compute to profile the second (PERF.md, "Open questions" 3):

    ncu -k regex:ws_prefill --launch-skip 1 --launch-count 1 \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --print-details all \\
        python3 scripts/ncu_prefill.py gpt-oss
    ncu ... --section SourceCounters --page source --print-source sass --csv ...  # per instruction

Any seed-grid model (`prefill/ncu.txt`: gpt-oss and llama-8b), n = 512, L = 16384, f16 by
default; `--n 1 --format fp8` profiles a decode call instead (its main kernel is
`attention_kernel`: `ncu -k regex:attention_kernel ...`).
"""
import argparse
import sys

import torch

import skattn
from skattn.bench.models import MODELS
from skattn.bench.quant import quantize

DTYPES = {"f16": torch.float16, "fp8": torch.float8_e4m3fn, "q8_0": "q8_0", "q4_0": "q4_0"}


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--kv-len", type=int, default=16384)
    ap.add_argument("--format", default="f16", choices=("f16", "fp8", "q8_0", "q4_0"),
                    help="K/V's form (skattn.bench.quant.quantize)")
    args = ap.parse_args(argv)
    hq, hkv, d = MODELS[args.model][:3]
    q = torch.randn(1, args.n, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, args.kv_len, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q, k, v, kw = quantize(args.format, q, k, v)
    p = skattn.plan(batch=1, q_len=args.n, kv_len=args.kv_len, q_heads=hq, kv_heads=hkv,
                    head_dim=d, dtype=DTYPES[args.format], causal=True)
    print(args.model, args.format, "kernel", p.tuning.prefill, p.describe() if args.n < 64 else "",
          flush=True)
    for _ in range(3):
        skattn.attention(q, k, v, causal=True, plan=p, **kw)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
