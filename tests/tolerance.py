"""The numerical test rule: error vs float64 <= k x (PyTorch same-dtype error) + floor."""
import torch
import torch.nn.functional as F


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def torch_same_dtype_err(q, k, v, ref_plain, *, causal=False) -> float:
    """Relative error of PyTorch's own attention in k's dtype, on the same q, k, v.

    `ref_plain` is the float64 reference of plain attention (no mask/sink/softcap/alibi), so
    this measures the rounding of the inputs' dtype at this shape.
    """
    dt = k.dtype
    qt, kt, vt = (x.transpose(1, 2).to(dt) for x in (q, k, v))
    Lq, Lk = q.shape[1], k.shape[1]
    attn_mask = None
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
        attn_mask = torch.arange(Lk, device=q.device)[None, :] <= i
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, enable_gqa=True)
    return rel_err(out.transpose(1, 2), ref_plain)


def bound(q, k, v, *, causal=False, k_factor=3.0, floor=2e-3) -> float:
    from skattn import reference

    plain = reference.attention(q, k, v, causal=causal)
    if not torch.isfinite(plain).all() or plain.norm() == 0:
        return floor
    return k_factor * torch_same_dtype_err(q, k, v, plain, causal=causal) + floor
