"""The FP8 K/V provider of `skattn bench --e2e` ("skattn-fp8:<policy>").

The model's KV cache is a `skattn.transformers.FP8Cache` whose layers hold a fixed depth:
float8_e4m3fn K/V in skattn's layout `[B, L, Hkv, D]` with float32 scales per KV head, read
by skattn in place. The depth tokens are the f16 cache's own, quantized by FP8Cache's prefill
rule (per layer and KV head, scale = amax / 448 over them); each step quantizes its n tokens
with the same scales and writes them after the depth ones, so every repeat and every CUDA
graph replay does the same work, as for the f16 providers.

The rows are checked against f16 sdpa, as the others are, with a bound that adds what e4m3
rounding of K/V alone does to sdpa's logits on that cell (`FP8Depth.bound`).
"""
from __future__ import annotations

import torch

from skattn.bench.e2e import WRONG_ABOVE
from skattn.bench.e2e_model import FixedDepthCache, Step, reference, rel_err
from skattn.transformers_fp8 import SCALE_ATTR, FP8Cache, FP8Layer, head_scales, quantize


def _store(fp8: torch.Tensor, start: int, states: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize `states` [B, Hkv, n, D] with `scale` into `fp8[:, start:start + n]`
    (`fp8`: [B, L, Hkv, D])."""
    n = states.shape[2]
    # copied as bytes, as FP8Layer does (float8 has fewer copy kernels than uint8)
    fp8[:, start:start + n].view(torch.uint8).copy_(
        quantize(states, scale).transpose(1, 2).view(torch.uint8))


def rounded(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`states` [B, Hkv, n, D] as the FP8 cache stores them: quantized with `scale` [Hkv] and
    multiplied back, in the states' dtype."""
    return (quantize(states, scale).float() * scale[None, :, None, None]).to(states.dtype)


class FixedDepthFP8Layer(FP8Layer):
    """One layer of FP8 K/V holding `depth` tokens, with room for the step's n more.

    `update` writes the n new tokens after the depth ones (quantized with the depth's
    scales) and returns `[B, Hkv, depth + n, D]` views carrying the scales, so skattn runs
    bottom-right causal over exactly the depth + n keys, with no mask, as it does over the
    f16 cache.
    """

    # offsets are ints: transformers then lets the mask function skip the mask
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, depth: int):
        # keys, values: one layer of a FixedDepthCache, [B, Hkv, depth + room, D]
        super().__init__(max_cache_len=keys.shape[2])
        self.lazy_initialization(keys, values)
        self.depth = depth
        for fp8, scale, states in ((self.k_fp8, self.k_scale, keys),
                                   (self.v_fp8, self.v_scale, values)):
            scale.copy_(head_scales(states[:, :, :depth]))
            _store(fp8, 0, states[:, :, :depth], scale)
        self.scales_set = True
        self.cumulative_length.fill_(depth)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        if self.depth + n > self.max_cache_len:
            raise ValueError(f"{n} new tokens, room for {self.max_cache_len - self.depth}")
        _store(self.k_fp8, self.depth, key_states, self.k_scale)
        _store(self.v_fp8, self.depth, value_states, self.v_scale)
        if n not in self._views:  # made once per n: the same objects every step
            end = self.depth + n
            k, v = self.k_fp8[:, :end].transpose(1, 2), self.v_fp8[:, :end].transpose(1, 2)
            setattr(k, SCALE_ATTR, self.k_scale)
            setattr(v, SCALE_ATTR, self.v_scale)
            self._views[n] = (k, v)
        return self._views[n]

    def get_seq_length(self) -> int:
        return self.depth

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.depth + query_length, 0


class FixedDepthFP8Cache(FP8Cache):
    """An `FP8Cache` holding the tokens of `cache` (a FixedDepthCache) in FP8 at its depth.

    The model's attention implementation must be a skattn one when it is made and at every
    step (FP8Cache's own check: sdpa or eager would receive float8 tensors).
    """

    def __init__(self, config, cache: FixedDepthCache):
        super().__init__(config, max_cache_len=cache.depth + cache.room)
        self.layers = [FixedDepthFP8Layer(k, v, cache.depth)
                       for k, v in zip(cache.keys, cache.values)]
        self.depth, self.room = cache.depth, cache.room

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.depth


class RoundedCache(FixedDepthCache):
    """f16 K/V equal to what `fp8` stores (dequantized), new tokens rounded the same way on
    every update: sdpa over it computes the FP8 provider's step in f16 arithmetic."""

    def __init__(self, fp8: FixedDepthFP8Cache, dtype):
        self.fp8 = fp8
        self.keys, self.values = [], []
        for layer in fp8.layers:
            for out, stored, scale in ((self.keys, layer.k_fp8, layer.k_scale),
                                       (self.values, layer.v_fp8, layer.v_scale)):
                out.append((stored.float() * scale[None, None, :, None]).to(dtype)
                           .transpose(1, 2).contiguous())
        self.depth, self.room, self.n = fp8.depth, fp8.room, 0
        self.is_sliding = [False] * len(fp8.layers)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        layer = self.fp8.layers[layer_idx]
        return super().update(rounded(key_states, layer.k_scale),
                              rounded(value_states, layer.v_scale), layer_idx)


class FP8Depth:
    """The FP8 provider's caches at one depth: the FP8 cache and its rounded f16 twin.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Left with the attention implementation `implementation` set.
    cache : FixedDepthCache
        The f16 cache of the depth; its tokens are quantized.
    implementation : str
        A skattn attention implementation's name (FP8Cache refuses any other).

    Attributes
    ----------
    error : str or None
        Why the caches could not be made (then every FP8 row of the depth says so).
    """

    def __init__(self, model, cache: FixedDepthCache, implementation: str):
        self.cache = self.rounded = self.error = None
        try:
            model.set_attn_implementation(implementation)
            self.cache = FixedDepthFP8Cache(model.config, cache)
            self.rounded = RoundedCache(self.cache, model.dtype)
        except Exception as exc:  # e.g. out of memory: the rows say so, the run goes on
            lines = str(exc).strip().splitlines()
            self.error = f"error: {type(exc).__name__}: {lines[0][:300] if lines else ''}"

    def step(self, model, n: int, seed: int) -> Step:
        """The FP8 provider's step of n tokens (the same tokens as the f16 step of `seed`)."""
        return Step(model, self.cache, n, seed)

    def bound(self, model, n: int, seed: int, ref) -> float | None:
        """The relative error of the FP8 rows' last-token logits vs f16 sdpa's (`ref`) above
        which a row is wrong; None (rows not checked) where there is no reference.

        e4m3 keeps 3 mantissa bits, so each stored K/V element is off by up to 2^-4 of
        itself (about 3% in relative norm on Gaussian K/V). What that does to the logits
        depends on the model: on random llama-like models in float32 (a CPU, sdpa on
        rounded vs unrounded K/V) 2-7% with 2 layers, 7% with 8 and 10-12% with 32. So the
        bound is measured on each cell rather than fixed: WRONG_ABOVE (what the f16 rows
        allow: f16 arithmetic and kernel differences) plus the relative error of sdpa's
        logits over the e4m3-rounded K/V (`RoundedCache`) against sdpa's over the f16 ones.
        A provider that misreads the FP8 K/V (its scales ignored, wrong bytes) is off by
        O(1) and fails it.
        """
        if ref is None or self.rounded is None:
            return None
        fp8_ref = reference(model, Step(model, self.rounded, n, seed))
        return None if fp8_ref is None else WRONG_ABOVE + rel_err(fp8_ref, ref)
