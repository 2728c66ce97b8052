"""`torch.ops.skattn.attention`: skattn's attention as a torch custom op, for torch.compile.

`skattn.attention` stays the eager entry point (no dispatcher on its host path); this op
wraps the same kernel so that `torch.compile(fullgraph=True)` traces it without a graph
break (a fake kernel gives the output's shape) and CUDA graphs (mode="reduce-overhead")
capture it. The op plans with a named policy, cached per shape like `skattn.attention`, and
a repeat call replays its signature's recipe (`skattn.recipe`) with a workspace of its own.

Quantized K/V (docs/quant.md) pass as tensors: FP8 K/V with `k_scale`, `v_scale` as
`skattn.attention` takes them, and a q8_0 cache as its int8 values in `k`/`v` with its f16
block scales in `k_scale`/`v_scale` (`attention` below unpacks a `skattn.quant.Q8_0`); a
q4_0 cache likewise, as its packed uint8 values (`skattn.quant.Q4_0`).
"""
from __future__ import annotations

from functools import lru_cache
from numbers import Real

import torch

from skattn import api, buffers, checks, launch, quant
from skattn import policy as policies
from skattn.device import hardware, shared_memory_limit
from skattn.planner import plan as make_plan
from skattn.recipe import Recipe

__all__ = ["attention", "plan_for", "attention_with_kvcache", "attention_varlen"]

DEFAULT_POLICY = "auto"


@lru_cache(maxsize=512)
def _cached_plan(B, Lq, Lk, Hq, Hkv, Dk, Dv, dtype, causal, window, device, policy, has_mask):
    sms, _ = hardware(device)  # no occupancy named: as `skattn.attention` plans
    return make_plan(batch=B, q_len=Lq, kv_len=Lk, q_heads=Hq, kv_heads=Hkv, head_dim=Dk,
                     head_dim_v=Dv, dtype=dtype, causal=causal, window=window, sms=sms,
                     policy=policy, has_mask=has_mask,
                     smem_limit=shared_memory_limit(device))


def plan_for(q, k, v, *, causal=False, window=None, policy=DEFAULT_POLICY, has_mask=False):
    """The plan the op runs for these inputs: `skattn.plan(..., policy=policy)` for the
    current GPU (the interpreter's pretend grid on a CPU), cached per shape and policy;
    `has_mask`: the call passes a mask (its tile takes shared memory). k and v may be
    float8_e4m3fn tensors or `skattn.quant.Q8_0`, `Q4_0` caches (the plan is made for their
    form)."""
    B, Lq, Hq, Dk = q.shape
    try:
        return _cached_plan(B, Lq, k.shape[1], Hq, k.shape[2], Dk, v.shape[3], quant.kv_dtype(k),
                            bool(causal), window, q.device, policy, bool(has_mask))
    except ValueError:  # name the tensor at fault (e.g. an f32 k) rather than the planner's field
        if not quant.is_quantized(k):  # (quantized K/V were checked with their scales)
            checks.attention_args(q, k, v, causal=causal, window=window)
        raise


def _check_policy(policy) -> None:
    known = (*policies.POLICIES, *getattr(policies, "POLICY_ALIASES", {}))
    if policy not in known:
        raise ValueError(f"policy must be one of {known}, got {policy!r}")


def _kv_forms(k, v, k_scale, v_scale):
    """The op's K/V as `skattn.attention` takes them: int8 values whose scale is a float16
    tensor are a q8_0 cache (`Q8_0(values, block scales)`), uint8 values with them a q4_0
    cache (`Q4_0(packed values, block scales)`); a Q8_0 or Q4_0 holds its own scales."""
    if k_scale is None and v_scale is None:  # 16-bit K/V (or block forms): as they are
        return k, v, None, None
    out = []
    for x, s in ((k, k_scale), (v, v_scale)):
        if (isinstance(x, torch.Tensor) and x.dtype in _FORMS and isinstance(s, torch.Tensor)
                and s.dtype == torch.float16):
            x, s = _FORMS[x.dtype](x, s), None
        out += [x, s]
    return out[0], out[2], out[1], out[3]


_FORMS = {torch.int8: quant.Q8_0, torch.uint8: quant.Q4_0}


# signatures of op calls whose arguments passed the checks (as `skattn.api` keeps them for
# `skattn.attention`): a repeat call with the same shapes, strides, dtypes, devices and options
# is not checked again; per policy, the signature's recipe (`skattn.recipe`: its plan and
# launches, replayed as `skattn.attention` replays them)
_CHECKED: dict = {}
_RECIPES: dict = {}


def _signature(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, k_scale,
               v_scale):
    return api._signature(q, k, v, scale, causal, window, mask, sinks, softcap, alibi_slopes,
                          False, None, None, k_scale, v_scale)


