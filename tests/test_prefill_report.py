"""`skattn bench --report prefill_ab.csv`: the prompt-chunk A/B's table and plot."""
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
