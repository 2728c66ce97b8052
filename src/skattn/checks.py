"""Input checks of `skattn.attention`, the float64 reference and the plan executor: one rule set.

Every check raises a TypeError (wrong kind of value) or a ValueError (wrong value) that names
the argument, before anything is launched. The kernels add their own rules (dtypes, a
contiguous last dimension, forward only, CUDA or the interpreter, `out`); the references
accept any float dtype and layout, and bool masks.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from skattn import quant
from skattn.device import interpreting

Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KV_DTYPES = (torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WINDOW_NEEDS_CAUSAL = ("window={window} keeps keys with q_pos - window < k_pos <= q_pos, a "
                       "bottom-right causal sliding window: pass causal=True with it")


def causal_window(causal, window) -> None:
    """`causal` is a bool; `window` is None or a positive int and comes with causal=True."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not causal:
        raise ValueError(WINDOW_NEEDS_CAUSAL.format(window=window))


def _number(name: str, x, *, minimum=None) -> None:
    if type(x) is not float and (isinstance(x, bool) or not isinstance(x, Real)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def _tensor(name: str, x, ndim: int, dtypes) -> None:
    """A tensor of `ndim` dimensions; `dtypes` a tuple, or None for any floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is None:
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    elif x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def _overlaps(x: torch.Tensor) -> bool:
    """Whether two elements of x share memory (a stride 0, or strides that interleave)."""
    if x.is_contiguous():
        return False
    reach = 0  # the largest offset reached by the dimensions seen so far
    for stride, size in sorted((abs(st), sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def attention_args(q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None,
                   softcap=0.0, alibi_slopes=None, return_lse=False, plan=None, out=None,
                   kernel: bool = True, k_scale=None, v_scale=None) -> None:
    """Check the arguments of an attention call (see `skattn.attention`).

    Parameters
    ----------
    q, k, v, scale, causal, window, mask, sinks, softcap, alibi_slopes, return_lse, plan, out,
    k_scale, v_scale
        As in `skattn.attention` (quantized K/V: `skattn.quant.check_kv`).
    kernel : bool
        True: the Triton kernels' rules too (dtypes, last dimension contiguous, no autograd,
        CUDA tensors or the interpreter, a plan made for these shapes, `out`). False: the
        float64 references' (any float dtype and layout, bool masks; `plan` only typed).

    Raises
    ------
    TypeError, ValueError
        Naming the first argument that breaks a rule.
    """
    floats = None if not kernel else Q_DTYPES
    _tensor("q", q, 4, floats)
    kv_name = None
    kv_shapes = None  # a block form's logical [B, Lk, Hkv, D] (a Q4_0 packs two values a byte)
    if k_scale is not None or v_scale is not None or _byte_kv(k) or _byte_kv(v):
        # quantized K/V: their own rules, then the generic ones on the tensors the kernel reads
        kv_name = quant.check_kv(q, k, v, k_scale, v_scale, kernel=kernel)
        if kernel:
            scales_without_grad(k, v, k_scale, v_scale)
        if kv_name is not None:
            kv_shapes = k.shape, v.shape
            k, v = quant.kernel_data(k), quant.kernel_data(v)
    kv_dtypes = KV_DTYPES if kv_name is None else (k.dtype,)
    _tensor("k", k, 4, None if not kernel and kv_name is None else kv_dtypes)
    _tensor("v", v, 4, None if not kernel and kv_name is None else kv_dtypes)
    k_shape, v_shape = kv_shapes or (k.shape, v.shape)
    (B, Lq, Hq, Dk), (Bk, Lk, Hkv, Dk2), Dv = q.shape, k_shape, v_shape[3]
    if kernel and v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {B}, k {Bk}, v {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v's [Lk, Hkv] {tuple(v.shape[1:3])} differ from k's {(Lk, Hkv)}")
    if Dk2 != Dk:
        raise ValueError(f"head size of q ({Dk}) and k ({Dk2}) differ")
    if min(B, Lq, Hq, Dk, Lk, Hkv, Dv) < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if mask is not None:
        if kernel or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            _tensor("mask", mask, 3, MASK_DTYPES if kernel else None)
        if mask.dim() != 3 or mask.shape[0] not in (1, B) or mask.shape[1:] != (Lq, Lk):
            first = "1" if B == 1 else f"{B} or 1"
            raise ValueError(f"mask must have shape [{first}, {Lq}, {Lk}], got {tuple(mask.shape)}")
    per_head(Hq, kernel, sinks=sinks, alibi_slopes=alibi_slopes)
    for name, x in (("k", k), ("v", v), ("mask", mask), ("sinks", sinks),
                    ("alibi_slopes", alibi_slopes)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    options(scale=scale, softcap=softcap, causal=causal, window=window, return_lse=return_lse)
    if plan is not None:
        from skattn.planner import Plan  # the planner imports this module

        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a skattn.Plan (from skattn.plan), got "
                            f"{type(plan).__name__}")
    if kernel:
        _kernel_args(q, k, v, mask, sinks, alibi_slopes, out, Dv, k_scale, v_scale)
        if plan is not None:
            plan_matches(plan, q, k, v, causal=causal, window=window, kv_name=kv_name,
                         head_dim_v=Dv)
            plan_mask(plan, mask, q.device)
            if getattr(plan, "dequant", None) is not None:  # the plan that runs
                plan_mask(plan.dequant, mask, q.device)


def _byte_kv(x) -> bool:
    """K or V in a 1-byte form (fp8, int8, a Q8_0 or Q4_0): `skattn.quant`'s rules decide."""
    return (isinstance(x, quant.BLOCK_FORMS)
            or (isinstance(x, torch.Tensor) and x.element_size() == 1))


