"""The seed table: speed-up and fixup time from synthetic rows, its layout, and one real run of
both policies (full call and main kernel alone) under the Triton interpreter."""
import csv

import pytest
import torch

from skattn.bench import cli, grid, run, seed, timing
from skattn.bench.run import RunOptions
from skattn.bench.timing import Timing

from test_bench_report import _args

DEPTHS = (8192, 16384, 32768)


def _row(model, hq, n, depth, policy, part, p50, status="ok", programs=264, fixup="general"):
    return dict(model=model, hq=hq, hkv=8, d=128, n=n, depth=depth, policy=policy, part=part,
                programs=programs, fixup=fixup, ntiles_dst=8, status=status, err="1e-3",
                p20_us=p50, p50_us=p50, p80_us=p50, reps=10, timer="graph", layers=16, gpu="synthetic",
                sms=132, torch="t", triton="t", commit="c", flush="read", timestamp="2000-01-01T00:00:00")


def _synthetic():
    # SYNTHETIC numbers (not measurements): before 30 µs, after 24 µs, main kernels 27 / 23 µs
    rows = []
    for model, hq in (("llama-8b", 32), ("llama-70b", 64)):
        for n in (1, 16):
            for depth in DEPTHS:
                scale = depth / 8192
                rows += [_row(model, hq, n, depth, "llamacpp-before", "call", 30.0 * scale),
                         _row(model, hq, n, depth, "llamacpp-before", "main", 27.0 * scale),
                         _row(model, hq, n, depth, "llamacpp", "call", 24.0 * scale, fixup="uniform"),
                         _row(model, hq, n, depth, "llamacpp", "main", 23.0 * scale, fixup="uniform")]
    # one cell whose "after" call was not capturable: no speed-up, a status instead
    for r in rows:
        if (r["model"], r["n"], r["depth"], r["policy"], r["part"]) == ("llama-70b", 16, 32768, "llamacpp",
                                                                        "call"):
            r.update(status="not capturable: synthetic", p50_us="")
    return rows


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=seed.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table_rows(table):
    return [line.split(" | ") for line in table.splitlines()[2:]]


def test_speedup_and_fixup_time():
    results = seed.cell_results(_synthetic())
    assert [(r["model"], r["n"], r["depth"]) for r in results][:4] == [
        ("llama-8b", 1, 8192), ("llama-8b", 1, 16384), ("llama-8b", 1, 32768), ("llama-8b", 16, 8192)]
    first = results[0]
    assert first["speedup"] == pytest.approx(30 / 24)
    assert first["llamacpp-before"]["fixup_us"] == pytest.approx(3.0)
    assert first["llamacpp"]["fixup_us"] == pytest.approx(1.0)
    last = results[-1]
    assert last["speedup"] is None and last["llamacpp"]["fixup_us"] is None
    assert last["llamacpp-before"]["fixup_us"] == pytest.approx(12.0)  # 4 x (30 - 27)


def test_seed_layout_rows_model_by_n_columns_depth():
    results = seed.cell_results(_synthetic())
    table = seed.speedup_table(results)
    assert table.splitlines()[0] == "| model (Hq/Hkv/D) | n | L = 8192 | L = 16384 | L = 32768 |"
    rows = _table_rows(table)
    assert [r[:2] for r in rows] == [["| llama-8b (32/8/128)", "1"], ["| llama-8b (32/8/128)", "16"],
                                     ["| llama-70b (64/8/128)", "1"], ["| llama-70b (64/8/128)", "16"]]
    assert rows[0][2:] == ["1.25x", "1.25x", "1.25x |"]
    assert rows[3][2:] == ["1.25x", "1.25x", "not capturable |"]
    fixups = _table_rows(seed.fixup_table(results))
    assert fixups[0][2:] == ["3.0 / 1.0", "6.0 / 2.0", "12.0 / 4.0 |"]
    assert fixups[3][4] == "12.0 / — |"
    per_cell = _table_rows(seed.times_table(results))
    assert per_cell[0][3:] == ["30.0 (264 general)", "24.0 (264 uniform)", "1.25x", "3.0", "1.0 |"]
    short = seed.short_table(results).splitlines()
    assert len(short) == 1 + len(results) and "1.25x" in short[1] and "not capturable" in short[-1]


