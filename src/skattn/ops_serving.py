"""`torch.ops.skattn.attention_with_kvcache` and `torch.ops.skattn.attention_varlen`: the
serving functions as torch custom ops, for torch.compile.

As `torch.ops.skattn.attention` does for `skattn.attention` (skattn/ops.py): a fake kernel
gives the output's shape, so `torch.compile(fullgraph=True)` traces a model that reads a
ragged or paged cache without a graph break, and CUDA graphs (mode="reduce-overhead")
capture it; lengths, block tables and offsets are tensors read on the GPU, so a captured
graph follows them as they change. The plan is made per bounds and policy (cached), and
every call builds its work list and uses a workspace of its own, uninitialised (CUDA graphs
of torch.compile own what an op allocates; the work-list step zeroes the fused counters). The eager entry points stay
`skattn.attention_with_kvcache` and `skattn.attention_varlen` (no dispatcher on their path).

Quantized K/V pass as tensors, as the dense op takes them: FP8 K/V with `k_scale`,
`v_scale`; a q8_0 cache as its int8 values with its f16 block scales in `k_scale` /
`v_scale`, a q4_0 cache as its packed uint8 values (the wrappers below unpack a
`skattn.quant.Q8_0` or `Q4_0`).
"""
from __future__ import annotations

import torch

from skattn import serving
from skattn import serving_checks as sc
from skattn.ops import DEFAULT_POLICY, _LIB, _kv_forms, op_kv, traced_int
from skattn.serving_plan import SERVING_POLICIES

__all__ = ["attention_with_kvcache", "attention_varlen"]

_LIB.define("attention_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, "
            "Tensor cache_seqlens, Tensor? block_table, Tensor? sinks, Tensor? alibi_slopes, "
            "float? scale, bool causal, SymInt? window, float softcap, str policy, "
            "Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor")
_LIB.define("attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
            "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
            "Tensor? block_table, Tensor? sinks, Tensor? alibi_slopes, float? scale, "
            "bool causal, SymInt? window, float softcap, str policy, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> Tensor")


def _check_policy(policy) -> None:
    if policy not in SERVING_POLICIES:
        raise ValueError(f"policy must be one of {SERVING_POLICIES} for the serving ops, got "
                         f"{policy!r}")


def _kvcache_kernel(q, k_cache, v_cache, cache_seqlens, block_table, sinks, alibi_slopes, scale,
                    causal, window, softcap, policy, k_scale=None, v_scale=None):
    _check_policy(policy)
    k, v, k_scale, v_scale = _kv_forms(k_cache, v_cache, k_scale, v_scale)
    return serving._kvcache(q, k, v, cache_seqlens, block_table, causal, window, sinks, softcap,
                            alibi_slopes, scale, False, None, None, None, None, k_scale,
                            v_scale, policy=policy, own_workspace=True)


def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, block_table, sinks, alibi_slopes, scale,
                  causal, window, softcap, policy, k_scale=None, v_scale=None):
    # the real kernel's checks (not of the lengths' values), so bad input fails while tracing
    _check_policy(policy)
    k, v, k_scale, v_scale = _kv_forms(k_cache, v_cache, k_scale, v_scale)
    _, _, dv = sc.kvcache_args(q, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                               scale=scale, causal=causal, window=traced_int(window), sinks=sinks,
                               softcap=softcap, alibi_slopes=alibi_slopes, return_lse=False,
                               out=None, k_scale=k_scale, v_scale=v_scale, values=False)
    B, Lq, Hq, _ = q.shape
    return q.new_empty(B, Lq, Hq, dv)


def _varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                   sinks, alibi_slopes, scale, causal, window, softcap, policy, k_scale=None,
                   v_scale=None):
    _check_policy(policy)
    k, v, k_scale, v_scale = _kv_forms(k, v, k_scale, v_scale)
    _, hq, _ = q.shape
    # rows of q that belong to no sequence are not written: zeros here, so the op's output
    # is the same from call to call
    out = q.new_zeros(q.shape[0], hq, v.shape[-1])  # (a block form's logical Dv)
    return serving._varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table, causal, window, sinks, softcap, alibi_slopes, scale,
                           False, None, out, None, None, k_scale, v_scale, policy=policy,
                           own_workspace=True)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                 sinks, alibi_slopes, scale, causal, window, softcap, policy, k_scale=None,
                 v_scale=None):
    _check_policy(policy)
    k, v, k_scale, v_scale = _kv_forms(k, v, k_scale, v_scale)
    _, _, dv, _ = sc.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, traced_int(max_seqlen_q),
                                 traced_int(max_seqlen_k), block_table=block_table, scale=scale,
                                 causal=causal, window=traced_int(window), sinks=sinks,
                                 softcap=softcap,
                                 alibi_slopes=alibi_slopes, return_lse=False, out=None,
                                 k_scale=k_scale, v_scale=v_scale, values=False)
    return q.new_empty(q.shape[0], q.shape[1], dv)


for _name, _kernel, _fake in (("attention_with_kvcache", _kvcache_kernel, _kvcache_fake),
                              ("attention_varlen", _varlen_kernel, _varlen_fake)):
    _LIB.impl(_name, _kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"skattn::{_name}", _fake, lib=_LIB)


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table=None, causal=True,
                           window=None, sinks=None, softcap=0.0, alibi_slopes=None, scale=None,
                           policy=DEFAULT_POLICY, k_scale=None, v_scale=None):
    """`skattn.attention_with_kvcache` through the custom op
    `torch.ops.skattn.attention_with_kvcache`: one node in a graph that `torch.compile`
    traces, capturable by its CUDA graphs. Arguments as `skattn.attention_with_kvcache`,
    with `policy` (a serving plan's: "auto", "llamacpp", "llamacpp-before", "split") in
    place of a plan, and no lse, `out`, workspace or work list. Returns out [B, Lq, Hq, Dv]."""
    k, v, k_scale, v_scale = op_kv(q, k_cache, v_cache, k_scale, v_scale)
    return torch.ops.skattn.attention_with_kvcache(
        q, k, v, cache_seqlens, block_table, sinks, alibi_slopes,
        None if scale is None else float(scale), bool(causal), window, float(softcap), policy,
        k_scale, v_scale)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     block_table=None, causal=True, window=None, sinks=None, softcap=0.0,
                     alibi_slopes=None, scale=None, policy=DEFAULT_POLICY, k_scale=None,
                     v_scale=None):
    """`skattn.attention_varlen` through the custom op `torch.ops.skattn.attention_varlen`
    (see `attention_with_kvcache` here). Rows of q that belong to no sequence give 0.
    Returns out [total_q, Hq, Dv]."""
    k, v, k_scale, v_scale = op_kv(q, k, v, k_scale, v_scale)
    return torch.ops.skattn.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, sinks,
        alibi_slopes, None if scale is None else float(scale), bool(causal), window,
        float(softcap), policy, k_scale, v_scale)
