"""`skattn bench --report CSV` without a GPU: the prompt-chunk A/B's and the quantized-K/V
benchmark's tables and plots."""
import csv

from skattn.bench.cli import main as cli_main
from skattn.bench.records import have_matplotlib


def test_prefill_report_counts_the_targets(tmp_path):
    # `skattn bench --report prefill_ab.csv`: % of peak per cell and provider, skattn's speed
    # over unmasked cuDNN, "both" where auto reaches 75% of peak and beats cuDNN
    cols = ("model", "n", "L", "dtype", "provider", "variant", "status", "p50_us", "pct_peak",
            "cudnn_nomask_over")
    rows = [("m", 512, 8192, "f16", "sdpa-cudnn-nomask", "no mask: lower bound", "ok", 100, 80, 1),
            ("m", 512, 8192, "f16", "skattn", "auto", "ok", 95, 84, ""),
            ("m", 512, 16384, "f16", "sdpa-cudnn-nomask", "no mask: lower bound", "ok", 100, 80, 1),
            ("m", 512, 16384, "f16", "skattn", "auto", "ok", 105, 76, ""),
            ("m", 128, 32768, "f16", "sdpa-cudnn-nomask", "no mask: lower bound", "ok", 100, 30, 1),
            ("m", 128, 32768, "f16", "skattn", "auto", "ok", 50, 60, "")]
    path = tmp_path / "prefill_ab.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    assert cli_main(["--report", str(path), "--out", str(tmp_path / "r"), "--tag", "t"]) == 0
    text = (tmp_path / "r" / "prefill-t.md").read_text()
    lines = {ln.split("|")[3].strip(): ln for ln in text.splitlines() if ln.startswith("| m |")}
    assert lines["8192"].endswith("| both |") and "1.053x" in lines["8192"]
    assert lines["16384"].endswith("| - |")  # 76% of peak but slower than cuDNN
    assert lines["32768"].endswith("| - |")  # 2x cuDNN but 60% of peak
    assert "1 of 3 cells" in text
    assert (tmp_path / "r" / "prefill-t.png").exists() == have_matplotlib()


def test_quant_report_merges_runs_and_draws_the_speed_ups(tmp_path):
    cols = ("model", "hq", "hkv", "d", "n", "depth", "format", "status", "p50_us", "pct_floor",
            "speedup_vs_f16", "err_unquantized")
    cell = ("llama-8b", 32, 8, 128, 1, 32768)

    def write(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)

    a, b = tmp_path / "quant-a.csv", tmp_path / "quant-b.csv"
    write(a, [(*cell, "f16", "ok", 36.0, 86, 1, ""), (*cell, "fp8", "ok", 30.0, 50, 1.2, "4e-2")])
    write(b, [(*cell, "fp8", "ok", 24.0, 64, 1.5, "4e-2")])  # a later run of the same cell
    assert cli_main(["--report", str(a), str(b), "--out", str(tmp_path / "r"), "--tag", "t"]) == 0
    text = (tmp_path / "r" / "quant-t.md").read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("| llama-8b")][0]
    assert "24.0 (64%) 1.50x" in line and "30.0" not in line and "36.0 (86%)" in line
    assert (tmp_path / "r" / "quant-t.png").exists() == have_matplotlib()
