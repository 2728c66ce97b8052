"""fastdiv on the device: n // d and n % d by a multiply-high, an add and a shift."""
import triton
import triton.language as tl


@triton.jit
def fastdiv(n, mp, shift):
    """n // d for 0 <= n < 2**31, with (mp, shift) = skattn.fastdiv.magic(d); returns int32."""
    nu = tl.cast(n, tl.uint32)  # tl.cast, not .to: ints equal to 1 arrive as constexpr
    hi = tl.umulhi(nu, tl.cast(mp, tl.uint32))
    # -- 32-bit add: hi <= n, so it cannot wrap while n < 2**31
    return ((hi + nu) >> tl.cast(shift, tl.uint32)).to(tl.int32)


@triton.jit
def fastdivmod(n, mp, shift, d):
    """(n // d, n % d) for 0 <= n < 2**31 (llama.cpp: fast_div_modulo)."""
    q = fastdiv(n, mp, shift)
    return q, n - q * d
