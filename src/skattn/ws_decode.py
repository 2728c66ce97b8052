"""`auto`'s plan for decode tiles of 80-128 rows a KV head (16 tokens at GQA ratio 8, 12 at 8,
16 at 5): the warp-specialised prompt kernel (`kernels/prefill_ws.py`) in 128-key blocks, one
program an SM, each tile cut into equal pieces for the uniform fixup.

`planner.plan` asks for it where the caller names no tuning, program count, geometry or cost
model, the plan's tiles have 128 rows in one token block a KV head, and the current GPU (if
any) is a Hopper; `prefill_launch.refusal` then rules out what the kernel does not take
(quantized K/V, other head sizes, a window, a mask). Measured on an H200 (PERF.md, "Decode
on the graph timer"): 1.04-1.14x the base kernel at n = 12-16, where 132 programs with the
general fixup and 264 (two waves at one an SM) ran slower than the base kernel.
"""
from __future__ import annotations

import torch

from skattn import prefill_launch
from skattn.policy import MAX_EFFICIENCY_LOSS_PERCENT
from skattn.tuning import Tuning

PER_SM = 1  # programs an SM of the warp-specialised kernel in 128-key blocks
BLOCKS = 2  # the fewest KV blocks a program (measured with 2 and 4)
PIECES = 4  # the fewest pieces a tile (measured with 16 and 32)
ROWS = 80  # the fewest rows a KV head (measured with 80, 96 and 128)
MERGE_STEP = 16  # pieces the fixup merges in one step


def on_hopper_or_no_gpu() -> bool:
    """Whether the current GPU, where there is one, is a Hopper (sm_90): the warp-specialised
    kernel's; without a GPU a plan is made for one."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 9


def plan_for(plan, given: dict, ntiles_dst: int, sms: int):
    """The plan `plan(**given)` makes on the warp-specialised kernel: each tile in PIECES or
    more equal pieces (a multiple of MERGE_STEP where that still fills 95% of the SMs) on at
    least 95% of the SMs, at least BLOCKS KV blocks a program; None where no such plan exists,
    none fits in 128-key blocks (shared memory, fewer items than programs) or the kernel
    refuses it."""
    fill = (100 - MAX_EFFICIENCY_LOSS_PERCENT) * sms
    per_tile = sms * PER_SM // ntiles_dst
    if per_tile > MERGE_STEP and ntiles_dst * (per_tile // MERGE_STEP * MERGE_STEP) * 100 >= fill:
        per_tile = per_tile // MERGE_STEP * MERGE_STEP
    programs = ntiles_dst * per_tile
    if per_tile < PIECES or programs * 100 < fill:
        return None
    try:
        p = plan(**dict(given, programs=programs, block_n=128, tuning=Tuning(prefill="ws")))
    except ValueError:
        return None
    if (p.tuning.prefill != "ws" or p.fixup not in ("uniform", "none")
            or p.work < BLOCKS * programs or prefill_launch.refusal(p) is not None):
        return None
    return p
