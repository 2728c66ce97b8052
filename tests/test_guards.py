"""The guards of tests/conftest.py: an isolated test runs in its own process and a hang there
fails that test only; the GPU tests' watchdog ends a hung process with every stack printed."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = '''
import os, time, pytest

@pytest.mark.isolated(timeout=3)
def test_hangs():
    time.sleep(120)

@pytest.mark.isolated(timeout=120)
def test_in_its_own_process():
    assert os.environ.get("SKATTN_ISOLATED_TEST") == "1"

@pytest.mark.isolated(timeout=120)
def test_fails():
    assert False, "wrong in the child"

@pytest.mark.isolated(timeout=120)
def test_skips():
    pytest.skip("no device here")

@pytest.mark.gpu
def test_watched():
    time.sleep(120)
'''


def _run(tmp_path, *args, **env):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_cases.py").write_text(CASES)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_isolated_tests(tmp_path):
    res = _run(tmp_path, "-k", "not watched")
    out = res.stdout
    assert "PASSED test_cases.py::test_in_its_own_process" in out, out
    assert "FAILED test_cases.py::test_hangs" in out and "did not finish within 3 s" in out, out
    assert "FAILED test_cases.py::test_fails" in out and "wrong in the child" in out, out
    assert "SKIPPED" in out and "no device here" in out, out


def test_gpu_watchdog(tmp_path):
    res = _run(tmp_path, "-k", "watched", SKATTN_TEST_TIMEOUT="2")
    assert res.returncode != 0
    assert "Timeout" in res.stderr and "test_watched" in res.stderr, res.stderr[-2000:]