def per_head(hq: int, kernel: bool, **vectors) -> None:
    """Per-head vectors (sinks, alibi_slopes): None or [Hq] tensors, f32 for the kernels."""
    for name, x in vectors.items():
        if x is not None:
            _tensor(name, x, 1, (torch.float32,) if kernel else None)
            if x.shape[0] != hq:
                raise ValueError(f"{name} must have shape [{hq}], got {tuple(x.shape)}")


def options(*, scale, softcap, causal, window, return_lse) -> None:
    """The scalar options every entry point takes."""
    if scale is not None:
        _number("scale", scale)
    _number("softcap", softcap, minimum=0)
    causal_window(causal, window)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")


def kernel_tensors(tensors, device) -> None:
    """The kernels' rules for (name, tensor or None) pairs on `device`: contiguous last
    dimension, no autograd, and CPU tensors only under the interpreter."""
    grad = torch.is_grad_enabled()
    for name, x in tensors:
        if x is None:
            continue
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension "
                             f"(stride {x.stride(-1)})")
        if grad and x.requires_grad:
            raise ValueError(f"{name} requires grad: skattn's kernels are forward-only; call "
                             f"under torch.no_grad() or detach the inputs")
    if device.type == "cpu" and not interpreting():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter); "
                         "move the tensors to a CUDA device")


def scales_without_grad(k, v, k_scale, v_scale) -> None:
    """Quantized K/V's scales (fp8 `k_scale`, `v_scale`; a block form's `scales`) do not
    require grad while grad mode is on, as `kernel_tensors` asks of the other inputs."""
    if not torch.is_grad_enabled():
        return
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale),
                    ("k.scales", getattr(k, "scales", None)),
                    ("v.scales", getattr(v, "scales", None))):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(f"{name} requires grad: skattn's kernels are forward-only; call "
                             f"under torch.no_grad() or detach the inputs")


