"""An FP8 e4m3 KV cache for transformers models run with skattn (`skattn.transformers.FP8Cache`).

    import skattn.transformers as skt
    skt.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="skattn", dtype=torch.float16)
    cache = skt.FP8Cache(model.config, max_cache_len=4096)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

Each layer preallocates K and V as float8_e4m3fn `[B, max_cache_len, Hkv, D]` (skattn's own
layout) and hands transformers `[B, Hkv, max_cache_len, D]` views of them, as a static cache
does; the attention function transposes them back, so skattn reads the cache in place. The
per-KV-head float32 scales ride on those two view objects as the attribute `skattn_scale`
(a plain tensor attribute: the model's attention module passes the tensors from
`past_key_values.update(...)` to the attention function unchanged).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs

from skattn import quant_store
from skattn.device import interpreting
from skattn.quant import FP8_MAX

FP8 = torch.float8_e4m3fn
SCALE_ATTR = "skattn_scale"  # the attribute of the K/V views that holds their scales [Hkv]
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what quant_store writes


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-KV-head scales of new K or V states `[B, Hkv, L, D]`: amax / 448, 1 for a zero head."""
    amax = x.float().abs().amax(dim=(0, 2, 3))
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def one_launch(device, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
    """Whether a layer writes new states with `skattn.quant_store`'s one launch (eager code
    on a GPU, or under the interpreter, states contiguous in D) rather than with torch
    operations (10-42 small kernels a layer; inside torch.compile, which fuses them)."""
    return (not torch.compiler.is_compiling() and (device.type == "cuda" or interpreting())
            and key_states.stride(-1) == 1 and value_states.stride(-1) == 1
            and key_states.dtype in STATE_DTYPES)


def count_tokens(layer, n: int) -> None:
    """Count the n tokens an eager update writes into `layer` on the host (no device read),
    and refuse them where they would not fit: `quant_store` does not write rows past the
    cache, and torch's indexed copy fails on the device. A CUDA graph's replays and compiled
    code are not counted (their host code does not run per step)."""
    if torch.compiler.is_compiling():
        return
    written = getattr(layer, "host_tokens", 0) + n
    if written > layer.max_cache_len:
        raise ValueError(f"{written} tokens in a cache layer of max_cache_len "
                         f"{layer.max_cache_len}: make the cache with room for the prompt and "
                         f"every generated token")
    layer.host_tokens = written


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`[B, Hkv, L, D]` -> float8_e4m3fn with `scale` [Hkv], rounded to nearest, saturated at ±448."""
    return (x.float() / scale[None, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class FP8Layer(StaticLayer):
    """One layer's FP8 K/V, preallocated for `max_cache_len` tokens (a full-attention layer).

    The scales are fixed on the first update that brings tokens (the prefill): per KV head,
    amax / 448 of that update's K (and V), never 0. Later tokens are quantized with the same
    scales and saturate at ±448 times them where they exceed the prefill's range.
    """

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.scales_set = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        B, L, H = self.batch_size, self.max_cache_len, self.num_heads
        self.k_fp8 = torch.zeros(B, L, H, self.k_head_dim, dtype=FP8, device=self.device)
        self.v_fp8 = torch.zeros(B, L, H, self.v_head_dim, dtype=FP8, device=self.device)
        self.k_scale = torch.ones(H, dtype=torch.float32, device=self.device)
        self.v_scale = torch.ones(H, dtype=torch.float32, device=self.device)
        # transformers' [B, Hkv, L, D]: views, made once, carrying their scales
        self.keys, self.values = self.k_fp8.transpose(1, 2), self.v_fp8.transpose(1, 2)
        setattr(self.keys, SCALE_ATTR, self.k_scale)
        setattr(self.values, SCALE_ATTR, self.v_scale)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.k_fp8, self.v_fp8, self.k_scale, self.v_scale, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens `[B, Hkv, n, D]` quantized; return the FP8 K/V views
        `[B, Hkv, max_cache_len, D]` (their scales in the attribute `skattn_scale`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        count_tokens(self, n)
        if not self.scales_set and n > 0:
            self.k_scale.copy_(head_scales(key_states))
            self.v_scale.copy_(head_scales(value_states))
            self.scales_set = True
        if one_launch(self.device, key_states, value_states):
            quant_store.store_fp8(self.k_fp8, self.v_fp8, self.k_scale, self.v_scale,
                                  key_states.transpose(1, 2), value_states.transpose(1, 2),
                                  self.cumulative_length)
            self.cumulative_length.add_(n)
            return self.keys, self.values
        position = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        for cache, new, scale in ((self.k_fp8, key_states, self.k_scale),
                                  (self.v_fp8, value_states, self.v_scale)):
            # index_copy_ has no float8 kernels: copy the bytes
            cache.view(torch.uint8).index_copy_(
                1, position, quantize(new, scale).transpose(1, 2).view(torch.uint8))
        return self.keys, self.values

    def reset(self) -> None:
        if self.is_initialized:
            for t in (self.k_fp8, self.v_fp8):
                t.view(torch.uint8).zero_()
            self.k_scale.fill_(1.0)
            self.v_scale.fill_(1.0)
        self.cumulative_length.zero_()
        self.host_tokens = 0
        self.scales_set = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("FP8Cache does not reorder (beam search): use greedy or sampling")


class QuantizedCache(Cache):
    """What skattn's quantized transformers caches share: full-attention layers of `LAYER`,
    a positive `max_cache_len`, and a skattn attention implementation (the only one that
    reads `FORM` K/V), checked when made and on each update.

    Parameters
    ----------
    config : transformers.PreTrainedConfig
        The model's config (`model.config`): its layers must all be full attention, and its
        `attn_implementation` a name given by `skattn.transformers.register()`.
    max_cache_len : int
        Tokens each layer holds (prompt plus generated ones), allocated on the first update.
    """

    LAYER: type
    FORM: str  # the K/V the model's attention function receives, for the errors

    def __init__(self, config, max_cache_len: int):
        text_config = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text_config)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(f"{type(self).__name__} holds full-attention layers only; this "
                             f"config has {other}")
        if not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        self.config = text_config
        self._check_implementation(getattr(text_config, "_attn_implementation", None))
        super().__init__(layers=[self.LAYER(max_cache_len) for _ in layer_types])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self._check_implementation(self.config._attn_implementation)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_implementation(self, name) -> None:
        from skattn.transformers import is_skattn

        if not is_skattn(name):
            raise ValueError(f"{type(self).__name__} needs a skattn attention implementation "
                             f"(skattn.transformers.register(), attn_implementation='skattn'); "
                             f"the model uses {name!r}, which would receive {self.FORM} K/V")


class FP8Cache(QuantizedCache):
    """A static-shape FP8 e4m3 KV cache for models run with a skattn attention implementation
    (`config`, `max_cache_len` as for `QuantizedCache`): K and V of every layer are
    float8_e4m3fn `[B, max_cache_len, Hkv, D]` with float32 scales `[Hkv]`.

    Notes
    -----
    Scales are fixed per layer on the first update (the prefill): amax / 448 of that layer's
    K and of its V, per KV head (1 for a head of zeros). Later tokens use the same scales and
    saturate at ±448 x scale; a prompt that is not representative of the generated tokens'
    range loses precision there (`skattn.transformers.Q8_0Cache` scales every 32 values of
    every token instead). Only skattn's attention function reads the FP8 K/V; the cache
    refuses to run under any other implementation (sdpa or eager would receive float8
    tensors), on each update. Beam search (cache reordering) and offloading are not offered.
    """

    LAYER = FP8Layer
    FORM = "float8_e4m3fn"
