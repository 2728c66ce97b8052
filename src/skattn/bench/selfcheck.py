"""A small correctness run of skattn.attention on tiny shapes (the Triton interpreter on a CPU).

Run as `TRITON_INTERPRET=1 python -m skattn.bench.selfcheck`; the bench starts it in a child
process so that the interpreter is switched on before Triton is first imported.
"""
from __future__ import annotations

import os
import sys
import time

from skattn.bench.grid import Cell

# Tiny shapes that still split tiles between the interpreter's 8 pretend programs:
# 12/3 with 1 token: 3 tiles of 5 KV blocks, 8 programs -> general fixup;
# 10/2 with 3 tokens: GQA ratio 5 and a ragged Lk (not a multiple of BLOCK_N) -> uniform.
SHAPES = (Cell("tiny", 12, 3, 64, 1, 300), Cell("tiny", 10, 2, 64, 3, 130))
VARIANTS = ("llamacpp-before", "llamacpp", "fused")
SMS, BLOCKS_PER_SM = 4, 2


def check(time_limit_s: float = 90.0) -> tuple[int, int, list[str]]:
    """Run every (shape, variant) until the time limit.

    Returns
    -------
    (int, int, list of str)
        Passed, failed and one report line per run (or one line saying why nothing ran).
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import skattn
    from skattn.bench.grid import SKATTN_VARIANTS
    from skattn.bench.providers import reference, relative_error
    from skattn.bench.run import TOLERANCE

    start, passed, failed, lines = time.monotonic(), 0, 0, []
    g = torch.Generator().manual_seed(0)
    for cell in SHAPES:
        q = torch.randn(1, cell.n, cell.hq, cell.d, generator=g).half()
        k = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g).half()
        v = torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g).half()
        ref = reference(q, k, v)
        for variant in VARIANTS:
            if time.monotonic() - start > time_limit_s:
                lines.append(f"time limit {time_limit_s:g} s reached: the remaining runs were skipped")
                return passed, failed, lines
            policy, fixup = SKATTN_VARIANTS[variant]
            name = f"{cell.label} {variant}"
            try:
                p = skattn.plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                                kv_heads=cell.hkv, head_dim=cell.d, dtype=k.dtype, causal=True,
                                sms=SMS, occupancy=BLOCKS_PER_SM, policy=policy, fixup=fixup)
                err = relative_error(skattn.attention(q, k, v, causal=True, plan=p), ref)
            except Exception as exc:
                failed += 1
                lines.append(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[:1]}")
                continue
            ok = err <= TOLERANCE[k.dtype]
            passed, failed = passed + ok, failed + (not ok)
            lines.append(f"{'pass' if ok else 'FAIL'} {name} (N={p.programs}, fixup {p.fixup}): "
                         f"relative error {err:.2e}")
    return passed, failed, lines


def main() -> int:
    """Print one line per run and a total; exit status 1 when a run failed."""
    passed, failed, lines = check()
    for line in lines:
        print(line)
    if passed or failed:
        print(f"interpreter correctness: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
