"""Bad input to skattn.attention gets a clear error naming the argument; nothing is launched."""
import pytest
import torch

import skattn


def inputs(B=1, Lq=2, Lk=20, Hq=4, Hkv=2, D=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Lq, Hq, D, generator=g).to(dtype),
            torch.randn(B, Lk, Hkv, D, generator=g).to(dtype),
            torch.randn(B, Lk, Hkv, D, generator=g).to(dtype))


@pytest.mark.parametrize("change,error,words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q.double(), k, v), TypeError, "q must have dtype"),
    (lambda q, k, v: (q, k.float(), v.float()), TypeError, "k must have dtype"),
    (lambda q, k, v: (q, k, v.bfloat16()), TypeError, "v must have k's dtype"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch mismatch"),
    (lambda q, k, v: (q, k, v[:, :10]), ValueError, "v's [Lk, Hkv]"),
    (lambda q, k, v: (q[..., :8].contiguous(), k, v), ValueError, "head size of q (8) and k (16)"),
    (lambda q, k, v: (q[:, :, :3].contiguous(), k, v), ValueError, "multiple of k/v heads"),
    (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), ValueError,
     "contiguous in its last dimension"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "empty input"),
    (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
])
def test_bad_tensors(change, error, words):
    q, k, v = change(*inputs())
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        skattn.attention(q, k, v)


@pytest.mark.parametrize("kw,words", [
    (dict(mask=torch.zeros(1, 3, 20)), r"mask must have shape \[1 or 1, 2, 20\]"),
    (dict(mask=torch.zeros(1, 2, 20, dtype=torch.int32)), "mask must have dtype"),
    (dict(sinks=torch.zeros(3)), r"sinks must have shape \[4\]"),
    (dict(sinks=torch.zeros(4, dtype=torch.float16)), "sinks must have dtype"),
    (dict(alibi_slopes=torch.zeros(5)), r"alibi_slopes must have shape \[4\]"),
    (dict(softcap=-1.0), "softcap must be >= 0"),
    (dict(window=0), "window must be a positive int"),
])
def test_bad_options(kw, words):
    q, k, v = inputs()
    with pytest.raises((ValueError, TypeError), match=words):
        skattn.attention(q, k, v, **kw)


def test_plan_for_other_shapes():
    q, k, v = inputs()
    p = skattn.plan(batch=1, q_len=2, kv_len=21, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    blocks_per_sm=2)
    with pytest.raises(ValueError, match="plan was made for kv_len=21, inputs have 20"):
        skattn.attention(q, k, v, plan=p)
    p = skattn.plan(batch=1, q_len=2, kv_len=20, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    blocks_per_sm=2)
    with pytest.raises(ValueError, match="plan was made for causal=False"):
        skattn.attention(q, k, v, plan=p, causal=True)


def test_bad_out():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="out must be"):
        skattn.attention(q, k, v, out=torch.empty(1, 2, 4, 16, dtype=torch.float32))


def test_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        skattn.attention(q, k, v)
