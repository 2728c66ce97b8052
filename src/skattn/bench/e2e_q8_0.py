"""The q8_0 K/V provider of `skattn bench --e2e` ("skattn-q8_0:<policy>").

The model's KV cache is a `skattn.transformers.Q8_0Cache` whose layers hold a fixed depth
(skattn.bench.e2e_quant): llama.cpp's q8_0 blocks in skattn's layout, int8 values
`[B, L, Hkv, D]` and f16 scales `[B, L, Hkv, D / 32]`, every 32 values of a token's K or V
head sharing one scale (amax / 127), read by skattn in place. The depth tokens are the f16
cache's own, quantized by `skattn.quant.q8_0`; each step quantizes its n tokens the same way
(each token scaled on its own, so no range is fixed by the depth) and writes them after the
depth ones.

The rows are checked against f16 sdpa, as the others are, with a bound that adds what q8_0
rounding of K/V alone does to sdpa's logits on that cell (`Q8_0Depth`).
"""
from __future__ import annotations

import torch

from skattn import quant, quant_store
from skattn.bench.e2e_quant import FixedDepthLayer, FixedDepthQuantizedCache, QuantizedDepth
from skattn.transformers_fp8 import SCALE_ATTR, one_launch
from skattn.transformers_q8_0 import BLOCKS_ATTR, Q8_0Cache, Q8_0Layer


def rounded(states: torch.Tensor) -> torch.Tensor:
    """`states` [B, Hkv, n, D] as the q8_0 cache stores them: quantized by `quant.q8_0` and
    dequantized, in the states' dtype."""
    return quant.q8_0(states.transpose(1, 2)).dequantize(states.dtype).transpose(1, 2)


class FixedDepthQ8_0Layer(FixedDepthLayer, Q8_0Layer):
    """One layer of q8_0 K/V holding `depth` tokens, with room for the step's n more
    (`FixedDepthLayer`); `caches` holds (values, scales) of K, then of V."""

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if one_launch(self.device, keys, values):
            quant_store.store_q8_0(*self.blocks, keys.transpose(1, 2), values.transpose(1, 2),
                                   self.starts[start])
            return
        # plain copies into the slots (no index tensor, no host sync: a CUDA graph captures it)
        for (stored, scales), states in zip(self.caches, (keys, values)):
            blocks = quant.q8_0(states.transpose(1, 2))
            n = states.shape[2]
            stored[:, start:start + n].copy_(blocks.values)
            scales[:, start:start + n].copy_(blocks.scales)

    def views(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = []
        for stored, scales in self.caches:
            view = stored[:, :end].transpose(1, 2)
            setattr(view, SCALE_ATTR, scales[:, :end].transpose(1, 2))
            setattr(view, BLOCKS_ATTR, quant.Q8_0(stored[:, :end], scales[:, :end]))
            views.append(view)
        return tuple(views)

    def dequantized(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(quant.Q8_0(stored, scales).dequantize(dtype).transpose(1, 2)
                     for stored, scales in self.caches)

    def rounded(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rounded(keys), rounded(values)


class FixedDepthQ8_0Cache(FixedDepthQuantizedCache, Q8_0Cache):
    """A `Q8_0Cache` holding the tokens of a FixedDepthCache in q8_0 blocks at its depth."""

    FIXED_LAYER = FixedDepthQ8_0Layer


class Q8_0Depth(QuantizedDepth):
    """The q8_0 provider's caches at one depth: the q8_0 cache and its rounded f16 twin
    (`QuantizedDepth`).

    Notes
    -----
    A block's scale is its amax / 127 (stored in f16), so each stored element is off by about
    half its block's scale at most: about 0.5% in relative norm on Gaussian K/V
    (docs/quant.md), a sixth of e4m3's; the bound is measured per cell as for FP8.
    """

    CACHE = FixedDepthQ8_0Cache
