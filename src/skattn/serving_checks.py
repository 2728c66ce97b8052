"""Input checks of the serving entry points (docs/serving.md, "Bad input").

Shapes, dtypes, devices and layouts are checked on every unchecked call. The values of
lengths and page ids are checked where they are on the CPU (`values`), since reading GPU
tensors would synchronise; `check_values` does it on request for GPU tensors.
"""
from __future__ import annotations

import torch

from skattn import quant
from skattn.checks import (KV_DTYPES, Q_DTYPES, _byte_kv, _reads, _tensor, check_out,
                           kernel_tensors, options, per_head, scales_without_grad)


def _int32(name: str, x, shape: tuple, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q on {device}")


def _features(hq, device, *, scale, causal, window, sinks, softcap, alibi_slopes, return_lse):
    per_head(hq, True, sinks=sinks, alibi_slopes=alibi_slopes)
    for name, x in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device}, q on {device}")
    options(scale=scale, softcap=softcap, causal=causal, window=window, return_lse=return_lse)


def _lead(x):
    """A packed [total_k, Hkv, D] block cache as one sequence [1, total_k, Hkv, D]."""
    return type(x)(x.values[None], x.scales[None])


def _kv_dtypes(q, k, v, k_scale, v_scale, *, dims: int, kernel: bool) -> tuple | None:
    """The K/V dtypes to accept: f16/bf16, or float8_e4m3fn with scales, or None for
    `skattn.quant.Q8_0` / `Q4_0` caches, under the dense path's rules
    (`skattn.quant.check_kv`: the same errors, before any launch)."""
    if isinstance(k, quant.BLOCK_FORMS) or isinstance(v, quant.BLOCK_FORMS):
        for name, x in (("k", k), ("v", v)):
            if isinstance(x, quant.BLOCK_FORMS) and x.dim() != dims:
                raise ValueError(f"{name} must have {dims} dimensions, got shape "
                                 f"{tuple(x.shape)}")
        both = isinstance(k, quant.BLOCK_FORMS) and isinstance(v, quant.BLOCK_FORMS)
        k4, v4 = (_lead(k), _lead(v)) if dims == 3 and both else (k, v)
        quant.check_kv(q, k4, v4, k_scale, v_scale, kernel=kernel)
        return None
    if k_scale is None and v_scale is None and not (_byte_kv(k) or _byte_kv(v)):
        return KV_DTYPES
    for name, x in (("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    # packed [total_k, Hkv, D] as one sequence [1, total_k, Hkv, D]: Hkv at dimension 2
    k4, v4 = ((k[None], v[None]) if dims == 3 and isinstance(k, torch.Tensor)
              and isinstance(v, torch.Tensor) else (k, v))
    form = quant.check_kv(q, k4, v4, k_scale, v_scale, kernel=kernel)
    return KV_DTYPES if form is None else (k.dtype,)


def _kv(q, k, v, hq, d, *, paged: bool, block_table, batch: int, packed: bool, k_scale=None,
        v_scale=None, kernel: bool = True):
    """K/V dtypes, shapes and the block table; returns (Hkv, Dv)."""
    dims = 3 if packed else 4
    dtypes = _kv_dtypes(q, k, v, k_scale, v_scale, dims=dims, kernel=kernel)
    if dtypes is not None:  # block caches: checked by their class and quant.check_kv
        _tensor("k", k, dims, dtypes)
        _tensor("v", v, dims, dtypes)
        if v.dtype != k.dtype:
            raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v differ in shape before the head size: {list(k.shape)} vs "
                         f"{list(v.shape)}")
    hkv, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    if (kernel and isinstance(v, torch.Tensor) and v.dtype in quant.FP8_DTYPES
            and (dv % 4 or any(st % 4 for st in v.stride()[:-1]))):
        raise ValueError(f"FP8 v: the serving kernel reads its rows as 32-bit words, so its "
                         f"head size and strides must be multiples of 4, got head size {dv}, "
                         f"strides {v.stride()}")
    if dk != d:
        raise ValueError(f"head size of q ({d}) and k ({dk}) differ")
    if min(k.shape) < 1 or dv < 1:
        raise ValueError(f"empty k or v: {list(k.shape)}, {list(v.shape)}")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if paged:
        page_size = k.shape[1]
        if page_size % 16:
            raise ValueError(f"the paged cache's page size (k.shape[1]) must be a positive "
                             f"multiple of 16, got {page_size}")
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"block_table must be a torch.Tensor of int32, got "
                            f"{type(block_table).__name__}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape [{batch}, max_pages], got "
                             f"{list(block_table.shape)}")
        _int32("block_table", block_table, (batch, block_table.shape[1]), q.device)
        if block_table.shape[1] < 1 or block_table.stride(1) != 1:
            raise ValueError("block_table must have at least one column, contiguous")
    elif not packed and k.shape[0] != batch:
        raise ValueError(f"batch mismatch: q {batch}, k {k.shape[0]}")
    for name, x in (("k", quant.kernel_data(k)), ("v", quant.kernel_data(v))):
        rows = k.shape[1] if not packed else 1
        if not packed and rows * abs(x.stride(1)) >= 2**31:
            raise ValueError(f"{name}: one sequence's keys span {rows * abs(x.stride(1))} elements; "
                             f"the kernels address them with 32-bit offsets (< 2**31)")
    return hkv, dv


