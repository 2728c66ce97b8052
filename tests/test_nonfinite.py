"""NaN and inf in the inputs reach only the rows that read them, as `skattn.attention` documents;
the float64 reference does the same (Triton kernels under TRITON_INTERPRET=1)."""
import pytest
import torch

import skattn
from skattn import reference
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy on NaN, in the interpreter
]

NAN, INF = float("nan"), float("inf")
B, LQ, LK, HQ, HKV, D = 2, 3, 40, 4, 2, 16   # 2 query heads per KV head; 3 KV blocks of 16
# (fixup, programs): 4 tiles cut by 5 programs (general fixup); 2 pieces a tile, fused
PLANS = [(None, 5), ("fused", 8)]


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, LQ, HQ, D, generator=g).half(),
            torch.randn(B, LK, HKV, D, generator=g).half(),
            torch.randn(B, LK, HKV, D, generator=g).half())


def run(q, k, v, fixup, programs, **kw):
    """Kernel and reference: (out, lse, ref_out, ref_lse)."""
    p = skattn.plan(batch=B, q_len=LQ, kv_len=LK, q_heads=HQ, kv_heads=HKV, head_dim=D, sms=4,
                    occupancy=2, block_n=16, programs=programs, fixup=fixup,
                    causal=kw.get("causal", False))
    out = torch.full((B, LQ, HQ, D), 7.0, dtype=q.dtype)  # poison: every row must be written
    out, lse = skattn.attention(q, k, v, plan=p, out=out, return_lse=True, **kw)
    return (out, lse, *reference.attention(q, k, v, return_lse=True, **kw))


def rows(b=None, i=None, h=None):
    """A [B, LQ, HQ] bool mask of the rows picked by the indices (None: all)."""
    m = torch.zeros(B, LQ, HQ, dtype=torch.bool)
    m[tuple(slice(None) if x is None else x for x in (b, i, h))] = True
    return m


def check(result, nan_rows, clean, *, whole=True, **kw):
    """NaN exactly in `nan_rows` (kernel and reference; whole rows of out and lse, else some
    columns of out); the other rows as on the clean inputs, within the float64-vs-PyTorch
    tolerance."""
    out, lse, ref, ref_lse = result
    for o, l in ((out, lse), (ref, ref_lse)):
        assert torch.equal(torch.isnan(o).any(-1), nan_rows), torch.isnan(o).any(-1).nonzero()
        if whole:
            assert torch.equal(torch.isnan(o).all(-1), nan_rows)
        assert torch.equal(torch.isnan(l).transpose(1, 2), nan_rows if whole else rows(0) & False)
    keep = ~nan_rows
    clean_ref = reference.attention(*clean, **kw)
    assert rel_err(out[keep], clean_ref[keep]) <= bound(*clean, causal=kw.get("causal", False))


@pytest.mark.parametrize("fixup,programs", PLANS)
def test_nan_in_q_stays_in_its_row(fixup, programs):
    q, k, v = make(1)
    bad = q.clone()
    bad[1, 2, 3, 5] = NAN
    check(run(bad, k, v, fixup, programs), rows(1, 2, 3), (q, k, v))
    bad[1, 2, 3, 5] = INF  # q . k = +-inf: inf - inf in the softmax
    check(run(bad, k, v, fixup, programs), rows(1, 2, 3), (q, k, v))


@pytest.mark.parametrize("fixup,programs", PLANS)
def test_nan_in_k_reaches_the_rows_that_see_that_key(fixup, programs):
    # causal: only the last query sees the last key; KV head 1 is query heads 2 and 3
    q, k, v = make(2)
    bad = k.clone()
    bad[0, LK - 1, 1, 4] = NAN
    check(run(q, bad, v, fixup, programs, causal=True), rows(0, LQ - 1, slice(2, 4)), (q, k, v),
          causal=True)


@pytest.mark.parametrize("fixup,programs", PLANS)
def test_nan_in_v_stays_in_its_sequence_and_kv_head(fixup, programs):
    q, k, v = make(3)
    bad = v.clone()
    bad[1, 5, 0, 0] = NAN  # out's column 0 of the rows of (sequence 1, KV head 0); lse clean
    check(run(q, k, bad, fixup, programs), rows(1, None, slice(0, 2)), (q, k, v), whole=False)


@pytest.mark.parametrize("fixup,programs", PLANS)
def test_mask_minus_inf_hides_plus_inf_and_nan_poison(fixup, programs):
    q, k, v = make(4)
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(B, LQ, LK, generator=g)
    clean[torch.rand(B, LQ, LK, generator=g) < 0.3] = -INF
    clean[1, 0] = -INF                     # a row with no visible key: 0 and lse -inf
    mask = clean.clone()
    mask[0, 1, 7] = INF                    # the row (all heads, the mask is shared) is NaN
    mask[1, 2, 9] = NAN
    result = run(q, k, v, fixup, programs, mask=mask)
    check(result, rows(0, 1) | rows(1, 2), (q, k, v), mask=clean)
    out, lse = result[:2]
    assert (out[1, 0] == 0).all() and torch.isneginf(lse[1, :, 0]).all()


@pytest.mark.parametrize("fixup,programs", PLANS)
def test_sinks(fixup, programs):
    # -inf is no sink (bitwise: the same arithmetic); NaN and +inf make the head's rows NaN
    q, k, v = make(6)
    sinks = torch.tensor([0.5, -INF, NAN, INF])
    out, lse, ref, ref_lse = run(q, k, v, fixup, programs, sinks=sinks)
    plain, plain_lse = run(q, k, v, fixup, programs)[:2]
    assert torch.equal(out[:, :, 1], plain[:, :, 1]) and torch.equal(lse[:, 1], plain_lse[:, 1])
    check((out, lse, ref, ref_lse), rows(None, None, slice(2, 4)), (q, k, v),
          sinks=torch.tensor([0.5, -INF, -INF, -INF]))
