"""A q8_0 KV cache for transformers models run with skattn (`skattn.transformers.Q8_0Cache`).

    cache = skt.Q8_0Cache(model.config, max_cache_len=4096)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

llama.cpp's 8-bit blocks (`skattn.quant.Q8_0`): every 32 values of a token's K or V head
share one f16 scale, amax / 127, so each token is scaled when it is written (no range fixed
by the prompt, as `FP8Cache` fixes it) at 34/32 bytes a value. Each layer preallocates int8
values `[B, max_cache_len, Hkv, D]` and f16 scales `[B, max_cache_len, Hkv, D / 32]`
(skattn's layout) and hands transformers `[B, Hkv, max_cache_len, D]` views of the values,
whose attribute `skattn_scale` holds the matching `[B, Hkv, max_cache_len, D / 32]` view of
the scales and `skattn_blocks` the cache as skattn takes it, `Q8_0(values, scales)` in its
own layout (made once per layer); the attention function passes that on and skattn reads
the cache in place.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from skattn import quant, quant_store
from skattn.transformers_fp8 import SCALE_ATTR, QuantizedCache, count_tokens, one_launch

BLOCKS_ATTR = "skattn_blocks"  # the attribute of the value views that holds their Q8_0


class Q8_0Layer(StaticLayer):
    """One layer's q8_0 K/V, preallocated for `max_cache_len` tokens (a full-attention layer);
    unwritten tokens are 0 (zero values, zero scales)."""

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        for d in (self.k_head_dim, self.v_head_dim):
            if d % quant.QK8_0:
                raise ValueError(f"Q8_0Cache needs head sizes that are multiples of "
                                 f"{quant.QK8_0}, got {d}")
        B, L, H = self.batch_size, self.max_cache_len, self.num_heads
        self.caches = []
        for d in (self.k_head_dim, self.v_head_dim):
            values = torch.zeros(B, L, H, d, dtype=torch.int8, device=self.device)
            scales = torch.zeros(B, L, H, d // quant.QK8_0, dtype=torch.float16,
                                 device=self.device)
            self.caches.append((values, scales))
        # transformers' [B, Hkv, L, D]: views, made once, carrying their scales' views and
        # the caches as skattn reads them (a Q8_0 made once, not at every attention call)
        views = []
        self.blocks = tuple(quant.Q8_0(values, scales) for values, scales in self.caches)
        for (values, scales), blocks in zip(self.caches, self.blocks):
            view = values.transpose(1, 2)
            setattr(view, SCALE_ATTR, scales.transpose(1, 2))
            setattr(view, BLOCKS_ATTR, blocks)
            views.append(view)
        self.keys, self.values = views
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (*self.caches[0], *self.caches[1], self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens `[B, Hkv, n, D]` in q8_0 blocks; return the int8 value views
        `[B, Hkv, max_cache_len, D]` (their scales' views in the attribute `skattn_scale`,
        their `Q8_0` in `skattn_blocks`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        count_tokens(self, n)
        if one_launch(self.device, key_states, value_states):
            quant_store.store_q8_0(*self.blocks, key_states.transpose(1, 2),
                                   value_states.transpose(1, 2), self.cumulative_length)
            self.cumulative_length.add_(n)
            return self.keys, self.values
        position = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        for (values, scales), new in zip(self.caches, (key_states, value_states)):
            blocks = quant.q8_0(new.transpose(1, 2))
            values.index_copy_(1, position, blocks.values)
            scales.index_copy_(1, position, blocks.scales)
        return self.keys, self.values

    def reset(self) -> None:
        if self.is_initialized:
            for values, scales in self.caches:
                values.zero_()
                scales.zero_()
        self.cumulative_length.zero_()
        self.host_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("Q8_0Cache does not reorder (beam search): use greedy or "
                                  "sampling")


class Q8_0Cache(QuantizedCache):
    """A static-shape q8_0 KV cache for models run with a skattn attention implementation
    (`config`, `max_cache_len` as for `skattn.transformers_fp8.QuantizedCache`): K and V of
    every layer are int8 values `[B, max_cache_len, Hkv, D]` with f16 block scales
    `[B, max_cache_len, Hkv, D / 32]` (D a multiple of 32).

    Notes
    -----
    Each token's K and V are quantized when written, as `skattn.quant.q8_0` does (per 32
    values: scale amax / 127, values rounded half away from zero). Only skattn's attention
    function reads them; the cache refuses to run under any other implementation (sdpa or
    eager would receive the int8 values), on each update. Beam search (cache reordering) and
    offloading are not offered.
    """

    LAYER = Q8_0Layer
    FORM = "q8_0 (int8)"
