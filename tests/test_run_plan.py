"""The plan executor (stream-K partials + fixups in float64) against the one-shot reference."""
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import skattn
from skattn.reference import attention, run_plan

NEG_INF = float("-inf")
TOL = dict(rtol=1e-10, atol=1e-10)


def _plan(*, b, lq, lk, hq, hkv, dk, dv, programs, fixup=None, block_n=16, causal=False,
          window=None):
    kw = dict(batch=b, q_len=lq, kv_len=lk, q_heads=hq, kv_heads=hkv, head_dim=dk,
              head_dim_v=dv, causal=causal, window=window, sms=4, occupancy=2,
              block_n=block_n)
    if programs == "W":
        programs = skattn.plan(programs=1, **kw).work
    return skattn.plan(programs=programs, fixup=fixup, **kw)


def _inputs(seed, *, b, lq, lk, hq, hkv, dk, dv, sinks=False, mask=None, alibi=False,
            softcap=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, hq, dk, generator=g, dtype=torch.float64)
    k = torch.randn(b, lk, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, lk, hkv, dv, generator=g, dtype=torch.float64)
    kw = dict(softcap=softcap)
    if sinks:
        kw["sinks"] = torch.randn(hq, generator=g) * 2
    if alibi:
        kw["alibi_slopes"] = torch.rand(hq, generator=g) * 0.3
    if mask == "random":
        kw["mask"] = torch.where(torch.rand(b, lq, lk, generator=g) < 0.3, NEG_INF,
                                 torch.randn(b, lq, lk, generator=g, dtype=torch.float64))
    elif mask == "all":
        kw["mask"] = torch.full((1, lq, lk), NEG_INF, dtype=torch.float64)
    return q, k, v, kw


def check(seed=0, *, expect=None, split=None, sinks=False, mask=None, alibi=False, softcap=0.0,
          **shape_and_plan):
    """Run `plan` through run_plan and compare out and lse with reference.attention."""
    p = _plan(**shape_and_plan)
    if expect is not None:
        assert p.fixup == expect, p.describe()
    if split is not None:
        assert bool(p.pieces()) == split, p.describe()
    names = ("b", "lq", "lk", "hq", "hkv", "dk", "dv")
    q, k, v, kw = _inputs(seed, **{n: shape_and_plan[n] for n in names}, sinks=sinks, mask=mask,
                          alibi=alibi, softcap=softcap)
    opts = dict(causal=shape_and_plan.get("causal", False), window=shape_and_plan.get("window"), **kw)
    out, lse = run_plan(p, q, k, v, return_lse=True, **opts)
    ref_out, ref_lse = attention(q, k, v, return_lse=True, **opts)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    return p, out, lse


# decode with GQA: 2 sequences x 2 KV heads = 4 tiles, Lk = 100 -> 7 KV blocks, W = 28
DECODE = dict(b=2, lq=1, lk=100, hq=8, hkv=2, dk=16, dv=16)


@pytest.mark.parametrize("fixup", [None, "fused"])
def test_one_program(fixup):
    # N = 1: a single program walks every tile in order, nothing is split
    check(**DECODE, programs=1, fixup=fixup, expect="none", split=False)


def test_one_program_per_tile():
    # N = ntiles_dst: programs work on whole tiles, no fixup and no workspace
    p, _, _ = check(**DECODE, programs=4, expect="none", split=False)
    assert p.workspace_floats == 0


@pytest.mark.parametrize("fixup,expect", [(None, "uniform"), ("general", "general"),
                                          ("fused", "fused")])
def test_one_program_per_item(fixup, expect):
    # N = W: every work item is its own program, so every tile has ntiles_kv pieces
    p, _, _ = check(**DECODE, programs="W", fixup=fixup, expect=expect, split=True)
    assert max(len(v) for v in p.pieces().values()) == 7


