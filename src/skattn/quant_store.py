"""New K and V rows written into a quantized cache in one launch (`kernels/store.py`).

    quant_store.store_fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, start)
    quant_store.store_q8_0(k_blocks, v_blocks, k_new, v_new, start)

`k_new`, `v_new` are `[B, n, Hkv, D]` (f16, bf16 or f32, any strides: a transposed view of
transformers' `[B, Hkv, n, D]` states works as it is), written to rows `start .. start + n - 1`
of every sequence of the caches `[B, L, Hkv, D]`, quantized exactly as `skattn.quant.q8_0`
and `skattn.transformers_fp8.quantize` do (the same bits). `start` is a one-element integer
tensor on the caches' device, read there, so a CUDA graph of a decode step writes where the
cache's length says at each replay. Rows that would fall past L are not written (no write
outside the cache; a caller that lets its cache overflow loses those tokens).

One launch writes both K and V, where torch operations take 10 (FP8) to 42 (q8_0) small
kernels a layer; on a CPU the kernels run under the Triton interpreter.
"""
from __future__ import annotations

import torch
import triton

from skattn import quant
from skattn.device import interpreting
from skattn.kernels.store import store_fp8_kernel, store_q8_0_kernel

__all__ = ["store_fp8", "store_q8_0"]


def _check(name, cache, new, start, value_dtype) -> None:
    if not isinstance(new, torch.Tensor) or new.dtype not in (torch.float16, torch.bfloat16,
                                                                torch.float32):
        raise TypeError(f"{name}_new must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(new, 'dtype', type(new).__name__)}")
    if cache.dtype != value_dtype or cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(f"{name} cache must be a {value_dtype} [B, L, Hkv, D] tensor contiguous "
                         f"in D, got {cache.dtype} {tuple(cache.shape)}")
    if new.dim() != 4 or (new.shape[0], new.shape[2], new.shape[3]) != (
            cache.shape[0], cache.shape[2], cache.shape[3]) or new.stride(3) != 1:
        raise ValueError(f"{name}_new must be [B, n, Hkv, D] = [{cache.shape[0]}, n, "
                         f"{cache.shape[2]}, {cache.shape[3]}] contiguous in D, got "
                         f"{tuple(new.shape)} with strides {new.stride()}")
    if new.device != cache.device or start.device != cache.device:
        raise ValueError(f"{name}_new, its cache and start must be on one device, got "
                         f"{new.device}, {cache.device}, {start.device}")


def _start(start) -> torch.Tensor:
    if (not isinstance(start, torch.Tensor) or start.numel() != 1
            or start.dtype not in (torch.int32, torch.int64)):
        raise TypeError("start must be a one-element int32 or int64 tensor on the caches' "
                        f"device, got {start!r}")
    return start


def _rows(k_cache, v_cache, k_new, v_new) -> tuple[int, int, int]:
    if k_new.shape[:3] != v_new.shape[:3] or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"K and V must have the same [B, n, Hkv] and caches the same "
                         f"[B, L, Hkv], got new {tuple(k_new.shape)}, {tuple(v_new.shape)} and "
                         f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, n, H = k_new.shape[:3]
    return B * n * H, n, H


def store_fp8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, start) -> None:
    """Quantize `k_new`, `v_new` with `k_scale`, `v_scale` (float32 `[1]` or `[Hkv]`) into the
    float8_e4m3fn caches at rows `start ..` (module docstring): x / scale in float32, clamped
    to +-448, rounded to nearest e4m3."""
    start = _start(start)
    for name, cache, new, scale in (("k", k_cache, k_new, k_scale),
                                    ("v", v_cache, v_new, v_scale)):
        _check(name, cache, new, start, torch.float8_e4m3fn)
        if not isinstance(scale, torch.Tensor):  # (a float would cost a copy to the device)
            raise TypeError(f"{name}_scale must be a float32 tensor, got {type(scale).__name__}")
        quant._scale(f"{name}_scale", scale, cache.shape[2], cache.device)
    quant.fp8_capability(k_cache.device)
    programs, n, heads = _rows(k_cache, v_cache, k_new, v_new)
    if programs == 0:
        return
    interpret = interpreting()
    if interpret:  # the kernel writes the bytes itself (`kernels.store._e4m3_bits`)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    store_fp8_kernel[(programs,)](
        k_new, *k_new.stride()[:3], v_new, *v_new.stride()[:3],
        k_cache, *k_cache.stride()[:3], v_cache, *v_cache.stride()[:3], k_scale.reshape(-1),
        v_scale.reshape(-1), start, n, heads, k_cache.shape[1],
        DK=k_cache.shape[3], DV=v_cache.shape[3],
        BLOCK_DK=triton.next_power_of_2(k_cache.shape[3]),
        BLOCK_DV=triton.next_power_of_2(v_cache.shape[3]),
        K_HEAD_SCALES=int(k_scale.numel() > 1), V_HEAD_SCALES=int(v_scale.numel() > 1),
        INTERPRET=interpret)


def store_q8_0(k_blocks, v_blocks, k_new, v_new, start) -> None:
    """Quantize `k_new`, `v_new` into the `skattn.quant.Q8_0` caches `k_blocks`, `v_blocks`
    at rows `start ..` (module docstring), as `skattn.quant.q8_0` does."""
    start = _start(start)
    for name, blocks, new in (("k", k_blocks, k_new), ("v", v_blocks, v_new)):
        if type(blocks).__name__ != "Q8_0":
            raise TypeError(f"{name} cache must be a skattn.quant.Q8_0, got "
                            f"{type(blocks).__name__}")
        _check(name, blocks.values, new, start, torch.int8)
    programs, n, heads = _rows(k_blocks.values, v_blocks.values, k_new, v_new)
    if programs == 0:
        return
    kv, vv = k_blocks.values, v_blocks.values
    store_q8_0_kernel[(programs,)](
        k_new, *k_new.stride()[:3], v_new, *v_new.stride()[:3],
        kv, *kv.stride()[:3], k_blocks.scales, *k_blocks.scales.stride()[:3],
        vv, *vv.stride()[:3], v_blocks.scales, *v_blocks.scales.stride()[:3], start, n, heads,
        kv.shape[1],
        DK=kv.shape[3], DV=vv.shape[3], BLOCK_DK=triton.next_power_of_2(kv.shape[3]),
        BLOCK_DV=triton.next_power_of_2(vv.shape[3]),
        enable_fp_fusion=False)  # x * (1 / d) + 0.5 rounded twice, as torch does, not one FMA
