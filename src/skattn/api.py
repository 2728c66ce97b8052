"""The public attention function: checks its inputs, plans (or takes a plan) and launches."""
from __future__ import annotations

import itertools
from numbers import Real
from functools import lru_cache

import torch

from skattn import checks, launch, launcher, quant
from skattn.device import hardware, shared_memory_limit
from skattn.planner import plan as make_plan
from skattn.recipe import Recipe


# Signatures of calls whose arguments passed `checks.attention_args`: a call with the same
# plan, shapes, strides, dtypes, devices and options passes again, so it is not re-checked;
# each keeps the call's recipe (`skattn.recipe`: its plan and launches).
_CHECKED: dict = {}
_CHECKED_MAX = 4096
_TOKENS = itertools.count()
_METAS: list = []  # the C launcher's `metas` (None where it could not be built), once known
_CONTIGUOUS = torch.contiguous_format


def _meta(x):
    if type(x) is torch.Tensor:  # the common case first (a subclass takes the long way)
        return x.shape, x.stride(), x.dtype, x.device, x.requires_grad
    if isinstance(x, quant.BLOCK_FORMS):
        return type(x), _meta(x.values), _meta(x.scales)
    if isinstance(x, Real) and not isinstance(x, bool):  # a scale: its value is checked
        return type(x), x
    if x is None or not isinstance(x, torch.Tensor):
        return x if x is None else type(x)
    return x.shape, x.stride(), x.dtype, x.device, x.requires_grad


def _signature(q, k, v, scale, causal, window, mask, sinks, softcap, alibi_slopes, return_lse,
               plan, out, k_scale=None, v_scale=None):
    """What `checks.attention_args` depends on, cheap to build and hash (a plan by a token
    it carries, so a freed plan's id is never mistaken for a new one's). Unhashable options
    make it unhashable: the checks name them."""
    token = plan_token(plan)
    if not _METAS:
        _METAS.append(launcher.metas_function())
    # every tensor argument in one C call where all are plain tensors or None (a float
    # scale, a block form or a subclass: Python reads them, into the same tuple)
    tensors = (_METAS[0](q, k, v, out, mask, sinks, alibi_slopes, k_scale, v_scale)
               if _METAS[0] is not None else None)
    if tensors is None:
        T = torch.Tensor  # plain tensors inline (what `_meta` returns for them)
        tensors = (
            (q.shape, q.stride(), q.dtype, q.device, q.requires_grad) if type(q) is T else _meta(q),
            (k.shape, k.stride(), k.dtype, k.device, k.requires_grad) if type(k) is T else _meta(k),
            (v.shape, v.stride(), v.dtype, v.device, v.requires_grad) if type(v) is T else _meta(v),
            (out.shape, out.stride(), out.dtype, out.device, out.requires_grad)
            if type(out) is T else _meta(out),
            None if mask is None else _meta(mask), None if sinks is None else _meta(sinks),
            None if alibi_slopes is None else _meta(alibi_slopes),
            None if k_scale is None else _meta(k_scale),
            None if v_scale is None else _meta(v_scale))
    return (tensors, scale, type(scale), softcap, type(softcap), causal, type(causal), window,
            type(window), return_lse, type(return_lse), token, torch.is_grad_enabled())


def plan_token(plan):
    """A plan's key in signatures: a token it carries from its first call on (so a freed
    plan's id is never mistaken for a new one's); None for no plan."""
    if plan is None:
        return None
    d = getattr(plan, "__dict__", None)
    if d is None:
        return type(plan), id(plan)
    token = d.get("_token")
    if token is None:
        token = d["_token"] = type(plan), next(_TOKENS)
    return token


