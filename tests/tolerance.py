"""The numerical test rule: error vs float64 <= k x (PyTorch same-dtype error) + floor."""
import torch
import torch.nn.functional as F


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def torch_same_dtype(q, k, v, *, causal=False):
    """PyTorch's own attention in k's dtype on the same q, k, v: [B, Lq, Hq, Dv]; rows with no
    visible key (causal, Lq > Lk) give 0, as skattn's do, instead of SDPA's NaN."""
    dt = k.dtype
    qt, kt, vt = (x.transpose(1, 2).to(dt) for x in (q, k, v))
    Lq, Lk = q.shape[1], k.shape[1]
    attn_mask = None
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
        attn_mask = torch.arange(Lk, device=q.device)[None, :] <= i
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, enable_gqa=True)
    return out.transpose(1, 2).nan_to_num(0.0)


def torch_same_dtype_err(q, k, v, ref_plain, *, causal=False) -> float:
    """Relative error of PyTorch's own attention in k's dtype, on the same q, k, v.

    `ref_plain` is the float64 reference of plain attention (no mask/sink/softcap/alibi), so
    this measures the rounding of the inputs' dtype at this shape.
    """
    return rel_err(torch_same_dtype(q, k, v, causal=causal), ref_plain)


def row_rel_err(out, ref):
    """Relative error of each output row (last dim): 0 where both are 0, inf where only ref is."""
    num = (out.double() - ref).norm(dim=-1)
    den = ref.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))


def bound(q, k, v, *, causal=False, k_factor=3.0, floor=2e-3) -> float:
    from skattn import reference

    plain = reference.attention(q, k, v, causal=causal)
    if not torch.isfinite(plain).all() or plain.norm() == 0:
        return floor
    return k_factor * torch_same_dtype_err(q, k, v, plain, causal=causal) + floor


def bounds(q, k, v, *, causal=False, ref=None, k_factor=3.0, floor=2e-3, row_floor=4e-3):
    """(whole-output bound, row bound): the rule of `bound`, and the same row by row (a wrong
    row among many barely moves the norm of the whole output), from one float64 reference
    and one PyTorch run on plain attention. With `ref`, the float64 answer of the call being
    checked, PyTorch's error is at least that of rounding `ref` to q's dtype (the output's):
    features PyTorch's plain run does not have (sinks, softcap) change what rounding costs."""
    from skattn import reference

    plain = reference.attention(q, k, v, causal=causal)
    if not torch.isfinite(plain).all() or plain.norm() == 0:
        err, rows = 0.0, torch.zeros(1, dtype=torch.float64)
    else:
        pt = torch_same_dtype(q, k, v, causal=causal)
        err, rows = rel_err(pt, plain), row_rel_err(pt, plain)
    if ref is not None:
        rounded = ref.to(q.dtype)
        err = max(err, rel_err(rounded, ref))
        rows = torch.cat([rows.flatten(), row_rel_err(rounded, ref).flatten()])
    rows = rows[torch.isfinite(rows)]
    worst = rows.max().item() if rows.numel() else 0.0
    return k_factor * err + floor, k_factor * worst + row_floor
