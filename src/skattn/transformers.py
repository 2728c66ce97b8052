"""Hugging Face transformers integration: `register()` adds skattn as an attention implementation.

    import skattn.transformers
    skattn.transformers.register()                          # "skattn", policy auto
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="skattn")
    skattn.transformers.register(policy="llamacpp", name="skattn-llamacpp")
    model.set_attn_implementation("skattn-llamacpp")

transformers hands q/k/v over as [B, H, L, D]; skattn reads transposed views of them
([B, L, H, D], last dim contiguous). The plain causal case (no padding, the last query at
the last key, as with a dynamic cache) runs bottom-right `causal=True` with no mask, and a
sliding-window layer adds `window=`; any other pattern (padding, a static cache's unwritten
tail, packed sequences) arrives as an additive mask built by the mask function registered
beside the attention function. GPT-OSS's sinks (`s_aux`) become `sinks=`, Gemma's logit
softcapping `softcap=`. Inside `torch.compile` the call goes through the custom op
`torch.ops.skattn.attention` (no graph break); in eager code through `skattn.attention`
with a cached plan (less host time). `FP8Cache` (skattn/transformers_fp8.py) keeps K/V in
float8_e4m3fn, read by skattn in place with their per-KV-head scales, `Q8_0Cache`
(skattn/transformers_q8_0.py) in q8_0 blocks (docs/transformers.md).
"""
from __future__ import annotations

import numbers

import torch

import skattn
from skattn import ops, quant
from skattn.transformers_paged import PagedForward, float_sinks

__all__ = ["register", "attention_forward", "attention_mask", "is_skattn", "FP8Cache",
           "Q8_0Cache", "NAME"]

NAME = "skattn"


def __getattr__(name):
    if name == "FP8Cache":  # imports transformers' cache classes, so on first use
        _interfaces()
        from skattn.transformers_fp8 import FP8Cache

        return FP8Cache
    if name == "Q8_0Cache":
        _interfaces()
        from skattn.transformers_q8_0 import Q8_0Cache

        return Q8_0Cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("skattn.transformers needs the transformers package "
                          "(pip install 'skattn[transformers]')") from exc
    return AttentionInterface, AttentionMaskInterface


def register(policy: str = ops.DEFAULT_POLICY, name: str = NAME, q_split="auto") -> str:
    """Register skattn in transformers' AttentionInterface and AttentionMaskInterface.

    Parameters
    ----------
    policy : str
        The planner's policy for every attention call of models using `name` ("auto",
        "llamacpp", "llamacpp-before", ...; see `skattn.plan`).
    name : str
        The `attn_implementation` name; registering a name again replaces its policy.
        It must not contain "/" (transformers reads such names as hub kernels) nor "sdpa",
        "flash" or "flex_attention" (transformers applies those back ends' checks).
    q_split : "auto" (default), int or None
        Continuous batching only: plan each packed step as `skattn.serving_plan(...,
        q_split=q_split)` does, requests of at most `q_split` new tokens in decode tiles and
        the others in prompt tiles (docs/serving.md "Mixed batches"). None: one plan a step.

    Returns
    -------
    str
        `name`, for `from_config(..., attn_implementation=name)` or
        `model.set_attn_implementation(name)`. Continuous batching (`generate_batch`)
        switches such a model to `"paged|" + name`, registered here too
        (skattn/transformers_paged.py: `skattn.attention_varlen` over the packed requests;
        its policy must be one of the ragged-batch policies).
    """
    ops._check_policy(policy)
    if not (q_split is None or q_split == "auto" or (
            isinstance(q_split, numbers.Integral) and not isinstance(q_split, bool)
            and q_split >= 1)):
        raise ValueError(f"q_split must be None, 'auto' or a positive int, got {q_split!r}")
    if "/" in name or any(word in name for word in ("sdpa", "flash", "flex_attention")):
        raise ValueError(f"attention implementation name {name!r} would be taken for one of "
                         "transformers' own back ends or a hub kernel")
    attention_interface, mask_interface = _interfaces()
    attention_interface.register(name, _Forward(policy))
    mask_interface.register(name, attention_mask)
    # continuous batching (generate_batch) calls "paged|" + name: the ragged-batch path
    attention_interface.register(f"paged|{name}", PagedForward(policy, q_split))
    return name


def is_skattn(name) -> bool:
    """Whether the attention implementation `name` is one that `register()` added."""
    attention_interface, _ = _interfaces()
    return isinstance(attention_interface().get(name), _Forward)


class _Forward:
    """transformers' attention-function signature, bound to one planner policy."""

    def __init__(self, policy: str):
        self.policy = policy

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, sliding_window=None, softcap=None, s_aux=None, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, is_causal=is_causal,
                                 sliding_window=sliding_window, softcap=softcap, s_aux=s_aux,
                                 policy=self.policy)


