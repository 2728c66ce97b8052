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
    (dict(mask=torch.zeros(1, 3, 20)), r"mask must have shape \[1, 2, 20\]"),  # B = 1: no "1 or 1"
    (dict(mask=torch.zeros(1, 2, 20, dtype=torch.int32)), "mask must have dtype"),
    (dict(sinks=torch.zeros(3)), r"sinks must have shape \[4\]"),
    (dict(sinks=torch.zeros(4, dtype=torch.float16)), "sinks must have dtype"),
    (dict(alibi_slopes=torch.zeros(5)), r"alibi_slopes must have shape \[4\]"),
    (dict(softcap=-1.0), "softcap must be >= 0"),
    (dict(window=0, causal=True), "window must be a positive int"),
    (dict(window=True, causal=True), "window must be a positive int"),  # a bool is no window
    (dict(window=8), "pass causal=True"),      # the window is bottom-right causal: say so
    (dict(causal=1), "causal must be a bool"),
    (dict(causal="yes"), "causal must be a bool"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(scale="0.1"), "scale must be a float"),
    (dict(softcap=float("nan")), "softcap must be finite"),
    (dict(softcap=float("inf")), "softcap must be finite"),
    (dict(return_lse="no"), "return_lse must be a bool"),
    (dict(plan="auto"), "plan must be a skattn.Plan"),
    (dict(sinks=torch.zeros(8)[::2]), "sinks must be contiguous"),
])
def test_bad_options(kw, words):
    q, k, v = inputs()
    with pytest.raises((ValueError, TypeError), match=words):
        skattn.attention(q, k, v, **kw)


def test_plan_for_other_shapes():
    q, k, v = inputs()
    p = skattn.plan(batch=1, q_len=2, kv_len=21, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    occupancy=2)
    with pytest.raises(ValueError, match="plan was made for kv_len=21, inputs have 20"):
        skattn.attention(q, k, v, plan=p)
    p = skattn.plan(batch=1, q_len=2, kv_len=20, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    occupancy=2)
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


def test_mask_shape_names_the_batch():
    q, k, v = inputs(B=2)
    with pytest.raises(ValueError, match=r"mask must have shape \[2 or 1, 2, 20\]"):
        skattn.attention(q, k, v, mask=torch.zeros(3, 2, 20))


@pytest.mark.parametrize("make_out", [
    lambda: torch.empty(1, 2, 1, 16, dtype=torch.float16).expand(1, 2, 4, 16),  # stride 0
    lambda: torch.empty(200, dtype=torch.float16).as_strided((1, 2, 4, 16), (64, 32, 8, 1)),
])
def test_out_with_overlapping_memory(make_out):
    # rows that share memory would silently hold one of them
    q, k, v = inputs()
    with pytest.raises(ValueError, match="out has overlapping memory"):
        skattn.attention(q, k, v, out=make_out())


@pytest.mark.parametrize("name", ["q", "k", "v", "sinks"])
def test_inputs_that_require_grad(name):
    q, k, v = inputs()
    args = dict(q=q, k=k, v=v, sinks=torch.zeros(4))
    args[name] = args[name].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad: skattn's kernels are forward"):
        skattn.attention(**args)
    with torch.no_grad():  # what the message asks for works
        skattn.attention(**args)


