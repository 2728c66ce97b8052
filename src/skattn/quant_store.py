"""New K and V rows written into a quantized cache in one launch (`kernels/store.py`).

    quant_store.store_fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, start)
    quant_store.store_q8_0(k_blocks, v_blocks, k_new, v_new, start)
    quant_store.store_fp8_slots(k_cache, v_cache, k_scale, v_scale, k_new, v_new, slot_mapping)
    quant_store.store_q8_0_slots(k_blocks, v_blocks, k_new, v_new, slot_mapping)

`k_new`, `v_new` are `[B, n, Hkv, D]` (f16, bf16 or f32, any strides: a transposed view of
transformers' `[B, Hkv, n, D]` states works as it is), written to rows `start .. start + n - 1`
of every sequence of the caches `[B, L, Hkv, D]`, quantized exactly as `skattn.quant.q8_0`
and `skattn.transformers_fp8.quantize` do (the same bits). `start` is a one-element integer
tensor on the caches' device, read there, so a CUDA graph of a decode step writes where the
cache's length says at each replay. Rows that would fall past L are not written (no write
outside the cache; a caller that lets its cache overflow loses those tokens).

The `_slots` forms write a serving step's tokens into a paged cache `[pages, page_size, Hkv,
D]` (`skattn.attention_with_kvcache`'s): `k_new`, `v_new` are `[T, Hkv, D]` and token t goes
to row `slot_mapping[t] % page_size` of page `slot_mapping[t] // page_size` (vLLM's
convention; a negative slot, such as -1 for a padding token, or one past the cache is not
written). A dense serving cache `[B, Lmax, Hkv, D]` takes slots `b * Lmax + position`.

One launch writes both K and V, where torch operations take 10 (FP8) to 42 (q8_0) small
kernels a layer; on a CPU the kernels run under the Triton interpreter.
"""
from __future__ import annotations

import torch
import triton

from skattn import quant
from skattn.device import interpreting
from skattn.kernels.store import store_fp8_kernel, store_q8_0_kernel

__all__ = ["store_fp8", "store_q8_0", "store_fp8_slots", "store_q8_0_slots"]


def _check(name, cache, new, where, value_dtype, slots: bool) -> None:
    if not isinstance(new, torch.Tensor) or new.dtype not in (torch.float16, torch.bfloat16,
                                                                torch.float32):
        raise TypeError(f"{name}_new must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(new, 'dtype', type(new).__name__)}")
    if cache.dtype != value_dtype or cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(f"{name} cache must be a {value_dtype} [B, L, Hkv, D] tensor contiguous "
                         f"in D, got {cache.dtype} {tuple(cache.shape)}")
    B, _, H, D = cache.shape
    want, got = ((H, D), (new.shape[1:] if new.dim() == 3 else None)) if slots else (
        (B, H, D), ((new.shape[0], *new.shape[2:]) if new.dim() == 4 else None))
    if got is None or tuple(got) != want or new.stride(-1) != 1:
        form = f"[T, {H}, {D}]" if slots else f"[{B}, n, {H}, {D}]"
        raise ValueError(f"{name}_new must be {form} contiguous in D, got {tuple(new.shape)} "
                         f"with strides {new.stride()}")
    if new.device != cache.device or where.device != cache.device:
        raise ValueError(f"{name}_new, its cache and the positions must be on one device, got "
                         f"{new.device}, {cache.device}, {where.device}")


def _where(where, slots: bool, tokens: int) -> torch.Tensor:
    """`start` (one element) or `slot_mapping` ([T]), an int32 or int64 tensor."""
    ok = isinstance(where, torch.Tensor) and where.dtype in (torch.int32, torch.int64)
    if slots and not (ok and where.dim() == 1 and where.shape[0] == tokens):
        raise TypeError(f"slot_mapping must be an int32 or int64 [T] = [{tokens}] tensor on the "
                        f"caches' device, got {where!r}")
    if not slots and not (ok and where.numel() == 1):
        raise TypeError("start must be a one-element int32 or int64 tensor on the caches' "
                        f"device, got {where!r}")
    return where.contiguous() if slots else where


def _same(k_cache, v_cache, k_new, v_new) -> None:
    if k_new.shape[:-1] != v_new.shape[:-1] or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"K and V must have the same tokens and heads, and caches the same "
                         f"[B, L, Hkv], got new {tuple(k_new.shape)}, {tuple(v_new.shape)} and "
                         f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")


def _geometry(cache, new, slots: bool) -> tuple:
    """(the new states as [B, n, H, D], programs, n, heads, L, cache rows)."""
    new4 = new.unsqueeze(0) if slots else new
    B, n, H = new4.shape[:3]
    return new4, B * n * H, n, H, cache.shape[1], cache.shape[0] * cache.shape[1]


