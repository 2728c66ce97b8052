"""scripts/fixed_cost.py: the fixed cost and streaming rate of decode times (no GPU)."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["provider", "variant", "model", "n", "depth", "status", "p50_us", "bytes", "pct_floor"]


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def row(depth, us, n=1, variant="auto"):
    nbytes = depth * 4096  # 4 KB of K+V per position
    return dict(provider="skattn", variant=variant, model="m", n=n, depth=depth, status="ok",
                p50_us=us, bytes=nbytes, pct_floor=50)


def run(*paths):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fixed_cost.py"), *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("|")[1:-1] for line in out.splitlines()[2:]]


def test_recovers_fixed_cost_and_rate(tmp_path):
    # time = 6 us + bytes / 4.6 TB/s, exactly
    depths = (8192, 16384, 32768)
    write(tmp_path / "a.csv", [row(L, 6.0 + L * 4096 / 4.6e6) for L in depths]
          + [row(L, 1.0, n=512) for L in depths])  # prompt chunks are left out
    (series,) = run(tmp_path / "a.csv")
    assert [c.strip() for c in series[:6]] == ["skattn:auto", "m", "1", "6.0", "4.60", "0.0"]


def test_later_file_replaces_a_cell(tmp_path):
    depths = (8192, 16384, 32768)
    write(tmp_path / "a.csv", [row(L, 99.0) for L in depths])
    write(tmp_path / "b.csv", [row(L, 2.0 + L * 4096 / 2.0e6) for L in depths])
    (series,) = run(tmp_path / "a.csv", tmp_path / "b.csv")
    assert series[3].strip() == "2.0" and series[4].strip() == "2.00"


def test_flat_times_have_no_rate(tmp_path):
    write(tmp_path / "a.csv", [row(L, 10.0) for L in (8192, 16384, 32768)])
    (series,) = run(tmp_path / "a.csv")
    assert series[3].strip() == "10.0" and series[4].strip() == "—"
