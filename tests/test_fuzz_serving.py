"""Property-based differential test of the serving entry points under TRITON_INTERPRET=1:
`attention_with_kvcache` (dense and paged caches) and `attention_varlen` (packed and paged)
against the float64 reference over random ragged batches, plans and features.

A case draws the lengths (0 and 1 included, one sequence sometimes far longer than the
others), how many query tokens each sequence has, the head counts and sizes, K/V's dtype
(16-bit, FP8 with per-tensor or per-head scales, q8_0 or q4_0 blocks), q's dtype, page size and shared pages,
the features (causal, window, sinks, softcap, ALiBi, scale, lse) and a plan: policy, the
pretend GPU's grid, program count, fixup, block size, tail, tile cost, KV heads in pairs and
the split of a varlen batch into two halves. Every cache position no sequence may read (page
tails, unused pages, a dense cache past the lengths, packed rows past the last sequence)
holds NaN (a block cache: NaN scales), so a read of one shows in the output. The output starts as NaN: rows of q that
belong to no sequence must stay NaN, all others must be written. Some cases also run
through the custom op (`skattn.ops`: the default plan of the case's policy, a workspace of
the call's own), which must give the eager function's bits for that plan. Some run twice on one
workspace and work list, which must give the same bits. Errors are bounded per sequence by
the rule of `tolerance.py` (k x PyTorch's own error on the same inputs + a floor), for the
sequence's output and row by row. Each shard runs from a fixed seed: a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, seed, settings
from hypothesis import strategies as st

import skattn
from skattn import quant, reference_serving, serving
from skattn.reference_serving import _sequence_keys as sequence_keys
from tolerance import bounds, rel_err, row_rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU"),
]

NAN = float("nan")
F16, BF16, F32, FP8 = torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn
BLOCKS = {"q8_0": quant.q8_0, "q4_0": quant.q4_0}   # llama.cpp's block caches
FEATURES = ("causal", "window", "sinks", "softcap", "alibi", "return_lse")
POLICIES = ("auto", "llamacpp", "llamacpp-before", "split")
HARDWARE = ((4, 2), (1, 1), (2, 2), (3, 1), (5, 2))   # a pretend GPU's (SMs, programs an SM)
DIMS = ((16, 16), (32, 32), (64, 64), (32, 16), (80, 80))
EXAMPLES = 40   # a shard's cases


@dataclass(frozen=True)
class Profile:
    """What a run draws from: the interpreter's tiny batches here; the GPU's
    (tests/test_fuzz_serving_gpu.py) serving sizes on the real grid."""
    device: str = "cpu"
    batch: int = 4                    # most sequences
    len_hi: int = 40                  # a sequence's keys, most (a long one: up to 3x)
    q_hi: int = 12                    # a varlen sequence's queries, most
    kv_q_lens: tuple = (1, 1, 2, 3, 5)
    kv_heads: tuple = (1, 2, 2, 4)
    ratios: tuple = (1, 2, 3, 4, 8)
    dims: tuple = DIMS
    block_dims: tuple = ((32, 32), (64, 64), (64, 32))   # q8_0 / q4_0 caches
    page_sizes: tuple = (16, 32, 64)
    hardware: tuple = HARDWARE        # None: the GPU's own grid
    block_n: tuple = (16, 16, 32, 64)  # None: the planner's choice


INTERPRETER = Profile()


@dataclass(frozen=True)
class Case:
    api: str                     # "kvcache" or "varlen"
    paged: bool
    lens_k: tuple[int, ...]
    lens_q: tuple[int, ...]      # kvcache: every sequence's q_len
    kv_heads: int
    ratio: int
    dims: tuple[int, int]
    dtype: torch.dtype | str     # K and V: a torch dtype, or "q8_0" / "q4_0"
    q_dtype: torch.dtype
    per_head_scales: bool        # FP8 K/V: scales per KV head, else per tensor
    page_size: int
    share: int                   # pages of sequence 0 that the others share (paged)
    spare: int                   # dense: positions past the longest sequence; packed: rows
    pad_q: int                   # varlen: rows of q past the last sequence
    features: frozenset
    window: int | None
    softcap: float
    scale: float | None
    max_bias: float
    twice: bool                  # run twice on one workspace and work list
    via_op: bool                 # also through the custom op
    plan: object = field(compare=False)
    seed: int = 0

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.ratio


def _lengths(draw, batch: int, hi: int) -> list[int]:
    small = st.integers(0, 3)
    lens = [draw(st.integers(0, hi) | small) for _ in range(batch)]
    if batch > 1 and draw(st.booleans()):   # one sequence far longer than the others
        lens[draw(st.integers(0, batch - 1))] = draw(st.integers(hi, 3 * hi))
    return lens


def _plan(draw, bounds: dict, varlen: bool, profile: Profile):
    """A serving plan of a drawn policy and grid with some of the optional knobs; a knob the
    plan refuses for these bounds (a ValueError naming it) is dropped."""
    grid = draw(st.sampled_from(profile.hardware))
    base = dict(bounds, policy=draw(st.sampled_from(POLICIES)),
                block_n=draw(st.sampled_from(profile.block_n)))
    if grid is not None:
        base.update(sms=grid[0], occupancy=grid[1])
    knobs = {}
    if base["policy"] != "split" and draw(st.booleans()):
        knobs["fixup"] = draw(st.sampled_from(("general", "fused")))
    if base["policy"] != "split" and draw(st.integers(0, 3)) == 0:
        knobs["programs"] = draw(st.integers(1, 3 * grid[0] * grid[1] if grid else 800))
    if draw(st.integers(0, 4)) == 0:
        knobs["tail"] = draw(st.sampled_from((15, 30)))
    if draw(st.integers(0, 3)) == 0:
        knobs["tile_cost"] = draw(st.sampled_from((0, 3, 5)))
    if draw(st.integers(0, 3)) == 0:
        knobs["head_pairs"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:   # whole prompt tiles on the Hopper kernel (sm_90)
        knobs["tuning"] = skattn.Tuning(prefill="ws")
    if varlen:
        knobs["q_split"] = draw(st.sampled_from(("auto", "auto", None, 1, 2, 4)))
    while True:
        try:
            p = skattn.serving_plan(**base, **knobs)
            break
        except ValueError as e:
            named = [k for k in knobs if k in str(e)]
            if not named:
                raise
            event(f"plan refused {named[0]}")
            del knobs[named[0]]
    event(f"{type(p).__name__} {base['policy']} " + " ".join(sorted(knobs)))
    return p


@st.composite
def cases(draw, profile: Profile = INTERPRETER):
    api = draw(st.sampled_from(("kvcache", "varlen")))
    paged = draw(st.booleans())
    batch = draw(st.integers(1, profile.batch))
    lens_k = _lengths(draw, batch, profile.len_hi)
    if api == "kvcache":
        lens_q = [draw(st.sampled_from(profile.kv_q_lens))] * batch
    else:   # up to each sequence's keys; sometimes more (rows that see no key give 0)
        lens_q = [min(draw(st.integers(0, profile.q_hi)),
                      n + draw(st.sampled_from((0, 0, 0, 2)))) for n in lens_k]
        if sum(lens_q) == 0:
            lens_q[0] = 1
    kv_heads = draw(st.sampled_from(profile.kv_heads))
    ratio = draw(st.sampled_from(profile.ratios))
    dtype = draw(st.sampled_from((F16, BF16, F16, BF16, FP8, "q8_0", "q4_0")))
    quantized = dtype == FP8 or dtype in BLOCKS
    dims = draw(st.sampled_from(profile.block_dims if dtype in BLOCKS else profile.dims))
    q_dtype = draw(st.sampled_from((F16, BF16) if quantized else (dtype, dtype, F32)))
    features = frozenset(f for f in FEATURES if draw(st.booleans()))
    if "window" in features:
        features |= {"causal"}   # a window is bottom-right causal
    page_size = draw(st.sampled_from(profile.page_sizes))
    max_len = max(max(lens_k), 1)
    spare = draw(st.integers(0, 20))
    varlen = api == "varlen"
    bounds = dict(batch=batch, q_heads=kv_heads * ratio, kv_heads=kv_heads, head_dim=dims[0],
                  head_dim_v=dims[1], dtype=dtype, causal="causal" in features,
                  window=(window := draw(st.integers(1, max_len + 8))
                          if "window" in features else None))
    if varlen:
        bounds.update(max_q_len=max(max(lens_q), 1) + draw(st.integers(0, 4)),
                      total_q=sum(lens_q) + (pad_q := draw(st.integers(0, 3))))
    else:
        bounds["q_len"], pad_q = lens_q[0], 0
    if paged:
        max_pages = -(-max_len // page_size) + draw(st.integers(0, 2))
        bounds.update(page_size=page_size, max_pages=max_pages,
                      max_kv_len=max_pages * page_size if not varlen
                      else max_len + draw(st.integers(0, 8)))
    elif varlen:
        bounds.update(max_kv_len=max_len + draw(st.integers(0, 8)),
                      total_k=max(1, sum(lens_k) + spare))
    else:
        bounds["max_kv_len"] = max_len + spare
    plan = _plan(draw, bounds, varlen, profile)
    return Case(api=api, paged=paged, lens_k=tuple(lens_k), lens_q=tuple(lens_q),
                kv_heads=kv_heads, ratio=ratio, dims=dims, dtype=dtype, q_dtype=q_dtype,
                per_head_scales=draw(st.booleans()), page_size=page_size,
                share=draw(st.integers(0, 2)) if paged else 0, spare=spare, pad_q=pad_q,
                features=features, window=window,
                softcap=draw(st.floats(1.0, 50.0)) if "softcap" in features else 0.0,
                scale=draw(st.none() | st.floats(0.02, 0.3)), max_bias=draw(st.floats(0.5, 8.0)),
                twice=draw(st.integers(0, 3)) == 0, via_op=draw(st.integers(0, 3)) == 0,
                plan=plan,
                seed=draw(st.integers(0, 2**31 - 1)))


# -- inputs
def _poison(cache: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """`cache` with NaN at the positions (all dims but the last two) not in `readable`."""
    cache = cache.clone()
    cache[~readable] = NAN
    return cache


def _paged(case: Case, g, hkv, d, dv):
    """k, v [num_pages, page_size, hkv, d] in a random page order, NaN wherever no sequence
    reads, and the block table (unused entries far out of range)."""
    ps, lens = case.page_size, case.lens_k
    plan_pages = case.plan.max_pages if hasattr(case.plan, "max_pages") else None
    max_pages = plan_pages or max(1, max(-(-n // ps) for n in lens))
    need = [-(-n // ps) for n in lens]
    shared = min(case.share, need[0])
    num_pages = need[0] + sum(max(0, n - shared) for n in need[1:]) + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((len(lens), max_pages), 10**6, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(need):
        for j in range(n):
            if b > 0 and j < shared:
                table[b, j] = table[0, j]
            else:
                table[b, j] = perm[nxt]
                nxt += 1
    readable = torch.zeros(num_pages, ps, dtype=torch.bool)
    for b, n in enumerate(lens):
        for t in range(n):
            readable[table[b, t // ps], t % ps] = True
    k = torch.randn(num_pages, ps, hkv, d, generator=g)
    v = torch.randn(num_pages, ps, hkv, dv, generator=g)
    return _poison(k, readable), _poison(v, readable), table


def _contiguous_caches(case: Case, g, hkv, d, dv):
    """Dense [B, Lmax, hkv, d] or packed [total_k, hkv, d] caches, NaN past the lengths."""
    lens = case.lens_k
    if case.api == "kvcache":
        lmax = case.plan.max_kv_len
        readable = torch.arange(lmax)[None, :] < torch.tensor(lens)[:, None]
        shape = (len(lens), lmax)
    else:
        rows = case.plan.total_k if hasattr(case.plan, "total_k") else sum(lens) + case.spare
        readable = torch.arange(max(1, rows)) < sum(lens)
        shape = (max(1, rows),)
    k = torch.randn(*shape, hkv, d, generator=g)
    v = torch.randn(*shape, hkv, dv, generator=g)
    return _poison(k, readable), _poison(v, readable)


def _quantize(case: Case, x: torch.Tensor, scale: float):
    """x (times `scale`) in K/V's dtype, and FP8's float32 scale per tensor or per KV head;
    NaN positions stay NaN (a block cache's: their scales)."""
    if case.dtype in BLOCKS:
        form = BLOCKS[case.dtype](torch.nan_to_num(x, nan=0.0).mul(scale).half())
        form.scales[torch.isnan(x).any(-1)] = NAN
        return form, None
    if case.dtype != FP8:
        x = x.to(case.dtype)
        return x, None
    finite = torch.nan_to_num(x, nan=0.0) * scale
    flat = finite.reshape(1, -1, *x.shape[-2:])
    xq, s = quant.fp8(flat, per_head=case.per_head_scales)
    xq = xq.reshape(x.shape)
    xq.view(torch.uint8)[torch.isnan(x)] = 0x7F   # e4m3fn's NaN
    return xq, s


def _to(x, device):
    """A tensor or a block cache on `device`."""
    if isinstance(x, quant.BLOCK_FORMS):
        return type(x)(x.values.to(device), x.scales.to(device))
    return x if x is None else x.to(device)


def tensors(case: Case, device="cpu"):
    """q, k, v, the call's keyword arguments and a NaN-poisoned out, made on the CPU from
    the case's seed and moved to `device`."""
    g = torch.Generator().manual_seed(case.seed)
    hkv, hq, (d, dv) = case.kv_heads, case.q_heads, case.dims
    if case.paged:
        k, v, table = _paged(case, g, hkv, d, dv)
    else:
        (k, v), table = _contiguous_caches(case, g, hkv, d, dv), None
    k, k_scale = _quantize(case, k, 3.0)
    v, v_scale = _quantize(case, v, 0.5)
    if case.api == "kvcache":
        q = torch.randn(len(case.lens_k), case.lens_q[0], hq, d, generator=g).to(case.q_dtype)
        out = torch.full((*q.shape[:3], dv), NAN, dtype=case.q_dtype)
    else:
        q = torch.randn(sum(case.lens_q) + case.pad_q, hq, d, generator=g).to(case.q_dtype)
        out = torch.full((q.shape[0], hq, dv), NAN, dtype=case.q_dtype)
    f = case.features
    kw = dict(causal="causal" in f, window=case.window, softcap=case.softcap, scale=case.scale,
              return_lse="return_lse" in f, block_table=table)
    if "sinks" in f:
        kw["sinks"] = torch.randn(hq, generator=g) * 2
    if "alibi" in f:
        kw["alibi_slopes"] = skattn.alibi_slopes(hq, case.max_bias)
    if case.dtype == FP8:
        kw.update(k_scale=k_scale, v_scale=v_scale)
    kw = {name: _to(x, device) if isinstance(x, torch.Tensor) else x for name, x in kw.items()}
    return _to(q, device), _to(k, device), _to(v, device), kw, _to(out, device)


def _offsets(lens, device="cpu") -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def call(case: Case, q, k, v, kw, out, fn=skattn):
    """The case's entry point of `fn` (skattn or the reference), with its lengths."""
    kw = dict(kw, plan=case.plan)
    if fn is skattn:
        kw["out"] = out
    else:
        kw.pop("workspace", None), kw.pop("work_list", None)
    if case.api == "kvcache":
        return fn.attention_with_kvcache(q, k, v, cache_seqlens=torch.tensor(
            case.lens_k, dtype=torch.int32, device=q.device), **kw)
    p = case.plan
    max_q = p.max_q_len if hasattr(p, "max_q_len") else max(case.lens_q)
    return fn.attention_varlen(q, k, v, _offsets(case.lens_q, q.device),
                               _offsets(case.lens_k, q.device), max_q,
                               p.max_kv_len, **kw)


# -- the check
def _truncated(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 as the kernels do, as f32: under Triton 3.6's interpreter toward
    zero, on a GPU to nearest."""
    if x.device.type != "cpu":
        return x.float().to(BF16).float()
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _as_interpreted(case: Case, q, k, v, kw):
    """The float64 answer (out, lse) on the roundings made around the kernel (`_truncated`:
    the interpreter's toward zero, the GPU's to nearest): an f32 q meeting bf16 K/V rounded
    to bf16, a block cache's values times their scales rounded to a bf16 q's dtype, and a
    bf16 output rounded. Their error, and under the interpreter one bf16 step for the
    probabilities (truncated before P.V: up to 2**-7 of a row with one visible key), bound
    what rounding costs where PyTorch's run on plain attention has no error: one visible key
    with a sink, a softcap, a scale; shrunk keys shift lse by a fraction of the largest
    score."""
    qi = _truncated(q) if case.dtype == BF16 and case.q_dtype == F32 else q
    if case.dtype in BLOCKS and case.q_dtype == BF16:
        k, v = (_truncated(x.dequantize(torch.float32)).to(BF16) for x in (k, v))
    ref, lse = call(case, qi, k, v, dict(kw, return_lse=True), None, fn=reference_serving)
    return (_truncated(ref).double() if case.q_dtype == BF16 else ref), lse


def _sequences(case: Case, q, k, v, kw):
    """Per sequence with queries and keys: (its rows of the output, q [1, Lq, Hq, D] and its
    K/V [1, Lk, Hkv, D] in q's dtype as the kernel multiplies them)."""
    q_rows = _offsets(case.lens_q).tolist() if case.api == "varlen" else None
    k_start = _offsets(case.lens_k).tolist()
    dt = case.dtype if isinstance(case.dtype, torch.dtype) and case.dtype != FP8 else case.q_dtype
    for b, n in enumerate(case.lens_k):
        where = dict(b=b, block_table=kw["block_table"],
                     start=k_start[b] if case.api == "varlen" and not case.paged else 0)
        ks = sequence_keys(k, kw.get("k_scale"), n, **where).to(dt)
        vs = sequence_keys(v, kw.get("v_scale"), n, **where).to(dt)
        if case.api == "kvcache":
            rows, qb = slice(b, b + 1), q[b:b + 1]
        else:
            rows = slice(q_rows[b], q_rows[b + 1])
            qb = q[rows][None]
        if qb.numel() and n:
            yield rows, qb, ks[None], vs[None]


def check_case(case: Case, device="cpu") -> None:
    q, k, v, kw, out = tensors(case, device)
    p = case.plan
    if case.twice:   # a workspace of the caller's, reused below
        kw["workspace"] = skattn.serving.workspace(p, q.device)
    res = call(case, q, k, v, kw, out)
    got, lse = res if kw["return_lse"] else (res, None)
    ref, ref_lse = call(case, q, k, v, dict(kw, return_lse=True), None,
                        fn=reference_serving)
    rounded, rounded_lse = _as_interpreted(case, q, k, v, kw)
    where = f"{type(p).__name__} {case.api} paged={case.paged} features {sorted(case.features)}"
    if case.twice:   # again on that workspace, with a work list of this batch: the same bits
        again = torch.full_like(out, NAN)
        dev = q.device
        lens = (dict(cache_seqlens=torch.tensor(case.lens_k, dtype=torch.int32, device=dev))
                if case.api == "kvcache" else
                dict(cu_seqlens_q=_offsets(case.lens_q, dev),
                     cu_seqlens_k=_offsets(case.lens_k, dev)))
        wl = skattn.serving.work_list(p, **lens)
        res2 = call(case, q, k, v, dict(kw, work_list=wl), again)
        got2 = res2[0] if kw["return_lse"] else res2
        same = torch.equal(got2.nan_to_num(7.0), got.nan_to_num(7.0))
        assert same, f"a second call differs ({where})"
    if case.via_op:
        _check_op(case, q, k, v, kw, where)
    n_q = sum(case.lens_q)
    if case.api == "varlen":   # rows of no sequence stay as they were (NaN)
        assert torch.isnan(got[n_q:]).all(), f"rows past the sequences written ({where})"
        got, ref = got[:n_q], ref[:n_q]
        if lse is not None:
            lse, ref_lse, rounded_lse = lse[:, :n_q], ref_lse[:, :n_q], rounded_lse[:, :n_q]
    assert not torch.isnan(got).any(), f"an output row unwritten or NaN ({where})"
    starts = _offsets(case.lens_q).tolist()
    for b, n in enumerate(case.lens_k):   # a sequence without keys: its rows give 0
        rows = slice(b, b + 1) if case.api == "kvcache" else slice(starts[b], starts[b + 1])
        assert n or not got[rows].any(), f"sequence {b} has no key, its rows are not 0 ({where})"
    for rows, qb, kb, vb in _sequences(case, q, k, v, kw):
        o, r, rr = (x[rows] for x in (got, ref, rounded))
        o, r, rr = (x.reshape(1, *x.shape[-3:]) for x in (o, r, rr))
        tol, row_tol = bounds(qb, kb, vb, causal=kw["causal"], ref=r)
        tol = max(tol, 3 * rel_err(rr, r) + 2e-3)
        row_tol = max(row_tol, 3 * row_rel_err(rr, r).max().item() + 4e-3
                      + (2**-7 if BF16 in (case.dtype, case.q_dtype) and device == "cpu"
                         else 0.0))
        err = rel_err(o, r)
        assert err <= tol, f"{rows}: relative error {err:.2e} > {tol:.2e} ({where})"
        worst = row_rel_err(o, r).max().item()
        assert worst <= row_tol, f"{rows}: a row's error {worst:.2e} > {row_tol:.2e} ({where})"
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), f"lse -inf rows differ ({where})"
        if finite.any():
            diff = (lse[finite].double() - ref_lse[finite]).abs().max().item()
            shift = (rounded_lse[finite] - ref_lse[finite]).abs().max().item()
            assert diff <= 3 * shift + 5e-2, f"lse error {diff:.2e} ({where})"


def _check_op(case: Case, q, k, v, kw, where) -> None:
    """The custom op against the eager function on the same default plan (the case's policy;
    the eager call on a zeroed pool, the op on a workspace of its own): the same bits, rows of
    no sequence 0."""
    import skattn.ops

    policy = case.plan.policy
    opts = dict(causal=kw["causal"], window=kw["window"], sinks=kw.get("sinks"),
                softcap=kw["softcap"], alibi_slopes=kw.get("alibi_slopes"), scale=kw["scale"],
                k_scale=kw.get("k_scale"), v_scale=kw.get("v_scale"))
    table = kw["block_table"]
    if case.api == "kvcache":
        lens = torch.tensor(case.lens_k, dtype=torch.int32, device=q.device)
        got = skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,
                                                policy=policy, **opts)
        want = serving._kvcache(q, k, v, lens, table, opts["causal"], opts["window"],
                                opts["sinks"], opts["softcap"], opts["alibi_slopes"],
                                opts["scale"], False, None, None, None, None, opts["k_scale"],
                                opts["v_scale"], policy=policy)
        assert torch.equal(got, want), f"the op differs from the eager call ({where})"
        return
    cu_q, cu_k = _offsets(case.lens_q, q.device), _offsets(case.lens_k, q.device)
    n_q = sum(case.lens_q)
    max_q, max_k = case.plan.max_q_len, case.plan.max_kv_len
    got = skattn.ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, block_table=table,
                                      policy=policy, **opts)
    want = serving._varlen(q, k, v, cu_q, cu_k, max_q, max_k, table, opts["causal"],
                           opts["window"], opts["sinks"], opts["softcap"], opts["alibi_slopes"],
                           opts["scale"], False, None, None, None, None, opts["k_scale"],
                           opts["v_scale"], policy=policy)
    assert torch.equal(got[:n_q], want[:n_q]), f"the op differs from the eager call ({where})"
    assert not got[n_q:].any(), f"the op's rows of no sequence are not 0 ({where})"


def _run(examples: int, shard: int, profile: Profile = INTERPRETER) -> int:
    count = [0]

    @seed(2000 + shard)
    @settings(max_examples=examples, deadline=None, database=None, report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.generate),  # no shrinking: cases are small, runs slow
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(case=cases(profile))
    def fuzz(case):
        count[0] += 1
        check_case(case, profile.device)

    fuzz()
    return count[0]


@pytest.mark.parametrize("shard", [0, 1])
def test_fuzz_serving(shard):
    n = _run(EXAMPLES, shard)
    assert n >= EXAMPLES, n
