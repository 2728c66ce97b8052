"""The H100 anchors (benchmarks/anchors-h100.csv, docs/benchmarks.md) and the report's third table."""
import pytest

from skattn.bench import anchors as anchors_mod
from skattn.bench import cli, grid
from skattn.bench.anchors import ANCHORS_CSV, anchor_index, load_anchors, pct_of_floor
from skattn.bench.report import anchors_table, report
from skattn.bench.models import MODELS

from test_bench_report import _args, _synthetic_rows, _write_csv


def test_anchors_cover_the_grid():
    rows = load_anchors()
    assert ANCHORS_CSV.is_file() and len(rows) == 90
    assert {(r["model"], r["n"], r["depth"]) for r in rows} == {
        (m, n, depth) for m in MODELS for n in grid.SEED_N for depth in grid.SEED_DEPTHS}
    for r in rows:
        assert (r["hq"], r["hkv"], r["d"]) == tuple(MODELS[r["model"]][:3])
        assert (r["gpu"], r["date"], r["source"]) == ("H100 SXM (80 GB)", "2026-11-24", "docs/benchmarks.md")
        assert all(r[k] > 0 for k in ("floor_us", "llamacpp_us", "sdpa_flash_us", "sdpa_cudnn_us"))


def test_anchor_row_by_hand():
    # the anchor table: | llama70b (64/8/128) | 512 | 32768 | 832.4 | 3039.1 | 1610.8 | 1653.0 |
    a = anchor_index(load_anchors())[(64, 8, 128, 512, 32768)]
    assert a["model"] == "llama-70b"
    assert (a["floor_us"], a["llamacpp_us"], a["sdpa_flash_us"], a["sdpa_cudnn_us"]) == \
        (832.4, 3039.1, 1610.8, 1653.0)
    assert pct_of_floor(a, "llamacpp_us") == pytest.approx(100 * 832.4 / 3039.1)
    # | qwen3moe-30b-a3b (32/4/128) | 1 | 8192 | 5.6 | 13.9 | 38.5 | 31.8 |
    moe = anchor_index(load_anchors())[(32, 4, 128, 1, 8192)]
    assert (moe["floor_us"], moe["llamacpp_us"], moe["sdpa_flash_us"], moe["sdpa_cudnn_us"]) == \
        (5.6, 13.9, 38.5, 31.8)


def test_missing_anchors_file(tmp_path, monkeypatch):
    assert load_anchors(tmp_path / "nope.csv") == []
    monkeypatch.setattr(anchors_mod, "ANCHORS_CSV", tmp_path / "nope.csv")
    assert load_anchors() == []
    intro, table = anchors_table(_synthetic_rows(), [])
    assert "table skipped" in intro and table == ""


def _anchor_rows(md: str) -> list[list[str]]:
    section = md.split("## vs the anchors")[1]
    return [line.split(" | ") for line in section.splitlines() if line.startswith("| qwen")]


def test_report_vs_anchors(tmp_path):
    # synthetic rows (floor 10 µs): qwen3moe n=1 best skattn = auto 10 µs -> 100%;
    # qwen3-14b n=512 best = auto 150 µs -> 7%; sdpa-flash 40 µs -> 25% in both
    path = _write_csv(tmp_path / "bench-synthetic.csv", _synthetic_rows())
    md = report([path], out_dir=tmp_path, plots=False)
    assert "## vs the anchors" in md and "measured on an H100 SXM (80 GB)" in md and "ours on synthetic" in md
    moe, q14 = _anchor_rows(md)
    assert moe[:4] == ["| qwen3moe-30b-a3b (32/4/128)", "1", "8192", "100% (auto)"]
    # the anchors' own H100 floor: 5.6 / 13.9 = 40%, 5.6 / 38.5 = 15%, 5.6 / 31.8 = 18%
    assert moe[4:7] == ["40%", "15%", "18%"]
    assert moe[7:] == ["25%", "—", "yes |"]  # our sdpa-flash; no sdpa-cudnn in the CSV
    # 130.1 / 625.0 = 21%, 130.1 / 385.3 = 34%, 130.1 / 438.9 = 30%
    assert q14[3:] == ["7% (auto)", "21%", "34%", "30%", "25%", "—", "no |"]
    assert "beats llama.cpp's % of floor in 1 of 2 cells (n = 1: 1 of 1; n = 512: 0 of 1)" in md


def test_vs_anchors_explicit_list_and_cli(tmp_path, capsys):
    rows = _synthetic_rows()
    mine = [dict(model="x", hq=32, hkv=4, d=128, n=1, depth=8192, floor_us=10.0, llamacpp_us=5.0,
                 sdpa_flash_us=None, sdpa_cudnn_us=20.0, gpu="G", date="D", source="S")]
    intro, table = anchors_table(rows, mine)
    assert "measured on an G on D" in intro
    lines = [line for line in table.splitlines() if line.startswith("| qwen")]
    assert len(lines) == 1 and lines[0].split(" | ")[3:] == ["100% (auto)", "200%", "—", "50%", "25%", "—",
                                                             "no |"]
    assert "No cell" in anchors_table(rows, [{**mine[0], "depth": 1}])[1]
    path = _write_csv(tmp_path / "bench-x.csv", rows)
    assert cli.run(_args("--report", str(path), "--out", str(tmp_path / "r"))) == 0
    assert "## vs the anchors" in capsys.readouterr().out
    assert "## vs the anchors" in (tmp_path / "r" / "bench-x.md").read_text()
