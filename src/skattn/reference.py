"""Float64 attention with every feature: the ground truth for kernels and plans
(docs/design.md, "The operation").

`attention` computes each (sequence, head) row block in one shot; `run_plan` (in
`skattn.reference_plan`, re-exported here) replays a Plan's stream-K decomposition with the
same partial states and fixups as the Triton kernels, and `run_serving_plan` (in
`skattn.reference_serving_plan`) a ServingPlan's ragged one. They use the row math of
`skattn.reference_math` and the input rules of `skattn.checks`.
"""
from __future__ import annotations

import torch

from skattn.reference_math import F64, empty_state, finalise, online_update, prepare, scores
from skattn.reference_plan import run_plan
from skattn.reference_serving import attention_varlen, attention_with_kvcache
from skattn.reference_serving_plan import run_serving_plan

__all__ = ["attention", "run_plan", "attention_with_kvcache", "attention_varlen",
           "run_serving_plan"]


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, return_lse=False, plan=None, k_scale=None,
              v_scale=None):
    """Float64 attention with every skattn feature (docs/design.md), one head at a time.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Lq, Hq, Dk]``, any float dtype.
    k, v : torch.Tensor, skattn.quant.Q8_0 or skattn.quant.Q4_0
        ``[B, Lk, Hkv, Dk]`` and ``[B, Lk, Hkv, Dv]``; query head h reads KV head
        ``h // (Hq // Hkv)``. Quantized K/V (float8_e4m3fn with scales, Q8_0, Q4_0) are
        dequantized exactly in float64.
    scale : float, optional
        Logit scale, ``Dk ** -0.5`` by default.
    causal : bool
        Bottom-right causal mask: query i sits at position ``Lk - Lq + i``.
    window : int, optional
        Keep keys with ``q_pos - window < k_pos <= q_pos``; needs ``causal=True``.
    mask : torch.Tensor, optional
        ``[B or 1, Lq, Lk]`` additive mask (``-inf`` = masked); a bool mask means
        True = attend, as in ``scaled_dot_product_attention``.
    sinks : torch.Tensor, optional
        ``[Hq]`` logits that join each row's softmax denominator only.
    softcap : float
        ``c > 0`` replaces a logit s by ``c * tanh(s / c)`` (before ALiBi and mask).
    alibi_slopes : torch.Tensor, optional
        ``[Hq]``; adds ``-slope * |q_pos - k_pos|`` to the logits.
    return_lse : bool
        Also return the natural-log sum-exp of each row's logits (sink included).
    plan : skattn.Plan, optional
        Accepted for signature parity with ``skattn.attention``: must be a Plan, else ignored.
    k_scale, v_scale : torch.Tensor or float, optional
        The scales of float8_e4m3fn K/V (``[]``, ``[1]`` or ``[Hkv]``), as in ``skattn.attention``.

    Returns
    -------
    out : torch.Tensor
        ``[B, Lq, Hq, Dv]`` float64, on q's device. Rows with no visible key give 0.
    lse : torch.Tensor
        ``[B, Hq, Lq]`` float64, when ``return_lse``: ``-inf`` for rows with no visible key
        and no sink, the sink itself for rows with no visible key and a sink.
    """
    x = prepare(q, k, v, scale=scale, causal=causal, window=window, mask=mask, sinks=sinks,
                softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse, plan=plan,
                k_scale=k_scale, v_scale=v_scale)
    bsz, lq, lk, hq, _ = x.shape
    dev = x.q.device
    out = torch.empty(bsz, lq, hq, x.v.shape[-1], dtype=F64, device=dev)
    lse = torch.empty(bsz, hq, lq, dtype=F64, device=dev)
    qi = torch.arange(lq, device=dev)
    for b in range(bsz):
        for h in range(hq):
            heads = torch.full_like(qi, h)
            s = scores(x, b, h // x.ratio, heads, qi, 0, lk)
            state = online_update(empty_state(lq, x.v.shape[-1], dev), s, x.v[b, :, h // x.ratio])
            del s
            out[b, :, h], lse[b, h] = finalise(state, None if x.sinks is None else x.sinks[heads])
    return (out, lse) if return_lse else out

