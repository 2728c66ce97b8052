"""q4_0 K/V: the packer against a transcription of llama.cpp's quantizer, the nibble layout,
the input rules, and the kernels under the interpreter against float64 on the dequantized K/V."""
import numpy as np
import pytest
import torch

import skattn
from skattn import quant, reference
from skattn.config import shared_bytes
from test_quant import _check, _inputs, _plan
from tolerance import bound, rel_err


# -- the packer: llama.cpp's quantizer, bit for bit
def _ggml_q4_0(row: np.ndarray) -> bytes:
    """llama.cpp's quantize_row_q4_0_ref, transcribed with numpy float32 scalars."""
    out = b""
    for blk in row.astype(np.float32).reshape(-1, 32):
        amax, vmax = np.float32(0), np.float32(0)
        for x in blk:
            if amax < abs(x):
                amax, vmax = np.float32(abs(x)), x
        d = np.float32(vmax / np.float32(-8))
        inv = np.float32(1) / d if d else np.float32(0)
        qs = []
        for j in range(16):
            x0, x1 = np.float32(blk[j] * inv), np.float32(blk[16 + j] * inv)
            xi0 = min(15, int(np.float32(x0 + np.float32(8.5))))  # C's (int8_t): toward zero
            xi1 = min(15, int(np.float32(x1 + np.float32(8.5))))
            qs.append(xi0 | (xi1 << 4))
        out += np.float16(d).tobytes() + bytes(qs)
    return out


def test_q4_0_matches_llamacpp_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=g) * torch.tensor([1e-3, 1.0, 300.0, 1.0])[:, None]
    x[0, :32] = 0.0  # an all-zero block: d = 0, nibbles 8
    x[1, 32:64] = torch.linspace(-1, 1, 32)
    x[1, 34], x[1, 40] = 3.0, -3.0  # equal magnitudes: the first (+3) sets d = -3 / 8
    x[3, 64:96] = -x[3, 64:96].abs()
    x[3, 70], x[3, 71] = 5.0, -4.99  # the largest is positive: -4.99 maps to 16, clamped to 15
    c = quant.q4_0(x)
    want = b"".join(_ggml_q4_0(r.numpy()) for r in x)
    assert c.to_ggml().numpy().tobytes() == want
    assert c.scales[1, 1].item() == np.float16(-3.0 / 8)
    assert c.nibbles()[1, 34].item() == 0 and c.nibbles()[1, 40].item() == 15
    assert c.nibbles()[3, 71].item() == 15
    back = quant.Q4_0.from_ggml(c.to_ggml())
    assert torch.equal(back.values, c.values) and torch.equal(back.scales, c.scales)


def test_q4_0_nibble_layout():
    # one block: max |x| is x[0] = -8, so d = 1 and a value's nibble is x + 8; byte j holds
    # value j (nibble j) in its low nibble and value j + 16 (nibble 15 - j) in its high one
    lo = torch.arange(16.0) - 8
    hi = (15 - torch.arange(16.0)) - 8
    c = quant.q4_0(torch.cat([lo, hi]).half()[None])
    assert c.scales.tolist() == [[1.0]] and c.values.shape == (1, 16)
    assert c.values[0].tolist() == [j | ((15 - j) << 4) for j in range(16)]
    assert torch.equal(c.dequantize(torch.float32)[0], torch.cat([lo, hi]))
    assert c.to_ggml()[0].tolist() == [0x00, 0x3C] + c.values[0].tolist()  # f16 1.0, LE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q4_0_round_trip(dtype):
    x = (torch.randn(2, 5, 3, 64) * torch.tensor([0.01, 1.0, 50.0])[:, None]).to(dtype)
    c = quant.q4_0(x)
    assert c.values.dtype == torch.uint8 and c.values.shape == (2, 5, 3, 32)
    assert c.scales.shape == (2, 5, 3, 2) and c.shape == x.shape
    d64 = c.dequantize(torch.float64)
    want = (c.nibbles().double() - 8) * c.scales.double().repeat_interleave(32, -1)
    assert torch.equal(d64, want)
    # within half a step (one step where the other sign's end is clamped at nibble 15),
    # plus the f16 rounding of the scale (at most 8 steps of 2**-11 relative)
    step = c.scales.double().abs().repeat_interleave(32, -1)
    err = (d64 - x.double()).abs()
    assert (err <= step * (1 + 8 * 2.0**-11) + 1e-6).all()
    half = (x.double() / -c.scales.double().repeat_interleave(32, -1)).abs() < 7.5
    assert (err[half] <= 0.5 * step[half] + 8 * 2.0**-11 * step[half] + 1e-6).all()


