"""Float64 attention with every feature: the ground truth for kernels and plans (DESIGN §1).

`attention` computes each (sequence, head) row block in one shot; `run_plan` (in
`skattn.reference_plan`, re-exported here) replays a Plan's stream-K decomposition with the
same partial states and fixups as the Triton kernels. Both share the row math below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["attention", "run_plan"]

NEG_INF = float("-inf")
F64 = torch.float64


@dataclass(frozen=True)
class Inputs:
    """Checked inputs, cast to float64 on q's device."""

    q: torch.Tensor                # [B, Lq, Hq, Dk]
    k: torch.Tensor                # [B, Lk, Hkv, Dk]
    v: torch.Tensor                # [B, Lk, Hkv, Dv]
    mask: torch.Tensor | None      # [B or 1, Lq, Lk] additive
    sinks: torch.Tensor | None     # [Hq]
    slopes: torch.Tensor | None    # [Hq]
    scale: float
    softcap: float
    causal: bool
    window: int | None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, Lq, Lk, Hq, Hkv)."""
        return self.q.shape[0], self.q.shape[1], self.k.shape[1], self.q.shape[2], self.k.shape[2]

    @property
    def ratio(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


def _per_head(t, name, hq, device):
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.shape != (hq,):
        raise ValueError(f"{name} must have shape [{hq}], got {tuple(t.shape)}")
    return t.to(device=device, dtype=F64)


def prepare(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
            softcap=0.0, alibi_slopes=None) -> Inputs:
    """Check shapes and options (DESIGN §1) and cast everything to float64."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D: [B, L, H, D]")
    b, lq, hq, dk = q.shape
    bk, lk, hkv, dkk = k.shape
    if bk != b or tuple(v.shape[:3]) != (b, lk, hkv) or dkk != dk:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive integer, got {window!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    dev = q.device
    if mask is not None:
        if mask.dim() != 3 or mask.shape[0] not in (1, b) or tuple(mask.shape[1:]) != (lq, lk):
            raise ValueError(f"mask must have shape [{b} or 1, {lq}, {lk}], got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:  # as in scaled_dot_product_attention: True = attend
            mask = torch.zeros(mask.shape, dtype=F64, device=dev).masked_fill(~mask.to(dev), NEG_INF)
        mask = mask.to(device=dev, dtype=F64)
    return Inputs(q.to(F64), k.to(device=dev, dtype=F64), v.to(device=dev, dtype=F64), mask,
                  _per_head(sinks, "sinks", hq, dev), _per_head(alibi_slopes, "alibi_slopes", hq, dev),
                  dk ** -0.5 if scale is None else float(scale), float(softcap), bool(causal), window)


def scores(x: Inputs, b: int, g: int, heads: torch.Tensor, qi: torch.Tensor, k0: int,
           k1: int) -> torch.Tensor:
    """Masked logits [R, k1 - k0] of rows (sequence b, query heads `heads`, tokens `qi`) of KV
    head g against keys [k0, k1); invisible keys are -inf."""
    _, lq, lk, _, _ = x.shape
    qrows = x.q[b, qi, heads]                                  # [R, Dk]
    s = x.scale * (qrows @ x.k[b, k0:k1, g].T)
    if x.softcap > 0:
        s = x.softcap * torch.tanh(s / x.softcap)
    qpos = (lk - lq + qi)[:, None]
    kpos = torch.arange(k0, k1, device=s.device)[None, :]
    if x.slopes is not None:
        s = s - x.slopes[heads][:, None] * (qpos - kpos).abs().to(F64)
    if x.mask is not None:
        s = s + x.mask[b if x.mask.shape[0] > 1 else 0][qi, k0:k1]
    if x.causal or x.window is not None:
        s = s.masked_fill(kpos > qpos, NEG_INF)
    if x.window is not None:
        s = s.masked_fill(kpos <= qpos - x.window, NEG_INF)
    return s


# -- partial softmax states (O unnormalised, m, l); rows that saw no key have m = -inf, l = 0
State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _finite(m: torch.Tensor) -> torch.Tensor:
    """m with -inf replaced by 0, so that exp(x - m) never evaluates -inf - -inf."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def empty_state(rows: int, dv: int, device) -> State:
    return (torch.zeros(rows, dv, dtype=F64, device=device),
            torch.full((rows,), NEG_INF, dtype=F64, device=device),
            torch.zeros(rows, dtype=F64, device=device))


def online_update(state: State, s: torch.Tensor, vb: torch.Tensor) -> State:
    """Fold one block of logits s [R, n] and values vb [n, Dv] into a partial state."""
    o, m, l = state
    m_new = torch.maximum(m, s.amax(dim=-1))
    ref = _finite(m_new)
    alpha = torch.exp(m - ref)
    p = torch.exp(s - ref[:, None])
    return alpha[:, None] * o + p @ vb, m_new, alpha * l + p.sum(dim=-1)


def merge(a: State, b: State) -> State:
    """Merge two partial states of the same rows (DESIGN §2)."""
    m = torch.maximum(a[1], b[1])
    ref = _finite(m)
    sa, sb = torch.exp(a[1] - ref), torch.exp(b[1] - ref)
    return sa[:, None] * a[0] + sb[:, None] * b[0], m, sa * a[2] + sb * b[2]


def finalise(state: State, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a complete state, adding the sink logits [R] once: (out [R, Dv], lse [R])."""
    o, m, l = state
    if sinks is not None:
        m2 = torch.maximum(m, sinks)
        ref = _finite(m2)
        alpha = torch.exp(m - ref)
        o, l, m = alpha[:, None] * o, alpha * l + torch.exp(sinks - ref), ref
    seen = l > 0
    safe_l = torch.where(seen, l, torch.ones_like(l))
    out = torch.where(seen[:, None], o / safe_l[:, None], torch.zeros_like(o))
    lse = torch.where(seen, _finite(m) + torch.log(safe_l), torch.full_like(l, NEG_INF))
    return out, lse


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, return_lse=False, plan=None):
    """Float64 attention with every skattn feature (DESIGN §1), one head at a time.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Lq, Hq, Dk]``, any float dtype.
    k, v : torch.Tensor
        ``[B, Lk, Hkv, Dk]`` and ``[B, Lk, Hkv, Dv]``; query head h reads KV head
        ``h // (Hq // Hkv)``.
    scale : float, optional
        Logit scale, ``Dk ** -0.5`` by default.
    causal : bool
        Bottom-right causal mask: query i sits at position ``Lk - Lq + i``.
    window : int, optional
        Keep keys with ``q_pos - window < k_pos <= q_pos``.
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
        Accepted for signature parity with ``skattn.attention`` and ignored.

    Returns
    -------
    out : torch.Tensor
        ``[B, Lq, Hq, Dv]`` float64, on q's device. Rows with no visible key give 0.
    lse : torch.Tensor
        ``[B, Hq, Lq]`` float64, when ``return_lse``: ``-inf`` for rows with no visible key
        and no sink, the sink itself for rows with no visible key and a sink.
    """
    del plan
    x = prepare(q, k, v, scale=scale, causal=causal, window=window, mask=mask, sinks=sinks,
                softcap=softcap, alibi_slopes=alibi_slopes)
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


def __getattr__(name):
    # run_plan lives in reference_plan, which imports this module: load it on first use.
    if name == "run_plan":
        from skattn.reference_plan import run_plan

        return run_plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
