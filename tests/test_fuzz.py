"""Property-based differential test: `skattn.attention` against the float64 reference over random
shapes, head sizes, GQA ratios, strides, features, plans and dtypes.

Two profiles. The interpreter profile (CPU CI) draws tiny shapes of every kind. The GPU profile
(`-m gpu`, SKATTN_FUZZ_EXAMPLES cases, 2,000 by default) draws real sizes within a fixed list of
families, each fixing what changes the compiled code (head sizes, dtypes, features, tile
geometry; strides padded to multiples of 16), so that its cases share a few compiled kernels.
Errors are bounded relative to PyTorch's own error on the same inputs (`tolerance.py`), for the
whole output and row by row. Each shard runs from a fixed seed: a run is reproducible.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, given, reject, seed, settings
from hypothesis import strategies as st

import skattn
from skattn import reference
from skattn.fastdiv import magic
from skattn.policy import FIXUPS, POLICIES
from tolerance import bounds, rel_err, row_rel_err

NEG_INF = float("-inf")
FEATURES = ("causal", "window", "mask", "sinks", "softcap", "alibi", "return_lse")


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    batch: tuple[int, int]
    kv_len: tuple[int, int]
    q_lens: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    ratios: tuple[int, ...] = ()
    dims: tuple[tuple[int, int], ...] = ()
    block_n: tuple[int | None, ...] = (None,)   # None: the planner's choice
    hardware: tuple[tuple[int, int] | None, ...] = (None,)  # (sms, occupancy); None: the GPU's
    aligned: bool = False        # strides and view offsets multiples of 16 elements
    families: tuple[dict, ...] = ()  # each fixes some of the case's fields (GPU profile)
    configs_per_kind: int = 0    # GPU: kernel configurations per family and fixup kind (0: any)


INTERPRETER = Profile(
    name="interpreter", device="cpu", batch=(1, 2), kv_len=(1, 80),
    q_lens=(1, 1, 2, 3, 4, 5, 6, 11),   # 11 x ratio 2 > 16 rows: several token blocks
    kv_heads=(1, 2), ratios=(1, 2, 3, 4, 5, 6, 7, 8),
    dims=((16, 16), (32, 32), (64, 64), (80, 80), (72, 72), (32, 16), (16, 48), (96, 64)),
    block_n=(16, 16, 32), hardware=((4, 2), (1, 1), (2, 2), (3, 1), (5, 2), (6, 1)))

# GPU families: each compiles its own kernels; every other field is drawn per case.
# f = the features that are on (the rest off); dtype = K/V's; q = q's dtype (default K/V's)
_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32
GPU_FAMILIES = (
    dict(q_len=1, kv_heads=8, ratio=4, dims=(128, 128), dtype=_F16, f={"causal", "return_lse"}),
    dict(q_len=4, kv_heads=4, ratio=5, dims=(128, 128), dtype=_BF16, f={"causal", "mask"}),
    dict(q_len=2, kv_heads=8, ratio=8, dims=(64, 64), dtype=_BF16,
         f={"causal", "window", "sinks", "return_lse"}),
    dict(q_len=8, kv_heads=4, ratio=2, dims=(256, 256), dtype=_BF16, f={"causal", "softcap"}),
    dict(q_len=3, kv_heads=2, ratio=3, dims=(80, 80), dtype=_F16, q=_F32,
         f={"alibi", "mask", "return_lse"}),
    dict(q_len=1, kv_heads=16, ratio=1, dims=(72, 72), dtype=_F16, f={"mask", "sinks"}),
    dict(q_len=1, kv_heads=1, ratio=16, dims=(192, 128), dtype=_BF16, f={"causal", "return_lse"}),
    dict(q_len=1, kv_heads=1, ratio=16, dims=(576, 512), dtype=_BF16, f={"causal"}),
    dict(q_len=64, kv_heads=2, ratio=4, dims=(128, 128), dtype=_F16, f={"causal", "return_lse"}),
    dict(q_len=5, kv_heads=3, ratio=2, dims=(96, 64), dtype=_F16,
         f={"causal", "window", "alibi", "return_lse"}),
    dict(q_len=16, kv_heads=4, ratio=1, dims=(64, 64), dtype=_F16, q=_F32, f=set(FEATURES)),
    dict(q_len=1, kv_heads=2, ratio=8, dims=(128, 128), dtype=_F16, fastdiv=False,
         f={"causal", "mask", "return_lse"}),
    # a prompt chunk with a mask at head size 128 (shared memory of the mask tile)
    dict(q_len=48, kv_heads=2, ratio=4, dims=(128, 128), dtype=_BF16, f={"causal", "mask"}),
)
GPU = Profile(name="gpu", device="cuda", batch=(1, 4), kv_len=(1, 8192), aligned=True,
              families=GPU_FAMILIES, configs_per_kind=1)


@dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    kv_len: int
    kv_heads: int
    ratio: int
    dims: tuple[int, int]
    dtype: torch.dtype           # K and V
    q_dtype: torch.dtype
    features: frozenset
    window: int | None
    softcap: float
    scale: float | None
    max_bias: float
    mask_kind: str               # "full" [B, Lq, Lk], "one" [1, ...], "batch0": stride 0 over B,
    #                              "row0": stride 0 over Lq
    mask_dtype: torch.dtype
    kv_view: bool                # k and v are views into larger caches
    q_transposed: bool           # q and out are [B, Hq, Lq, D] buffers seen as [B, Lq, Hq, D]
    out_transposed: bool
    pad: int                     # extra elements per row of every buffer
    plan: skattn.Plan = field(compare=False)
    seed: int = 0

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.ratio


def _plan_kwargs(c: dict, hardware, block_n, fastdiv) -> dict:
    """skattn.plan's arguments for the case's fields `c`."""
    sms, occ = hardware if hardware else (None, None)
    return dict(batch=c["batch"], q_len=c["q_len"], kv_len=c["kv_len"],
                q_heads=c["kv_heads"] * c["ratio"], kv_heads=c["kv_heads"],
                head_dim=c["dims"][0], head_dim_v=c["dims"][1], dtype=c["dtype"],
                causal="causal" in c["features"], window=c["window"],
                has_mask="mask" in c["features"], sms=sms, occupancy=occ, block_n=block_n,
                fastdiv=fastdiv)


def _draw_plan(draw, kw: dict) -> skattn.Plan:
    """A plan of any policy and, in turn, of each fixup kind: the policy's own, or a program
    count in [1, W] that gives the kind drawn."""
    policy = draw(st.sampled_from(POLICIES))
    base = skattn.plan(policy=policy, **kw)
    tiles, work = base.ntiles_dst, base.work
    kind = draw(st.sampled_from(("policy",) + FIXUPS))
    fixup, programs = None, None
    if kind == "uniform" and min(base.kv_count) >= 2:  # pieces a tile <= its KV blocks
        fixup, programs = kind, tiles * draw(st.integers(2, min(base.kv_count)))
    elif kind == "none":
        fixup, programs = kind, draw(st.sampled_from((1, tiles)))  # no tile is ever cut
    elif kind == "general":
        cut = [n for n in range(2, work + 1) if n % tiles and tiles % n]  # llama.cpp: general
        if cut:
            fixup, programs = kind, draw(st.sampled_from(cut))
    elif kind == "fused":
        fixup, programs = kind, draw(st.sampled_from(range(1, work + 1)))  # not small-biased
    try:
        return skattn.plan(policy=policy, programs=programs, fixup=fixup, **kw)
    except ValueError:  # "general" where causal tiles differ: plain llama.cpp rule for this N
        return skattn.plan(policy=policy, programs=programs, **kw)


def _compile_key(family: int, p: skattn.Plan) -> tuple:
    """What makes Triton compile another kernel within a family: the plan's kind, and the
    class (1, a multiple of 16, other) of each run-time integer the launch passes (Triton
    specialises integer arguments on those)."""
    ints = (p.kv_len, p.group_work, p.work, p.programs, p.split, p.kv_first[0], p.window or 0,
            *magic(p.group_work))
    return (family, p.fixup, p.per_tile_ranges, p.programs >= 4 * p.ntiles_dst,
            *(1 if x == 1 else 16 if x % 16 == 0 else 0 for x in ints))


@st.composite
def cases(draw, profile: Profile, seen: dict):
    fam_index = draw(st.sampled_from(range(len(profile.families)))) if profile.families else -1
    fam = profile.families[fam_index] if profile.families else {}
    c = {}
    c["batch"] = draw(st.integers(*profile.batch))
    c["q_len"] = fam.get("q_len") or draw(st.sampled_from(profile.q_lens))
    lo, hi = profile.kv_len
    c["kv_len"] = draw(st.integers(lo, hi) | st.integers(lo, min(hi, 300)))
    c["kv_heads"] = fam.get("kv_heads") or draw(st.sampled_from(profile.kv_heads))
    c["ratio"] = fam.get("ratio") or draw(st.sampled_from(profile.ratios))
    c["dims"] = fam.get("dims") or draw(st.sampled_from(profile.dims))
    c["dtype"] = fam.get("dtype") or draw(st.sampled_from((_F16, _BF16)))
    c["q_dtype"] = fam.get("q") or (fam.get("dtype") or draw(st.sampled_from((c["dtype"], _F32))))
    if "f" in fam:
        features = frozenset(fam["f"])
    else:
        features = frozenset(f for f in FEATURES if draw(st.booleans()))
        if "window" in features:
            features |= {"causal"}  # a window is bottom-right causal
    c["features"] = features
    c["window"] = draw(st.integers(1, c["kv_len"] + 8)) if "window" in features else None
    hardware = draw(st.sampled_from(profile.hardware))
    block_n = draw(st.sampled_from(profile.block_n))
    fastdiv = fam.get("fastdiv", True) if profile.families else draw(st.booleans())
    p = _draw_plan(draw, _plan_kwargs(c, hardware, block_n, fastdiv))
    if profile.configs_per_kind:  # keep the GPU profile's compiled kernels few
        key = _compile_key(fam_index, p)
        keys = seen.setdefault((fam_index, p.fixup), set())
        if key not in keys:
            if len(keys) >= profile.configs_per_kind:
                reject()
            keys.add(key)
    event(f"fixup {p.fixup}{' whole tiles' if p.per_tile_ranges else ''}")
    return Case(
        **c, softcap=draw(st.floats(1.0, 50.0)) if "softcap" in features else 0.0,
        scale=draw(st.none() | st.floats(0.02, 0.3)),
        max_bias=draw(st.floats(0.5, 8.0)),
        mask_kind=draw(st.sampled_from(("full", "one", "batch0", "row0"))),
        mask_dtype=c["dtype"] if profile.aligned else draw(st.sampled_from((_F16, _BF16, _F32))),
        kv_view=draw(st.booleans()), q_transposed=draw(st.booleans()),
        out_transposed=draw(st.booleans()),
        pad=16 * draw(st.integers(0, 1)) if profile.aligned else draw(st.integers(0, 3)),
        plan=p, seed=draw(st.integers(0, 2**31 - 1)))


def _width(d: int, case: Case, profile: Profile) -> int:
    """Row length of a buffer holding d elements a row."""
    base = -(-d // 16) * 16 if profile.aligned else d
    return base + case.pad


def tensors(case: Case, profile: Profile):
    """q, k, v, the features' keyword arguments and a NaN-poisoned out, laid out as drawn."""
    dev = profile.device
    g = torch.Generator(device=dev).manual_seed(case.seed)
    B, Lq, Lk, Hkv, Hq = case.batch, case.q_len, case.kv_len, case.kv_heads, case.q_heads
    Dk, Dv = case.dims

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    def heads_first(shape_bhld, d, dtype, fill=None):
        """[B, L, H, d] as a view of a [B, H, L, width] buffer."""
        b, h, l = shape_bhld
        w = _width(d, case, profile)
        buf = randn(b, h, l, w, dtype=dtype) if fill is None else torch.full(
            (b, h, l, w), fill, device=dev, dtype=dtype)
        return buf[..., :d].transpose(1, 2)

    def rows_view(shape, d, dtype, fill=None):
        """[B, L, H, d] as a view of a [B, L, H, width] buffer."""
        w = _width(d, case, profile)
        buf = randn(*shape, w, dtype=dtype) if fill is None else torch.full(
            (*shape, w), fill, device=dev, dtype=dtype)
        return buf[..., :d]

    q = (heads_first((B, Hq, Lq), Dk, case.q_dtype) if case.q_transposed
         else rows_view((B, Lq, Hq), Dk, case.q_dtype))

    def cache(d):
        if not case.kv_view:
            return rows_view((B, Lk, Hkv), d, case.dtype)
        # a view of a larger cache: other sequences, later positions, other heads around it
        extra = 16 if profile.aligned else 3
        buf = rows_view((B + 1, Lk + extra, Hkv + 2), d, case.dtype)
        return buf[1:, extra // 2:extra // 2 + Lk, 1:1 + Hkv]

    k, v = cache(Dk), cache(Dv)
    nan = float("nan")
    out = (heads_first((B, Hq, Lq), Dv, case.q_dtype, fill=nan) if case.out_transposed
           else rows_view((B, Lq, Hq), Dv, case.q_dtype, fill=nan))
    f = case.features
    kw = dict(causal="causal" in f, window=case.window, softcap=case.softcap, scale=case.scale)
    if "sinks" in f:
        kw["sinks"] = randn(Hq, dtype=_F32) * 2
    if "alibi" in f:
        kw["alibi_slopes"] = skattn.alibi_slopes(Hq, case.max_bias).to(dev)
    if "mask" in f:
        kw["mask"] = _mask(case, profile, randn)
    return q, k, v, kw, out


def _mask(case: Case, profile: Profile, randn):
    B, Lq, Lk = case.batch, case.q_len, case.kv_len
    w = _width(Lk, case, profile)
    shape = {"full": (B, Lq), "one": (1, Lq), "batch0": (1, Lq), "row0": (B, 1)}[case.mask_kind]
    m = randn(*shape, w, dtype=_F32)
    hidden = randn(*shape, w, dtype=_F32) > 0.8          # about 20% of the keys
    m = m.masked_fill(hidden, NEG_INF)
    if case.seed % 3 == 0:
        m[0, -1] = NEG_INF           # a row that sees no key: output 0, lse -inf
    m = m.to(case.mask_dtype)[..., :Lk]
    if case.mask_kind == "batch0":
        m = m.expand(B, Lq, Lk)      # stride 0 over the batch
    elif case.mask_kind == "row0":
        m = m.expand(B, Lq, Lk)      # stride 0 over the queries
    return m


def check_case(case: Case, profile: Profile) -> None:
    q, k, v, kw, out = tensors(case, profile)
    before = [x.clone() for x in (q, k, v)] if profile.device == "cpu" else None
    return_lse = "return_lse" in case.features
    res = skattn.attention(q, k, v, plan=case.plan, out=out, return_lse=return_lse, **kw)
    out, lse = res if return_lse else (res, None)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    where = (f"{case.plan.policy} N={case.plan.programs} fixup={case.plan.fixup}, "
             f"features {sorted(case.features)}")
    assert not torch.isnan(out).any(), f"unwritten or NaN output ({where})"
    if before is not None:
        assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), "an input was modified"
    tol, row_tol = bounds(q, k, v, causal=kw["causal"], ref=ref)
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.2e} ({where})"
    rows = row_rel_err(out, ref)
    worst = rows.max().item()
    assert worst <= row_tol, (f"row {divmod_rows(rows.argmax().item(), rows.shape)}: error "
                              f"{worst:.2e} > {row_tol:.2e} ({where})")
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), f"lse -inf rows differ ({where})"
        if finite.any():
            diff = (lse[finite].double() - ref_lse[finite]).abs().max().item()
            assert diff <= 20 * tol, f"lse error {diff:.2e} > {20 * tol:.2e} ({where})"


