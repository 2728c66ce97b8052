"""The seed grid: model attention shapes x query tokens n x KV depth, and its subsets."""
from __future__ import annotations

from dataclasses import dataclass

from skattn.bench.models import MODELS, resolve

SEED_N = (1, 2, 4, 8, 16, 512)
SEED_DEPTHS = (8192, 16384, 32768)

# skattn variants timed per cell: name -> (policy, fixup) for `skattn.plan`.
SKATTN_VARIANTS: dict[str, tuple[str, str | None]] = {
    "llamacpp-before": ("llamacpp-before", None),  # before the seed change: general fixup
    "llamacpp": ("llamacpp", None),  # the merged rule: uniform fixup where it applies
    "round-4x": ("round-4x", None),
    "auto": ("auto", None),
    "fused": ("llamacpp-before", "fused"),
    "auto-fused": ("auto", "fused"),  # auto's N, merged inside the main kernel (one launch)
    "auto-nowait": ("auto", None),  # auto's plan, the main kernel launched without PDL (VARIANT_TUNING)
}
# Tuning fields of variants that launch a plan differently (`skattn.Tuning`)
VARIANT_TUNING: dict[str, dict] = {"auto-nowait": {"pdl_wait": False}}

# `--quick`: a run that fits in about 4 minutes on an H100/H200.
QUICK_MODELS = ("qwen3moe-30b-a3b", "qwen3-14b")
QUICK_N = (1, 4, 16, 512)
QUICK_DEPTHS = (16384,)


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: `n` queries at the end of a causal window over `depth` keys, batch 1."""

    model: str
    hq: int
    hkv: int
    d: int
    n: int
    depth: int

    @property
    def shape(self) -> str:
        return f"{self.hq}/{self.hkv}/{self.d}"

    @property
    def label(self) -> str:
        return f"{self.model} ({self.shape}) n={self.n} L={self.depth}"


def parse_ints(text: str | None) -> tuple[int, ...] | None:
    """'1,4,16' -> (1, 4, 16); None or '' -> None."""
    if not text:
        return None
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def parse_names(text: str | None) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); None or '' -> None."""
    if not text:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip()) or None


def select(models_: tuple[str, ...] | None = None, ns: tuple[int, ...] | None = None,
           depths: tuple[int, ...] | None = None, *, quick: bool = False) -> list[Cell]:
    """Cells of the seed grid, in the seed table's order (model, n, depth).

    Parameters
    ----------
    models_ : tuple of str, optional
        Model names or aliases (`skattn.bench.models`); all five seed models by default.
    ns, depths : tuple of int, optional
        Query tokens and KV depths; the seed's values by default. Any positive value is
        accepted, so a subset or an off-grid cell can be run.
    quick : bool
        Default to the quick subset (explicit arguments still win).

    Returns
    -------
    list of Cell
    """
    if models_:
        names = list(dict.fromkeys(resolve(m)[0] for m in models_))
    else:
        names = QUICK_MODELS if quick else tuple(MODELS)
    ns = ns or (QUICK_N if quick else SEED_N)
    depths = depths or (QUICK_DEPTHS if quick else SEED_DEPTHS)
    cells = []
    for m in names:
        hq, hkv, d = MODELS[m][:3]
        cells += [Cell(m, hq, hkv, d, n, L) for n in ns for L in depths]
    return cells
