#!/usr/bin/env bash
# GPU tests, then `skattn bench`, on the GPU machine. Run from anywhere in the repo:
#   scripts/gpu_run.sh --quick                  # ~4 min on an H100/H200
#   scripts/gpu_run.sh --models llama-8b --tag part3
# Arguments go to `skattn bench`. Results go to $OUT (or benchmarks/results when unset):
# bench-<tag>.csv/.json/.md, bench-<tag>-speedup.png, bench-<tag>-floor.png and gpu_tests.log.
# Uses the image's python3 (torch + triton preinstalled); never pip-installs torch.
# Exit status: the tests' when they failed, else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"

nvidia-smi -L || echo "nvidia-smi failed"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

# several workers compile Triton kernels in parallel (the GPU tests are compile-bound: 30 tests
# took 116 s with 8 workers on the 16-core H200 machine)
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
python3 -m pytest -q -m gpu $workers tests 2>&1 | tee "$OUT_DIR/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
if [ "$test_rc" -eq 5 ]; then
    echo "gpu_run.sh: no test is marked gpu yet (pytest exit 5), not a failure"
    test_rc=0
fi

if [ -f src/skattn/cli.py ]; then
    python3 -m skattn.cli bench "$@" --out "$OUT_DIR"
else  # before the package CLI exists: the bench's own entry point takes the same options
    python3 -m skattn.bench.cli "$@" --out "$OUT_DIR"
fi
bench_rc=$?

echo "gpu_run.sh: tests exit $test_rc, bench exit $bench_rc"
if [ "$test_rc" -ne 0 ]; then
    exit "$test_rc"
fi
exit "$bench_rc"
