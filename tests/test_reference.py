"""The float64 reference against PyTorch's SDPA and a naive per-row loop; ALiBi slopes."""
import math

import pytest
import torch
import torch.nn.functional as F

from skattn.alibi import alibi_slopes
from skattn.reference import attention

NEG_INF = float("-inf")


def _inputs(seed, b, lq, lk, hq, hkv, dk, dv=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dv = dk if dv is None else dv
    q = torch.randn(b, lq, hq, dk, generator=g, dtype=torch.float64)
    k = torch.randn(b, lk, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, lk, hkv, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), g


def _sdpa(q, k, v, **kw):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=True, **kw)
    return out.transpose(1, 2)


def _naive(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
           softcap=0.0, alibi=None):
    """docs/design.md's semantics row by row, the sink as one more logit of a plain softmax."""
    b_, lq, hq, dk = q.shape
    lk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    out = torch.zeros(b_, lq, hq, dv, dtype=torch.float64)
    lse = torch.full((b_, hq, lq), NEG_INF, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(lq):
                qpos = lk - lq + i
                logits, vals = [], []
                for j in range(lk):
                    if (causal or window) and j > qpos or window and j <= qpos - window:
                        continue
                    s = scale * float(q[b, i, h] @ k[b, j, g])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        s -= float(alibi[h]) * abs(qpos - j)
                    if mask is not None:
                        s += float(mask[b if mask.shape[0] > 1 else 0, i, j])
                    if s > NEG_INF:
                        logits.append(s)
                        vals.append(v[b, j, g])
                if sinks is not None:
                    logits.append(float(sinks[h]))
                if not logits:
                    continue
                t = torch.tensor(logits, dtype=torch.float64)
                p = torch.softmax(t, 0)
                lse[b, h, i] = torch.logsumexp(t, 0)
                if vals:
                    out[b, i, h] = p[:len(vals)] @ torch.stack(vals)
    return out, lse


def _bottom_right(lq, lk):
    return torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]


