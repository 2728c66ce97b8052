"""The inline PTX of the 8-bit and 4-bit conversions (`kernels/quant.py`), run here by a
small emulator of the instructions they use (prmt, lop3, xor, mov, sub.f16x2), bit for bit:
the GPU tests check them inside the kernels, this checks every byte value on a CPU."""
import numpy as np
import pytest

from skattn.kernels import quant

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _halves(x: int) -> np.ndarray:
    return np.array([x & 0xFFFF, x >> 16], dtype=np.uint16).view(np.float16)


def _sub_f16x2(a: int, b: int) -> int:
    h = (_halves(a) - _halves(b)).astype(np.float16).view(np.uint16)
    return int(h[0]) | (int(h[1]) << 16)


def run_ptx(asm: str, inputs: dict) -> dict:
    """Registers after the instructions of `asm` ({ ... } of `;`-separated statements), the
    operands $k given in `inputs`."""
    regs = dict(inputs)
    body = asm.strip().strip("{}")
    for stmt in (s.strip() for s in body.split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [x.strip() for x in rest.split(",")]

        def val(x):
            return int(x, 16) if x.startswith("0x") else regs[x]
        if op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]) if args[2] != "0" else 0, val(args[3]))
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op == "xor.b32":
            regs[args[0]] = (val(args[1]) ^ val(args[2])) & MASK
        elif op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "sub.f16x2":
            regs[args[0]] = _sub_f16x2(val(args[1]), val(args[2]))
        else:
            raise AssertionError(f"no emulation of {op!r}")
    return regs


def _words():
    rng = np.random.default_rng(0)
    every = np.arange(256, dtype=np.uint32)
    cycled = (every | (np.roll(every, 1) << 8) | (np.roll(every, 7) << 16)
              | (np.roll(every, 31) << 24))
    return [int(w) for w in np.concatenate([cycled, rng.integers(0, 2**32, 200, dtype=np.uint32)])]


def test_q4_0_nibbles_ptx():
    for w in _words():
        out = run_ptx(quant.Q4_NIBBLES_F16.value, {"$4": w})
        b = [(w >> (8 * i)) & 0xFF for i in range(4)]
        lo = [x & 15 for x in b]
        hi = [x >> 4 for x in b]
        got = np.concatenate([_halves(out[f"${k}"]) for k in range(4)]).astype(np.int64)
        assert got.tolist() == [v - 8 for v in lo + hi], (hex(w), got)


@pytest.mark.parametrize("name", ["I8X4_PAIRS", "I8_PAIRS_F16"])
def test_int8_ptx(name):
    # I8X4_PAIRS: bytes 0-3 -> f16 pairs (0, 1), (2, 3); I8_PAIRS_F16: (0, 2), (1, 3)
    order = [0, 1, 2, 3] if name == "I8X4_PAIRS" else [0, 2, 1, 3]
    asm = getattr(quant, name).value
    for w in _words():
        out = run_ptx(asm, {"$2": w})
        want = [np.int8(np.uint8((w >> (8 * i)) & 0xFF)) for i in order]
        got = np.concatenate([_halves(out["$0"]), _halves(out["$1"])]).astype(np.int64)
        assert got.tolist() == [int(x) for x in want], (name, hex(w), got)
