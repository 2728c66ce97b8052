"""Float64 row math shared by the reference and the plan executor: checked inputs, masked
logits and partial softmax states (O unnormalised, m, l) with their merge."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skattn import checks, quant

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


def prepare(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
            softcap=0.0, alibi_slopes=None, return_lse=False, plan=None, k_scale=None,
            v_scale=None) -> Inputs:
    """Check the arguments (`skattn.checks`, the references' rules) and cast to float64;
    quantized K/V are dequantized (`skattn.quant.dequantize_kv`)."""
    checks.attention_args(q, k, v, scale=scale, causal=causal, window=window, mask=mask,
                          sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                          return_lse=return_lse, plan=plan, kernel=False, k_scale=k_scale,
                          v_scale=v_scale)
    k, v = quant.dequantize_kv(k, v, k_scale, v_scale, F64)
    if mask is not None and mask.dtype == torch.bool:  # as in SDPA: True = attend
        mask = torch.zeros(mask.shape, dtype=F64, device=q.device).masked_fill(~mask, NEG_INF)
    f64 = [None if x is None else x.to(F64) for x in (mask, sinks, alibi_slopes)]
    return Inputs(q.to(F64), k.to(F64), v.to(F64), *f64,
                  q.shape[-1] ** -0.5 if scale is None else float(scale), float(softcap),
                  causal, window)


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
    """Merge two partial states of the same rows (docs/design.md, "Tiles and the work list")."""
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
    seen = l != 0  # a row with no visible key gives 0; a NaN row stays NaN
    safe_l = torch.where(seen, l, torch.ones_like(l))
    out = torch.where(seen[:, None], o / safe_l[:, None], torch.zeros_like(o))
    lse = torch.where(seen, _finite(m) + torch.log(safe_l), torch.full_like(l, NEG_INF))
    return out, lse
