"""Attention over ragged batches and paged KV caches (docs/serving.md).

`attention_with_kvcache` (FlashAttention's `flash_attn_with_kvcache` convention) and
`attention_varlen` (`flash_attn_varlen_func`'s) run the stream-K kernel over a work list
built on the GPU from the lengths, so a CUDA graph captured once serves every step.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from skattn import quant
from skattn import serving_checks as sc
from skattn import serving_launch as sl
from skattn import serving_recipe as sr
from skattn.device import hardware, shared_memory_limit
from skattn.launch import default_scale
from skattn.serving_checks import check_values
from skattn.serving_mixed import MixedPlan, step_plan
from skattn.serving_plan import PAIR_HEAD_DIM, SERVING_DTYPES, ServingPlan, serving_plan

__all__ = ["attention_with_kvcache", "attention_varlen", "serving_plan", "ServingPlan",
           "MixedPlan", "work_list", "workspace", "fresh_workspace", "check_values"]


@lru_cache(maxsize=256)
def _cached_plan(device, q_split="auto", **bounds) -> ServingPlan | MixedPlan:
    """The plan of these bounds on `device`: a serving loop's plan for one step
    (`serving_mixed.step_plan`: two halves where they help, else one plan); q_split=None:
    one plan."""
    # no occupancy named: the serving plan's defaults by K/V form apply (`serving_plan`)
    sms, _ = hardware(device)
    args = dict(bounds, sms=sms, smem_limit=shared_memory_limit(device))
    return serving_plan(**args, q_split=None) if q_split is None else step_plan(q_split, args)


def _plan(plan, device, bounds: dict, k, v, policy: str = "auto") -> ServingPlan | MixedPlan:
    """The call's plan (cached per bounds and policy where the caller gave none), checked
    against the call's bounds and, where it reads KV heads in pairs, against K/V's layout."""
    if plan is None:
        if bounds["head_dim"] == PAIR_HEAD_DIM and not (_adjacent(k) and _adjacent(v)):
            bounds["head_pairs"] = False  # the default plan reads one KV head a row then
        plan = _cached_plan(device, policy=policy, **bounds)
    else:
        _check_plan(plan, bounds)
    _pairs_layout(plan, k, v)
    return plan


def _check_plan(plan, bounds: dict) -> None:
    """A caller's plan is a whole serving plan made for the call's bounds."""
    if not isinstance(plan, (ServingPlan, MixedPlan)):
        raise TypeError(f"plan must be a skattn.ServingPlan or MixedPlan (from "
                        f"skattn.serving_plan), got {type(plan).__name__}")
    if isinstance(plan, ServingPlan) and plan.q_range is not None:
        raise ValueError("this plan is one half of a MixedPlan and runs only part of the "
                         "batch: pass the MixedPlan")
    dtype = bounds.pop("dtype")
    if isinstance(plan, MixedPlan):  # the short half is bounded by q_split
        if "q_len" in bounds:
            raise ValueError("a MixedPlan splits a varlen batch: pass it to attention_varlen")
        sc.plan_matches(plan.short, dtype=SERVING_DTYPES[dtype], **dict(bounds, max_q_len=plan.q_split))
    sc.plan_matches(plan.long if isinstance(plan, MixedPlan) else plan, dtype=SERVING_DTYPES[dtype], **bounds)


def _adjacent(x) -> bool:
    """A K/V row's heads lie side by side (what reading KV heads in pairs needs; a block
    cache's values are never read in pairs)."""
    return not isinstance(x, torch.Tensor) or (x.stride(-1) == 1 and x.stride(-2) == x.shape[-1])


def _pairs_layout(plan, k, v) -> None:
    """A plan that reads KV heads in pairs needs each K/V row's heads adjacent."""
    halves = plan.halves if isinstance(plan, MixedPlan) else (plan,)
    if any(h.head_pairs for h in halves):
        for name, x in (("k", k), ("v", v)):
            if not _adjacent(x):
                raise ValueError(
                    f"this plan reads two KV heads as one row (serving_plan(head_pairs=...)): "
                    f"{name}'s heads must be adjacent (stride(-2) = {x.shape[-1]}, stride(-1) "
                    f"= 1), got strides {tuple(x.stride())}; plan with head_pairs=False for "
                    f"other layouts")


