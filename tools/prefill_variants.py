"""The skattn variants `tools/prefill_ab.py` times: named ones, `ws@N` and
`KERNEL/D:key=value:...` (`chosen` parses a `--variants` list).

    python3 tools/prefill_variants.py [NAMES]   # what a --variants list means (no GPU)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from skattn.bench.providers import tuning_fields
from skattn.tuning import PREFILL_KERNELS


@dataclass(frozen=True)
class Variant:
    """A skattn configuration: the prefill kernel and plan overrides per head size."""

    name: str
    prefill: str | None = "base"  # None: no Tuning (auto's own choice)
    geometry: dict = field(default_factory=dict)  # head size -> dict(block_n=, num_warps=, ...)
    tuning: dict = field(default_factory=dict)  # other Tuning fields


VARIANTS = (
    Variant("base"),
    Variant("auto", None),
    Variant("tma", "tma"),
    Variant("tma-alt", "tma", geometry={128: dict(block_n=64, num_warps=8, num_stages=4),
                                        64: dict(block_n=128, num_warps=4, num_stages=3)}),
    Variant("ws", "ws"),
    Variant("ws-alt", "ws", geometry={64: dict(block_n=128)}),
    Variant("ws-pp", "ws", geometry={64: dict(block_n=128)}, tuning=dict(prefill_pingpong=True)),
)
# named only (not in the default set): A/Bs of opt-in switches
EXTRA = (
    Variant("ws-sum", "ws", geometry={64: dict(block_n=128)}, tuning=dict(prefill_sum_mma=True)),
    Variant("ws-nosum", "ws", geometry={64: dict(block_n=128)},
            tuning=dict(prefill_sum_mma=False)),
)


def on_programs(name: str) -> Variant | None:
    """`ws@N`: the warp-specialised kernel on N programs, or None for another name."""
    kernel, _, count = name.partition("@")
    if kernel != "ws" or not count.isdigit() or int(count) < 1:
        return None
    n = int(count)
    return Variant(name, "ws", geometry={128: dict(programs=n), 64: dict(block_n=128, programs=n)})


GEOMETRY_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "programs")


def custom(name: str) -> Variant | None:
    """`KERNEL/D:key=value:...`: a kernel ("base", "tma", "ws") with `skattn.plan`'s geometry
    (block_m, block_n, num_warps, num_stages, programs) at head size D, and `skattn.Tuning`
    fields (at every head size; integers, true/false or words), e.g.
    `base/128:block_n=128:num_stages=3`; None for a name of another form."""
    kernel, sep, rest = name.partition("/")
    head, *pairs = rest.split(":")
    if not sep or kernel not in PREFILL_KERNELS or not head.isdigit() or not pairs:
        return None
    geometry, others = {}, []
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if key in GEOMETRY_KEYS and eq and text.isdigit():
            geometry[key] = int(text)
        elif key == "prefill":
            raise SystemExit(f"variant {name!r}: the kernel is the name's first part, not "
                             f"{pair!r}")
        else:
            others.append(pair)
    try:  # the others: Tuning fields, parsed and checked as `skattn bench` does
        tuning = tuning_fields(others, name)
    except ValueError as err:
        raise SystemExit(f"{err} (or of {list(GEOMETRY_KEYS)})") from None
    return Variant(name, kernel, geometry={int(head): geometry}, tuning=tuning)


def chosen(names=None) -> tuple:
    """The variants named (comma-separated or a list), in VARIANTS' order then `ws@N` and
    `KERNEL/D:...` ones in the order given; all of VARIANTS without names."""
    if isinstance(names, str):
        names = [x for x in names.split(",") if x]
    if not names:
        return VARIANTS
    extra = ([v for v in EXTRA if v.name in names]
             + [v for v in (on_programs(n) or custom(n) for n in names) if v is not None])
    unknown = set(names) - {v.name for v in VARIANTS} - {v.name for v in extra}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: "
                         f"{[v.name for v in VARIANTS]}, ws@N and KERNEL/D:key=value:...")
    return tuple(v for v in VARIANTS if v.name in names) + tuple(extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="?", default="",
                    help="a --variants list (comma-separated); all named variants without one")
    args = ap.parse_args(argv)
    for v in chosen(args.names):
        print(f"{v.name}: kernel {v.prefill or 'auto'}, geometry {v.geometry}, tuning {v.tuning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