@pytest.mark.parametrize("programs", [8, 12, 28])
def test_uniform(programs):
    # N a multiple of ntiles_dst: 2, 3 and 7 (= ntiles_kv) equal pieces per tile
    check(**DECODE, programs=programs, expect="uniform", split=True, sinks=True)


@pytest.mark.parametrize("programs", [3, 5, 6, 7, 9, 27])
@pytest.mark.parametrize("fixup", [None, "fused"])
def test_general_and_fused(programs, fixup):
    # N neither a divisor nor a multiple of ntiles_dst: pieces vary in number and length
    check(programs, **DECODE, programs=programs, fixup=fixup,
          expect="general" if fixup is None else "fused", split=True, sinks=True)


@pytest.mark.parametrize("fixup", ["general", "fused"])
def test_uniform_count_through_other_fixups(fixup):
    # a uniform N forced through the general or fused fixup: linear ranges, not per tile
    check(**DECODE, programs=8, fixup=fixup, expect=fixup, split=True)


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_single_key(programs):
    # Lk = 1: one KV block of one key, so W = ntiles_dst and no tile can be split
    check(b=3, lq=2, lk=1, hq=4, hkv=1, dk=8, dv=8, programs=programs, split=False, sinks=True)


@pytest.mark.parametrize("fixup", [None, "fused"])
def test_ragged_last_block(fixup):
    # Lk = 37 with BLOCK_N 16: the last KV block holds 5 keys
    check(b=1, lq=3, lk=37, hq=2, hkv=2, dk=8, dv=8, programs=5, fixup=fixup, split=True)


@pytest.mark.parametrize("programs", [3, 4, 8])
def test_gqa_ratio_5(programs):
    # ratio 5 (40/8 heads): 3 tokens x 5 heads fill 15 of 16 rows; row 15 is padding
    p, _, _ = check(b=1, lq=3, lk=50, hq=10, hkv=2, dk=16, dv=16, programs=programs, split=True)
    assert (p.geometry.block_m, p.geometry.heads_per_tile) == (16, 5)


def test_gqa_ratio_above_16():
    # ratio 20 > 16 heads per tile: two head groups per KV head, the second one 4/16 full
    p, _, _ = check(b=1, lq=2, lk=40, hq=40, hkv=2, dk=8, dv=8, programs=7, split=True, alibi=True)
    assert p.ntiles_z == 2


@pytest.mark.parametrize("dk,dv", [(24, 16), (8, 40)])
def test_dk_not_dv(dk, dv):
    # Dv != Dk (192/128, 576/512 in real models): O and the workspace are Dv wide
    check(b=2, lq=2, lk=45, hq=4, hkv=2, dk=dk, dv=dv, programs=5, split=True)


@pytest.mark.parametrize("sinks", [False, True])
def test_every_row_masked(sinks):
    # every key masked: all partials have m = -inf, l = 0 and the merges must not make NaN
    _, out, lse = check(b=1, lq=2, lk=40, hq=4, hkv=2, dk=8, dv=8, programs=5, mask="all",
                        sinks=sinks, split=True)
    assert (out == 0).all()
    if sinks:  # lse is the sink itself
        assert torch.isfinite(lse).all()
    else:
        assert torch.isneginf(lse).all()


def test_prefill_causal_token_blocks():
    # causal prefill, 16 heads x 9 tokens: 2 token blocks whose KV counts differ (3 and 4)
    p, _, _ = check(b=1, lq=9, lk=49, hq=16, hkv=1, dk=8, dv=8, causal=True, programs=3,
                    expect="general", split=True, sinks=True)
    assert p.ntiles_x == 2 and p.kv_count == (3, 4)


@pytest.mark.parametrize("programs,fixup", [(3, None), (4, None), (5, "fused")])
def test_causal_rows_that_see_nothing(programs, fixup):
    # Lq > Lk causal: the first 5 queries sit before key 0, inside tiles that get split
    check(b=2, lq=40, lk=35, hq=1, hkv=1, dk=8, dv=8, causal=True, programs=programs, fixup=fixup,
          split=True, sinks=programs == 4)


