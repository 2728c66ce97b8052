"""The prompt-chunk kernel (`kernels/prefill.py`, `Tuning(prefill="tma")`) under the interpreter.

Triton 3.6's interpreter runs tensor descriptors (host and device made, zero padding past the
tensor), so these tests run the kernel's own loads: the K/V descriptors, the two-part KV
loop, the counted tile loop and every fixup, against the float64 reference. What only a GPU
shows (the copy engine, bf16 tensor-core dots, shared memory) is in tests/test_gpu_prefill.py
and, compiled for sm_90 here, tests/test_prefill_compile.py.
"""
import pytest
import torch

import skattn
from skattn import launch, prefill_launch, reference
from skattn.kernels import attention as base_kernel
from skattn.kernels import prefill as prefill_kernel
from tolerance import bound, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

TMA = skattn.Tuning(prefill="tma")


def make(Lq, Lk, Hq=8, Hkv=2, D=64, dtype=torch.float16, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    return q, k, v


def plan_for(q, k, *, causal=True, tuning=TMA, block_n=16, **kw):
    return skattn.plan(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1], q_heads=q.shape[2],
                       kv_heads=k.shape[2], head_dim=q.shape[3], dtype=k.dtype, causal=causal,
                       sms=kw.pop("sms", 4), occupancy=kw.pop("occupancy", 2), block_n=block_n,
                       num_warps=kw.pop("num_warps", 4), tuning=tuning, **kw)


class Spy:
    """Counts the launches of a kernel (the launcher looks kernels up on their module)."""

    def __init__(self, module, name, monkeypatch):
        self.fn, self.calls = getattr(module, name), 0
        self.arg_names = self.fn.arg_names
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        self.calls += 1
        return self.fn[grid]


@pytest.fixture
def spies(monkeypatch):
    return (Spy(prefill_kernel, "prefill_kernel", monkeypatch),
            Spy(base_kernel, "attention_kernel", monkeypatch))


def check(q, k, v, p, **kw):
    out = torch.full(q.shape[:3] + (v.shape[3],), float("nan"), dtype=q.dtype)
    out, lse = skattn.attention(q, k, v, plan=p, out=out, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    tol = bound(q, k, v, causal=kw.get("causal", False))
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 20 * tol


# Lq = 40 at GQA ratio 4: 128-row tiles of 32 tokens x 4 heads, two token blocks (the second
# 8 tokens: rows past Lq), Lk = 120 keys in 16-key blocks (the last one 8 past Lk)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("programs,fixup", [(4, "none"), (8, None), (7, None), (5, "fused")])
def test_fixups(causal, programs, fixup, spies):
    q, k, v = make(40, 120)
    p = plan_for(q, k, causal=causal, programs=programs, fixup=fixup)
    assert p.geometry.block_m == 128 and p.geometry.tokens_per_tile == 32
    assert launch.bind(p, torch.device("cpu")).prefill is not None
    check(q, k, v, p, causal=causal)
    assert (spies[0].calls, spies[1].calls) == (1, 0)


def test_fixup_kinds_covered():
    q, k, _ = make(40, 120)
    kinds = {plan_for(q, k, programs=n, fixup=f).fixup
             for n, f in [(4, "none"), (8, None), (7, None), (5, "fused")]}
    assert kinds == {"none", "uniform", "general", "fused"}


def test_bf16_head_128_sinks():
    # bf16 (the interpreter's dots in f32: INTERPRET), head size 128, ratio 8: 16 tokens a tile
    q, k, v = make(20, 70, Hq=16, Hkv=2, D=128, dtype=torch.bfloat16, seed=1)
    sinks = torch.randn(16, generator=torch.Generator().manual_seed(2))
    p = plan_for(q, k, programs=6)
    assert launch.bind(p, torch.device("cpu")).prefill is not None
    check(q, k, v, p, causal=True, sinks=sinks)


def test_q_f32(spies):
    # q in f32, K/V in f16: q is loaded in K/V's dtype; two sequences
    q, k, v = make(40, 64, seed=3, B=2)
    p = plan_for(q, k, programs=8)
    check(q.float(), k, v, p, causal=True)
    assert spies[0].calls == 1


def test_more_queries_than_keys():
    # Lq > Lk, causal: the first rows see no key (0, lse -inf), in whole and cut tiles
    q, k, v = make(40, 24, seed=4)
    for programs in (None, 3):
        check(q, k, v, plan_for(q, k, programs=programs), causal=True)


def test_device_descriptors():
    q, k, v = make(40, 120, seed=5)
    p = plan_for(q, k, tuning=skattn.Tuning(prefill="tma", prefill_device_desc=True), programs=7)
    check(q, k, v, p, causal=True)


def test_features_it_lacks_run_the_base_kernel(spies):
    q, k, v = make(40, 120, seed=6)
    p = plan_for(q, k, causal=False)
    g = torch.Generator().manual_seed(7)
    mask = torch.randn(1, 40, 120, generator=g)
    for kw in (dict(mask=mask), dict(softcap=10.0), dict(alibi_slopes=skattn.alibi_slopes(8, 8.0))):
        check(q, k, v, p, **kw)
    assert (spies[0].calls, spies[1].calls) == (0, 3)
    # a view whose row stride is not a multiple of 16 bytes: the copy engine cannot read it
    big = torch.randn(1, 120, 2, 68).half()
    kv = big[..., :64]
    check(q, kv, kv, p)
    assert (spies[0].calls, spies[1].calls) == (0, 4)


def test_refusals():
    q, k, _ = make(40, 120)
    assert prefill_launch.refusal(plan_for(q, k, tuning=skattn.Tuning())) is not None
    assert "window" in prefill_launch.refusal(plan_for(q, k, window=32))
    assert "head sizes" in prefill_launch.refusal(
        skattn.plan(batch=1, q_len=40, kv_len=120, q_heads=8, kv_heads=2, head_dim=80,
                    sms=4, occupancy=2, tuning=TMA))
    decode = skattn.plan(batch=1, q_len=1, kv_len=120, q_heads=8, kv_heads=2, head_dim=64,
                         sms=4, occupancy=2, tuning=TMA)
    assert "rows" in prefill_launch.refusal(decode)
    assert launch.bind(decode, torch.device("cpu")).prefill is None
    with pytest.raises(ValueError, match="prefill"):
        skattn.Tuning(prefill="fast")


def test_whole_prompts_on_this_kernel(spies):
    # a whole causal prompt (Lq = Lk) whose 12 tiles outnumber the 2 resident programs more
    # than 3x: `auto` takes whole tiles, longest first (made without a tuning it runs the
    # warp-specialised kernel on sm_90, which the interpreter cannot run)
    q, k, v = make(192, 192, seed=6)
    assert plan_for(q, k, tuning=None, sms=1, occupancy=2).tuning.prefill == "ws"
    p = plan_for(q, k, tuning=TMA, sms=1, occupancy=2)
    assert (p.programs, p.fixup, p.tuning.prefill) == (p.ntiles_dst, "none", "tma")
    assert p.longest_first  # the longest tiles first (Tuning.tile_order)
    check(q, k, v, p, causal=True)
    assert (spies[0].calls, spies[1].calls) == (1, 0)