def divmod_rows(flat: int, shape) -> tuple[int, ...]:
    """(b, i, h) of a flat row index."""
    idx = []
    for n in reversed(shape):
        flat, r = divmod(flat, n)
        idx.append(r)
    return tuple(reversed(idx))


def _run(profile: Profile, examples: int, shard: int = 0, shards: int = 1) -> int:
    """Run `examples` cases of the profile (its families shard::shards) from a fixed seed per
    shard, so that a run is reproducible; returns the count."""
    if profile.families:
        profile = Profile(**{**profile.__dict__, "families": profile.families[shard::shards]})
    seen: dict = {}
    count = [0]

    @seed(1000 + shard)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(case=cases(profile, seen))
    def fuzz(case):
        count[0] += 1
        check_case(case, profile)

    fuzz()
    return count[0]


# -- the interpreter profile (CI): two shards so that both xdist workers take one
INTERPRETER_EXAMPLES = 60


@pytest.mark.interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")
@pytest.mark.parametrize("shard", [0, 1])
def test_fuzz_interpreter(shard):
    n = _run(INTERPRETER, INTERPRETER_EXAMPLES, shard)
    assert n >= INTERPRETER_EXAMPLES, n


# -- the GPU profile: SKATTN_FUZZ_EXAMPLES cases (2,000 by default) in 4 shards of families
# (parallel under pytest-xdist); SKATTN_FUZZ_CONFIGS kernel configurations per family and
# fixup kind (1 by default: about 50 compiled main kernels in all)
GPU_SHARDS = 4
_GPU_TOTAL = [0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shard", range(GPU_SHARDS))
def test_fuzz_gpu(shard):
    total = int(os.environ.get("SKATTN_FUZZ_EXAMPLES", "2000"))
    examples = math.ceil(total / GPU_SHARDS)
    profile = Profile(**{**GPU.__dict__,
                         "configs_per_kind": int(os.environ.get("SKATTN_FUZZ_CONFIGS", "1"))})
    n = _run(profile, examples, shard, GPU_SHARDS)
    _GPU_TOTAL[0] += n
    print(f"\nfuzz gpu: shard {shard + 1}/{GPU_SHARDS} passed {n} cases; this process: "
          f"{_GPU_TOTAL[0]} cases, {compiled_kernels()} compiled kernel configurations")
    assert n >= examples, f"only {n} of {examples} cases ran"


def compiled_kernels() -> int:
    """Kernel configurations Triton holds for skattn's kernels in this process."""
    from skattn.kernels.attention import attention_kernel
    from skattn.kernels.fixup import general_fixup_kernel, uniform_fixup_kernel

    n = 0
    for fn in (attention_kernel, uniform_fixup_kernel, general_fixup_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            n += len(caches[0])
    return n