@pytest.mark.parametrize("programs,fixup", [(3, None), (5, "fused")])
def test_causal_tiles_that_see_nothing(programs, fixup):
    # Lq = 60 > Lk = 40, 16 heads: token blocks 0 and 1 see no key and keep one masked block
    p, _, _ = check(b=1, lq=60, lk=40, hq=16, hkv=1, dk=8, dv=8, causal=True, programs=programs,
                    fixup=fixup, split=True)
    assert p.kv_count[:2] == (1, 1) and p.ntiles_x == 8


@pytest.mark.parametrize("programs,fixup", [(3, None), (6, None), (8, None), (5, "fused")])
def test_window(programs, fixup):
    # window 20 over Lk = 90: tiles start at KV block 4 (kv_first > 0), partial first block
    p, _, _ = check(b=2, lq=3, lk=90, hq=4, hkv=2, dk=8, dv=8, causal=True, window=20,
                    programs=programs, fixup=fixup, split=True, alibi=True)
    assert p.kv_first[0] > 0


@pytest.mark.parametrize("fixup,programs", [(None, 5), (None, 8), ("fused", 6)])
def test_all_features_batch_2(fixup, programs):
    # every feature at once, batch 2, through each fixup
    check(b=2, lq=2, lk=53, hq=6, hkv=2, dk=16, dv=8, programs=programs, fixup=fixup, split=True,
          sinks=True, mask="random", alibi=True, softcap=3.0)


def test_plan_for_other_options_is_refused():
    shape = dict(b=1, lq=2, lk=20, hq=2, hkv=1, dk=8, dv=8)
    p = _plan(**shape, programs=1)
    q, k, v, _ = _inputs(0, **shape)
    with pytest.raises(ValueError):
        run_plan(p, q, k, v, causal=True)
    with pytest.raises(ValueError):
        run_plan(p, q[:, :1], k, v)


def test_divisor_count_with_unequal_causal_tiles():
    # 6 token blocks with KV counts 1,1,2,2,3,3 (W = 12): N = 3 divides ntiles_dst = 6, yet
    # program 1's range [4, 8) ends inside tile 4 = [6, 9), so "none" would be wrong
    p, _, _ = check(b=1, lq=48, lk=48, hq=16, hkv=1, dk=8, dv=8, causal=True, programs=3,
                    expect="general", split=True)
    assert p.kv_count == (1, 1, 2, 2, 3, 3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), b=st.integers(1, 2), lq=st.sampled_from(range(1, 21)), lk=st.sampled_from(range(1, 101)),
       hkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 5, 16]),
       dims=st.sampled_from([(8, 8), (16, 8), (8, 24)]), causal=st.booleans(),
       window=st.none() | st.sampled_from(range(1, 61)), fixup=st.sampled_from([None, "general", "fused"]),
       sinks=st.booleans(), mask=st.sampled_from([None, "random"]), seed=st.integers(0, 2**16))
def test_random_plans(data, b, lq, lk, hkv, ratio, dims, causal, window, fixup, sinks, mask, seed):
    shape = dict(b=b, lq=lq, lk=lk, hq=hkv * ratio, hkv=hkv, dk=dims[0], dv=dims[1],
                 causal=causal or window is not None, window=window)
    work = _plan(**shape, programs=1).work
    programs = data.draw(st.sampled_from(range(1, work + 1)), label="programs")  # uniform, not small-biased
    try:
        _plan(**shape, programs=programs, fixup=fixup)
    except ValueError:  # that fixup does not apply to this N (e.g. "general" for a divisor)
        assume(False)
    p, _, _ = check(seed, **shape, programs=programs, fixup=fixup, sinks=sinks, mask=mask)
    event(f"fixup {p.fixup}, split tiles: {bool(p.pieces())}, token blocks > 1: {p.ntiles_x > 1}")