def _check(key, q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, k_scale,
           v_scale):
    """(k, v) in the forms `skattn.attention` takes and the call's signature `key` (None where
    it cannot be kept), after the checks where the signature is new."""
    k, v, k_scale, v_scale = _kv_forms(k, v, k_scale, v_scale)
    try:
        seen = key in _CHECKED
    except TypeError:  # unhashable options: the checks name them
        key, seen = None, False
    if not seen:
        checks.attention_args(q, k, v, scale=scale, causal=causal, window=window, mask=mask,
                              sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                              k_scale=k_scale, v_scale=v_scale)
        if key is not None:
            api.remember(_CHECKED, key, None)
    return k, v, key


def _recipe(key, policy, q, kf, vf, causal, window, mask) -> Recipe:
    """The recipe of a checked call for `policy` (kept under its signature where it has one)."""
    rec = _RECIPES.get((key, policy)) if key is not None else None
    if rec is None:
        p = plan_for(q, kf, vf, causal=causal, window=window, policy=policy,
                     has_mask=mask is not None)
        rec = Recipe(launch.bind(p, q.device), p)
        if key is not None:
            api.remember(_RECIPES, (key, policy), rec)
    return rec


# The op is registered through the dispatcher's own API (`torch.library.Library`) rather than
# `torch.library.custom_op`, whose Python layers (an autograd wrapper that redispatches, a
# dynamo guard, alias checks of the outputs) took about half of a call's host time: the
# kernel is registered for every backend and a fake kernel for tracing. There is no autograd
# kernel: the dispatcher's own autograd fallback (C++) passes the call to the kernel, whose
# checks refuse inputs that require grad while grad mode is on, as `skattn.attention` does
# (a Python autograd kernel cost ~4 µs a call on a 2-core CPU).
_LIB = torch.library.Library("skattn", "DEF")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? sinks, "
            "Tensor? alibi_slopes, float? scale, bool causal, SymInt? window, float softcap, "
            "str policy, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor")


def _attention_kernel(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, policy,
                      k_scale=None, v_scale=None):
    # a signature with a recipe passed the checks when the recipe was made
    key = _signature(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, k_scale,
                     v_scale)
    try:
        rec = _RECIPES.get((key, policy))
    except TypeError:  # unhashable options: the checks name them
        rec = None
    if rec is None:
        kf, vf, key = _check(key, q, k, v, mask, sinks, alibi_slopes, scale, causal, window,
                             softcap, k_scale, v_scale)
        rec = _recipe(key, policy, q, kf, vf, causal, window, mask)
    if rec.out_like_q:  # (the cheaper allocation, as `skattn.attention` makes it)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:  # v's logical Dv (a q4_0 v packs two values a byte)
        B, Lq, Hq, _ = q.shape
        out = q.new_empty(B, Lq, Hq, rec.plan.head_dim_v)
    if k.dtype in quant.FP8_DTYPES:  # scales [] / [1] / [Hkv] as the kernel reads them: [1] / [Hkv]
        k_scale, v_scale = quant.scale_tensor(k_scale, None), quant.scale_tensor(v_scale, None)
    # a workspace of this call alone: CUDA graphs of torch.compile own what the op allocates
    own = buffers.scratch(rec.bound.layout, q.device)
    rec.run(q, k, v, out, None, scale, mask, sinks, softcap, alibi_slopes, own, k_scale, v_scale)
    return out


def _attention_fake(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, policy,
                    k_scale=None, v_scale=None):
    # the same checks as the real kernel, so bad input fails while tracing, not at run time
    window = traced_int(window)
    key = _signature(q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap, k_scale,
                     v_scale)
    _, vf, _ = _check(key, q, k, v, mask, sinks, alibi_slopes, scale, causal, window, softcap,
                      k_scale, v_scale)
    _check_policy(policy)
    B, Lq, Hq, _ = q.shape
    return q.new_empty(B, Lq, Hq, vf.shape[3])