def _reach(x: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that x reaches: [first, last + 1)."""
    first = last = x.storage_offset()
    for size, stride in zip(x.shape, x.stride()):
        last += (size - 1) * stride
    return first * x.element_size(), (last + 1) * x.element_size()


def _meet(dims, d: int) -> bool:
    """Whether sum(t_k s_k) = d for integers lo_k <= t_k <= hi_k, dims = [(s, lo, hi)] in
    increasing s: from the largest stride down, the t that the smaller ones can still make
    up (at most a few where strides nest, as a view's do; many: assumed to meet)."""
    if not dims:
        return d == 0
    s, lo, hi = dims[-1]
    reach = sum(st * max(-a, b) for st, a, b in dims[:-1])
    t_lo, t_hi = max(lo, -((reach - d) // s)), min(hi, (d + reach) // s)
    if t_hi - t_lo > 8:
        return True
    return any(_meet(dims[:-1], d - t * s) for t in range(t_lo, t_hi + 1))


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an element of a and one of b share an address. Views of one buffer with the
    same strides (q, k and v of a fused projection, heads side by side) are solved exactly;
    otherwise ranges of one storage that meet count as shared."""
    at = a.untyped_storage().data_ptr()
    if at != b.untyped_storage().data_ptr() or at == 0:   # (0: a meta tensor's, or none)
        return False
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _reach(a), _reach(b)
    if not (a0 < b1 and b0 < a1):
        return False
    es = a.element_size()
    if a.stride() != b.stride() or es != b.element_size() or (b0 - a0) % es:
        return True
    # a[i] = b[j] where sum((i_k - j_k) s_k) = b0 - a0, with -(nb_k - 1) <= i_k - j_k <= na_k - 1
    dims = sorted((st, 1 - nb, na - 1) for st, na, nb in zip(a.stride(), a.shape, b.shape)
                  if st > 0 and (na > 1 or nb > 1))
    return _meet(dims, (b0 - a0) // es)


def check_out(out, want: tuple, q, reads=()) -> None:
    """`out`, when given: a `want`-shaped tensor of q's dtype on q's device, contiguous in
    its last dimension, each element at its own address, sharing no memory with q (unless it
    is q, the same view: each tile's rows of q are read before its rows of out are written)
    or with the tensors the kernels read while they write it (`reads`: (name, tensor or
    None) pairs)."""
    if out is None:
        return
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != q.dtype
            or out.stride(-1) != 1):
        got = (f"{list(out.shape)} {out.dtype}, last stride {out.stride(-1)}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out must be a {list(want)} {q.dtype} tensor, contiguous in its last "
                         f"dimension; got {got}")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, q on {q.device}")
    if _overlaps(out):
        raise ValueError(f"out has overlapping memory (strides {out.stride()}): each output "
                         f"element needs its own address")
    same = (out.data_ptr() == q.data_ptr() and out.shape == q.shape
            and out.stride() == q.stride())
    for name, x in (*(() if same else (("q", q),)), *reads):
        if isinstance(x, torch.Tensor) and shares_memory(out, x):
            raise ValueError(f"out shares memory with {name}, which the kernels read while "
                             f"they write out: pass a separate tensor")


def _kernel_args(q, k, v, mask, sinks, alibi_slopes, out, dv, k_scale=None,
                 v_scale=None) -> None:
    kernel_tensors((("q", q), ("k", k), ("v", v), ("mask", mask), ("sinks", sinks),
                    ("alibi_slopes", alibi_slopes)), q.device)
    for name, x in (("k", k), ("v", v)):
        if x.shape[1] * abs(x.stride(1)) >= 2**31:
            raise ValueError(f"{name}: one sequence's keys span {x.shape[1] * abs(x.stride(1))} "
                             f"elements (Lk x stride {x.stride(1)}); the kernels address them "
                             f"with 32-bit offsets (< 2**31): split the sequence or use a "
                             f"denser layout")
    check_out(out, (*q.shape[:3], dv), q, _reads(k, v, mask=mask, sinks=sinks,
                                                 alibi_slopes=alibi_slopes, k_scale=k_scale,
                                                 v_scale=v_scale))


def _reads(k, v, **others) -> list:
    """(name, tensor) of what the kernels read besides q: K/V (the tensors, or a block
    cache's values and scales) and the other arguments given."""
    pairs = []
    for name, x in (("k", k), ("v", v)):
        if isinstance(x, quant.BLOCK_FORMS):
            pairs += [(f"{name}.values", x.values), (f"{name}.scales", x.scales)]
        else:
            pairs.append((name, x))
    return pairs + list(others.items())


_PLAN_FIELDS = ("batch", "q_len", "kv_len", "q_heads", "kv_heads", "head_dim", "head_dim_v",
                "causal", "window", "dtype")
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def plan_matches(plan, q, k, v, *, causal, window, dtype: bool = True, kv_name=None,
                 head_dim_v=None) -> None:
    """The plan was made for these shapes, options and (when `dtype`) K/V's dtype, or
    `kv_name` (quantized K/V: "float8_e4m3fn", "q8_0", "q4_0"); `head_dim_v`: Dv when v's
    last dimension is not it (a Q4_0's packed bytes)."""
    B, Lq, Hq, Dk = q.shape
    name = kv_name or _DTYPE_NAMES.get(k.dtype, str(k.dtype).removeprefix("torch."))
    have = (B, Lq, k.shape[1], Hq, k.shape[2], Dk, head_dim_v or v.shape[3], causal, window,
            name if dtype else plan.dtype)
    for name, value in zip(_PLAN_FIELDS, have):
        if getattr(plan, name) != value:
            raise ValueError(f"plan was made for {name}={getattr(plan, name)!r}, inputs have "
                             f"{value!r}")


def plan_mask(plan, mask, device) -> None:
    """A mask's tile takes shared memory (`skattn.config.shared_bytes`): a plan made without
    `has_mask` runs with a mask where its configuration still fits the device (then it is the
    configuration `has_mask=True` gives too); one made with it runs without a mask where its
    configuration is also the maskless one."""
    has_mask = mask is not None
    if plan.has_mask == has_mask:
        return
    from skattn.config import shared_bytes, tile_geometry
    from skattn.device import shared_memory_limit

    limit = shared_memory_limit(device)
    if has_mask:
        need = shared_bytes(plan.geometry, has_mask=True, kv_format=plan.dtype)
        if need > limit:
            raise ValueError(f"plan was made for has_mask=False, inputs have a mask: its kernel "
                             f"configuration would need {need} bytes of shared memory with the "
                             f"mask's tile ({limit} on {device}); plan with "
                             f"skattn.plan(..., has_mask=True)")
        return
    shape = dict(q_len=plan.q_len, gqa_ratio=plan.gqa_ratio, head_dim=plan.head_dim,
                 head_dim_v=plan.head_dim_v, smem_limit=limit, kv_format=plan.dtype)
    reduced = tile_geometry(has_mask=True, **shape)
    if plan.geometry == reduced and reduced != tile_geometry(**shape):
        raise ValueError("plan was made for has_mask=True, inputs have no mask: its kernel "
                         "configuration was reduced to fit a mask's tile; plan with "
                         "has_mask=False")
