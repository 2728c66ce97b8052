"""The instruction mix of the main kernel's KV loop, compiled here for sm_90 (no GPU).

  python3 scripts/sass_loop.py D Dv n FORMAT [--heads 4] [--kv-len 32768] [--top 16] [--json]
      [--plan KEY=INT,...]
      # FORMAT: float16, float8_e4m3fn, q8_0 or q4_0; --heads: query heads on one KV head;
      # --plan: skattn.plan keywords and Tuning fields (num_warps=2,block_n=64,num_stages=3,
      # occupancy=4: q8_0's two-warp decode tiles; q8_0_v_blocks=0: V staged)

Plans one KV head's call as `scripts/resources.py` does (its default main kernel at two
programs an SM, built for the GPU, not the interpreter; so q8_0 decode tiles in four warps,
not the two-warp default of plans that name no occupancy, `config.q8_0_narrow_decode`, which
--plan builds), compiles it for sm_90a, disassembles the cubin with Triton's own `nvdisasm`
and finds the loops: the instructions between a backward branch and its
target. The loops that hold an MMA (`HMMA` or `HGMMA`) are the KV loop's variants (the
unmasked blocks first, then the masked ones) and the loops around them (a program's loop
over its tiles); for each it prints its warp instructions (for a KV loop: a KV block's)
and the commonest opcodes. A loop's length predicts
a change's worth where the loop is bound by issue (quantized K/V: PERF.md).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton

from skattn.bench.quant import parse_geo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resources  # noqa: E402

_INSTR = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);")
_LABEL = re.compile(r"\s*\.(L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?\.?(L_x_\d+)")


def sass(D: int, Dv: int, n: int, kv: str, heads: int = 4, kv_len: int = 32768,
         **overrides) -> str:
    """The sm_90a SASS of the default main kernel for one KV head of `heads` query heads;
    `overrides`: plan keywords (`resources._main_launch`)."""
    _, fn, args, kw = resources._main_launch(D, Dv, n, heads, kv_len, kv, **overrides)
    return disassemble(resources.build(fn, args, kw).asm["cubin"])


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin, by Triton's own `nvdisasm`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def mma_loops(text: str, innermost: bool = False) -> list[list[str]]:
    """The loops of `text` (SASS) that hold an MMA, in code order: each a list of
    instructions (predicates kept) from the branch target to the backward branch.
    `innermost`: only those that hold no other such loop (the KV loops, not a program's
    loop over its tiles)."""
    labels, code = {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(code)
            continue
        m = _INSTR.match(line)
        if m:
            code.append(m.group(1).strip())
    spans = []
    for i, ins in enumerate(code):
        m = _BRANCH.search(ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            if any("HMMA" in x or "HGMMA" in x for x in code[labels[m.group(1)]:i + 1]):
                spans.append((labels[m.group(1)], i + 1))
    if innermost:
        spans = [(a, b) for a, b in spans
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [code[a:b] for a, b in spans]


def opcodes(body: list[str]) -> collections.Counter:
    """Opcode counts of a loop (the predicate dropped, modifiers kept: `HMMA.16816.F32`)."""
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0] for x in body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("D", type=int)
    ap.add_argument("Dv", type=int)
    ap.add_argument("n", type=int, help="query tokens")
    ap.add_argument("format", choices=resources.KV_FORMATS)
    ap.add_argument("--heads", type=int, default=4, help="query heads on the one KV head")
    ap.add_argument("--kv-len", type=int, default=32768)
    ap.add_argument("--top", type=int, default=16, help="opcodes printed per loop")
    ap.add_argument("--json", action="store_true", help="one JSON line per loop instead")
    ap.add_argument("--plan", default="", metavar="KEY=INT,...",
                    help="skattn.plan keywords and Tuning fields, e.g. num_warps=2,block_n=64,"
                         "num_stages=3,occupancy=4 or q8_0_v_blocks=0")
    args = ap.parse_args(argv)
    # as tools/quant_sweep.py's geometries: `default:key=value+...`
    overrides = parse_geo("default:" + args.plan.replace(",", "+")) if args.plan else {}
    loops = mma_loops(sass(args.D, args.Dv, args.n, args.format, args.heads, args.kv_len,
                           **overrides))
    for i, body in enumerate(loops):
        counts = opcodes(body)
        if args.json:
            print(json.dumps(dict(loop=i, instructions=len(body), opcodes=dict(counts))))
        else:
            top = ", ".join(f"{op} {c}" for op, c in counts.most_common(args.top))
            print(f"loop {i}: {len(body)} instructions | {top}")
    return 0 if loops else 1


if __name__ == "__main__":
    raise SystemExit(main())
