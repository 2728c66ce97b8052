"""Before and after in one GPU call: run a command against the source tree of another commit,
then against the working tree, on the same machine one after the other.

    python3 tools/ab_tree.py prepare REF        # here: REF's src/ into .ab/REF (git archive)
    # the device call, carrying the ignored folder: run(..., carry=[".ab"])
    PYTHONPATH=src python3 tools/ab_tree.py run REF [--order ref,work] -- COMMAND ARGS...

`run` starts COMMAND once per entry of --order (default ref,work; `ref,work,ref` brackets a
drift of the machine), with PYTHONPATH set to that tree's `src` and OUT to `$OUT/<entry>`
(default benchmarks/results/latest/ab), prints each run's last lines, and writes
`$OUT/ab.json`: the commits (REF's as `prepare` recorded it; the working tree's, or
--work-commit), the command and each run's exit status and seconds. A timer or checker that writes under $OUT (e.g.
tools/serving_sweep.py, tools/quant_sweep.py, tools/varlen_prefill.py) keeps its files
apart per tree. Same-call pairs are what PERF.md compares ("Timers and method").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AB = ROOT / ".ab"


def prepare(ref: str) -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    dest = AB / ref
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "COMMIT").write_text(commit + "\n")
    print(f"{dest.relative_to(ROOT)}/src: {commit}; carry '.ab' to the device")
    return 0


def _head() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (res.stdout.strip() or "unknown") + ("+" if dirty else "")


def run(ref: str, order: list[str], command: list[str], tail: int, work: str | None) -> int:
    src = {"ref": AB / ref / "src", "work": ROOT / "src"}
    if not (src["ref"] / "skattn").is_dir():
        print(f"{src['ref']} is missing: run `tools/ab_tree.py prepare {ref}` first and carry "
              f"'.ab' to the device", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", ROOT / "benchmarks/results/latest/ab"))
    out.mkdir(parents=True, exist_ok=True)
    commit = (AB / ref / "COMMIT").read_text().strip()
    runs, rc = [], 0
    for i, tree in enumerate(order):
        env = dict(os.environ, PYTHONPATH=str(src[tree]), OUT=str(out / f"{i}-{tree}"))
        t0 = time.time()
        res = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        runs.append(dict(tree=tree, out=f"{i}-{tree}", rc=res.returncode,
                         seconds=round(time.time() - t0, 1)))
        rc = rc or res.returncode
        lines = (res.stdout + res.stderr).splitlines()
        print(f"== {tree} ({commit if tree == 'ref' else 'working tree'}), exit {res.returncode}")
        print("\n".join(lines[-tail:]))
    meta = dict(ref=ref, ref_commit=commit, work_commit=work or _head(), command=command,
                runs=runs)
    (out / "ab.json").write_text(json.dumps(meta, indent=1) + "\n")
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="REF's src/ into .ab/REF (here, before the device call)")
    p.add_argument("ref")
    r = sub.add_parser("run", help="-- COMMAND against REF's tree and the working tree (GPU)")
    r.add_argument("ref")
    r.add_argument("--order", default="ref,work", help="trees in turn, e.g. ref,work,ref")
    r.add_argument("--tail", type=int, default=30, help="last lines printed of each run")
    r.add_argument("--work-commit", help="the working tree's commit for ab.json (default: what "
                   "git reports there; a device's copy of the tree may carry older git data)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, command = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if args.what == "prepare":
        return prepare(args.ref)
    order = args.order.split(",")
    if not command or any(t not in ("ref", "work") for t in order):
        ap.error("run needs -- COMMAND, and --order of ref and work")
    return run(args.ref, order, command, args.tail, args.work_commit)


if __name__ == "__main__":
    raise SystemExit(main())
