"""Float64 references of the serving entry points: each sequence's keys gathered (through the
block table), then `skattn.reference.attention` on that one sequence (docs/serving.md)."""
from __future__ import annotations

import torch

from skattn import quant
from skattn import serving_checks as sc
from skattn.reference_math import F64, NEG_INF

__all__ = ["attention_with_kvcache", "attention_varlen", "gather_keys", "dequantize"]


def dequantize(cache: torch.Tensor, scale) -> torch.Tensor:
    """A float8_e4m3fn cache in float64, exactly: `x.double() * scale`, the scale per tensor
    or per KV head (dimension -2 of dense, packed and paged caches); other caches unchanged."""
    return cache if scale is None else quant.dequantize_fp8(cache, scale)


def gather_keys(cache: torch.Tensor, n: int, *, b: int = 0, start: int = 0,
                block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Keys 0..n-1 of one sequence, [n, Hkv, D]: from a dense cache row b, a packed tensor
    from row `start`, or a paged cache through `block_table[b]`."""
    if block_table is not None:
        ps = cache.shape[1]
        pos = torch.arange(n, device=cache.device)
        pages = block_table[b].to(cache.device).long()[pos // ps]
        return cache[pages, pos % ps]
    if cache.dim() == 4:
        return cache[b, :n]
    return cache[start:start + n]


def _sequence_keys(cache, scale, n: int, **where) -> torch.Tensor:
    """One sequence's keys (`gather_keys`) in float64, dequantized exactly: fp8 with its
    scale (`dequantize`), a Q8_0 / Q4_0 cache by its blocks."""
    if isinstance(cache, quant.BLOCK_FORMS):
        return type(cache)(gather_keys(cache.values, n, **where),
                           gather_keys(cache.scales, n, **where)).dequantize(torch.float64)
    return dequantize(gather_keys(cache, n, **where), scale)


def _one(q, k, v, *, return_lse, **kw):
    """Attention of one sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, Dv], lse [Hq, Lq]."""
    from skattn.reference import attention

    lq, hq = q.shape[0], q.shape[1]
    if k.shape[0] == 0:  # no key: 0, and lse -inf (or the sink alone)
        out = torch.zeros(lq, hq, v.shape[-1], dtype=F64, device=q.device)
        sinks = kw.get("sinks")
        lse = (torch.full((hq, lq), NEG_INF, dtype=F64, device=q.device) if sinks is None
               else sinks.to(F64)[:, None].expand(hq, lq).clone())
        return out, lse
    out, lse = attention(q[None], k[None], v[None], return_lse=True, **kw)
    return out[0], lse[0]


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table=None,
                           causal=True, window=None, sinks=None, softcap=0.0,
                           alibi_slopes=None, scale=None, return_lse=False, plan=None,
                           k_scale=None, v_scale=None):
    """Float64 `skattn.attention_with_kvcache`: [B, Lq, Hq, Dv] (and lse [B, Hq, Lq]).

    Lengths and page ids are checked (ValueError for bad ones), as for CPU inputs of the
    kernels; `plan` is accepted for signature parity and ignored. float8_e4m3fn caches are
    dequantized exactly with `k_scale`, `v_scale` (`dequantize`).
    """
    sc.kvcache_args(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                    scale=scale, causal=causal, window=window, sinks=sinks, softcap=softcap,
                    alibi_slopes=alibi_slopes, return_lse=return_lse, out=None, kernel=False,
                    k_scale=k_scale, v_scale=v_scale)
    sc.kvcache_values(k_cache, cache_seqlens, block_table)
    kw = dict(causal=causal, window=window, sinks=sinks, softcap=softcap,
              alibi_slopes=alibi_slopes, scale=scale)
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.cpu().tolist()):
        # dequantized per sequence: a whole serving cache in float64 would not fit
        k = _sequence_keys(k_cache, k_scale, n, b=b, block_table=block_table)
        v = _sequence_keys(v_cache, v_scale, n, b=b, block_table=block_table)
        out, lse = _one(q[b], k, v, return_lse=True, **kw)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     block_table=None, causal=True, window=None, sinks=None, softcap=0.0,
                     alibi_slopes=None, scale=None, return_lse=False, plan=None, k_scale=None,
                     v_scale=None):
    """Float64 `skattn.attention_varlen`: [total_q, Hq, Dv] (and lse [Hq, total_q]).

    Rows of q outside every sequence are NaN (the kernels leave them unwritten).
    float8_e4m3fn K/V are dequantized exactly with `k_scale`, `v_scale` (`dequantize`), Q8_0 /
    Q4_0 caches by their blocks.
    """
    sc.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   block_table=block_table, scale=scale, causal=causal, window=window,
                   sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                   return_lse=return_lse, out=None, kernel=False, k_scale=k_scale,
                   v_scale=v_scale)
    sc.varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    kw = dict(causal=causal, window=window, sinks=sinks, softcap=softcap,
              alibi_slopes=alibi_slopes, scale=scale)
    total_q, hq = q.shape[0], q.shape[1]
    out = torch.full((total_q, hq, v.shape[-1]), float("nan"), dtype=F64, device=q.device)
    lse = torch.full((hq, total_q), float("nan"), dtype=F64, device=q.device)
    cq, ck = cu_seqlens_q.cpu().tolist(), cu_seqlens_k.cpu().tolist()
    for b in range(len(cq) - 1):
        n = ck[b + 1] - ck[b]
        kb = _sequence_keys(k, k_scale, n, b=b, start=ck[b], block_table=block_table)
        vb = _sequence_keys(v, v_scale, n, b=b, start=ck[b], block_table=block_table)
        if cq[b + 1] == cq[b]:
            continue
        o, s = _one(q[cq[b]:cq[b + 1]], kb, vb, return_lse=True, **kw)
        out[cq[b]:cq[b + 1]] = o
        lse[:, cq[b]:cq[b + 1]] = s
    return (out, lse) if return_lse else out
