"""Length mixes of the serving benchmark (docs/serving.md), shared with the GPU tests."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

MIXES = ("equal", "one-long", "lognormal", "mixed")
MIX_NOTES = {
    "equal": "(a) 64 sequences x 4096 keys",
    "one-long": "(b) 1 x 32768 + 63 x 1024 keys",
    "lognormal": "(c) 64 sequences, lognormal lengths around 4096 (sigma 0.8, 16..32768)",
    "mixed": "(d) one 512-token prompt chunk (4096 keys) + 31 decode sequences (lognormal ~4096)",
}
# Parts of (d), for timing a mixed batch's halves alone (tools/serving_sweep.py): its 31
# decode sequences; its chunk; and a step of a loop whose graph was captured for (d) after the
# chunk has become a decode sequence (32 sequences of one query, planned for 512)
PARTS = ("mixed-decode", "mixed-chunk", "mixed-step")
MIX_NOTES.update({
    "mixed-decode": "(d)'s 31 decode sequences alone",
    "mixed-chunk": "(d)'s 512-token chunk alone",
    "mixed-step": "(d)'s 32 sequences, one query each, in a plan made for 512",
})


@dataclass(frozen=True)
class Mix:
    """One batch: query tokens and keys per sequence."""

    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    q_bound: int = 0  # the plan's max_q_len where it exceeds max(q_lens) (a step of a loop)

    @property
    def batch(self) -> int:
        return len(self.kv_lens)

    @property
    def decode(self) -> bool:
        """Every sequence has one query token (attention_with_kvcache, Lq = 1) and the plan
        is made for one."""
        return all(n == 1 for n in self.q_lens) and self.q_bound <= 1

    @property
    def max_q(self) -> int:
        """The plan's bound on query tokens per sequence."""
        return max(max(self.q_lens), self.q_bound)


def _lognormal(n: int, rng: random.Random, median: int = 4096, sigma: float = 0.8,
               lo: int = 16, hi: int = 32768) -> list[int]:
    return [min(hi, max(lo, int(round(median * math.exp(rng.gauss(0.0, sigma)))))) for _ in range(n)]


def mix(name: str, seed: int = 0, scale: float = 1.0) -> Mix:
    """The lengths of mix `name`; `scale` shrinks every length (tests), keeping the shape."""
    rng = random.Random(seed)

    def s(n):
        return max(1, int(n * scale))

    if name == "equal":
        kv = [s(4096)] * 64
        q = [1] * 64
    elif name == "one-long":
        kv = [s(32768)] + [s(1024)] * 63
        q = [1] * 64
    elif name == "lognormal":
        kv = [s(n) for n in _lognormal(64, rng)]
        q = [1] * 64
    elif name == "mixed":
        kv = [s(4096)] + [s(n) for n in _lognormal(31, rng)]
        q = [min(512, kv[0])] + [1] * 31
    elif name in PARTS:
        d = mix("mixed", seed, scale)
        if name == "mixed-step":
            return Mix(name, (1,) * d.batch, d.kv_lens, q_bound=d.q_lens[0])
        part = slice(1, None) if name == "mixed-decode" else slice(0, 1)
        return Mix(name, d.q_lens[part], d.kv_lens[part])
    else:
        raise ValueError(f"unknown mix {name!r}; choose from {MIXES + PARTS}")
    return Mix(name, tuple(q), tuple(kv))
