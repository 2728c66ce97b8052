"""`torch.ops.skattn.attention`: skattn's attention as a torch custom op, for torch.compile.

`skattn.attention` stays the eager entry point (no dispatcher on its host path); this op
wraps the same kernel so that `torch.compile(fullgraph=True)` traces it without a graph
break (a fake kernel gives the output's shape) and CUDA graphs (mode="reduce-overhead")
capture it. The op plans with a named policy, cached per shape like `skattn.attention`.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from skattn import checks, launch
from skattn import policy as policies
from skattn.device import hardware, shared_memory_limit
from skattn.planner import plan as make_plan

__all__ = ["attention", "plan_for"]

DEFAULT_POLICY = "auto"


@lru_cache(maxsize=512)
def _cached_plan(B, Lq, Lk, Hq, Hkv, Dk, Dv, dtype, causal, window, device, policy, has_mask):
    sms, occ = hardware(device)
    return make_plan(batch=B, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=Dk,
                     head_dim_v=Dv, dtype=dtype, causal=causal, window=window, sms=sms,
                     occupancy=occ, policy=policy, has_mask=has_mask,
                     smem_limit=shared_memory_limit(device))


def plan_for(q, k, v, *, causal=False, window=None, policy=DEFAULT_POLICY, has_mask=False):
    """The plan the op runs for these inputs: `skattn.plan(..., policy=policy)` for the
    current GPU (the interpreter's pretend grid on a CPU), cached per shape and policy;
    `has_mask`: the call passes a mask (its tile takes shared memory)."""
    B, Lq, Hq, Dk = q.shape
    try:
        return _cached_plan(B, Lq, k.shape[1], Hq, k.shape[2], Dk, v.shape[3], k.dtype,
                            bool(causal), window, q.device, policy, bool(has_mask))
    except ValueError:  # name the tensor at fault (e.g. an f32 k) rather than the planner's field
        checks.attention_args(q, k, v, causal=causal, window=window)
        raise


def _check_policy(policy) -> None:
    known = (*policies.POLICIES, *getattr(policies, "POLICY_ALIASES", {}))
    if policy not in known:
        raise ValueError(f"policy must be one of {known}, got {policy!r}")


@torch.library.custom_op("skattn::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                  scale: float | None, causal: bool, window: int | None, softcap: float,
                  policy: str) -> torch.Tensor:
    checks.attention_args(q, k, v, scale=scale, causal=causal, window=window, mask=mask,
                          sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes)
    p = plan_for(q, k, v, causal=causal, window=window, policy=policy, has_mask=mask is not None)
    B, Lq, Hq, Dk = q.shape
    out = q.new_empty(B, Lq, Hq, v.shape[3])
    # a workspace of this call alone: CUDA graphs of torch.compile own what the op allocates
    launch.run(p, q, k, v, out, None, scale=launch.default_scale(Dk) if scale is None else scale,
               mask=mask, sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes, scratch=True)
    return out


@_attention_op.register_fake
def _attention_fake(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, policy):
    # the same checks as the real kernel, so bad input fails while tracing, not at run time
    checks.attention_args(q, k, v, scale=scale, causal=causal, window=window, mask=mask,
                          sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes)
    _check_policy(policy)
    B, Lq, Hq, _ = q.shape
    return q.new_empty(B, Lq, Hq, v.shape[3])


def _no_backward(ctx, grad):
    raise NotImplementedError("skattn's attention has no backward (inference only): run it "
                              "under torch.no_grad() or torch.inference_mode()")


_attention_op.register_autograd(_no_backward)


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, policy=DEFAULT_POLICY):
    """`skattn.attention` through the custom op `torch.ops.skattn.attention`.

    Use this inside code that `torch.compile` traces (it is one node in the graph, no graph
    break) or that a CUDA graph captures; in eager code `skattn.attention` costs less host
    time. Inference only: the op has no backward.

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk], f16, bf16 or f32 (last dim contiguous)
    k : Tensor [B, Lk, Hkv, Dk], f16 or bf16; may be a strided view of a larger cache
    v : Tensor [B, Lk, Hkv, Dv], k's dtype
    scale : float, optional
        Score scale, default Dk ** -0.5.
    causal : bool
        Bottom-right causal mask: query i sits at position Lk - Lq + i.
    window : int, optional
        Sliding window: keys with q_pos - window < k_pos <= q_pos (implies causal).
    mask : Tensor [B or 1, Lq, Lk], optional
        Additive mask (f16, bf16 or f32), -inf hides a key; broadcast over heads.
    sinks : Tensor [Hq] f32, optional
        One extra logit per head in the softmax denominator.
    softcap : float
        When > 0, scores become softcap * tanh(scores / softcap).
    alibi_slopes : Tensor [Hq] f32, optional
        Bias -slope * |q_pos - k_pos|.
    policy : str
        The planner's policy for the program count ("auto", "llamacpp", "llamacpp-before",
        ...; see `skattn.plan`).

    Returns
    -------
    Tensor [B, Lq, Hq, Dv], q's dtype
    """
    return torch.ops.skattn.attention(q, k, v, mask, sinks, alibi_slopes,
                                      None if scale is None else float(scale), bool(causal),
                                      window, float(softcap), policy)
