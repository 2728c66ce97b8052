"""Gate compute-sanitizer racecheck over the warp-specialised prompt kernel's calls: every
hazard must lie at the two places where Triton's warp-specialisation protocol passes the
partitions' state and arguments through shared memory (reported at `ws_prefill_kernel`'s `def`
line and at its `gl.warp_specialize` call; `scripts/ws_protocol_probe.py` reproduces them with
nothing but that protocol, docs/prefill.md "Checking it"). A hazard anywhere else, e.g. on the
kernel's own K/V ring or query buffers, fails.

    compute-sanitizer --tool racecheck python3 tools/sanitize_cases.py --quick --ws > ws.log
    python3 scripts/racecheck_ws.py ws.log

Prints one line (hazard reports at the protocol's lines, elsewhere) and exits 1 if any lies
elsewhere or the log has no racecheck summary.
"""
import argparse
import re
import sys
from pathlib import Path

KERNEL = Path(__file__).resolve().parent.parent / "src" / "skattn" / "kernels" / "prefill_ws.py"
ACCESS = re.compile(r"(?:Race reported between|and) (?:Read|Write) access at (\S+?)\+0x[0-9a-f]+ "
                    r"in (\S+?):(\d+)")


def protocol_lines(source: str) -> set[int]:
    """The `def ws_prefill_kernel` line and the line of its `gl.warp_specialize(` call."""
    lines = source.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("def ws_prefill_kernel("))
    call = next(i for i in range(start, len(lines)) if "gl.warp_specialize(" in lines[i])
    return {start + 1, call + 1}


def check(log: str, allowed: set[int]) -> tuple[int, list[str]]:
    """(accesses at the protocol's lines, the others as 'kernel file:line')."""
    ok, other = 0, []
    for kernel, path, line in ACCESS.findall(log):
        if kernel == "ws_prefill_kernel" and Path(path).name == KERNEL.name and int(line) in allowed:
            ok += 1
        else:
            other.append(f"{kernel} {path}:{line}")
    return ok, other


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="compute-sanitizer racecheck output")
    args = ap.parse_args(argv)
    log = Path(args.log).read_text(errors="replace")
    ok, other = check(log, protocol_lines(KERNEL.read_text()))
    summary = "RACECHECK SUMMARY" in log
    print(f"racecheck ws: {ok} hazard accesses at the protocol's lines, {len(other)} elsewhere"
          + ("" if summary else "; no racecheck summary in the log")
          + (f" ({', '.join(sorted(set(other))[:5])})" if other else ""))
    return 0 if summary and not other else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