def test_q4_0_views_of_a_cache():
    cache = quant.q4_0(torch.randn(2, 40, 4, 64))
    view = cache[:, :17]
    assert view.shape == (2, 17, 4, 64) and view.values.stride() == cache.values.stride()
    assert view.values.stride(1) == 16 * view.scales.stride(1)
    assert torch.equal(view.dequantize(), cache.dequantize()[:, :17])
    with pytest.raises(IndexError):
        cache[..., :16]
    with pytest.raises(ValueError, match="laid out like the values"):
        quant.Q4_0(cache.values, cache.scales.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("make, err, match", [
    (lambda: quant.Q4_0(torch.zeros(1, 2, 1, 16, dtype=torch.int8),
                        torch.zeros(1, 2, 1, 1, dtype=torch.float16)), TypeError, "uint8"),
    (lambda: quant.Q4_0(torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, 1, 1)),
     TypeError, "scales must be a float16"),
    (lambda: quant.Q4_0(torch.zeros(1, 2, 1, 24, dtype=torch.uint8),
                        torch.zeros(1, 2, 1, 1, dtype=torch.float16)),
     ValueError, "multiple of 32"),
    (lambda: quant.Q4_0(torch.zeros(1, 2, 1, 32, dtype=torch.uint8),
                        torch.zeros(1, 2, 1, 1, dtype=torch.float16)), ValueError, "shape"),
    (lambda: quant.q4_0(torch.zeros(2, 48)), ValueError, "multiple of 32"),
    (lambda: quant.q4_0(torch.zeros(2, 32, dtype=torch.int32)), TypeError, "float16"),
    (lambda: quant.Q4_0.from_ggml(torch.zeros(2, 34, dtype=torch.uint8)), ValueError, "block_q4_0"),
])
def test_q4_0_rules(make, err, match):
    with pytest.raises(err, match=match):
        make()


# -- the kernels under the interpreter
@pytest.mark.parametrize("D, Dv, Lq, causal, qdtype, programs", [
    (64, 64, 1, True, torch.float16, 7),     # decode, split tiles merged by a fixup
    (96, 64, 3, False, torch.float16, 4),    # n > 1; Dk not a power of two (last block masked)
    (64, 32, 2, True, torch.bfloat16, 3),    # bf16 q: K/V dequantized to bf16 (INTERPRET here)
])
def test_q4_0_kernel(D, Dv, Lq, causal, qdtype, programs):
    q, k, v = _inputs(Lq=Lq, D=D, Dv=Dv, qdtype=qdtype, seed=D + Lq)
    kq, vq = quant.q4_0(k), quant.q4_0(v)
    p = _plan(q, kq, vq, "q4_0", programs=programs, causal=causal)
    assert p.dtype == "q4_0"
    if Lq == 1:
        assert p.fixup is not None and p.split > 0, p.describe()
    # the interpreter truncates f32 -> bf16 (test_quant.py's q8_0 test says why k = 6)
    _check(q, kq, vq, p, k_factor=6.0 if qdtype == torch.bfloat16 else 3.0, causal=causal)


def test_q4_0_cache_views():
    # strided views of larger caches: [:, :L] of the sequence and [:, :, :Hkv] of the heads
    # (scales' strides = the packed values' / 16), and the call without a plan
    q, k, v = _inputs(Lk=70, Hkv=2, D=64, seed=5)
    kc = quant.q4_0(torch.cat([k, torch.randn(1, 70, 1, 64)], dim=2))  # 3 heads, 2 used
    vc = quant.q4_0(v)
    kq, vq = kc[:, :45, :2], vc[:, :45]
    assert kq.values.stride() == (70 * 3 * 32, 3 * 32, 32, 1) and kq.scales.stride(1) == 3 * 2
    out = skattn.attention(q, kq, vq, causal=True)
    ref = reference.attention(q, kq, vq, causal=True)
    kd, vd = kq.dequantize(), vq.dequantize()
    assert rel_err(out, ref) <= bound(q, kd, vd, causal=True)
    p = _plan(q, kq, vq, "q4_0", programs=5, causal=True)
    _check(q, kq, vq, p, causal=True)


def test_q4_0_large_head_chunks():
    # Dk > 256: the scores are summed over chunks (whole q4_0 blocks each)
    q, k, v = _inputs(Lq=1, Lk=20, Hq=2, Hkv=1, D=288, Dv=64, seed=7)
    kq, vq = quant.q4_0(k), quant.q4_0(v)
    p = _plan(q, kq, vq, "q4_0", programs=2)
    assert p.geometry.dk_chunks > 1
    _check(q, kq, vq, p)


