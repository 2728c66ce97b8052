"""The `skattn` command line: `skattn plan`, plus `bench` and `calibrate` where installed."""
from __future__ import annotations

import argparse
import importlib
import sys

from skattn.policy import FIXUPS, POLICIES

# Subcommands living in other modules, each with add_arguments(parser) and run(args) -> int;
# registered only when the module exists. Add new ones here.
PLUGINS = (
    ("bench", "skattn.bench.cli"),
    ("calibrate", "skattn.bench.calibrate"),
)


def _heads(text: str) -> tuple[int, int]:
    try:
        q, kv = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Q/KV such as 40/8, got {text!r}") from None
    return q, kv


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show the stream-K plan of one attention shape",
                       description="Plan one attention shape (n queries at the end of a causal "
                                   "window over depth keys) and describe it.")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--model", help="a model name, e.g. llama-8b (see skattn.bench.models)")
    shape.add_argument("--heads", type=_heads, metavar="Q/KV", help="query/KV heads, e.g. 40/8")
    p.add_argument("--head-dim", type=int, help="head size (required with --heads)")
    p.add_argument("--n", type=int, required=True, help="query tokens (q_len)")
    p.add_argument("--depth", type=int, required=True, help="KV cache length (kv_len)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="bottom-right causal mask (default: on)")
    p.add_argument("--window", type=int, help="sliding window in tokens")
    p.add_argument("--sms", type=int, help="SM count (default: the current GPU's)")
    p.add_argument("--occupancy", "--blocks-per-sm", type=int, help="programs per SM (default: the GPU's)")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--programs", "--nblocks", type=int, help="force the number of programs")
    p.add_argument("--fixup", choices=FIXUPS, help="force the fixup kind")
    p.add_argument("--png", help="also draw the plan into this PNG file")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from skattn.planner import plan

    if args.model is not None:
        from skattn.bench.models import resolve

        _, shape = resolve(args.model)
        q_heads, kv_heads, head_dim = shape.q_heads, shape.kv_heads, shape.head_dim
        head_dim = args.head_dim or head_dim
    else:
        if args.head_dim is None:
            raise ValueError("--heads needs --head-dim")
        (q_heads, kv_heads), head_dim = args.heads, args.head_dim
    try:
        p = plan(batch=args.batch, q_len=args.n, kv_len=args.depth, q_heads=q_heads,
                 kv_heads=kv_heads, head_dim=head_dim, causal=args.causal, window=args.window,
                 sms=args.sms, occupancy=args.occupancy, policy=args.policy,
                 programs=args.programs, fixup=args.fixup)
    except RuntimeError as err:  # no GPU to ask
        raise RuntimeError(f"{err} (here: --sms and --occupancy)") from None
    sys.stdout.write(p.describe() + "\n")
    if args.png:
        p.draw(args.png)
        sys.stdout.write(f"wrote {args.png}\n")
    return 0


def _missing(err: ModuleNotFoundError, path: str) -> bool:
    """Whether `err` is about `path` itself or a package above it, not about its imports."""
    parts = path.split(".")
    return err.name in {".".join(parts[:i]) for i in range(2, len(parts) + 1)}


def build_parser() -> argparse.ArgumentParser:
    """The `skattn` parser; its subparsers are in `parser.subcommands` for more `add_parser`.

    Returns
    -------
    argparse.ArgumentParser
        Every subcommand's namespace carries `func(args) -> int`.
    """
    parser = argparse.ArgumentParser(prog="skattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommands = sub
    _add_plan(sub)
    for name, path in PLUGINS:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if _missing(err, path):
                continue
            raise
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad shape or no GPU).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: sys.argv[1:]).

    Returns
    -------
    int
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as err:  # bad shape, unknown model, no GPU to ask
        sys.stderr.write(f"skattn {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
