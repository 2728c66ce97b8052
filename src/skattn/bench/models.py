"""Attention shapes of the seed grid's models (docs/benchmarks.md), by name and alias."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["ModelShape", "MODELS", "ALIASES", "WINDOWS", "resolve"]


class ModelShape(NamedTuple):
    """Query heads, KV heads, head size and a note on what the plain shape leaves out."""

    q_heads: int
    kv_heads: int
    head_dim: int
    extra: str = ""


# The canonical grid order.
MODELS: dict[str, ModelShape] = {
    "qwen3moe-30b-a3b": ModelShape(32, 4, 128),
    "gpt-oss": ModelShape(64, 8, 64, "sinks; every other layer a 128-token sliding window"),
    "llama-8b": ModelShape(32, 8, 128),
    "qwen3-14b": ModelShape(40, 8, 128, "GQA ratio 5 (not a power of two)"),
    "llama-70b": ModelShape(64, 8, 128),
}

# Other names with the same attention shape.
ALIASES: dict[str, str] = {
    "gpt-oss-20b": "gpt-oss",
    "gpt-oss-120b": "gpt-oss",
    "qwen3-4b": "llama-8b",
    "llama8b": "llama-8b",
    "qwen2-32b": "qwen3-14b",
}

# Sliding window of the windowed layers, where a model has them.
WINDOWS: dict[str, int] = {"gpt-oss": 128}


def resolve(name: str) -> tuple[str, ModelShape]:
    """The canonical name and shape of model `name` (case and '_' vs '-' ignored).

    Parameters
    ----------
    name : str
        A key of MODELS or ALIASES.

    Returns
    -------
    (canonical name, ModelShape)

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        known = ", ".join([*MODELS, *ALIASES])
        raise ValueError(f"unknown model {name!r}; known models: {known} "
                         f"(or give --heads Q/KV --head-dim D)")
    return key, MODELS[key]