def test_seed_report_files_and_cli_report(tmp_path, capsys):
    path = _write(tmp_path / "seed-x.csv", _synthetic())
    md = seed.seed_report([path], out_dir=tmp_path / "out")
    assert "## Speed-up of llamacpp over llamacpp-before" in md and "## The fixup's own time" in md
    assert "graph timer: per layer" in md and "- llamacpp call llama-70b n=16 L=32768: not capturable" in md
    assert (tmp_path / "out" / "seed-x.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "seed-x.md").read_text() == md
    # --report tells a seed-table CSV by its columns
    assert cli.run(_args("--report", str(path), "--out", str(tmp_path / "r"))) == 0
    assert "## Speed-up of llamacpp over llamacpp-before" in capsys.readouterr().out


def test_seed_table_runs_both_policies_under_the_interpreter(tmp_path, monkeypatch):
    # a real run on a tiny cell: 8/2/16, n = 1, L = 300 plans N = 6 programs for 2 tiles, so
    # llamacpp-before merges with the general fixup and llamacpp with the uniform one; the
    # main kernel alone runs through launch.run(main_only=True)
    cell = grid.Cell("tiny", 8, 2, 16, 1, 300)
    timed = []

    class FakeTimer:
        def __init__(self, flush="read"):
            pass

        def time(self, fn, warmup, reps):
            out = fn()
            timed.append(out)
            return Timing(1.0, 2.0, 3.0, reps)

    def cpu_inputs(c, s, dtype=torch.float16):
        g = torch.Generator().manual_seed(s)
        return tuple(torch.randn(1, L, h, c.d, generator=g).to(dtype)
                     for L, h in ((c.n, c.hq), (c.depth, c.hkv), (c.depth, c.hkv)))

    monkeypatch.setattr(timing, "ColdTimer", FakeTimer)
    monkeypatch.setattr(run, "_inputs", cpu_inputs)
    monkeypatch.setattr(run, "provenance", lambda sms: {"gpu": "none (test)", "sms": sms})
    opts = RunOptions(timer="event", sms=4, occupancy=2, warmup=0, reps=1, progress=False)
    csv_path, rows = seed.run_seed_table([cell], out_dir=tmp_path, tag="t", opts=opts)
    assert [(r["policy"], r["part"], r["status"]) for r in rows] == [
        ("llamacpp-before", "call", "ok"), ("llamacpp-before", "main", "ok"),
        ("llamacpp", "call", "ok"), ("llamacpp", "main", "ok")]
    for r in rows:
        p = seed.plan_cell(cell, r["policy"], sms=4, occupancy=2)
        assert (r["programs"], r["fixup"]) == (p.programs, p.fixup)
    assert [r["fixup"] for r in rows] == ["general", "general", "uniform", "uniform"]
    assert float(rows[0]["err"]) < 2e-2 and "err" not in rows[1]  # the main kernel alone is not checked
    assert len(timed) == 4 and all(t.shape == (1, 1, 8, 16) for t in timed)
    written = seed.read_seed_rows([csv_path])
    assert len(written) == 4 and {r["timer"] for r in written} == {"event"}
    assert seed.cell_results(written)[0]["speedup"] == pytest.approx(1.0)


def test_seed_table_reports_a_wrong_call(tmp_path, monkeypatch):
    # the full call is checked against float64 before it is timed
    real = seed.layer_call

    def zeros_for_llamacpp(plan, q, k, v, part, workspace):
        fn = real(plan, q, k, v, part, workspace)
        return (lambda: torch.zeros_like(fn())) if part == "call" and plan.policy == "llamacpp" else fn

    cell = grid.Cell("tiny", 8, 2, 16, 1, 130)
    g = torch.Generator().manual_seed(3)
    layers = [tuple(torch.randn(1, L, h, 16, generator=g).half() for L, h in ((1, 8), (130, 2), (130, 2)))]
    from skattn.bench.graph import References
    from skattn.bench.providers import reference

    monkeypatch.setattr(seed, "layer_call", zeros_for_llamacpp)
    opts = RunOptions(timer="event", sms=4, occupancy=2, warmup=0, reps=1)
    row = seed.measure_part(cell, "llamacpp", "call", layers, References(layers, reference), None, opts)
    assert row["status"].startswith("wrong: relative error") and "p50_us" not in row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plans-only mode of a machine without a GPU")
def test_seed_table_without_gpu_prints_plans(capsys):
    assert cli.run(_args("--seed-table", "--models", "llama-8b", "--n", "1,512", "--depth", "8192")) == 0
    out = capsys.readouterr().out
    assert "| llama-8b (32/8/128) | 1 | 8192 | 8 |" in out and "timings need a GPU" in out