def _fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, where, slots: bool) -> None:
    for name, cache, new, scale in (("k", k_cache, k_new, k_scale),
                                    ("v", v_cache, v_new, v_scale)):
        if not isinstance(scale, torch.Tensor):  # (a float would cost a copy to the device)
            raise TypeError(f"{name}_scale must be a float32 tensor, got {type(scale).__name__}")
    where = _where(where, slots, k_new.shape[0] if isinstance(k_new, torch.Tensor) else -1)
    for name, cache, new, scale in (("k", k_cache, k_new, k_scale),
                                    ("v", v_cache, v_new, v_scale)):
        _check(name, cache, new, where, torch.float8_e4m3fn, slots)
        quant._scale(f"{name}_scale", scale, cache.shape[2], cache.device)
    quant.fp8_capability(k_cache.device)
    _same(k_cache, v_cache, k_new, v_new)
    k_new, programs, n, heads, L, rows = _geometry(k_cache, k_new, slots)
    v_new = _geometry(v_cache, v_new, slots)[0]
    if programs == 0:
        return
    interpret = interpreting()
    if interpret:  # the kernel writes the bytes itself (`kernels.store._e4m3_bits`)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    store_fp8_kernel[(programs,)](
        k_new, *k_new.stride()[:3], v_new, *v_new.stride()[:3],
        k_cache, *k_cache.stride()[:3], v_cache, *v_cache.stride()[:3], k_scale.reshape(-1),
        v_scale.reshape(-1), where, n, heads, L, rows,
        DK=k_cache.shape[3], DV=v_cache.shape[3],
        BLOCK_DK=triton.next_power_of_2(k_cache.shape[3]),
        BLOCK_DV=triton.next_power_of_2(v_cache.shape[3]),
        K_HEAD_SCALES=int(k_scale.numel() > 1), V_HEAD_SCALES=int(v_scale.numel() > 1),
        INTERPRET=interpret, SLOTS=slots)


def _q8_0(k_blocks, v_blocks, k_new, v_new, where, slots: bool) -> None:
    for name, blocks in (("k", k_blocks), ("v", v_blocks)):
        if type(blocks).__name__ != "Q8_0":
            raise TypeError(f"{name} cache must be a skattn.quant.Q8_0, got "
                            f"{type(blocks).__name__}")
    where = _where(where, slots, k_new.shape[0] if isinstance(k_new, torch.Tensor) else -1)
    for name, blocks, new in (("k", k_blocks, k_new), ("v", v_blocks, v_new)):
        _check(name, blocks.values, new, where, torch.int8, slots)
    kv, vv = k_blocks.values, v_blocks.values
    _same(kv, vv, k_new, v_new)
    k_new, programs, n, heads, L, rows = _geometry(kv, k_new, slots)
    v_new = _geometry(vv, v_new, slots)[0]
    if programs == 0:
        return
    store_q8_0_kernel[(programs,)](
        k_new, *k_new.stride()[:3], v_new, *v_new.stride()[:3],
        kv, *kv.stride()[:3], k_blocks.scales, *k_blocks.scales.stride()[:3],
        vv, *vv.stride()[:3], v_blocks.scales, *v_blocks.scales.stride()[:3], where, n, heads,
        L, rows, DK=kv.shape[3], DV=vv.shape[3], BLOCK_DK=triton.next_power_of_2(kv.shape[3]),
        BLOCK_DV=triton.next_power_of_2(vv.shape[3]), SLOTS=slots,
        enable_fp_fusion=False)  # x * (1 / d) + 0.5 rounded twice, as torch does, not one FMA


def store_fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, start) -> None:
    """Quantize `k_new`, `v_new` `[B, n, Hkv, D]` with `k_scale`, `v_scale` (float32 `[1]` or
    `[Hkv]`) into the float8_e4m3fn caches `[B, L, Hkv, D]` at rows `start ..` (module
    docstring): x / scale in float32, clamped to +-448, rounded to nearest e4m3."""
    _fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, start, False)


def store_q8_0(k_blocks, v_blocks, k_new, v_new, start) -> None:
    """Quantize `k_new`, `v_new` `[B, n, Hkv, D]` into the `skattn.quant.Q8_0` caches
    `k_blocks`, `v_blocks` at rows `start ..` (module docstring), as `skattn.quant.q8_0`."""
    _q8_0(k_blocks, v_blocks, k_new, v_new, start, False)


def store_fp8_slots(k_cache, v_cache, k_scale, v_scale, k_new, v_new, slot_mapping) -> None:
    """`store_fp8` for a serving step: `k_new`, `v_new` `[T, Hkv, D]` into the paged caches
    `[pages, page_size, Hkv, D]` at `slot_mapping` `[T]` (module docstring)."""
    _fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, slot_mapping, True)


def store_q8_0_slots(k_blocks, v_blocks, k_new, v_new, slot_mapping) -> None:
    """`store_q8_0` for a serving step: `k_new`, `v_new` `[T, Hkv, D]` into the paged
    `Q8_0` caches at `slot_mapping` `[T]` (module docstring)."""
    _q8_0(k_blocks, v_blocks, k_new, v_new, slot_mapping, True)