def workspace(plan: ServingPlan | MixedPlan, device=None) -> torch.Tensor:
    """A zeroed workspace for calls with `plan` (partials, the work list, fused counters):
    pass it as `workspace=` when capturing CUDA graphs."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if isinstance(plan, MixedPlan):
        return torch.zeros(sr.mixed_workspace_bytes(plan), dtype=torch.uint8, device=device)
    return sl.allocate(plan, device)


def fresh_workspace(plan: ServingPlan | MixedPlan, device) -> torch.Tensor:
    """A workspace for one call, freed with it, that may take a work list built before
    (`work_list=`): only the counters at the end of each plan's part are zeroed (a memset);
    the partials are written before they are read. A call that builds its own work list
    needs no zeroed bytes at all (its work-list step zeroes the counters): the custom ops
    take an uninitialised workspace of that size each call."""
    mixed = isinstance(plan, MixedPlan)
    size = sr.mixed_workspace_bytes(plan) if mixed else sl.workspace_bytes(plan)
    buf = torch.empty(max(16, size), dtype=torch.uint8, device=device)
    parts = zip(plan.halves, sr.workspace_offsets(plan)) if mixed else [(plan, 0)]
    for half, at in parts:
        end = at + sl.workspace_bytes(half) if mixed else buf.numel()
        counters = sl.bind(half, device).layout[2]
        buf[end - max(counters, 1) * 4:end].zero_()
    return buf


def work_list(plan: ServingPlan, *, cache_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
              out=None) -> torch.Tensor:
    """Build the work list of one batch on the GPU, to share among calls (`work_list=`).

    Parameters
    ----------
    plan : ServingPlan
    cache_seqlens : Tensor [B] int32, for attention_with_kvcache plans
    cu_seqlens_q, cu_seqlens_k : Tensor [B + 1] int32, for attention_varlen plans
    out : Tensor, optional
        int32 buffer of at least `plan.work_list_words` elements to build into.

    Returns
    -------
    Tensor
        int32 [plan.work_list_words]; valid until the lengths change (rebuild each step,
        inside the captured graph).
    """
    seq = cache_seqlens if not plan.varlen else cu_seqlens_k
    if not isinstance(seq, torch.Tensor):
        raise TypeError("work_list needs cache_seqlens (attention_with_kvcache plans) or "
                        "cu_seqlens_q and cu_seqlens_k (attention_varlen plans)")
    n = plan.batch if not plan.varlen else plan.batch + 1
    sc._int32("cache_seqlens" if not plan.varlen else "cu_seqlens_k", seq, (n,), seq.device)
    if plan.varlen:
        sc._int32("cu_seqlens_q", cu_seqlens_q, (n,), seq.device)
    if out is None:
        out = torch.empty(plan.work_list_words, dtype=torch.int32, device=seq.device)
    sr.check_work_list(plan, out, seq.device)
    for half, _, wl in sr.halves(plan, None, out):
        sl.build(half, wl[:half.work_list_words], seq_k=seq, cu_k=plan.varlen,
                 seq_q=cu_seqlens_q if plan.varlen else None)
    return out


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table=None,
                           causal=True, window=None, sinks=None, softcap=0.0,
                           alibi_slopes=None, scale=None, return_lse=False, plan=None,
                           out=None, workspace=None, work_list=None, k_scale=None,
                           v_scale=None):
    """Attention of the newest tokens of B sequences over a dense or paged KV cache.

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk], f16, bf16 or f32
        The Lq newest tokens of each sequence (already written to the cache).
    k_cache, v_cache : Tensor, f16, bf16 or float8_e4m3fn (with k_scale, v_scale); or
        `skattn.quant.Q8_0` / `Q4_0` caches (llama.cpp's blocks, `skattn.quant.q8_0(cache)`)
        Dense ``[B, Lmax, Hkv, D]``, or paged ``[num_pages, page_size, Hkv, D]`` with
        `block_table` (page_size a multiple of 16).
    cache_seqlens : Tensor [B] int32, on q's device
        Keys of each sequence, the new tokens included; may change between graph replays.
    block_table : Tensor [B, max_pages] int32, optional
        Page of keys ``[j page_size, (j+1) page_size)`` of sequence b: ``block_table[b, j]``.
        Pages may be shared between sequences (read only).
    causal : bool
        Bottom-right causal per sequence: query i of b sits at ``cache_seqlens[b] - Lq + i``.
    window, sinks, softcap, alibi_slopes, scale, return_lse
        As in `skattn.attention`.
    plan : ServingPlan, optional
        From `skattn.serving_plan(batch=B, q_len=Lq, max_kv_len=..., ...)`; default: one for
        the current GPU, cached per shape.
    out : Tensor [B, Lq, Hq, Dv], optional
        May be q itself; not memory of the caches, lengths or block table (refused on a
        signature's first call: repeat calls are not re-checked, docs/host.md).
    workspace : Tensor, optional
        `skattn.serving.workspace(plan)`: pass one when capturing CUDA graphs.
    work_list : Tensor, optional
        A work list built for this batch by `skattn.serving.work_list` (skips building one).
    k_scale, v_scale : Tensor [] / [1] / [Hkv] float32, or float; float8_e4m3fn K/V only
        The value of a cache element is ``x.float() * scale`` (vLLM's convention; per tensor
        or per KV head, docs/quant.md). Tensors are read on the GPU: a CUDA graph follows new
        values written into them. q must then be f16 or bf16.

    Returns
    -------
    out [B, Lq, Hq, Dv], or (out, lse [B, Hq, Lq] f32)
        Rows that see no key give 0 (lse -inf).

    Raises
    ------
    TypeError, ValueError
        Before any launch (`skattn.serving_checks`): dtypes (lengths and block table int32),
        shapes, devices, a page size not a multiple of 16, a plan made for other bounds, FP8
        K/V without scales or with misshapen ones (`skattn.quant.check_kv`); on
        CPU tensors also bad lengths and page ids. GPU lengths are not read: the kernels
        clamp them to the cache and skip pages out of range (docs/serving.md).
    """
    return _kvcache(q, k_cache, v_cache, cache_seqlens, block_table, causal, window, sinks,
                    softcap, alibi_slopes, scale, return_lse, plan, out, workspace, work_list,
                    k_scale, v_scale)


def _kvcache(q, k_cache, v_cache, cache_seqlens, block_table, causal, window, sinks, softcap,
             alibi_slopes, scale, return_lse, plan, out, workspace, work_list, k_scale, v_scale,
             policy: str = "auto", own_workspace: bool = False):
    """`attention_with_kvcache`; without a plan, one of `policy`; `own_workspace`: a
    workspace of the call's own (uninitialised), as the custom op runs it. A repeat call
    of a checked signature replays its recipe (`skattn.serving_recipe`)."""
    key = sr.signature((q, k_cache, v_cache, out, cache_seqlens, block_table, sinks,
                        alibi_slopes, k_scale, v_scale, workspace, work_list),
                       (causal, type(causal), window, type(window), softcap, type(softcap),
                        scale, type(scale), return_lse, type(return_lse), policy,
                        own_workspace), plan)
    rec = sr.lookup(key) or sr.keep(key, _kvcache_recipe(
        q, k_cache, v_cache, cache_seqlens, block_table, causal, window, sinks, softcap,
        alibi_slopes, scale, return_lse, plan, out, k_scale, v_scale, policy))
    return _call(rec, q, k_cache, v_cache, cache_seqlens, None, block_table, sinks, softcap,
                 alibi_slopes, scale, return_lse, out, workspace, work_list, k_scale, v_scale,
                 own_workspace)


def _kvcache_recipe(q, k_cache, v_cache, cache_seqlens, block_table, causal, window, sinks,
                    softcap, alibi_slopes, scale, return_lse, plan, out, k_scale, v_scale,
                    policy) -> sr.Recipe:
    """Check a call of `attention_with_kvcache` and make its recipe (its plan made here
    where the caller gave none)."""
    paged, hkv, dv = sc.kvcache_args(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                     block_table=block_table, scale=scale, causal=causal,
                                     window=window, sinks=sinks, softcap=softcap,
                                     alibi_slopes=alibi_slopes, return_lse=return_lse, out=out,
                                     k_scale=k_scale, v_scale=v_scale)
    B, Lq, Hq, Dk = q.shape
    if paged:
        ps = k_cache.shape[1]
        bounds = dict(batch=B, q_len=Lq, max_kv_len=block_table.shape[1] * ps, page_size=ps,
                      max_pages=block_table.shape[1])
    else:
        bounds = dict(batch=B, q_len=Lq, max_kv_len=k_cache.shape[1], page_size=None)
    bounds.update(q_heads=Hq, kv_heads=hkv, head_dim=Dk, head_dim_v=dv, dtype=quant.kv_dtype(k_cache),
                  causal=causal, window=window)
    plan = _plan(plan, q.device, bounds, k_cache, v_cache, policy)
    return sr.Recipe(plan, q.device, (B, Lq, Hq, dv), (B, Hq, Lq))


def _call(rec: sr.Recipe, q, k, v, seq_k, seq_q, block_table, sinks, softcap, alibi_slopes,
          scale, return_lse, out, workspace, work_list, k_scale, v_scale, own_workspace):
    """A checked call: its output, lse and workspace where the caller gave none, K/V as the
    kernels read them, then its recipe's launches."""
    if out is None:  # like q where it has q's shape (the cheaper allocation: docs/host.md)
        out = (torch.empty_like(q, memory_format=torch.contiguous_format)
               if rec.out_shape == q.shape else
               torch.empty(rec.out_shape, device=q.device, dtype=q.dtype))
    if own_workspace:  # uninitialised: the call builds its work lists, which zero the counters
        workspace = torch.empty(rec.workspace_bytes, dtype=torch.uint8, device=q.device)
    lse = torch.empty(rec.lse_shape, device=q.device, dtype=torch.float32) if return_lse else None
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    k, v, k_scale, v_scale = quant.kernel_kv(k, v, k_scale, v_scale, q.device)
    rec.run(q, k, v, out, lse, seq_k, seq_q, block_table, sinks, alibi_slopes, k_scale, v_scale,
            workspace, work_list, scale, float(softcap))
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     block_table=None, causal=True, window=None, sinks=None, softcap=0.0,
                     alibi_slopes=None, scale=None, return_lse=False, plan=None, out=None,
                     workspace=None, work_list=None, k_scale=None, v_scale=None):
    """Attention of packed sequences of different lengths (mixed prefill and decode).

    Parameters
    ----------
    q : Tensor [total_q, Hq, Dk], f16, bf16 or f32
        Sequence b's queries are rows ``cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1``.
    k, v : Tensor, f16, bf16 or float8_e4m3fn (with k_scale, v_scale); or Q8_0 / Q4_0
        Packed ``[total_k, Hkv, D]`` (sequence b's keys at rows ``cu_seqlens_k[b]`` on), or
        paged caches ``[num_pages, page_size, Hkv, D]`` with `block_table`.
    cu_seqlens_q, cu_seqlens_k : Tensor [B + 1] int32, on q's device
        Non-decreasing offsets; with a block table only the differences of cu_seqlens_k
        (the key counts) are used.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the lengths, kept on the host (they size the plan).
    block_table : Tensor [B, max_pages] int32, optional
    causal : bool
        Bottom-right causal per sequence: query i of b sits at ``Lk_b - Lq_b + i``.
    window, sinks, softcap, alibi_slopes, scale, return_lse, plan, out, workspace, work_list,
    k_scale, v_scale
        As in `attention_with_kvcache` (plan from `skattn.serving_plan(batch=B,
        max_q_len=max_seqlen_q, total_q=total_q, max_kv_len=max_seqlen_k, ...)`: where
        max_seqlen_q exceeds what fills a 16-row tile, a `MixedPlan` by default, decode tiles
        for the sequences of at most `q_split` query tokens and prompt tiles for the others,
        docs/serving.md "Mixed batches"; `q_split=None` for one plan; workspace and work list
        from `skattn.serving.workspace(plan)` and `skattn.serving.work_list(plan, ...)`).
        Without a plan, the same default is made and cached per bounds.

    Returns
    -------
    out [total_q, Hq, Dv], or (out, lse [Hq, total_q] f32)
        Rows of q that belong to no sequence are not written.

    Raises
    ------
    TypeError, ValueError
        As `attention_with_kvcache`; on CPU tensors also non-monotone offsets, offsets past
        the packed tensors and lengths above the bounds.
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                   causal, window, sinks, softcap, alibi_slopes, scale, return_lse, plan, out,
                   workspace, work_list, k_scale, v_scale)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, causal,
            window, sinks, softcap, alibi_slopes, scale, return_lse, plan, out, workspace,
            work_list, k_scale, v_scale, policy: str = "auto", own_workspace: bool = False):
    """`attention_varlen`; `policy`, `own_workspace` as in `_kvcache`."""
    key = sr.signature((q, k, v, out, cu_seqlens_q, cu_seqlens_k, block_table, sinks,
                        alibi_slopes, k_scale, v_scale, workspace, work_list),
                       (max_seqlen_q, type(max_seqlen_q), max_seqlen_k, type(max_seqlen_k),
                        causal, type(causal), window, type(window), softcap, type(softcap),
                        scale, type(scale), return_lse, type(return_lse), policy,
                        own_workspace), plan)
    rec = sr.lookup(key) or sr.keep(key, _varlen_recipe(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, causal,
        window, sinks, softcap, alibi_slopes, scale, return_lse, plan, out, k_scale, v_scale,
        policy))
    return _call(rec, q, k, v, cu_seqlens_k, cu_seqlens_q, block_table, sinks, softcap,
                 alibi_slopes, scale, return_lse, out, workspace, work_list, k_scale, v_scale,
                 own_workspace)


def _varlen_recipe(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                   causal, window, sinks, softcap, alibi_slopes, scale, return_lse, plan, out,
                   k_scale, v_scale, policy) -> sr.Recipe:
    """Check a call of `attention_varlen` and make its recipe."""
    paged, hkv, dv, B = sc.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, block_table=block_table, scale=scale,
                                       causal=causal, window=window, sinks=sinks,
                                       softcap=softcap, alibi_slopes=alibi_slopes,
                                       return_lse=return_lse, out=out, k_scale=k_scale,
                                       v_scale=v_scale)
    total_q, Hq, Dk = q.shape
    bounds = dict(batch=B, max_q_len=max_seqlen_q, total_q=total_q, max_kv_len=max_seqlen_k)
    if paged:
        bounds.update(page_size=k.shape[1], max_pages=block_table.shape[1])
    else:
        bounds.update(total_k=k.shape[0], page_size=None)
    bounds.update(q_heads=Hq, kv_heads=hkv, head_dim=Dk, head_dim_v=dv, dtype=quant.kv_dtype(k),
                  causal=causal, window=window)
    if isinstance(plan, ServingPlan) and plan.q_len is not None:
        raise ValueError("plan was made for attention_with_kvcache (q_len); plan varlen "
                         "batches with max_q_len and total_q")
    plan = _plan(plan, q.device, bounds, k, v, policy)
    return sr.Recipe(plan, q.device, (total_q, Hq, dv), (Hq, total_q))