@pytest.mark.parametrize("kw,words", [
    (dict(dtype=torch.float32), "dtype is K/V's"),
    (dict(block_n=48), "block_n must be one of 16, 32"),
    (dict(block_n=8), "block_n must be one of 16, 32"),
    (dict(num_warps=3), "num_warps must be one of 1, 2, 4"),
    (dict(num_stages=0), "num_stages must be one of 1, 2"),
    (dict(num_stages=2.0), "num_stages must be one of 1, 2"),
    (dict(window=8), "pass causal=True"),
    (dict(causal="yes"), "causal must be a bool"),
])
def test_plan_settings_that_cannot_run(kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        skattn.plan(batch=1, q_len=2, kv_len=20, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    occupancy=2, **kw)


@pytest.mark.parametrize("kw,words", [
    (dict(window=8), "pass causal=True"),
    (dict(window=True, causal=True), "window must be a positive int"),
    (dict(causal=1), "causal must be a bool"),
    (dict(softcap=float("nan")), "softcap must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(mask=torch.zeros(1, 3, 20)), r"mask must have shape \[1, 2, 20\]"),
])
def test_references_follow_the_same_rules(kw, words):
    # skattn.checks is the one rule set: the float64 reference and the plan executor agree
    from skattn import reference

    q, k, v = inputs()
    p = skattn.plan(batch=1, q_len=2, kv_len=20, q_heads=4, kv_heads=2, head_dim=16, sms=4,
                    occupancy=2)
    with pytest.raises((ValueError, TypeError), match=words):
        reference.attention(q, k, v, **kw)
    with pytest.raises((ValueError, TypeError), match=words):
        reference.run_plan(p, q, k, v, **kw)
    with pytest.raises(TypeError, match="plan must be a skattn.Plan"):
        reference.run_plan("auto", q, k, v)


def test_out_may_be_q_but_not_memory_of_k_or_v():
    import skattn as sk

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 4, 32, generator=g).half()
    k, v = (torch.randn(1, 40, 2, 32, generator=g).half() for _ in "kv")
    shape = dict(batch=1, q_len=3, kv_len=40, q_heads=4, kv_heads=2, head_dim=32, causal=True,
                 sms=2, occupancy=2, block_n=16)
    p = sk.plan(**shape, programs=sk.plan(**shape).work - 1)   # cut tiles, merged after
    assert p.fixup != "none"
    want = sk.attention(q, k, v, causal=True, plan=p)
    q2 = q.clone()
    assert torch.equal(sk.attention(q2, k, v, causal=True, plan=p, out=q2), want)
    in_v = torch.empty(0, dtype=torch.float16).set_(v.untyped_storage())[:q.numel()].view(q.shape)
    with pytest.raises(ValueError, match="out shares memory with v"):
        sk.attention(q, k, v, causal=True, out=in_v, scale=0.2)   # (a signature of its own)


def test_shares_memory_solves_views_of_one_buffer():
    # views with the same strides (heads of a fused projection side by side) exactly, against
    # every address of both; views with other strides: by the ranges they reach
    import random

    from skattn.checks import shares_memory

    def addresses(x):
        at = torch.zeros(x.shape, dtype=torch.long) + x.storage_offset()
        for k, (n, st) in enumerate(zip(x.shape, x.stride())):
            at = at + (torch.arange(n) * st).view([n if i == k else 1 for i in range(x.dim())])
        return set(at.flatten().tolist())

    rng = random.Random(0)
    buf = torch.zeros(2, 5, 7, 8)

    def view():
        cut = []
        for n in buf.shape:
            lo = rng.randrange(n)
            cut.append(slice(lo, rng.randrange(lo + 1, n + 1), rng.choice((1, 1, 2, 3))))
        return buf[tuple(cut)]

    for _ in range(400):
        a, b = view(), view()
        shared = bool(addresses(a) & addresses(b))
        assert shares_memory(a, b) == shared or (a.stride() != b.stride() and not shared)
    qkv = torch.zeros(2, 3, 12, 16)
    q, k, v = qkv[:, :, :8], qkv[:, :, 8:10], qkv[:, :, 10:]
    assert not shares_memory(q, k) and not shares_memory(k, v) and shares_memory(q, q)
    assert not shares_memory(q, torch.zeros(3))


def test_out_in_place_over_a_fused_projection():
    # q, k and v as heads of one [B, L, Hq + 2 Hkv, D] tensor: out may be q (exactly), not a
    # view that partly covers it
    import skattn as sk

    qkv = torch.randn(1, 20, 8, 32, generator=torch.Generator().manual_seed(5)).half()
    q, k, v = qkv[:, -3:, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    want = sk.attention(q.clone(), k, v, causal=True)
    q_in = qkv.clone()
    q2, k2, v2 = q_in[:, -3:, :4], q_in[:, :, 4:6], q_in[:, :, 6:]
    assert torch.equal(sk.attention(q2, k2, v2, causal=True, out=q2), want)
    with pytest.raises(ValueError, match="out shares memory with q"):
        sk.attention(q2, k2, v2, causal=True, out=q_in[:, -4:-1, :4], scale=0.3)


def test_out_in_the_memory_of_a_mask_or_sinks():
    # the kernels read the mask and the sinks while they write out: out may share neither
    import skattn as sk

    q, k, v = inputs(Lq=2, Lk=20, Hq=4, D=16)
    buf = torch.zeros(2 * 2 * 4 * 16 + 64, dtype=torch.float16)
    out = buf[:q.numel()].view(q.shape)
    mask = buf[q.numel() - 40:q.numel()].view(1, 2, 20)       # its rows end in out's last
    with pytest.raises(ValueError, match="out shares memory with mask"):
        sk.attention(q, k, v, out=out, mask=mask)
    sinks = torch.zeros(2 * 2 * 4 * 16 // 2 + 8)               # f32: out's bytes and more
    out32 = sinks.view(torch.float16)[:q.numel()].view(q.shape)
    with pytest.raises(ValueError, match="out shares memory with sinks"):
        sk.attention(q, k, v, out=out32, sinks=sinks[:4])
