"""tools/quant_prefill_ab.py on the CPU: its two dequantizing passes (torch's kernels and
skattn's `launch.dequantize`, under the interpreter) against float64 on the dequantized K/V, and its rows'
calls (the timing needs a GPU)."""
import sys
from pathlib import Path

import pytest
import torch

from skattn import quant
from skattn.bench.grid import Cell
from skattn.bench.quant import quantize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import quant_prefill_ab as ab  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests of the tool")


@pytest.mark.parametrize("fmt", ["fp8", "q8_0"])
@pytest.mark.parametrize("fused", [False, True])
def test_dequantize_passes(fmt, fused):
    # 3 KV heads x 37 keys: rows not a multiple of the kernel's 32, per-head FP8 scales apart
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, h, 64, generator=g).half() * 4 for n, h in ((2, 6), (37, 3),
                                                                               (37, 3)))
    k[:, :, 1] *= 50  # scales that differ by head
    _, kq, vq, kw = quantize(fmt, q, k, v)
    kd, vd = (torch.full_like(k, float("nan")) for _ in range(2))
    kd, vd = ab.dequantize(fmt, kq, vq, kw, kd, vd, fused)
    want_k, want_v = quant.dequantize_kv(kq, vq, kw.get("k_scale"), kw.get("v_scale"))
    for got, want in ((kd, want_k), (vd, want_v)):
        assert got.dtype == torch.float16 and not torch.isnan(got).any()
        # the exact product (float64) rounded as a float32 multiply does, then to f16
        assert torch.equal(got, want.float().half()), (got.double() - want).abs().max()


def test_rows_call_what_they_name(monkeypatch):
    cell = Cell("tiny", 4, 2, 64, 3, 40)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(1, 3, 4, 64, generator=g).half(),
            *(torch.randn(1, 40, 2, 64, generator=g).half() for _ in range(2)))
    layers = [quantize("fp8", *base)]
    seen = []
    monkeypatch.setattr(ab, "dequantize", lambda *a: seen.append(a[-1]) or (a[4], a[5]))
    monkeypatch.setattr(ab.skattn, "attention", lambda q, k, v, plan=None, **kw: seen.append(
        (k.dtype, plan and plan.tuning.quant_route)))
    for variant in ("plain", "torch", "fused", "route", ":torch", ":fused"):
        ab.layer_calls("fp8", variant, layers, cell)[0]()
    f8, f16 = torch.float8_e4m3fn, torch.float16
    assert seen == [(f8, "native"), False, (f16, None), True, (f16, None), (f8, "dequant"), False,
                    True]