# every backend (the checks name a device the kernels do not run on); meta tensors and
# tracing take the fake kernel
_LIB.impl("attention", _attention_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("skattn::attention", _attention_fake, lib=_LIB)


def _scale_arg(name, s, device):
    """A float scale as a [1] f32 tensor (checked as `skattn.attention` checks it); tensors
    and None pass through (the op checks them)."""
    if isinstance(s, Real) and not isinstance(s, bool):
        if not (float(s) > 0 and float(s) < float("inf")):
            raise ValueError(f"{name} must be positive and finite, got {s}")
        return quant.scale_tensor(s, device)
    if s is not None and not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor or a float, got {type(s).__name__}")
    return s


def attention(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
              softcap=0.0, alibi_slopes=None, policy=DEFAULT_POLICY, k_scale=None, v_scale=None):
    """`skattn.attention` through the custom op `torch.ops.skattn.attention`.

    Use this inside code that `torch.compile` traces (it is one node in the graph, no graph
    break) or that a CUDA graph captures; in eager code `skattn.attention` costs less host
    time. Inference only, as `skattn.attention`: an input that requires grad while grad
    mode is on is refused (ValueError) before any launch.

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk], f16, bf16 or f32 (last dim contiguous); f16 or bf16 with
        quantized K/V, which are dequantized to q's dtype
    k : Tensor [B, Lk, Hkv, Dk], f16, bf16 or float8_e4m3fn (with k_scale), or a
        `skattn.quant.Q8_0` or `Q4_0` (Dk a multiple of 32); may be a strided view of a
        larger cache
    v : Tensor [B, Lk, Hkv, Dv], k's dtype (or k's block form when k is one)
    scale : float, optional
        Score scale, default Dk ** -0.5.
    causal : bool
        Bottom-right causal mask: query i sits at position Lk - Lq + i.
    window : int, optional
        Sliding window: keys with q_pos - window < k_pos <= q_pos (implies causal).
    mask : Tensor [B or 1, Lq, Lk], optional
        Additive mask (f16, bf16 or f32), -inf hides a key; broadcast over heads.
    sinks : Tensor [Hq] f32, optional
        One extra logit per head in the softmax denominator.
    softcap : float
        When > 0, scores become softcap * tanh(scores / softcap).
    alibi_slopes : Tensor [Hq] f32, optional
        Bias -slope * |q_pos - k_pos|.
    policy : str
        The planner's policy for the program count ("auto", "llamacpp", "llamacpp-before",
        ...; see `skattn.plan`).
    k_scale, v_scale : Tensor [] / [1] / [Hkv] float32, or float; float8_e4m3fn K/V only
        K/V's value is `x.float() * scale` (see `skattn.attention`). Tensors are read on the
        device, so a captured graph follows new values written into them; a float becomes a
        [1] tensor per call (and a constant of a compiled graph).

    Returns
    -------
    Tensor [B, Lq, Hq, Dv], q's dtype

    Notes
    -----
    At the op itself, `torch.ops.skattn.attention(q, k, v, mask, sinks, alibi_slopes, scale,
    causal, window, softcap, policy, k_scale, v_scale)`, a q8_0 cache is two tensors: its
    int8 values as `k`/`v` and its float16 block scales `[B, Lk, Hkv, D / 32]` as
    `k_scale`/`v_scale` (this function unpacks a Q8_0 so); a q4_0 cache likewise, its packed
    uint8 values `[B, Lk, Hkv, D / 2]` as `k`/`v`.
    """
    k, v, k_scale, v_scale = op_kv(q, k, v, k_scale, v_scale)
    return torch.ops.skattn.attention(q, k, v, mask, sinks, alibi_slopes,
                                      None if scale is None else float(scale), bool(causal),
                                      window, float(softcap), policy, k_scale, v_scale)


def op_kv(q, k, v, k_scale, v_scale) -> tuple:
    """K/V and their scales as the ops take them: a Q8_0 / Q4_0 cache as its values and
    block scales, FP8 scales given as floats as [1] tensors (checked as `skattn.attention`
    checks them)."""
    blocks = quant.BLOCK_FORMS
    if isinstance(k, blocks) and isinstance(v, blocks) and type(k) is type(v):
        if k_scale is not None or v_scale is not None:  # as skattn.attention says it
            quant.check_kv(q, k, v, k_scale, v_scale, kernel=True)
        return k.values, v.values, k.scales, v.scales
    if isinstance(k, blocks) or isinstance(v, blocks):
        quant.check_kv(q, k, v, k_scale, v_scale, kernel=True)  # names the mix-up
    return k, v, _scale_arg("k_scale", k_scale, q.device), _scale_arg("v_scale", v_scale, q.device)


def traced_int(x):
    """A fake kernel's view of an int argument (`window`, `max_seqlen_*`): a symbolic int
    (torch.compile with dynamic shapes) as 1, which passes the checks that ask for a
    positive int, so tracing neither fails on it nor guards on its value (a recompile for
    each); the real kernel checks the value."""
    return x if x is None or isinstance(x, int) else 1


def __getattr__(name):  # the serving ops' wrappers (skattn/ops_serving.py, imported below)
    if name in ("attention_with_kvcache", "attention_varlen"):
        return getattr(ops_serving, name)
    raise AttributeError(f"module 'skattn.ops' has no attribute {name!r}")


# the serving functions' ops register on the same library (skattn/ops_serving.py); a plain
# import, so that either module may be imported first
import skattn.ops_serving as ops_serving  # noqa: E402
