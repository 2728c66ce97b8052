"""Python time of a planned skattn call on a CPU, with the GPU launches stubbed.

    TRITON_INTERPRET=1 PYTHONPATH=src python3 tools/host_cpu.py [--calls 2000] [--reps 7] [--json PATH]

llama-8b decode (n = 1, L = 256) planned for an H200's grid (a uniform plan: two launches a
call), over f16 K/V and over FP8 K/V (as read, and on the dequant route). The launches go to Triton's Python launcher wrapper around a counter, or (rows
"..., C launcher") to skattn's C launcher with its driver call left out
(`skattn.bench.host_cpu`), so the numbers are skattn's Python plus that launcher code: what
the host path costs before the driver. Compare runs on one machine only.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before skattn's kernels are decorated

from skattn.bench.host_cpu import measure  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed run")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per row (median)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    result = measure(args.calls, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"plan fixup {result['fixup']}, {result['launches']} launches a call")
    for name, us in result.items():
        if isinstance(us, float):
            print(f"{name:34s} {us:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
