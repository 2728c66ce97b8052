"""The smallest Gluon kernels with `gl.warp_specialize` (no TMA, no MMA, no shared memory that
two partitions share), each partition storing its arguments to global memory: `probe_kernel`, a default
partition and one worker of one warp; `probe_kernel_ws_shape`, the partitions of
`kernels/prefill_ws.py` (a default of 4 warps, workers of 4 and 1 warps, the same register
split and cap, so the same padding warps and register hand-over); `probe_kernel_full_smem`,
that shape behind 224 KB of shared memory, so the protocol's words sit where the kernel's
do. Run under `compute-sanitizer --tool racecheck`, it shows which hazards come from
Triton's warp-specialisation protocol itself (the partitions' state and captured arguments
passed through shared memory around named barrier 1), to tell them apart from a kernel's
own (docs/prefill.md, "Checking it").

    compute-sanitizer --tool racecheck python3 scripts/ws_protocol_probe.py
    python3 scripts/ws_protocol_probe.py --build   # no GPU: the sm_90a build's protocol

`--build` prints one JSON line: the first kernel's named-barrier-1 syncs and shared-memory
stores and loads (all of them the protocol's), the second's barrier-1 syncs and register
hand-overs (`setmaxnreg`), the third's shared memory in bytes.
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


@gluon.jit
def _worker2(out, a, b):
    gl.store(out + gl.program_id(0) * 4 + 2, a - b)


@gluon.jit
def probe_kernel_ws_shape(out, a, b):
    gl.warp_specialize([(_default, (out, a, b)), (_worker, (out, a, b)), (_worker2, (out, a, b))],
                       [4, 1], [240, 24])


@gluon.jit
def _default_full(out, a, b, bufs):
    # reads each buffer's last word, so the buffers live while the partitions run
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    total = a + b
    for i in gl.static_range(3):
        total += gl.min(bufs[i].slice(bufs[i].shape[0] - 128, 128).load(layout), 0) - 7
    gl.store(out + gl.program_id(0) * 4, total)


@gluon.jit
def probe_kernel_full_smem(out, a, b):
    # the kernel's shape with shared memory as full as the kernel's (224 KB in three buffers
    # before the protocol's words), each buffer's last words written before the partitions
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    b13 = gl.allocate_shared_memory(gl.int32, [1 << 13], smem)
    b14 = gl.allocate_shared_memory(gl.int32, [1 << 14], smem)
    b15 = gl.allocate_shared_memory(gl.int32, [1 << 15], smem)
    b13.slice((1 << 13) - 128, 128).store(gl.full([128], 7, gl.int32, layout))
    b14.slice((1 << 14) - 128, 128).store(gl.full([128], 7, gl.int32, layout))
    b15.slice((1 << 15) - 128, 128).store(gl.full([128], 7, gl.int32, layout))
    gl.warp_specialize([(_default_full, (out, a, b, (b13, b14, b15))), (_worker, (out, a, b)),
                        (_worker2, (out, a, b))], [4, 1], [240, 24])


def build() -> dict:
    """The sm_90a build's protocol, counted in its PTX (scripts/ws_build.py's binder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ws_build import compile_sm90

    ptx = compile_sm90(probe_kernel, (torch.zeros(8, dtype=torch.int32), 3, 5),
                       dict(num_warps=4)).asm["ptx"]
    shaped = compile_sm90(probe_kernel_ws_shape, (torch.zeros(8, dtype=torch.int32), 3, 5),
                          dict(num_warps=4, maxnreg=168)).asm["ptx"]
    full = compile_sm90(probe_kernel_full_smem, (torch.zeros(8, dtype=torch.int32), 3, 5),
                        dict(num_warps=4, maxnreg=168)).metadata.shared
    return dict(shared_full=full, setmaxnreg_ws_shape=len(re.findall(r"setmaxnreg", shaped)),
                barrier_1_ws_shape=len(re.findall(r"barrier\.sync\s+1;", shaped)),
                barrier_1=len(re.findall(r"barrier\.sync\s+1;", ptx)),
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
    ok = True
    for kernel, extra in ((probe_kernel, {}), (probe_kernel_ws_shape, dict(maxnreg=168)),
                          (probe_kernel_full_smem, dict(maxnreg=168))):
        out.zero_()
        kernel[(132,)](out, 3, 5, num_warps=4, **extra)
        torch.cuda.synchronize()
        got = out.view(132, 4).cpu()
        # each partition's store: a + b, a * b and (but the first kernel's) a - b
        want = [8, 15] if kernel is probe_kernel else [8, 15, -2]
        ok = ok and bool((got[:, :len(want)] == torch.tensor(want, dtype=torch.int32)).all())
    print(f"warp_specialize probe (three kernels): {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
