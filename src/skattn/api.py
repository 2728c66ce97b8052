"""The public attention function: checks its inputs, plans (or takes a plan) and launches."""
from __future__ import annotations

from functools import lru_cache

import torch

from skattn import launch
from skattn.device import hardware, interpreting
from skattn.planner import Plan, plan as make_plan

_Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KV_DTYPES = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tensor(name, x, dtypes, ndim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {x.stride(-1)})")


def _check(q, k, v, mask, sinks, alibi_slopes, softcap, window):
    _tensor("q", q, _Q_DTYPES, 4)
    _tensor("k", k, _KV_DTYPES, 4)
    _tensor("v", v, _KV_DTYPES, 4)
    (B, Lq, Hq, Dk), (Bk, Lk, Hkv, Dk2) = q.shape, k.shape
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {B}, k {Bk}, v {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v's [Lk, Hkv] {tuple(v.shape[1:3])} differ from k's {(Lk, Hkv)}")
    if Dk2 != Dk:
        raise ValueError(f"head size of q ({Dk}) and k ({Dk2}) differ")
    if min(B, Lq, Hq, Dk, Lk, Hkv, v.shape[3]) < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    for name, x in (("k", k), ("v", v), ("mask", mask), ("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter); "
                         "move q, k, v to a CUDA device")
    if mask is not None:
        _tensor("mask", mask, _MASK_DTYPES, 3)
        if mask.shape[0] not in (1, B) or tuple(mask.shape[1:]) != (Lq, Lk):
            raise ValueError(f"mask must have shape [{B} or 1, {Lq}, {Lk}], got {tuple(mask.shape)}")
    for name, x in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if x is not None:
            _tensor(name, x, (torch.float32,), 1)
            if x.shape[0] != Hq:
                raise ValueError(f"{name} must have shape [{Hq}], got {tuple(x.shape)}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


@lru_cache(maxsize=256)
def _cached_plan(B, Lq, Lk, Hq, Hkv, Dk, Dv, dtype, causal, window, device):
    sms, occ = hardware(device)
    return make_plan(batch=B, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=Dk,
                     head_dim_v=Dv, dtype=dtype, causal=causal, window=window, sms=sms,
                     blocks_per_sm=occ)


def _check_plan(p: Plan, q, k, v, causal, window):
    B, Lq, Hq, Dk = q.shape
    want = dict(batch=B, q_len=Lq, kv_len=k.shape[1], q_heads=Hq, kv_heads=k.shape[2],
                head_dim=Dk, head_dim_v=v.shape[3], causal=bool(causal), window=window,
                dtype=str(k.dtype).removeprefix("torch."))
    for name, value in want.items():
        if getattr(p, name) != value:
            raise ValueError(f"plan was made for {name}={getattr(p, name)!r}, inputs have {value!r}")


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, return_lse=False, plan=None, out=None):
    """Attention over a KV cache with the stream-K kernel.

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
        Bias -slope * |q_pos - k_pos| (see `skattn.alibi_slopes`).
    return_lse : bool
        Also return lse [B, Hq, Lq] f32, the natural log of each row's softmax denominator.
    plan : Plan, optional
        A plan from `skattn.plan` for these shapes; without one, a plan for the current GPU
        is made and cached per shape. A planned call only checks and launches.
    out : Tensor [B, Lq, Hq, Dv], optional
        Where to write the output (q's dtype, last dim contiguous).

    Returns
    -------
    out, or (out, lse)
        Rows with no visible key give 0 (and lse -inf).
    """
    _check(q, k, v, mask, sinks, alibi_slopes, softcap, window)
    B, Lq, Hq, Dk = q.shape
    Dv = v.shape[3]
    if plan is None:
        plan = _cached_plan(B, Lq, k.shape[1], Hq, k.shape[2], Dk, Dv, k.dtype, bool(causal),
                            window, q.device)
    else:
        _check_plan(plan, q, k, v, causal, window)
    if out is None:
        out = torch.empty(B, Lq, Hq, Dv, device=q.device, dtype=q.dtype)
    elif tuple(out.shape) != (B, Lq, Hq, Dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a [{B}, {Lq}, {Hq}, {Dv}] {q.dtype} tensor, contiguous in "
                         f"its last dimension; got {tuple(out.shape)} {out.dtype}")
    lse = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32) if return_lse else None
    scale = launch.default_scale(Dk) if scale is None else float(scale)
    launch.run(plan, q, k, v, out, lse, scale=scale, mask=mask, sinks=sinks,
               softcap=float(softcap), alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out
