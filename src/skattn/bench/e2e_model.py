"""The model side of `skattn bench --e2e`: a random-initialised Llama, a KV cache held at a
fixed depth, one step of n tokens (eager or as a CUDA graph captures it), the provider's
attention implementation and SDPA's reference logits."""
from __future__ import annotations

import torch

FP8 = "skattn-fp8"  # the provider kind whose model runs over an FP8 KV cache
Q8_0 = "skattn-q8_0"  # the provider kind whose model runs over a q8_0 KV cache
# the quantized K/V kinds and the words their errors use for the form
QUANTIZED = {FP8: "FP8", Q8_0: "q8_0"}


class FixedDepthCache:
    """K/V of `depth` tokens per layer in buffers with room for `n` more; `update` writes the
    step's n tokens after the depth ones and returns [B, Hkv, depth + n, D] views, so every
    step sees the same cache (what a timed repeat and a CUDA graph replay need)."""

    is_compileable = False

    def __init__(self, layers: int, kv_heads: int, head_dim: int, depth: int, room: int, *,
                 dtype, device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (1, kv_heads, depth + room, head_dim)
        self.keys = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(layers)]
        self.depth, self.room, self.n = depth, room, 0
        self.is_sliding = [False] * layers

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        n = key_states.shape[2]
        if n > self.room:
            raise ValueError(f"{n} new tokens, room for {self.room}")
        end = self.depth + n
        k, v = self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
        k[:, :, self.depth:].copy_(key_states)
        v[:, :, self.depth:].copy_(value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.depth

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.depth

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.depth + query_length, 0


def build_model(shape: dict, dtype, device):
    """A random-initialised LlamaForCausalLM of `shape` on `device` (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval().requires_grad_(False)


def implementation(provider: str) -> str:
    """The attn_implementation name of a provider ("sdpa", "skattn:<policy>",
    "skattn-fp8:<policy>" or "skattn-q8_0:<policy>"), registering skattn's under
    "skattn-<policy>" (the quantized providers differ by their cache, not by their attention
    function)."""
    if provider == "sdpa":
        return "sdpa"
    kind, _, policy = provider.partition(":")
    if kind not in ("skattn", *QUANTIZED) or not policy:
        forms = [form for form in QUANTIZED.values() if form.lower() in kind.lower()]
        hint = f"; {forms[0]} K/V are read by skattn only" if forms else ""
        *kinds, last = ["sdpa", "skattn:<policy>"] + [f"{k}:<policy>" for k in QUANTIZED]
        raise ValueError(f"e2e providers are {', '.join(kinds)} or {last}, "
                         f"got {provider!r}{hint}")
    from skattn.transformers import register

    return register(policy=policy, name=f"skattn-{policy}")


class Step:
    """One step of n tokens at a fixed depth: `eager()` calls the model; `graph_step()` is the
    same computation with the mask made beforehand (what a CUDA graph captures)."""

    def __init__(self, model, cache: FixedDepthCache, n: int, seed: int):
        device = model.device
        g = torch.Generator(device=device).manual_seed(seed)
        self.model, self.cache = model, cache
        self.ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g, device=device)
        self.positions = torch.arange(cache.depth, cache.depth + n, device=device)[None]

    def eager(self):
        out = self.model(input_ids=self.ids, position_ids=self.positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits

    def mask(self):
        from transformers.masking_utils import create_causal_mask

        m = self.model.model
        return create_causal_mask(config=m.config, inputs_embeds=m.embed_tokens(self.ids),
                                  attention_mask=None, past_key_values=self.cache,
                                  position_ids=self.positions)

    def graph_step(self, mask):
        # LlamaModel.forward with the mask given (built inside a capture, it would differ:
        # transformers materialises masks while a stream is capturing)
        m = self.model.model
        h = m.embed_tokens(self.ids)
        rope = m.rotary_emb(h, position_ids=self.positions)
        for layer in m.layers:
            h = layer(h, attention_mask=mask, position_ids=self.positions,
                      past_key_values=self.cache, use_cache=True, position_embeddings=rope)
        return self.model.lm_head(m.norm(h[:, -1:]))


def rel_err(a, b) -> float:
    """Relative error of `a` against `b` (L2 norms, in float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(model, step: Step):
    """SDPA's eager logits of the step's last token: what every row is checked against."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return step.eager()[:, -1].clone()
    except Exception:  # e.g. out of memory: rows are then timed without a check
        return None