@lru_cache(maxsize=256)
def _cached_plan(B, Lq, Lk, Hq, Hkv, Dk, Dv, dtype, causal, window, device, has_mask=False):
    # no occupancy named: the planner's defaults by K/V form apply (`skattn.plan`)
    sms, _ = hardware(device)
    return make_plan(batch=B, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=Dk,
                     head_dim_v=Dv, dtype=dtype, causal=causal, window=window, sms=sms,
                     has_mask=has_mask,
                     smem_limit=shared_memory_limit(device))


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, return_lse=False, plan=None, out=None,
              workspace=None, k_scale=None, v_scale=None):
    """Attention over a KV cache with the stream-K kernel.

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk], f16, bf16 or f32 (last dim contiguous); f16 or bf16 with
        quantized K/V, which are dequantized to q's dtype
    k : Tensor [B, Lk, Hkv, Dk], f16, bf16 or float8_e4m3fn (with k_scale), or a
        `skattn.quant.Q8_0` or `skattn.quant.Q4_0` (llama.cpp's blocks, Dk a multiple of 32);
        may be a strided view of a larger cache
    v : Tensor [B, Lk, Hkv, Dv], k's dtype (or k's block form when k is one)
    scale : float, optional
        Score scale, default Dk ** -0.5.
    causal : bool
        Bottom-right causal mask: query i sits at position Lk - Lq + i.
    window : int, optional
        Sliding window: keys with q_pos - window < k_pos <= q_pos; needs causal=True (the
        window is bottom-right causal).
    mask : Tensor [B or 1, Lq, Lk], optional
        Additive mask (f16, bf16 or f32), -inf hides a key; broadcast over heads.
    sinks : Tensor [Hq] f32, optional
        One extra logit per head in the softmax denominator.
    softcap : float
        When > 0, scores become softcap * tanh(scores / softcap).
    alibi_slopes : Tensor [Hq] f32, optional
        Bias -slope * |q_pos - k_pos| (see `skattn.alibi_slopes`).
    return_lse : bool
        Also return lse [B, Hq, Lq] f32, the natural log of each row's softmax denominator.
    plan : Plan, optional
        A plan from `skattn.plan` for these shapes; without one, a plan for the current GPU
        is made and cached per shape. A planned call only checks and launches.
    out : Tensor [B, Lq, Hq, Dv], optional
        Where to write the output (q's dtype, last dim contiguous). It may be q itself (each
        tile's rows of q are read before its rows of out are written), not memory of k or v
        (refused on the first call of a signature: repeat calls are not re-checked).
    workspace : Tensor, optional
        Scratch for split tiles (`skattn.workspace(plan)`: zeroed, `plan.workspace_bytes`
        bytes; any plan that fits may share it, one call at a time). Default: a pool per
        (device, stream) that skattn grows to the largest plan run on it. Pass one when
        capturing CUDA graphs that replay concurrently or outlive other plans' growth.
    k_scale, v_scale : Tensor [] / [1] / [Hkv] float32, or float; float8_e4m3fn K/V only
        K/V's value is `x.float() * scale`, per tensor or per KV head (vLLM's convention);
        required with fp8 K/V. A float costs a 4-byte fill on the device per call: pass
        tensors in a decode loop or a CUDA graph. See docs/quant.md.

    Returns
    -------
    out, or (out, lse)
        Rows with no visible key give 0 (and lse -inf).

    Raises
    ------
    TypeError, ValueError
        Before any launch, naming the argument (`skattn.checks`): wrong dtypes, shapes,
        devices or layouts, `out` with overlapping memory, non-finite `scale` or `softcap`,
        `causal` not a bool, `window` without causal=True, a `plan` that is not a Plan or
        was made for other shapes, inputs that require grad (the kernels are forward-only:
        call under torch.no_grad() or detach); quantized K/V: missing or misshapen scales,
        k and v in different forms, an unsupported 8-bit dtype, q not f16/bf16, fp8 on a GPU
        below compute capability 8.9.

    Notes
    -----
    Non-finite values are not searched for (that would cost a pass over the KV cache); they
    reach only rows that read them, as NaN. A NaN in q makes its row NaN (out and lse); one
    in k makes NaN the rows that see that key (out and lse), one in v their outputs (in its
    column). Both may also reach other rows of the same sequence and KV head (an additive
    -inf does not hide a NaN score; V is read a KV block at a time), never rows of other
    sequences or KV heads. Infinities in q, k or v usually end as NaN the same way. In
    `mask`, -inf hides a key; +inf or NaN make the row NaN. A -inf sink is no sink; a NaN
    or +inf sink makes the head's rows NaN.
    """
    key = _signature(q, k, v, scale, causal, window, mask, sinks, softcap, alibi_slopes,
                     return_lse, plan, out, k_scale, v_scale)
    try:
        rec = _CHECKED.get(key)
    except TypeError:  # unhashable options
        key = rec = None
    if rec is None:
        checks.attention_args(q, k, v, scale=scale, causal=causal, window=window, mask=mask,
                              sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                              return_lse=return_lse, plan=plan, out=out, k_scale=k_scale,
                              v_scale=v_scale)
        rec = _recipe(key, plan, q, k, v, causal, window, mask)
    if out is None:
        if rec.out_like_q:  # (the cheaper allocation: 1.2 against 1.8 µs on a 2-core CPU)
            out = torch.empty_like(q, memory_format=_CONTIGUOUS)
        else:  # v's logical Dv (a block form's, not its packed bytes')
            B, Lq, Hq, _ = q.shape
            out = torch.empty(B, Lq, Hq, v.shape[3], device=q.device, dtype=q.dtype)
    k, v, k_scale, v_scale = quant.kernel_kv(k, v, k_scale, v_scale, q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device,
                      dtype=torch.float32) if return_lse else None
    if workspace is not None and not isinstance(workspace, torch.Tensor):
        raise TypeError("workspace must be a tensor from skattn.workspace(plan), got "
                        f"{type(workspace).__name__}")
    rec.run(q, k, v, out, lse, scale, mask, sinks, softcap, alibi_slopes, workspace, k_scale,
            v_scale)
    return (out, lse) if return_lse else out


def _recipe(key, plan, q, k, v, causal, window, mask) -> Recipe:
    """The recipe of a checked call (its plan made here for an unplanned call), kept under
    the call's signature."""
    if plan is None:
        B, Lq, Hq, Dk = q.shape
        plan = _cached_plan(B, Lq, k.shape[1], Hq, k.shape[2], Dk, v.shape[3], quant.kv_dtype(k),
                            bool(causal), window, q.device, mask is not None)
    rec = Recipe(launch.bind(plan, q.device), plan)
    if key is not None:
        remember(_CHECKED, key, rec)
    return rec


def remember(table: dict, key, value, limit: int = _CHECKED_MAX) -> None:
    """`table[key] = value`, dropping the oldest entry beyond `limit` (safe when another
    thread drops it first)."""
    table[key] = value
    if len(table) > limit:
        try:
            table.pop(next(iter(table)), None)
        except (RuntimeError, StopIteration):
            pass