# (B, Lq, Lk, Hq, Hkv, Dk, Dv)
SHAPES = [(1, 1, 1, 1, 1, 8, 8), (2, 5, 33, 4, 2, 16, 16), (1, 7, 64, 10, 2, 32, 24),
          (3, 16, 16, 6, 6, 8, 16), (1, 4, 100, 8, 1, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_matches_sdpa(shape):
    b, lq, lk, hq, hkv, dk, dv = shape
    q, k, v, _ = _inputs(1, b, lq, lk, hq, hkv, dk, dv)
    out, lse = attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, _sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    s = torch.einsum("blhd,bkhd->bhlk", q, k.repeat_interleave(hq // hkv, dim=2)) * dk ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
    assert out.dtype == lse.dtype == torch.float64
    assert out.shape == (b, lq, hq, dv) and lse.shape == (b, hq, lq)


@pytest.mark.parametrize("shape", SHAPES)
def test_causal_matches_sdpa(shape):
    b, lq, lk, hq, hkv, dk, dv = shape
    q, k, v, _ = _inputs(2, b, lq, lk, hq, hkv, dk, dv)
    out = attention(q, k, v, causal=True, scale=0.3)
    if lq == lk:
        expected = _sdpa(q, k, v, is_causal=True, scale=0.3)
    else:  # SDPA's is_causal is top-left aligned: give it the bottom-right mask explicitly
        expected = _sdpa(q, k, v, attn_mask=_bottom_right(lq, lk), scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_additive_mask_matches_sdpa(shape):
    b, lq, lk, hq, hkv, dk, dv = shape
    q, k, v, g = _inputs(3, b, lq, lk, hq, hkv, dk, dv)
    mask = torch.randn(b, lq, lk, generator=g, dtype=torch.float64)
    mask[torch.rand(b, lq, lk, generator=g) < 0.3] = NEG_INF
    mask[:, :, 0] = 0.0  # SDPA gives NaN for rows with every key masked
    out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=mask[:, None]), rtol=1e-12, atol=1e-12)
    # one mask row shared by every sequence
    out = attention(q, k, v, mask=mask[:1])
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=mask[:1, None]), rtol=1e-12, atol=1e-12)


def test_bool_mask_means_attend():
    q, k, v, g = _inputs(4, 2, 3, 9, 2, 1, 8)
    keep = torch.rand(2, 3, 9, generator=g) < 0.6
    keep[..., -1] = True
    torch.testing.assert_close(attention(q, k, v, mask=keep),
                               _sdpa(q, k, v, attn_mask=keep[:, None]), rtol=1e-12, atol=1e-12)


FEATURES = [
    dict(softcap=2.0),
    dict(alibi=True),
    dict(sinks=True),
    dict(window=3, causal=True),
    dict(window=1, causal=True),                        # each query sees only its own position
    dict(window=4, causal=True, sinks=True, alibi=True, softcap=5.0, mask=True),
    dict(causal=True, sinks=True),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(sorted(f)))
@pytest.mark.parametrize("shape", [(2, 3, 11, 4, 2, 8, 8), (1, 6, 5, 3, 1, 8, 4)])
def test_features_match_naive(shape, features):
    b, lq, lk, hq, hkv, dk, dv = shape
    q, k, v, g = _inputs(5, b, lq, lk, hq, hkv, dk, dv)
    kw = {n: features[n] for n in ("softcap", "window", "causal") if n in features}
    if features.get("alibi"):
        kw["alibi_slopes"] = torch.rand(hq, generator=g) + 0.1
    if features.get("sinks"):
        kw["sinks"] = torch.randn(hq, generator=g) * 2
    if features.get("mask"):
        kw["mask"] = torch.where(torch.rand(b, lq, lk, generator=g) < 0.2, NEG_INF,
                                 torch.randn(b, lq, lk, generator=g, dtype=torch.float64))
    out, lse = attention(q, k, v, return_lse=True, **kw)
    naive_kw = {("alibi" if n == "alibi_slopes" else n): val for n, val in kw.items()}
    ref_out, ref_lse = _naive(q, k, v, **naive_kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert not out.isnan().any() and not lse.isnan().any()


def test_fully_masked_rows_give_zero_and_neg_inf():
    q, k, v, g = _inputs(6, 2, 4, 6, 4, 2, 8)
    mask = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    mask[0, 1] = NEG_INF
    mask[1] = NEG_INF
    out, lse = attention(q, k, v, mask=mask, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0, 1] == 0).all() and (out[1] == 0).all()
    assert torch.isneginf(lse[0, :, 1]).all() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(out[0, [0, 2, 3]], _naive(q, k, v, mask=mask)[0][0, [0, 2, 3]])


def test_causal_rows_before_the_cache_see_nothing():
    # Lq > Lk bottom-right: the first Lq - Lk queries sit before key 0
    q, k, v, _ = _inputs(7, 1, 5, 3, 2, 2, 8)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :2] == 0).all() and torch.isneginf(lse[:, :, :2]).all()
    ref_out, ref_lse = _naive(q, k, v, causal=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_sinks_with_fully_masked_rows_give_zero_and_the_sink():
    q, k, v, g = _inputs(8, 1, 3, 5, 4, 2, 8)
    sinks = torch.randn(4, generator=g)
    mask = torch.full((1, 3, 5), NEG_INF, dtype=torch.float64)
    out, lse = attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert (out == 0).all()
    torch.testing.assert_close(lse, sinks.double()[None, :, None].expand(1, 4, 3), rtol=0, atol=0)


def test_low_precision_inputs_compute_in_float64():
    q, k, v, _ = _inputs(9, 1, 2, 7, 2, 1, 16, dtype=torch.float16)
    out = attention(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _sdpa(q.double(), k.double(), v.double()),
                               rtol=1e-12, atol=1e-12)


def test_plan_is_ignored():
    # a Plan of any shape is accepted for parity with skattn.attention; anything else is not
    from skattn import plan

    q, k, v, _ = _inputs(10, 1, 2, 7, 2, 1, 8)
    p = plan(batch=1, q_len=1, kv_len=1, q_heads=1, kv_heads=1, head_dim=8, sms=1, occupancy=1)
    assert torch.equal(attention(q, k, v, plan=p), attention(q, k, v))
    with pytest.raises(TypeError, match="plan must be a skattn.Plan"):
        attention(q, k, v, plan=object())


@pytest.mark.parametrize("bad", [
    dict(k_shape=(1, 7, 3, 8)),          # 2 query heads, 3 KV heads
    dict(mask=torch.zeros(1, 2, 6)),     # wrong Lk
    dict(sinks=torch.zeros(3)),
    dict(window=0),
])
def test_bad_arguments_raise(bad):
    q, k, v, _ = _inputs(11, 1, 2, 7, 2, 1, 8)
    if "k_shape" in bad:
        k = torch.zeros(bad.pop("k_shape"), dtype=torch.float64)
        v = torch.zeros_like(k)
    with pytest.raises(ValueError):
        attention(q, k, v, **bad)


# -- ALiBi slopes


def test_alibi_power_of_two_heads():
    expected = torch.tensor([2.0 ** -(h + 1) for h in range(8)])
    torch.testing.assert_close(alibi_slopes(8, 8.0), expected, rtol=0, atol=0)
    assert alibi_slopes(8, 8.0).dtype == torch.float32


def test_alibi_m1_branch():
    # 12 heads: n_head_log2 = 8, heads 8..11 use m1 = 2^-0.5 to the odd powers 1, 3, 5, 7
    expected = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** (-0.5 * e) for e in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12, 8.0), torch.tensor(expected), rtol=1e-7, atol=0)


def test_alibi_one_head_and_no_bias():
    torch.testing.assert_close(alibi_slopes(1, 3.0), torch.tensor([2.0 ** -3]))
    assert torch.equal(alibi_slopes(5, 0.0), torch.ones(5))
    assert torch.equal(alibi_slopes(5, -1.0), torch.ones(5))
    with pytest.raises(ValueError):
        alibi_slopes(0, 8.0)
