"""The Triton kernels under TRITON_INTERPRET=1 on tiny shapes: every feature and fixup kind."""
import math

import pytest
import torch

import skattn
from skattn import reference
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

SMS, OCC = 4, 2  # a pretend GPU of 8 programs, so tiny shapes still split tiles


def make(B=1, Lq=1, Lk=100, Hq=8, Hkv=2, D=32, Dv=None, dtype=torch.float16, qdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Lq, Hq, D, generator=g).to(qdtype or dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g).to(dtype)
    return q, k, v


def plan_for(q, k, v, *, causal=False, window=None, block_n=16, **kw):
    B, Lq, Hq, D = q.shape
    return skattn.plan(batch=B, q_len=Lq, kv_len=k.shape[1], q_heads=Hq, kv_heads=k.shape[2],
                       head_dim=D, head_dim_v=v.shape[3], dtype=k.dtype, causal=causal,
                       window=window, sms=kw.pop("sms", SMS), occupancy=kw.pop("occ", OCC),
                       block_n=block_n, **kw)


def check(q, k, v, p, **kw):
    """Kernel vs float64 reference and vs the plan executor; poisoned out, inputs untouched."""
    inputs = [x.clone() for x in (q, k, v)]
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), float("nan"), dtype=q.dtype)
    out, lse = skattn.attention(q, k, v, plan=p, return_lse=True, out=out, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    exe = reference.run_plan(p, q, k, v, **kw)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "an input was modified"
    tol = bound(q, k, v, causal=kw.get("causal", False))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    assert rel_err(out, exe) <= tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 20 * tol
    return out, lse


@pytest.mark.parametrize("fixup,programs", [
    (None, 4),          # 2 tiles, N a multiple above them: uniform
    (None, 7),          # general: N not a multiple of ntiles_dst
    (None, 1),          # N = 1: one program walks every tile, nothing to merge
    (None, 2),          # N = ntiles_dst: whole tiles, fixup none
    ("fused", 7),       # fused with uneven pieces
    ("fused", 4),       # fused where uniform would apply
    ("general", 4),     # the general fixup also merges uniform cuts
])
def test_fixup_kinds(fixup, programs):
    q, k, v = make(Lq=1, Lk=100)
    p = plan_for(q, k, v, programs=programs, fixup=fixup)
    check(q, k, v, p)


def test_n_equals_w():
    # N = W: every program gets exactly one KV block
    q, k, v = make(Lq=2, Lk=64)
    p0 = plan_for(q, k, v)
    p = plan_for(q, k, v, programs=p0.work, fixup="fused")
    check(q, k, v, p)
    check(q, k, v, plan_for(q, k, v, programs=p0.work))


@pytest.mark.parametrize("fixup,programs", [("uniform", 40), ("uniform", 37), ("general", 37),
                                           ("fused", 37)])
def test_many_pieces_per_tile(fixup, programs):
    # one tile cut into 37-40 pieces: the merges take them 16 at a time, the last step partial
    q, k, v = make(Lq=1, Lk=640, Hq=4, Hkv=1)
    p = plan_for(q, k, v, programs=programs, fixup=fixup)
    assert p.ntiles_dst == 1 and p.fixup == fixup
    check(q, k, v, p)


@pytest.mark.parametrize("fixup,programs", [(None, 8), (None, 9), ("fused", 9)])
def test_fixup_row_chunks(fixup, programs):
    # 9 tokens x 4 heads = 36 rows: BLOCK_M 64; 2 tiles in >= 8 pieces: the fixups merge 16 rows
    # per program
    q, k, v = make(Lq=9, Lk=160, Hq=8, Hkv=2)
    p = plan_for(q, k, v, programs=programs, fixup=fixup, causal=True)
    assert p.geometry.block_m == 64 and p.fixup != "none"
    check(q, k, v, p, causal=True)


@pytest.mark.parametrize("policy", ["llamacpp-before", "round-4x", "llamacpp", "split", "auto"])
def test_policies(policy):
    q, k, v = make(Lq=3, Lk=150, Hq=4, Hkv=2)
    check(q, k, v, plan_for(q, k, v, policy=policy, causal=True), causal=True)


def test_lk_one():
    # Lk = 1: a single key, a single partial block
    q, k, v = make(Lq=1, Lk=1)
    check(q, k, v, plan_for(q, k, v))


def test_lk_not_multiple_of_block_n():
    # the last KV block is partial: its out-of-range keys must not count
    q, k, v = make(Lq=4, Lk=37)
    check(q, k, v, plan_for(q, k, v, programs=5, causal=True), causal=True)


@pytest.mark.parametrize("Lq", [1, 3])
def test_fused_merges_only_filled_rows(Lq):
    # ratio 1: a 16-row tile holds Lq rows; the fused merge reads 1 (Lq=1) or 4 (Lq=3) rows
    q, k, v = make(Lq=Lq, Lk=200, Hq=2, Hkv=2)
    check(q, k, v, plan_for(q, k, v, programs=6, fixup="fused", causal=True), causal=True)


def test_block_m_32():
    # 32 rows (4 tokens x 8 heads) now default to 64-row tiles; 32 stays available
    q, k, v = make(Lq=4, Lk=90, Hq=8, Hkv=1)
    p = plan_for(q, k, v, programs=5, causal=True, block_m=32)
    assert p.geometry.block_m == 32 and plan_for(q, k, v).geometry.block_m == 64
    check(q, k, v, p, causal=True)


def test_ratio_five():
    # GQA ratio 5 (40/8 in the seed grid): heads do not fill the 16-row tile evenly
    q, k, v = make(Lq=5, Lk=70, Hq=10, Hkv=2)
    check(q, k, v, plan_for(q, k, v, programs=7, causal=True), causal=True)
    check(q, k, v, plan_for(q, k, v, programs=7, fixup="fused", causal=True), causal=True)


def test_dk_differs_from_dv():
    # Dk != Dv (192/128, 576/512 in real models)
    q, k, v = make(Lq=2, Lk=50, D=48, Dv=32)
    check(q, k, v, plan_for(q, k, v, programs=5))


def test_large_head_chunks():
    # Dk > 256 takes the chunked QK path (576/512 in MLA), here 320 = 5 x 64
    q, k, v = make(Lq=1, Lk=40, Hq=4, Hkv=1, D=320, Dv=64)
    check(q, k, v, plan_for(q, k, v, programs=3))


def test_prefill_causal_skips_invisible_blocks():
    # a 40-token chunk: early tiles see fewer KV blocks; W is smaller than tiles x ntiles_kv
    q, k, v = make(Lq=40, Lk=90, Hq=2, Hkv=1)
    p = plan_for(q, k, v, causal=True, programs=6, block_m=16)
    assert p.work < p.ntiles_dst * p.ntiles_kv
    check(q, k, v, p, causal=True)


def test_prefill_whole_tile_per_program():
    # N = ntiles_dst with fixup "none": each program its own causal tile, tiles of unequal length
    q, k, v = make(Lq=40, Lk=90, Hq=2, Hkv=1)
    p = plan_for(q, k, v, causal=True, block_m=16, programs=5, fixup="none")
    assert p.ntiles_dst == 5 and p.per_tile_ranges and len(set(p.kv_count)) > 1
    check(q, k, v, p, causal=True)


@pytest.mark.parametrize("order", ["longest", "index"])
def test_whole_tiles_in_either_order(order):
    # one whole tile a program, 2 sequences x 2 KV heads of causal prompts: "longest" hands
    # program p the p-th longest tile (token blocks last to first across the groups); both
    # orders write every tile once (out is poisoned with NaN)
    q, k, v = make(B=2, Lq=48, Lk=48, Hq=4, Hkv=2)
    tiles = plan_for(q, k, v, causal=True, block_m=16).ntiles_dst
    p = plan_for(q, k, v, causal=True, block_m=16, programs=tiles, fixup="none",
                 tuning=skattn.Tuning(tile_order=order))
    assert p.longest_first == (order == "longest") and p.ntiles_x > 1 and tiles > p.ntiles_x
    assert ("longest tiles first" in p.describe()) == p.longest_first
    order_ = p.longest_first_order()
    assert sorted(order_) == list(range(tiles))
    lens = [p.kv_count[t % p.ntiles_x] for t in order_]
    assert lens == sorted(lens, reverse=True) and lens[0] > lens[-1]
    check(q, k, v, p, causal=True)
    assert not plan_for(q, k, v, causal=True, block_m=16, programs=3).longest_first  # cut plan
    assert not plan_for(q, k, v, block_m=16, programs=tiles, fixup="none").longest_first  # equal


def test_window_and_sinks():
    # gpt-oss: sliding window plus per-head sinks
    q, k, v = make(Lq=3, Lk=120, Hq=8, Hkv=2)
    p = plan_for(q, k, v, causal=True, window=20, programs=3, block_m=16)
    assert p.work <= 3 * p.ntiles_dst
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3))
    check(q, k, v, p, causal=True, window=20, sinks=sinks)
    check(q, k, v, plan_for(q, k, v, causal=True, window=20, programs=3, fixup="fused", block_m=16),
          causal=True, window=20, sinks=sinks)


