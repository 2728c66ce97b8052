"""The smallest Gluon kernel with `gl.warp_specialize` (no shared memory of its own, no TMA,
no MMA): a default partition and one worker partition, each storing its arguments to global
memory. Run under `compute-sanitizer --tool racecheck`, it shows which hazards come from
Triton's warp-specialisation protocol itself (the partitions' state and captured arguments
passed through shared memory around named barrier 1), to tell them apart from a kernel's
own (docs/prefill.md, "Checks").

    compute-sanitizer --tool racecheck python3 scripts/ws_protocol_probe.py
    python3 scripts/ws_protocol_probe.py --build   # no GPU: the sm_90a build's protocol

`--build` prints one JSON line: the PTX's named-barrier-1 syncs and its shared-memory stores
and loads (all of them the protocol's: the kernel has no shared memory of its own).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _default(out, a, b):
    gl.store(out + gl.program_id(0) * 4, a + b)


@gluon.jit
def _worker(out, a, b):
    gl.store(out + gl.program_id(0) * 4 + 1, a * b)


@gluon.jit
def probe_kernel(out, a, b):
    gl.warp_specialize([(_default, (out, a, b)), (_worker, (out, a, b))], [1], [24])


def build() -> dict:
    """The sm_90a build's protocol, counted in its PTX (scripts/ws_build.py's binder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ws_build import compile_sm90

    ptx = compile_sm90(probe_kernel, (torch.zeros(8, dtype=torch.int32), 3, 5),
                       dict(num_warps=4)).asm["ptx"]
    return dict(barrier_1=len(re.findall(r"barrier\.sync\s+1;", ptx)),
                shared_stores=len(re.findall(r"st\.shared", ptx)),
                shared_loads=len(re.findall(r"ld\.shared", ptx)),
                warp_switch=len(re.findall(r"brx\.idx", ptx)))


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="no GPU: count the sm_90a build's protocol")
    if ap.parse_args(argv).build:
        print(json.dumps(build()))
        return 0
    out = torch.zeros(4 * 132, dtype=torch.int32, device="cuda")
    probe_kernel[(132,)](out, 3, 5, num_warps=4)
    torch.cuda.synchronize()
    got = out.view(132, 4)[:, :2].cpu()
    ok = bool((got[:, 0] == 8).all() and (got[:, 1] == 15).all())
    print(f"warp_specialize probe: {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