def kvcache_args(q, k_cache, v_cache, *, cache_seqlens, block_table, scale, causal, window,
                 sinks, softcap, alibi_slopes, return_lse, out, kernel: bool = True,
                 k_scale=None, v_scale=None, values: bool = True):
    """Check `attention_with_kvcache`'s arguments; returns (paged, Hkv, Dv). `values`: also
    the lengths and page ids of CPU tensors (not of a custom op's fake tensors)."""
    _tensor("q", q, 4, Q_DTYPES if kernel else None)
    batch, lq, hq, d = q.shape
    if min(batch, lq, hq, d) < 1:
        raise ValueError(f"empty q: {list(q.shape)}")
    paged = block_table is not None
    hkv, dv = _kv(q, k_cache, v_cache, hq, d, paged=paged, block_table=block_table, batch=batch,
                  packed=False, k_scale=k_scale, v_scale=v_scale, kernel=kernel)
    _int32("cache_seqlens", cache_seqlens, (batch,), q.device)
    _features(hq, q.device, scale=scale, causal=causal, window=window, sinks=sinks,
              softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse)
    if kernel:
        kernel_tensors((("q", q), ("k_cache", quant.kernel_data(k_cache)),
                       ("v_cache", quant.kernel_data(v_cache)), ("sinks", sinks),
                       ("alibi_slopes", alibi_slopes)), q.device)
        scales_without_grad(k_cache, v_cache, k_scale, v_scale)
        if lq * abs(q.stride(1)) >= 2**31:
            raise ValueError("q: one sequence's rows span 2**31 elements or more")
        check_out(out, (batch, lq, hq, dv), q, _reads(
            k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table, sinks=sinks,
            alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale))
    if values and cache_seqlens.device.type == "cpu":
        kvcache_values(k_cache, cache_seqlens, block_table)
    return paged, hkv, dv


def varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                block_table, scale, causal, window, sinks, softcap, alibi_slopes, return_lse,
                out, kernel: bool = True, k_scale=None, v_scale=None, values: bool = True):
    """Check `attention_varlen`'s arguments; returns (paged, Hkv, Dv, batch). `values`: also
    the offsets, lengths and page ids of CPU tensors."""
    _tensor("q", q, 3, Q_DTYPES if kernel else None)
    total_q, hq, d = q.shape
    if min(total_q, hq, d) < 1:
        raise ValueError(f"empty q: {list(q.shape)}")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
        raise ValueError("cu_seqlens_q must be a 1-D int32 tensor of B + 1 >= 2 offsets")
    batch = cu_seqlens_q.shape[0] - 1
    _int32("cu_seqlens_q", cu_seqlens_q, (batch + 1,), q.device)
    _int32("cu_seqlens_k", cu_seqlens_k, (batch + 1,), q.device)
    for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int (an upper bound kept on the host), "
                             f"got {x!r}")
    paged = block_table is not None
    hkv, dv = _kv(q, k, v, hq, d, paged=paged, block_table=block_table, batch=batch,
                  packed=not paged, k_scale=k_scale, v_scale=v_scale, kernel=kernel)
    _features(hq, q.device, scale=scale, causal=causal, window=window, sinks=sinks,
              softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse)
    if kernel:
        kd, vd = quant.kernel_data(k), quant.kernel_data(v)
        kernel_tensors((("q", q), ("k", kd), ("v", vd), ("sinks", sinks),
                       ("alibi_slopes", alibi_slopes)), q.device)
        scales_without_grad(k, v, k_scale, v_scale)
        for name, x, n in (("q", q, max_seqlen_q), ("k", kd, max_seqlen_k), ("v", vd, max_seqlen_k)):
            if not (x is not q and paged) and n * abs(x.stride(0)) >= 2**31:
                raise ValueError(f"{name}: one sequence's rows may span 2**31 elements or more")
        check_out(out, (total_q, hq, dv), q, _reads(
            k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
            sinks=sinks, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale))
    if values and cu_seqlens_q.device.type == "cpu":
        varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    return paged, hkv, dv, batch


