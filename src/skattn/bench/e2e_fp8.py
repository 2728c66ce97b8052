"""The FP8 K/V provider of `skattn bench --e2e` ("skattn-fp8:<policy>").

The model's KV cache is a `skattn.transformers.FP8Cache` whose layers hold a fixed depth
(skattn.bench.e2e_quant): float8_e4m3fn K/V in skattn's layout `[B, L, Hkv, D]` with float32
scales per KV head, read by skattn in place. The depth tokens are the f16 cache's own,
quantized by FP8Cache's prefill rule (per layer and KV head, scale = amax / 448 over them);
each step quantizes its n tokens with the same scales and writes them after the depth ones.

The rows are checked against f16 sdpa, as the others are, with a bound that adds what e4m3
rounding of K/V alone does to sdpa's logits on that cell (`FP8Depth`).
"""
from __future__ import annotations

import torch

from skattn.bench.e2e_quant import FixedDepthLayer, FixedDepthQuantizedCache, QuantizedDepth
from skattn import quant_store
from skattn.transformers_fp8 import (SCALE_ATTR, FP8Cache, FP8Layer, head_scales, one_launch,
                                     quantize)


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


class FixedDepthFP8Layer(FixedDepthLayer, FP8Layer):
    """One layer of FP8 K/V holding `depth` tokens, with room for the step's n more
    (`FixedDepthLayer`); the step's tokens are quantized with the depth's scales, saturating
    at ±448 times them."""

    def write_depth(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # FP8Cache's prefill rule: the scales are the depth tokens' amax / 448 per KV head
        self.k_scale.copy_(head_scales(keys))
        self.v_scale.copy_(head_scales(values))
        self.scales_set = True
        self.write(0, keys, values)

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if one_launch(self.device, keys, values):
            quant_store.store_fp8(self.k_fp8, self.v_fp8, self.k_scale, self.v_scale,
                                  keys.transpose(1, 2), values.transpose(1, 2),
                                  self.starts[start])
            return
        _store(self.k_fp8, start, keys, self.k_scale)
        _store(self.v_fp8, start, values, self.v_scale)

    def views(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_fp8[:, :end].transpose(1, 2), self.v_fp8[:, :end].transpose(1, 2)
        setattr(k, SCALE_ATTR, self.k_scale)
        setattr(v, SCALE_ATTR, self.v_scale)
        return k, v

    def dequantized(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple((stored.float() * scale[None, None, :, None]).to(dtype).transpose(1, 2)
                     for stored, scale in ((self.k_fp8, self.k_scale), (self.v_fp8, self.v_scale)))

    def rounded(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rounded(keys, self.k_scale), rounded(values, self.v_scale)


class FixedDepthFP8Cache(FixedDepthQuantizedCache, FP8Cache):
    """An `FP8Cache` holding the tokens of a FixedDepthCache in FP8 at its depth."""

    FIXED_LAYER = FixedDepthFP8Layer


class FP8Depth(QuantizedDepth):
    """The FP8 provider's caches at one depth: the FP8 cache and its rounded f16 twin
    (`QuantizedDepth`).

    Notes
    -----
    e4m3 keeps 3 mantissa bits, so each stored K/V element is off by up to 2^-4 of itself
    (about 3% in relative norm on Gaussian K/V). What that does to the logits depends on the
    model: on random llama-like models in float32 (a CPU, sdpa on rounded vs unrounded K/V)
    2-7% with 2 layers, 7% with 8 and 10-12% with 32; hence the bound measured per cell.
    """

    CACHE = FixedDepthFP8Cache
