"""Test setup: without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors.

Two guards keep a hung GPU kernel from stopping a whole run:

- a test marked `isolated(timeout=s)` runs in a child pytest process that is killed after
  `s` seconds (the test then fails, naming the time limit; the run goes on);
- every `gpu` test has a watchdog: after SKATTN_TEST_TIMEOUT seconds (default 600; 0 turns
  it off) the process prints every thread's stack and exits, which pytest-xdist reports as
  a crashed test before it starts a new worker.
"""
import faulthandler
import os
import re
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates skattn's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CHILD = "SKATTN_ISOLATED_TEST"  # set in an isolated test's own process
_STDERR: list = []  # the terminal's stderr, kept before pytest captures a test's output


def pytest_configure(config):
    _STDERR.append(os.dup(sys.stderr.fileno()))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    mark = pyfuncitem.get_closest_marker("isolated")
    if mark is None or os.environ.get(_CHILD):
        return None
    timeout = mark.kwargs.get("timeout", 300)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
           "no:xdist", pyfuncitem.nodeid]
    try:
        res = subprocess.run(cmd, cwd=pyfuncitem.config.rootpath, capture_output=True,
                             text=True, timeout=timeout, env=dict(os.environ, **{_CHILD: "1"}))
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-3000:]
        pytest.fail(f"did not finish within {timeout} s in its own process (killed): a hung "
                    f"kernel? Its output:\n{out.decode(errors='replace') if isinstance(out, bytes) else out}")
    out = res.stdout + res.stderr
    if re.search(r"\b1 skipped\b", out) and not re.search(r"\b1 passed\b", out):
        why = re.search(r"SKIPPED \[\d+\] (.*)", out)
        pytest.skip(why.group(1) if why else "skipped in its own process")
    if res.returncode != 0 or not re.search(r"\b1 passed\b", out):
        pytest.fail(f"failed in its own process (exit {res.returncode}):\n{out[-6000:]}")
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("SKATTN_TEST_TIMEOUT", "600")) if item.get_closest_marker("gpu") else 0
    isolated = item.get_closest_marker("isolated")
    if limit > 0 and isolated is not None and not os.environ.get(_CHILD):
        limit = max(limit, isolated.kwargs.get("timeout", 300) + 60)  # the child's limit first
    if limit > 0:
        faulthandler.dump_traceback_later(limit, exit=True, file=_STDERR[0])
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()
