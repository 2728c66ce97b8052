"""fastdiv: host constants, the exact emulation against // and %, and the Triton helper."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from skattn.fastdiv import divmod as fast_divmod
from skattn.fastdiv import divmod_np, fastdiv, magic
from skattn.kernels.fastdiv import fastdiv as k_fastdiv
from skattn.kernels.fastdiv import fastdivmod as k_fastdivmod

N_MAX = 2**31 - 1  # the largest numerator the device code may see


def _magic_arrays(ds):
    mps, shifts = zip(*(magic(int(d)) for d in ds))
    return np.array(mps, dtype=np.uint64), np.array(shifts, dtype=np.uint64)


def _numerators(ds, rng, n_random):
    """Edge numerators around multiples of each divisor, plus random ones, all in [0, 2^31)."""
    d = ds[:, None].astype(np.int64)
    k = np.array([2, 3, 7, 1000, 65535, 65536], dtype=np.int64)
    edges = np.concatenate([
        np.broadcast_to(np.array([0, 1, N_MAX, N_MAX - 1]), (len(ds), 4)),
        d - 1, d, d + 1, k * d, k * d - 1, k * d + 1,
        (N_MAX // d) * d, (N_MAX // d) * d - 1,   # the last multiple below 2^31 and its neighbour
    ], axis=1)
    random = rng.integers(0, 2**31, size=(len(ds), n_random), dtype=np.int64)
    n = np.concatenate([edges, random], axis=1)
    return np.where((n >= 0) & (n <= N_MAX), n, N_MAX).astype(np.uint64)


def _check_exact(ds, rng, n_random):
    mp, shift = _magic_arrays(ds)
    n = _numerators(ds, rng, n_random)
    d = ds.astype(np.uint64)[:, None]
    q, r = divmod_np(n, mp[:, None], shift[:, None], d)
    bad = (q != n // d) | (r != n % d)
    assert not bad.any(), f"mismatch at d={d[bad.any(axis=1)][:5].ravel()}"


def test_known_constants():
    # values from llama.cpp's init_fastdiv_values (docs/llamacpp.md, "fastdiv")
    assert magic(1) == (1, 0)
    assert magic(2) == (1, 1)
    assert magic(3) == (1431655766, 2)
    assert magic(132) == (4034666248, 8)


def test_every_divisor_up_to_65536():
    _check_exact(np.arange(1, 65537, dtype=np.int64), np.random.default_rng(0), n_random=64)


def test_large_divisors():
    rng = np.random.default_rng(1)
    # powers of two and their neighbours (shift changes there), then random large divisors
    p2 = 2 ** np.arange(16, 31, dtype=np.int64)
    ds = np.concatenate([p2 - 1, p2, p2 + 1, [N_MAX, N_MAX - 1],
                         rng.integers(65537, 2**31, size=20000, dtype=np.int64)])
    _check_exact(ds, rng, n_random=64)


def test_scalar_emulation_matches_vector_and_builtin():
    rng = np.random.default_rng(2)
    for d in [1, 2, 3, 5, 7, 132, 1000, 65537, 2**30 + 1, N_MAX]:
        mp, shift = magic(d)
        for n in [0, 1, d - 1, d, d + 1, N_MAX, *rng.integers(0, 2**31, 50).tolist()]:
            if n > N_MAX:
                continue
            assert fast_divmod(n, mp, shift, d) == divmod(n, d)
            assert fastdiv(n, mp, shift) == n // d


def test_outside_the_domain_fails():
    # why n < 2^31: the 32-bit add wraps near 2^32 (d=3, n=2^32-1 is llama.cpp's own example)
    mp, shift = magic(3)
    q, _ = divmod_np(2**32 - 1, mp, shift, 3)
    assert int(q) != (2**32 - 1) // 3


@pytest.mark.parametrize("d", [0, -1, 2**31, 2**32, 1.5, True, None])
def test_bad_divisor(d):
    with pytest.raises(ValueError, match="d must be"):
        magic(d)


@pytest.mark.parametrize("n", [-1, 2**31, 2**32])
def test_bad_numerator(n):
    mp, shift = magic(7)
    with pytest.raises(ValueError, match="n must be"):
        fast_divmod(n, mp, shift, 7)


@triton.jit
def _divmod_kernel(N, MP, SHIFT, D, Q, R, Q2, count, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    n = tl.load(N + offs, mask=ok)
    mp = tl.load(MP + offs, mask=ok)  # int64 holding a uint32
    shift = tl.load(SHIFT + offs, mask=ok)
    d = tl.load(D + offs, mask=ok)
    q, r = k_fastdivmod(n, mp, shift, d)
    tl.store(Q + offs, q, mask=ok)
    tl.store(R + offs, r, mask=ok)
    tl.store(Q2 + offs, k_fastdiv(n, mp, shift), mask=ok)


@triton.jit
def _scalar_kernel(N, Q, R, mp, shift, d, count, BLOCK: tl.constexpr):
    # constants as scalar arguments, the way the attention kernels pass them
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    q, r = k_fastdivmod(tl.load(N + offs, mask=ok), mp, shift, d)
    tl.store(Q + offs, q, mask=ok)
    tl.store(R + offs, r, mask=ok)


def _kernel_check(device="cpu", count=4096):
    """Launch the @triton.jit helpers (on CPU tensors: under the interpreter); compare exactly."""
    rng = np.random.default_rng(3)
    d = np.concatenate([np.arange(1, 257), rng.integers(1, 2**31, count - 256)])
    n = rng.integers(0, 2**31, count)
    n[:256] = [N_MAX, 0, 1, 2] * 64
    mp, shift = _magic_arrays(d)

    def as_t(a, dt):
        return torch.tensor(np.asarray(a).astype(np.int64), dtype=dt, device=device)

    out = [torch.full((count,), -7, dtype=torch.int32, device=device) for _ in range(3)]  # poisoned
    _divmod_kernel[(triton.cdiv(count, 256),)](
        as_t(n, torch.int32), as_t(mp, torch.int64), as_t(shift, torch.int32),
        as_t(d, torch.int32), *out, count, BLOCK=256)
    q, r, q2 = (t.cpu().numpy() for t in out)
    assert np.array_equal(q, n // d) and np.array_equal(r, n % d) and np.array_equal(q2, n // d)
    for dd in [1, 2, 3, 132, 65537, N_MAX]:
        q, r = (torch.full((count,), -7, dtype=torch.int32, device=device) for _ in range(2))
        _scalar_kernel[(triton.cdiv(count, 256),)](as_t(n, torch.int32), q, r, *magic(dd), dd,
                                                  count, BLOCK=256)
        assert np.array_equal(q.cpu().numpy(), n // dd) and np.array_equal(r.cpu().numpy(), n % dd)


@pytest.mark.interpret
def test_triton_helper_under_interpreter():
    # TRITON_INTERPRET is read when @triton.jit runs; setting it in this process would turn
    # every kernel imported later into an interpreted one, so run in a child unless we
    # already interpret (then the kernels above were decorated for the interpreter).
    if os.environ.get("TRITON_INTERPRET") == "1":
        _kernel_check()
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and compiled kernels")
def test_triton_helper_on_gpu():
    _kernel_check("cuda")


if __name__ == "__main__":
    _kernel_check()
