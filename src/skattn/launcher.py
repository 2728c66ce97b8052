"""skattn's C launcher (`launcher.c`): a repeat call's launches in one C call.

Triton's launcher parses every kernel argument of every launch from a Python tuple (about
50 a launch here); a recipe (`skattn.recipe`) already knows all of them but the stream and
the pointers. `spec()` packs a recipe's launches once into bytes: per launch, the compiled
kernel's CUfunction, grid, block, shared memory, launch attributes and its parameter block
with every constant in place, laid out exactly as Triton's launcher lays it out for the same
kernel (`triton/backends/nvidia/driver.py`, `make_launcher`). A call passes
`(spec, stream, *pointers)` (integers, or tensors whose `data_ptr()` the C function reads);
the C function checks their 16-byte alignment against the spec's (Triton compiled the
kernels for one pattern), writes them at their offsets and calls `cuLaunchKernelEx` per
launch.

The C module is compiled once per machine (Triton's C build and cache, as Triton builds its
own launchers) on first use; where that fails, `module()` is None, a warning says so once,
and recipes keep Triton's launcher.
"""
from __future__ import annotations

import struct
import threading
import warnings
from pathlib import Path

MAGIC = 0x314C4B53  # "SKL1"
MAX_VALUES, MAX_PARAMS, MAX_DATA = 64, 256, 4096  # as launcher.c
# Triton's parameter types and their C storage (struct formats); floats as Triton packs them
INTS = {"i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q", "u1": "B", "u8": "B",
        "u16": "H", "u32": "I", "u64": "Q"}
FLOATS = {"fp16": "e", "bf16": "H", "fp32": "f", "f32": "f", "fp64": "d"}
_LOCK = threading.Lock()
_MODULE: list = []


def module():
    """The compiled launcher module (functions `launch`, `prepare`, `describe`), or None
    where it cannot be built here (a warning says why, once)."""
    if _MODULE:
        return _MODULE[0]
    with _LOCK:
        if not _MODULE:
            _MODULE.append(_build())
    return _MODULE[0]


def _build():
    try:
        from triton.backends.nvidia.driver import include_dirs
        from triton.runtime.build import compile_module_from_src

        src = Path(__file__).with_name("launcher.c").read_text()
        m = compile_module_from_src(src=src, name="skattn_launcher", include_dirs=include_dirs)
        _bind_torch(m)
        return m
    except Exception as e:  # noqa: BLE001 (any build failure leaves Triton's launcher)
        warnings.warn(f"skattn: the C launcher could not be built ({type(e).__name__}: {e}); "
                      "repeat calls launch through Triton's launcher (a few µs more each)",
                      RuntimeWarning, stacklevel=3)
        return None


def _bind_torch(m) -> None:
    """Give the module torch's own tensor getters (`metas`, `data_ptr` of plain tensors);
    where torch.Tensor overrides one of them, `metas` stays unbound (it returns None)."""
    import torch

    names = ("shape", "dtype", "device", "requires_grad", "stride", "data_ptr")
    base = torch._C.TensorBase.__dict__
    if any(n in torch.Tensor.__dict__ or n not in base for n in names):
        return
    m.bind_torch(torch.Tensor, *(base[n] for n in names))


def metas_function():
    """The module's `metas` (what a call's signature keeps of each tensor), or None."""
    m = module()
    return None if m is None else m.metas


def function():
    """The function a recipe launches its spec with: the module's `launch`, or None."""
    m = module()
    return None if m is None else m.launch


def _bf16(x: float) -> int:
    """Triton's bf16 argument packing: the top half of the float32 bits (truncated)."""
    return struct.unpack("=I", struct.pack("=f", x))[0] >> 16


def _param(ty: str, part):
    """(struct format, value, per-call value index or None) of one parameter, or None where
    this launcher does not pack it (Triton's does)."""
    if not isinstance(ty, str):
        return None  # a tuple of parameters
    if ty.startswith("*"):
        if isinstance(part, int):
            return "Q", 0, part
        value = part[0]
        if value is None:
            return "Q", 0, None
        return ("Q", value, None) if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(part, int):
        return None  # a per-call value that is not a pointer
    value = part[0]
    if ty in INTS and isinstance(value, int):
        return INTS[ty], int(value), None
    if ty in FLOATS and isinstance(value, (int, float)):
        value = float(value)
        return (FLOATS[ty], _bf16(value) if ty == "bf16" else value, None)
    return None


def _launch_record(ck, grid, parts):
    """One launch's bytes, or None where a parameter or the launch is not packed here."""
    sig = getattr(getattr(ck, "src", None), "signature", None)
    r = ck.run
    if not isinstance(sig, dict) or len(sig) != len(parts):
        return None
    if (getattr(r, "global_scratch_size", 1) or getattr(r, "profile_scratch_size", 1)
            or getattr(r, "num_ctas", 1) != 1):
        return None
    warps, ctas, shared = ck.packed_metadata
    if ctas != 1:
        return None
    params, patches, data = [], [], bytearray()
    for ty, part in zip(sig.values(), parts):
        if ty == "constexpr":
            continue
        p = _param(ty, part)
        if p is None:
            return None
        fmt, value, index = p
        size = struct.calcsize("=" + fmt)
        data += bytes(-len(data) % size)
        if index is not None:
            patches.append((index, len(data)))
        params.append((len(data), size))
        data += struct.pack("=" + fmt, value)
    for _ in range(2):  # Triton's global and profile scratch pointers (none here)
        data += bytes(-len(data) % 8)
        params.append((len(data), 8))
        data += bytes(8)
    if len(params) > MAX_PARAMS or len(data) > MAX_DATA:
        return None
    head = struct.pack("=Q10I", ck.function, *grid, 32 * warps, shared, int(bool(r.launch_pdl)),
                       int(bool(r.launch_cooperative_grid)), len(params), len(patches), len(data))
    tables = b"".join(struct.pack("=2I", *p) for p in (*params, *patches))
    return head + tables + bytes(data) + bytes(-len(data) % 8)


def spec(launches, values: int, roles: int = 0, pattern: int = 0) -> bytes | None:
    """The spec of a call's launches, or None where one of them is not packed here.

    Parameters
    ----------
    launches : list of (CompiledKernel, grid, parts)
        `parts`: one per launcher argument after Triton's base arguments (the kernel's
        arguments, compile-time constants included, in order): an int is the index of a
        per-call pointer (1-based, after the stream), a 1-tuple a constant.
    values : int
        Per-call pointers a call passes after the stream.
    roles, pattern : int
        The first `roles` pointers were 16-byte aligned as `pattern` says (bit i set: pointer
        i is not) when the kernels were compiled; a call with another pattern gets None.
    """
    if values > MAX_VALUES or not 0 <= roles <= min(values, 32) or pattern >> roles:
        return None
    records = []
    for ck, grid, parts in launches:
        if any(isinstance(p, int) and not 1 <= p <= values for p in parts):
            return None
        parts = [p - 1 if isinstance(p, int) else p for p in parts]
        try:
            rec = _launch_record(ck, tuple(int(g) for g in grid), parts)
        except (struct.error, OverflowError, TypeError, ValueError):
            rec = None  # a value out of its type's range: Triton's launcher takes it
        if rec is None:
            return None
        records.append(rec)
    return struct.pack("=6I", MAGIC, len(records), values, roles, pattern, 0) + b"".join(records)
