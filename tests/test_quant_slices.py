"""The packers work a bounded slice at a time (`skattn.quant_block.slices`): the slices
cover every value once, stay within their limit, and the packed results are the same bits
as packing the whole cache at once."""
import pytest
import torch

from skattn import quant, quant_block


@pytest.mark.parametrize("shape, limit", [((3, 5, 2, 64), 64), ((3, 5, 2, 64), 1000),
                                          ((1, 7, 3, 32), 100), ((2, 3, 128), 1),
                                          ((4, 32), 70), ((2, 2, 2, 32), 10 ** 6)])
def test_slices_cover_each_value_once_within_the_limit(shape, limit):
    x = torch.zeros(shape)
    for idx in quant_block.slices(x, limit):
        part = x[idx]
        assert part.dim() == x.dim()
        assert part.numel() <= max(limit, shape[-1])  # one row at least
        x[idx] += 1
    assert (x == 1).all()


def test_slices_of_a_row_or_a_scalar_are_the_whole():
    for x in (torch.zeros(100), torch.zeros(())):
        assert [x[idx].shape for idx in quant_block.slices(x, 10)] == [x.shape]


def _whole_and_sliced(monkeypatch, fn):
    whole = fn()
    monkeypatch.setattr(quant_block, "SLICE_VALUES", 96)  # many slices of 1-3 rows
    return whole, fn()


@pytest.mark.parametrize("form", ["q8_0", "q4_0"])
def test_block_packers_in_slices_give_the_same_bits(monkeypatch, form):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 9, 3, 64, generator=g) * 4).to(torch.float16)[:, 1:]  # a strided view
    whole, sliced = _whole_and_sliced(monkeypatch, lambda: getattr(quant, form)(x))
    assert torch.equal(whole.values, sliced.values) and torch.equal(whole.scales, sliced.scales)
    assert sliced.values.is_contiguous() and sliced.scales.is_contiguous()
    deq_whole = whole.dequantize(torch.float32)
    monkeypatch.setattr(quant_block, "SLICE_VALUES", 50)  # (q4_0 unpacks its nibbles per slice)
    assert torch.equal(whole.dequantize(torch.float32), deq_whole)


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_in_slices_gives_the_same_bits(monkeypatch, per_head):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 11, 4, 32, generator=g) * torch.tensor([1.0, 30.0, 0.1, 2.0])[:, None]
    (w, ws), (s, ss) = _whole_and_sliced(monkeypatch, lambda: quant.fp8(x, per_head=per_head))
    assert torch.equal(ws, ss)
    assert torch.equal(w.view(torch.uint8), s.view(torch.uint8))


def test_packer_errors_come_before_any_slicing(monkeypatch):
    monkeypatch.setattr(quant_block, "SLICE_VALUES", 8)
    with pytest.raises(TypeError, match="q8_0 quantizes"):
        quant.q8_0(torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.q4_0(torch.zeros(4, 48))