def test_q4_0_custom_op():
    # torch.ops.skattn.attention takes a Q4_0 as its packed uint8 values and f16 block scales
    q, k, v = _inputs(Lq=2, Lk=30, D=32, seed=9)
    kq, vq = quant.q4_0(k), quant.q4_0(v)
    out = torch.full((*q.shape[:3], 32), float("nan"), dtype=q.dtype)
    out = skattn.ops.attention(q, kq, vq, causal=True)
    ref = reference.attention(q, kq, vq, causal=True)
    assert out.shape == (1, 2, 4, 32) and not torch.isnan(out).any()
    assert rel_err(out, ref) <= bound(q, kq.dequantize(), vq.dequantize(), causal=True)
    raw = torch.ops.skattn.attention(q, kq.values, vq.values, None, None, None, None, True, None,
                                     0.0, "auto", kq.scales, vq.scales)
    assert torch.equal(raw, out)


# -- rules
def test_q4_0_input_rules():
    q, k, v = _inputs(Lq=2, Lk=20, D=32)
    kq, vq = quant.q4_0(k), quant.q4_0(v)
    with pytest.raises(TypeError, match="both be skattn.quant.Q4_0 or neither, got Q4_0 and Q8_0"):
        skattn.attention(q, kq, quant.q8_0(v))
    with pytest.raises(TypeError, match="both be skattn.quant.Q8_0 or neither, got Q8_0 and Q4_0"):
        reference.attention(q, quant.q8_0(k), vq)
    with pytest.raises(TypeError, match="both be skattn.quant.Q4_0"):
        skattn.ops.attention(q, kq, v.half())
    with pytest.raises(ValueError, match="k_scale must be None with q4_0"):
        skattn.attention(q, kq, vq, k_scale=torch.ones(1))
    with pytest.raises(TypeError, match="q must be float16 or bfloat16"):
        skattn.attention(q.float(), kq, vq)
    with pytest.raises(TypeError, match="uint8 K/V are not supported"):
        skattn.attention(q, kq.values, vq.values)
    with pytest.raises(ValueError, match="head size of q"):  # the logical D, not the bytes
        skattn.attention(q[..., :16].contiguous(), kq, vq)
    p8 = _plan(q, k, v, "q8_0")
    with pytest.raises(ValueError, match="plan was made for dtype='q8_0'.*'q4_0'"):
        skattn.attention(q, kq, vq, plan=p8)
    p4 = _plan(q, k, v, "q4_0")
    with pytest.raises(ValueError, match="plan was made for dtype='q4_0'"):
        skattn.attention(q, quant.q8_0(k), quant.q8_0(v), plan=p4)
    with pytest.raises(ValueError, match="out must"):
        skattn.attention(q, kq, vq, out=torch.empty(1, 2, 4, 16, dtype=q.dtype))


def test_q4_0_plans():
    kw = dict(batch=1, q_len=4, kv_len=4096, q_heads=32, kv_heads=8, head_dim=128, causal=True,
              sms=132, occupancy=2)
    p8, p4 = skattn.plan(dtype="q8_0", **kw), skattn.plan(dtype="q4_0", **kw)
    assert p4.dtype == "q4_0" and "q4_0" in p4.describe()
    assert p4.geometry == p8.geometry  # counted as q8_0 (a bound: half its bytes of values)
    assert shared_bytes(p4.geometry, kv_format="q4_0") == shared_bytes(p8.geometry,
                                                                       kv_format="q8_0")
    with pytest.raises(ValueError, match="q4_0 K/V need head sizes that are multiples of 32"):
        skattn.plan(dtype="q4_0", **{**kw, "head_dim": 80})


def test_q4_0_opcheck():
    # opcheck of the op with a q4_0 cache: packed uint8 values in k/v, f16 block scales in
    # k_scale/v_scale (schema, fake kernel: its output has the logical Dv, aot dispatch)
    q, k, v = _inputs(Lq=3, Lk=20, D=32, seed=11)
    kq, vq = quant.q4_0(k), quant.q4_0(v)
    args = (q, kq.values, vq.values, None, None, None, None, True, None, 0.0, "auto",
            kq.scales, vq.scales)
    result = torch.library.opcheck(torch.ops.skattn.attention.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_q4_0_gpu_build_converts_nibbles_in_ptx():
    # the sm_90 build of the q4_0 decode kernel (llama-8b heads, n = 1, f16 q) takes the
    # inline-PTX conversion (`kernels/quant.py:Q4_NIBBLES_F16`: its 72 and 1032, as f16
    # pairs, subtracted), not Triton's int -> f32 conversion a value; the interpreter's build
    # (INTERPRET) converts value by value
    from helpers import main_ptx_counts

    c = main_ptx_counts("q4_0", "INTERPRET", (False, True),
                        (("0x54805480",), ("0x64086408",), ("cvt.rn.f32.s",)))
    assert c[False][0] > 0 and c[False][1] > 0 and c[False][2] == 0, c
    assert c[True][:2] == [0, 0] and c[True][2] > 0, c