def attention_forward(module, query, key, value, attention_mask, *, dropout=0.0, scaling=None,
                      is_causal=None, sliding_window=None, softcap=None, s_aux=None,
                      policy=ops.DEFAULT_POLICY):
    """One attention call from a transformers model.

    Parameters
    ----------
    module : torch.nn.Module
        The model's attention module (its `is_causal` and `training` are read).
    query : Tensor [B, Hq, Lq, D]
    key, value : Tensor [B, Hkv, Lk, D] (the KV cache)
        f16 or bf16; or float8_e4m3fn views from `FP8Cache`, which carry their float32
        scales [Hkv] as the attribute `skattn_scale` (passed as `k_scale`, `v_scale`); or
        int8 views from `Q8_0Cache`, which carry the cache as `skattn.quant.Q8_0` (in
        skattn's layout) as the attribute `skattn_blocks`.
    attention_mask : Tensor [B or 1, 1, Lq, Lk] or None
        None: bottom-right causal (with `sliding_window`, if given). A float mask is additive;
        a bool mask keeps the keys that are True. Either one replaces causal and window.
    dropout : float
        Must be 0 in training mode (skattn has no dropout).
    scaling : float, optional
    is_causal : bool, optional
        Default: `module.is_causal` (True when the module has none).
    sliding_window : int, optional
    softcap : float, optional
    s_aux : Tensor [Hq], optional
        Attention sinks (GPT-OSS).
    policy : str

    Returns
    -------
    (Tensor [B, Lq, Hq, D], None)
        The output in transformers' layout, and no attention weights.
    """
    if dropout and module.training:
        raise ValueError("skattn has no attention dropout: use model.eval() or dropout 0")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    k, v, scales = _quantized_kv(k, v, key, value)
    mask = window = None
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        window = sliding_window if causal else None
    else:
        mask, causal = _additive(attention_mask, q.shape[2]), False
    sinks = float_sinks(s_aux)
    kw = dict(scale=scaling, causal=causal, window=window, mask=mask, sinks=sinks,
              softcap=float(softcap or 0.0), **scales)
    if torch.compiler.is_compiling():
        out = ops.attention(q, k, v, policy=policy, **kw)
    else:
        plan = ops.plan_for(q, k, v, causal=causal, window=window, policy=policy,
                            has_mask=mask is not None)
        out = skattn.attention(q, k, v, plan=plan, **kw)
    return out, None


def _quantized_kv(k, v, key, value) -> tuple:
    """(k, v, the scales' keywords) as skattn takes them: `Q8_0Cache`'s int8 views with their
    block scales as `skattn.quant.Q8_0`, `FP8Cache`'s views with `k_scale`, `v_scale`."""
    if key.dtype == torch.int8 or value.dtype == torch.int8:
        k_blocks, v_blocks = getattr(key, "skattn_blocks", None), getattr(value, "skattn_blocks", None)
        if k_blocks is None or v_blocks is None:
            raise TypeError("int8 K/V reached skattn's attention function without their block "
                            "scales: use skattn.transformers.Q8_0Cache as past_key_values")
        return k_blocks, v_blocks, {}
    return k, v, _fp8_scales(key, value)


def _fp8_scales(key, value) -> dict:
    if key.dtype != torch.float8_e4m3fn and value.dtype != torch.float8_e4m3fn:
        return {}
    k_scale, v_scale = getattr(key, "skattn_scale", None), getattr(value, "skattn_scale", None)
    if k_scale is None or v_scale is None:
        raise TypeError("float8_e4m3fn K/V reached skattn's attention function without their "
                        "scales: use skattn.transformers.FP8Cache as past_key_values")
    return dict(k_scale=k_scale, v_scale=v_scale)


def _additive(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """[B|1, 1, Lq, Lk] bool or float mask -> skattn's additive [B|1, Lq, Lk]."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"skattn takes attention masks of shape [B or 1, 1, Lq, Lk] (one mask for "
                         f"all {heads} heads), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        mask = _where(mask, torch.float32)
    mask = mask[:, 0]
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def _where(allowed: torch.Tensor, dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full_like(zero, float("-inf")))


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True,
                   allow_is_bidirectional_skip=False, dtype=torch.float32, config=None,
                   use_vmap=False, device="cpu", **kwargs):
    """transformers' mask-interface function for skattn.

    Returns None where the attention call can run without a mask: no padding, the last query
    at the last key (bottom-right causal, what skattn's `causal=True` computes), and no
    window or the model's own `sliding_window` (which the attention call receives). Otherwise
    an additive mask [B, 1, Lq, Lk] in `dtype` (0 = keep, -inf = hide), built from transformers'
    boolean mask.
    """
    from transformers.masking_utils import (_ignore_bidirectional_mask_sdpa,
                                            causal_mask_function, prepare_padding_mask,
                                            sdpa_mask)

    mask_function = mask_function or causal_mask_function
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if allow_is_causal_skip and _bottom_right(padding, q_length, kv_length, q_offset, kv_offset,
                                              local_size, config):
        return None
    if allow_is_bidirectional_skip and _ignore_bidirectional_mask_sdpa(padding, kv_length, local_size):
        return None
    allowed = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                        q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, local_size=local_size,
                        allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    return _where(allowed, dtype)


def _bottom_right(padding, q_length, kv_length, q_offset, kv_offset, local_size, config) -> bool:
    from transformers.utils.import_utils import is_tracing

    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False  # a static cache: positions live on the device, keys past them are unwritten
    if q_offset + q_length != kv_offset + kv_length:
        return False
    if local_size is not None and local_size != getattr(config, "sliding_window", None):
        return False  # a pattern other than the sliding window (chunked attention)
    if padding is None:
        return True
    if is_tracing(padding):
        return False
    return bool(padding[:, kv_offset:kv_offset + kv_length].all())
