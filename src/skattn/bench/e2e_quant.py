"""What the quantized K/V providers of `skattn bench --e2e` share ("skattn-fp8:<policy>",
skattn.bench.e2e_fp8; "skattn-q8_0:<policy>", skattn.bench.e2e_q8_0).

Each provider runs the model over one of skattn's quantized transformers caches whose layers
hold a fixed depth: the depth tokens are the f16 cache's own, quantized once; each step
quantizes its n tokens and writes them after the depth ones, so every repeat and every CUDA
graph replay does the same work, as for the f16 providers. A kind supplies its layer (how
tokens are stored, read back and rounded) and its cache class; this module holds the
fixed-depth bookkeeping, the rounded f16 twin cache and the check's bound.

The rows are checked against f16 sdpa, as the others are, with a bound that adds what the
kind's rounding of K/V alone does to sdpa's logits on that cell (`QuantizedDepth.bound`).
"""
from __future__ import annotations

import torch

from skattn.bench.e2e import WRONG_ABOVE
from skattn.bench.e2e_model import FixedDepthCache, Step, reference, rel_err


class FixedDepthLayer:
    """Mixin over a quantized transformers cache layer: one layer of quantized K/V holding
    `depth` tokens, with room for the step's n more.

    `update` writes the n new tokens after the depth ones and returns `[B, Hkv, depth + n, D]`
    views (made once per n) carrying what skattn reads them with, so skattn runs bottom-right
    causal over exactly the depth + n keys, with no mask, as it does over the f16 cache.

    A kind implements `write(start, keys, values)` (quantize `[B, Hkv, n, D]` states into
    token slots start.. as the kind's transformers layer does in eager code: one launch of
    `skattn.quant_store` at the position `self.starts[start]` where that layer would use it,
    else torch operations; both are captured by a CUDA graph),
    `views(end)` (the K/V views of tokens :end), `dequantized(dtype)` (the stored K/V as
    `[B, Hkv, L, D]` tensors of `dtype`) and `rounded(keys, values)` (new states as the
    layer stores them, read back in their dtype); it may override `write_depth` to fix
    scales from the depth tokens first.
    """

    # offsets are ints: transformers then lets the mask function skip the mask
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, depth: int):
        # keys, values: one layer of a FixedDepthCache, [B, Hkv, depth + room, D]
        super().__init__(max_cache_len=keys.shape[2])
        self.lazy_initialization(keys, values)
        self.depth = depth
        # the write positions as device tensors, made here (not while a graph is captured)
        self.starts = {s: torch.full((), s, dtype=torch.int64, device=keys.device)
                       for s in (0, depth)}
        self.write_depth(keys[:, :, :depth], values[:, :, :depth])
        self.cumulative_length.fill_(depth)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write_depth(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the depth tokens `[B, Hkv, depth, D]` in slots 0..depth."""
        self.write(0, keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        if self.depth + n > self.max_cache_len:
            raise ValueError(f"{n} new tokens, room for {self.max_cache_len - self.depth}")
        self.write(self.depth, key_states, value_states)
        if n not in self._views:  # made once per n: the same objects every step
            self._views[n] = self.views(self.depth + n)
        return self._views[n]

    def get_seq_length(self) -> int:
        return self.depth

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.depth + query_length, 0


class FixedDepthQuantizedCache:
    """Mixin over a quantized transformers cache (`skattn.transformers_fp8.QuantizedCache`):
    the tokens of `cache` (a FixedDepthCache) at its depth, in `FIXED_LAYER`s.

    The model's attention implementation must be a skattn one when it is made and at every
    step (the quantized cache's own check: sdpa or eager would receive the stored bytes).
    """

    FIXED_LAYER: type  # a FixedDepthLayer subclass

    def __init__(self, config, cache: FixedDepthCache):
        super().__init__(config, max_cache_len=cache.depth + cache.room)
        self.layers = [self.FIXED_LAYER(k, v, cache.depth)
                       for k, v in zip(cache.keys, cache.values)]
        self.depth, self.room = cache.depth, cache.room

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.depth


class RoundedCache(FixedDepthCache):
    """f16 K/V equal to what `quantized` (a FixedDepthQuantizedCache) stores, read back, new
    tokens rounded the same way on every update: sdpa over it computes the quantized
    provider's step in f16 arithmetic."""

    def __init__(self, quantized: FixedDepthQuantizedCache, dtype):
        self.quantized = quantized
        self.keys, self.values = [], []
        for layer in quantized.layers:
            k, v = layer.dequantized(dtype)
            self.keys.append(k.contiguous())
            self.values.append(v.contiguous())
        self.depth, self.room, self.n = quantized.depth, quantized.room, 0
        self.is_sliding = [False] * len(quantized.layers)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = self.quantized.layers[layer_idx].rounded(key_states, value_states)
        return super().update(keys, values, layer_idx)


class QuantizedDepth:
    """A quantized provider's caches at one depth: its quantized cache (`CACHE`, a
    FixedDepthQuantizedCache) and the cache's rounded f16 twin.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Left with the attention implementation `implementation` set.
    cache : FixedDepthCache
        The f16 cache of the depth; its tokens are quantized.
    implementation : str
        A skattn attention implementation's name (the quantized caches refuse any other).

    Attributes
    ----------
    error : str or None
        Why the caches could not be made (then every row of the kind at the depth says so).
    """

    CACHE: type

    def __init__(self, model, cache: FixedDepthCache, implementation: str):
        self.cache = self.rounded = self.error = None
        try:
            model.set_attn_implementation(implementation)
            self.cache = self.CACHE(model.config, cache)
            self.rounded = RoundedCache(self.cache, model.dtype)
        except Exception as exc:  # e.g. out of memory: the rows say so, the run goes on
            lines = str(exc).strip().splitlines()
            self.error = f"error: {type(exc).__name__}: {lines[0][:300] if lines else ''}"

    def step(self, model, n: int, seed: int) -> Step:
        """The provider's step of n tokens (the same tokens as the f16 step of `seed`)."""
        return Step(model, self.cache, n, seed)

    def bound(self, model, n: int, seed: int, ref) -> float | None:
        """The relative error of the provider's last-token logits vs f16 sdpa's (`ref`) above
        which a row is wrong; None (rows not checked) where there is no reference.

        What rounding K/V does to the logits depends on the model and the form, so the
        bound is measured on each cell rather than fixed: WRONG_ABOVE (what the f16 rows
        allow: f16 arithmetic and kernel differences) plus the relative error of sdpa's
        logits over the rounded K/V (`RoundedCache`) against sdpa's over the f16 ones. A
        provider that misreads the quantized K/V (scales ignored, wrong bytes) is off by
        O(1) and fails it.
        """
        if ref is None or self.rounded is None:
            return None
        rounded_ref = reference(model, Step(model, self.rounded, n, seed))
        return None if rounded_ref is None else WRONG_ABOVE + rel_err(rounded_ref, ref)
