"""skattn's C launcher (`skattn.launcher`) on a CPU: a spec lays out every parameter as
Triton's launcher does (checked against numpy's encodings), per-call pointers land at their
offsets, launches it cannot pack are refused when the spec is made, and a damaged spec is an
error in C, not a read past its end. The driver call itself runs on the GPU
(tests/test_gpu_recipe.py)."""
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from skattn import launcher

SIG = {"q": "*fp16", "table": "*i32", "absent": "*fp32", "flag": "i1", "n": "i32",
       "big": "i64", "u": "u64", "h": "fp16", "b": "bf16", "s": "fp32", "d": "fp64",
       "BLOCK": "constexpr", "out": "*fp16", "small": "i8", "w": "u16"}


def _compiled(sig=SIG, pdl=True, scratch=0, ctas=1, function=0x7F00_0000_1234):
    r = SimpleNamespace(global_scratch_size=scratch, profile_scratch_size=0, num_ctas=ctas,
                        launch_pdl=pdl, launch_cooperative_grid=False)
    return SimpleNamespace(src=SimpleNamespace(signature=dict(sig)), run=r,
                           packed_metadata=(8, ctas, 49152), function=function)


# one launcher argument per signature entry: an int is a per-call pointer (1-based)
PARTS = [2, (0xABCDEF0,), (None,), (True,), (-7,), (1 << 40,), ((1 << 64) - 1,), (0.333,),
         (-1.7,), (0.1,), (2.5,), (64,), 1, (-5,), (65535,)]