# -- values (CPU tensors, or on request)
def _pages(k_cache, lens, block_table) -> None:
    page_size, num_pages = k_cache.shape[1], k_cache.shape[0]
    cap = block_table.shape[1] * page_size
    for b, n in enumerate(lens.tolist()):
        if n > cap:
            raise ValueError(f"sequence {b} has {n} keys, more than its block table row holds "
                             f"({block_table.shape[1]} pages x {page_size})")
        used = block_table[b, :-(-n // page_size)]
        bad = (used < 0) | (used >= num_pages)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"block_table[{b}, {j}] = {int(used[j])} is not a page of the cache "
                             f"(0 <= id < {num_pages})")


def kvcache_values(k_cache, cache_seqlens, block_table) -> None:
    """Lengths in [0, capacity] and page ids in range (reads the tensors: syncs on a GPU)."""
    lens = cache_seqlens.cpu()
    if bool((lens < 0).any()):
        b = int((lens < 0).nonzero()[0, 0])
        raise ValueError(f"cache_seqlens[{b}] = {int(lens[b])} is negative")
    if block_table is None:
        if bool((lens > k_cache.shape[1]).any()):
            b = int((lens > k_cache.shape[1]).nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{b}] = {int(lens[b])} exceeds the cache's "
                             f"{k_cache.shape[1]} positions")
    else:
        _pages(k_cache, lens, block_table.cpu())


def varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  block_table) -> None:
    """Monotone offsets within the packed tensors, lengths within the bounds, page ids in range."""
    for name, cu, rows, bound in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                  ("cu_seqlens_k", cu_seqlens_k,
                                   None if block_table is not None else k.shape[0], max_seqlen_k)):
        c = cu.cpu()
        if int(c[0]) < 0:
            raise ValueError(f"{name}[0] = {int(c[0])} is negative")
        lens = c[1:] - c[:-1]
        if bool((lens < 0).any()):
            b = int((lens < 0).nonzero()[0, 0])
            raise ValueError(f"{name} must be non-decreasing: {name}[{b + 1}] = {int(c[b + 1])} < "
                             f"{name}[{b}] = {int(c[b])}")
        if rows is not None and int(c[-1]) > rows:
            raise ValueError(f"{name}[-1] = {int(c[-1])} passes the {rows} packed rows")
        if bool((lens > bound).any()):
            b = int((lens > bound).nonzero()[0, 0])
            what = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
            raise ValueError(f"sequence {b} has {int(lens[b])} {'queries' if what[-1] == 'q' else 'keys'}, "
                             f"more than {what} = {bound}")
    if block_table is not None:
        c = cu_seqlens_k.cpu()
        _pages(k, c[1:] - c[:-1], block_table.cpu())


def check_values(*, k, block_table=None, cache_seqlens=None, q=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> None:
    """Check lengths, offsets and page ids of GPU tensors too (this synchronises).

    Give `cache_seqlens` (attention_with_kvcache) or q, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q and max_seqlen_k (attention_varlen), with k (the cache or packed keys) and
    the block table of a paged cache.

    Raises
    ------
    ValueError
        Naming the first bad length, offset or page id.
    """
    if cache_seqlens is not None:
        kvcache_values(k, cache_seqlens, block_table)
    else:
        varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)


def plan_matches(plan, **have) -> None:
    """The plan was made for these bounds (a plan that reads KV heads in pairs was made for
    twice its kv_heads and half its head sizes: `ServingPlan.head_pairs`)."""
    pairs = getattr(plan, "head_pairs", False)
    for name, value in have.items():
        want = getattr(plan, name)
        if pairs and name == "kv_heads":
            want *= 2
        elif pairs and name in ("head_dim", "head_dim_v"):
            want //= 2
        if want != value:
            note = (f" (it reads KV heads in pairs: its kernel has kv_heads={plan.kv_heads}, "
                    f"head_dim={plan.head_dim})" if pairs else "")
            raise ValueError(f"plan was made for {name}={want!r}, inputs have {value!r}{note}")


__all__ = ["kvcache_args", "varlen_args", "check_values", "plan_matches"]