@pytest.mark.parametrize("fixup", [None, "fused"])
def test_decode_window_starts_past_zero(fixup):
    # one token block whose first visible KV block is not 0 (the kernel gets it as a scalar)
    q, k, v = make(Lq=2, Lk=200, Hq=8, Hkv=2)
    p = plan_for(q, k, v, causal=True, window=40, programs=5, fixup=fixup)
    assert p.ntiles_x == 1 and p.kv_first[0] > 0
    check(q, k, v, p, causal=True, window=40)


def test_mask_softcap_alibi():
    q, k, v = make(B=2, Lq=3, Lk=60, Hq=4, Hkv=2)
    g = torch.Generator().manual_seed(4)
    mask = torch.randn(2, 3, 60, generator=g)
    mask[torch.rand(2, 3, 60, generator=g) < 0.3] = float("-inf")
    slopes = skattn.alibi_slopes(4, 8.0)
    p = plan_for(q, k, v, programs=5)
    check(q, k, v, p, mask=mask.half(), softcap=5.0, alibi_slopes=slopes, scale=0.3)
    check(q, k, v, p, mask=mask[:1])  # a mask broadcast over the batch


def test_fully_masked_rows():
    # every key of some rows masked: out 0 and lse -inf, never NaN
    q, k, v = make(Lq=2, Lk=40, Hq=4, Hkv=2)
    mask = torch.zeros(1, 2, 40)
    mask[:, 0] = float("-inf")
    out, lse = check(q, k, v, plan_for(q, k, v, programs=5), mask=mask)
    assert torch.all(out[:, 0] == 0) and torch.all(lse[:, :, 0] == float("-inf"))


