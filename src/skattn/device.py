"""What the planner needs to know about the machine: SMs, programs per SM, shared memory."""
from __future__ import annotations

import os

# Programs per SM when none is measured: llama.cpp's occupancy for its D=128 kernels, and
# what skattn's compiled kernels reach on H100/H200 (see PERF.md).
DEFAULT_BLOCKS_PER_SM = 2
# Under TRITON_INTERPRET=1 on a CPU: a small pretend grid, so that tiny test shapes still
# split tiles between programs.
INTERPRETER_SMS = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def hardware(device=None) -> tuple[int, int]:
    """(SMs, programs per SM) of `device` (default: the current CUDA GPU)."""
    import torch

    if device is not None and torch.device(device).type == "cpu":
        if interpreting():
            return INTERPRETER_SMS, DEFAULT_BLOCKS_PER_SM
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    if not torch.cuda.is_available():
        if interpreting():
            return INTERPRETER_SMS, DEFAULT_BLOCKS_PER_SM
        raise RuntimeError(
            "no CUDA GPU here: pass sms= and occupancy= to skattn.plan (for example "
            "sms=132, occupancy=2 for an H100 SXM)")
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, DEFAULT_BLOCKS_PER_SM


def shared_memory_limit(device=None) -> int:
    """Shared memory (bytes) one program may use on `device` (default: the current CUDA GPU):
    its opt-in limit per block; sm_90's 232448 on a CPU or under the interpreter."""
    import torch

    from skattn.config import SM90_SHARED_LIMIT

    if interpreting() or (device is not None and torch.device(device).type == "cpu"):
        return SM90_SHARED_LIMIT
    if not torch.cuda.is_available():
        return SM90_SHARED_LIMIT
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