def _expected(values):
    """The parameter bytes Triton's launcher would pass for PARTS with these per-call
    pointers, encoded with numpy (not struct, which `launcher` uses)."""
    bf16 = (np.array([-1.7], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return [np.uint64(values[1]).tobytes(), np.uint64(0xABCDEF0).tobytes(), bytes(8),
            np.int8(1).tobytes(), np.int32(-7).tobytes(), np.int64(1 << 40).tobytes(),
            np.uint64((1 << 64) - 1).tobytes(), np.float16(0.333).tobytes(), bf16.tobytes(),
            np.float32(0.1).tobytes(), np.float64(2.5).tobytes(),
            np.uint64(values[0]).tobytes(), np.int8(-5).tobytes(), np.uint16(65535).tobytes(),
            bytes(8), bytes(8)]  # Triton's global and profile scratch pointers


@pytest.fixture(scope="module")
def c():
    m = launcher.module()
    assert m is not None, "the C launcher did not build (gcc and Python's headers are needed)"
    return m


def test_every_parameter_type_is_laid_out_as_triton_lays_it_out(c):
    spec = launcher.spec([(_compiled(), (5, 2, 1), PARTS)], values=2)
    values = [0x7000_0000_0010, 0x7000_0000_2000]
    (d,) = c.describe(spec, 99, *values)
    assert d["params"] == _expected(values)  # BLOCK (constexpr) has no parameter
    assert (d["function"], d["grid"], d["block"], d["shared"], d["pdl"], d["cooperative"],
            d["stream"]) == (0x7F00_0000_1234, (5, 2, 1), 256, 49152, 1, 0, 99)
    # new pointers, the constants stay
    (d2,) = c.describe(spec, 3, 16, 32)
    assert d2["params"] == _expected([16, 32]) and d2["stream"] == 3


def test_launches_keep_their_order_and_their_own_pointers(c):
    one = _compiled({"x": "*fp16", "n": "i32"}, function=1)
    two = _compiled({"y": "*fp16", "z": "*fp16", "N": "constexpr"}, pdl=False, function=2)
    spec = launcher.spec([(one, (4, 1, 1), [3, (9,)]), (two, (1, 2, 3), [1, 2, (8,)])], 3)
    d1, d2 = c.describe(spec, 0, 100, 200, 300)
    assert d1["function"] == 1 and d1["params"][:2] == [struct.pack("=Q", 300),
                                                        struct.pack("=i", 9)]
    assert d2["function"] == 2 and d2["pdl"] == 0 and d2["grid"] == (1, 2, 3)
    assert d2["params"][:2] == [struct.pack("=Q", 100), struct.pack("=Q", 200)]
    assert c.prepare(spec, 0, 1, 2, 3) is True


@pytest.mark.parametrize("why, launch", [
    ("scratch: Triton's wrapper allocates it", (_compiled(scratch=64), (1, 1, 1), PARTS)),
    ("clusters", (_compiled(ctas=2), (1, 1, 1), PARTS)),
    ("a signature of another length", (_compiled(), (1, 1, 1), PARTS[:-1])),
    ("a tuple parameter", (_compiled({"t": ("i32", "i32")}), (1, 1, 1), [(1,)])),
    ("a tensor descriptor", (_compiled({"t": "nvTmaDesc"}), (1, 1, 1), [(1,)])),
    ("an int out of its type's range", (_compiled({"n": "i32"}), (1, 1, 1), [(1 << 31,)])),
    ("a bf16 beyond float32's range", (_compiled({"b": "bf16"}), (1, 1, 1), [(1e39,)])),
    ("an fp32 beyond its range", (_compiled({"s": "fp32"}), (1, 1, 1), [(1e39,)])),
    ("a per-call value that is not a pointer", (_compiled({"n": "i32"}), (1, 1, 1), [1])),
    ("a pointer index past the values", (_compiled({"p": "*fp16"}), (1, 1, 1), [3])),
    ("a pointer constant that is not an int", (_compiled({"p": "*fp16"}), (1, 1, 1), [(1.0,)])),
    ("no signature", (SimpleNamespace(run=_compiled().run, packed_metadata=(4, 1, 0),
                                      function=1), (1, 1, 1), [])),
])
def test_launches_it_cannot_pack_get_no_spec(why, launch):
    assert launcher.spec([launch], values=2) is None, why


def test_too_many_pointers_get_no_spec():
    assert launcher.spec([], values=launcher.MAX_VALUES + 1) is None


def test_a_damaged_spec_or_wrong_pointers_are_errors(c):
    spec = launcher.spec([(_compiled(), (5, 2, 1), PARTS)], values=2)
    with pytest.raises(ValueError, match="number of pointers"):
        c.prepare(spec, 0, 1)
    with pytest.raises(ValueError, match="header"):
        c.prepare(b"\0" * len(spec), 0, 1, 2)
    for cut in (25, 60, len(spec) - 8):
        with pytest.raises(ValueError, match="launch record"):
            c.prepare(spec[:cut], 0, 1, 2)
    with pytest.raises(ValueError, match="launch record"):
        c.prepare(spec + bytes(8), 0, 1, 2)
    with pytest.raises(ValueError):
        c.prepare("not bytes", 0, 1, 2)
    with pytest.raises((OverflowError, TypeError)):
        c.prepare(spec, 0, -1, 2)  # a pointer is an unsigned 64-bit integer


def test_launch_without_a_gpu_launches_nothing(c):
    # no libcuda here: a clear error; with a driver but no context: False (the recipe then
    # takes Triton's launch functions)
    spec = launcher.spec([(_compiled(), (5, 2, 1), PARTS)], values=2)
    try:
        got = c.launch(spec, 0, 1, 2)
    except RuntimeError as e:
        assert "libcuda" in str(e)
    else:
        assert got is False


def test_pointers_of_another_alignment_launch_nothing(c):
    # Triton compiled the kernels for one 16-byte alignment pattern of the first `roles`
    # pointers (bit i: pointer i is not aligned): another pattern gets None
    one = _compiled({"x": "*fp16", "y": "*fp16", "w": "*fp32"}, function=1)
    spec = launcher.spec([(one, (1, 1, 1), [1, 2, 3])], 3, roles=2, pattern=0b10)
    assert c.prepare(spec, 0, 32, 18, 7) is True  # the third (a workspace) is not checked
    for bad in ((32, 32, 0), (18, 18, 0), (2, 32, 0)):
        assert c.prepare(spec, 0, *bad) is None
        assert c.describe(spec, 0, *bad) is None
    assert launcher.spec([(one, (1, 1, 1), [1, 2, 3])], 3, roles=2, pattern=0b100) is None


def test_tensors_pass_their_data_ptr(c):
    import torch

    x, y = torch.empty(8), torch.empty(8, dtype=torch.float16)
    two = _compiled({"x": "*fp32", "y": "*fp16"}, function=2)
    spec = launcher.spec([(two, (1, 1, 1), [1, 2])], 2, roles=2)
    (d,) = c.describe(spec, 0, x, y)
    assert d["params"][:2] == [struct.pack("=Q", x.data_ptr()), struct.pack("=Q", y.data_ptr())]
    with pytest.raises(AttributeError):
        c.prepare(spec, 0, x, "no data_ptr")


def _one_pointer_spec():
    spec = launcher.spec([(_compiled({"x": "*fp16"}), (1, 1, 1), [1])], 1, roles=1)
    # header 24 bytes, launch head 48, then (offset, size) of 3 parameters (x and Triton's
    # two scratch pointers) and (value, offset) of 1 patch, then 24 bytes of data
    assert len(spec) == 24 + 48 + 3 * 8 + 8 + 24
    return bytearray(spec)


def test_offsets_that_would_wrap_around_are_errors(c):
    # 32-bit offsets near 2**32: their sums with a size must not wrap past the checks
    for at, value in ((100, 0xFFFFFFF8), (72, 0xFFFFFFFC), (76, 0xFFFFFFFC)):
        bad = _one_pointer_spec()
        bad[at:at + 4] = struct.pack("=I", value)
        for fn in (c.prepare, c.describe, c.launch):
            with pytest.raises(ValueError, match="launch record"):
                fn(bytes(bad), 0, 16)


def test_a_damaged_later_record_launches_nothing(c):
    # every record is checked before the first launch
    one = _compiled({"x": "*fp16"}, function=1)
    spec = bytearray(launcher.spec([(one, (1, 1, 1), [1]), (one, (1, 1, 1), [1])], 1, roles=1))
    spec[-24 - 8 + 4:-24 - 8 + 8] = struct.pack("=I", 0xFFFFFFF8)  # the second patch's offset
    with pytest.raises(ValueError, match="launch record"):
        c.launch(bytes(spec), 0, 16)