def test_more_queries_than_keys():
    # Lq > Lk with causal: the first queries see no key at all
    q, k, v = make(Lq=20, Lk=8, Hq=2, Hkv=1)
    p = plan_for(q, k, v, causal=True, block_m=16, policy="llamacpp-before")
    assert p.ntiles_dst == 3 and p.kv_count[0] == 1
    out, lse = check(q, k, v, p, causal=True)
    assert torch.all(out[:, :12] == 0)


def test_strided_cache_views():
    # K/V as views into a larger cache (longer and with more heads than used)
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(2, 200, 6, 32, generator=g).half()
    cache_v = torch.randn(2, 200, 6, 32, generator=g).half()
    k, v = cache_k[:, 10:90, 1:3], cache_v[:, 10:90, 1:3]
    q = torch.randn(2, 4, 8, 32, generator=g).half().transpose(1, 2)[:, :3]  # [B, Lq, Hq, D] view
    check(q, k, v, plan_for(q, k, v, programs=5, causal=True), causal=True)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_bf16_and_f32_query(qdtype):
    # bf16 K/V: the kernel multiplies in f32 under the interpreter (triton 3.6's bf16 tl.dot
    # is wrong there); the real bf16 tensor-core path is tested on the GPU
    q, k, v = make(Lq=2, Lk=50, dtype=torch.bfloat16, qdtype=qdtype)
    out, _ = check(q, k, v, plan_for(q, k, v, programs=5))
    assert out.dtype == qdtype


def test_fastdiv_off_matches_on():
    q, k, v = make(B=2, Lq=5, Lk=70, Hq=10, Hkv=2)
    on = skattn.attention(q, k, v, plan=plan_for(q, k, v, programs=7, causal=True), causal=True)
    off = skattn.attention(q, k, v, plan=plan_for(q, k, v, programs=7, fastdiv=False, causal=True),
                           causal=True)
    assert torch.equal(on, off)


def test_fused_plan_is_reusable():
    # the fused fixup's counters reset themselves: a second call with new inputs is right too
    p = None
    for seed in range(3):
        q, k, v = make(Lq=2, Lk=90, seed=seed)
        p = p or plan_for(q, k, v, programs=7, fixup="fused")
        check(q, k, v, p)


def test_default_plan_and_scale():
    # no plan: the interpreter's pretend GPU is planned for; scale defaults to Dk ** -0.5
    q, k, v = make(Lq=2, Lk=30)
    out = skattn.attention(q, k, v)
    ref = reference.attention(q, k, v, scale=1 / math.sqrt(32))
    assert rel_err(out, ref) <= bound(q, k, v)
