"""The bench harness on a CPU: floors, grid selection, plan table, status logic and reports."""
import argparse
import csv

import pytest
import torch

from skattn.bench import cli, grid
from skattn.bench.floors import Ceilings, cell_bytes, cell_flops, floor_us, pct_floor
from skattn.bench.plans import plan_table
from skattn.bench.providers import Built, Provider, reference, resolve
from skattn.bench.report import read_rows, report
from skattn.bench.run import COLUMNS, RunOptions, measure
from skattn.bench.timing import Timing, summarize

H100 = Ceilings(3.02e12, 660e12)  # the H100 anchors' ceilings (docs/benchmarks.md)


def test_floor_by_hand():
    # qwen3moe 32/4/128, n = 1, L = 8192: K + V = 2 * 8192 * 4 * 128 * 2 B, q + out = 2 * 32 * 128 * 2 B
    nbytes = cell_bytes(32, 4, 128, 1, 8192)
    assert nbytes == 16_777_216 + 16_384
    assert cell_flops(32, 128, 1, 8192) == 4 * 32 * 8192 * 128
    assert floor_us(nbytes, cell_flops(32, 128, 1, 8192), H100) == pytest.approx(5.5608, abs=1e-3)
    # n = 512 is matmul-bound: 4 * 32 * 512 * 8192 * 128 / 660e12 s = 104.1 µs (the seed table)
    assert floor_us(cell_bytes(32, 4, 128, 512, 8192), cell_flops(32, 128, 512, 8192), H100) == \
        pytest.approx(104.1, abs=0.05)
    assert pct_floor(5.0, 20.0) == 25.0


def test_summarize_quantiles():
    t = summarize([float(x) for x in range(11)])  # 0..10: p20 = 2, p50 = 5, p80 = 8
    assert (t.p20, t.p50, t.p80, t.reps) == (2.0, 5.0, 8.0, 11)


def _args(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_grid_selection():
    assert len(cli._cells(_args())) == 5 * 6 * 3
    cells = cli._cells(_args("--models", "qwen3-14b,llama-70b", "--n", "1,4", "--depth", "8192"))
    assert [(c.model, c.hq, c.hkv, c.d, c.n, c.depth) for c in cells] == [
        ("qwen3-14b", 40, 8, 128, 1, 8192), ("qwen3-14b", 40, 8, 128, 4, 8192),
        ("llama-70b", 64, 8, 128, 1, 8192), ("llama-70b", 64, 8, 128, 4, 8192)]
    quick = cli._cells(_args("--quick"))
    assert len(quick) == len(grid.QUICK_MODELS) * len(grid.QUICK_N) * len(grid.QUICK_DEPTHS)
    assert {c.depth for c in cli._cells(_args("--quick", "--depth", "8192"))} == {8192}
    assert [c.model for c in cli._cells(_args("--models", "qwen2-32b", "--n", "1", "--depth", "8192"))] \
        == ["qwen3-14b"]  # an alias
    with pytest.raises(ValueError):
        cli._cells(_args("--models", "no-such-model"))
    with pytest.raises(ValueError):
        cli._cells(_args("--n", "1,x"))


def test_provider_names():
    providers, _ = resolve(("skattn", "sdpa-flash"))
    assert [p.label for p in providers] == [f"skattn:{v}" for v in grid.SKATTN_VARIANTS] + ["sdpa-flash"]
    assert [p.label for p in resolve(("skattn:fused",))[0]] == ["skattn:fused"]
    with pytest.raises(ValueError):
        resolve(("skattn:nope",))


def test_plan_table_covers_the_grid():
    cells = grid.select()
    table = plan_table(cells, sms=132, occupancy=2)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(cells)
    for cell, row in zip(cells, rows):
        assert row.startswith(f"| {cell.model} ({cell.shape}) | {cell.n} | {cell.depth} |")
        assert "error" not in row


def test_measure_statuses():
    # tiny CPU tensors and fake providers: right, wrong and raising
    g = torch.Generator().manual_seed(0)
    cell = grid.Cell("tiny", 4, 2, 16, 2, 40)
    q, k, v = (torch.randn(1, n, h, 16, generator=g).half() for n, h in ((2, 4), (40, 2), (40, 2)))
    ref = reference(q, k, v)

    class FakeTimer:
        def time(self, fn, warmup, reps):
            fn()
            return Timing(1.0, 2.0, 3.0, reps)

    def provider(fn):
        return Provider("fake", "", lambda *a: Built(fn))

    def boom():
        raise NotImplementedError("head size 16 is not supported\nsecond line")

    opts = RunOptions(warmup=1, reps=3)
    right = measure(provider(lambda: ref.half()), cell, q, k, v, ref, FakeTimer(), opts)
    assert right["status"] == "ok" and right["p50_us"] == "2.000" and right["reps"] == 3
    wrong = measure(provider(lambda: torch.zeros_like(ref)), cell, q, k, v, ref, FakeTimer(), opts)
    assert wrong["status"].startswith("wrong") and "p50_us" not in wrong
    error = measure(provider(boom), cell, q, k, v, ref, FakeTimer(), opts)
    assert error["status"] == "error: NotImplementedError: head size 16 is not supported"


# -- report(): from a small SYNTHETIC CSV (made-up numbers for the test, not measurements)
def _synthetic_rows():
    rows = []
    for model, hq, n, master, uniform in (("qwen3moe-30b-a3b", 32, 1, 20.0, 16.0),
                                          ("qwen3-14b", 40, 512, 300.0, 250.0)):
        times = {"llamacpp-before": master, "llamacpp": uniform, "round-4x": uniform,
                 "auto": master / 2, "fused": master}
        measured = [("skattn", v, t) for v, t in times.items()] + [("sdpa-flash", "", 40.0)]
        for provider, variant, p50 in measured:
            rows.append(dict(provider=provider, variant=variant, policy=variant, fixup="general",
                             model=model, hq=hq, hkv=8 if hq == 40 else 4, d=128, n=n, depth=8192,
                             programs=264, status="ok", err="1e-3", p20_us=p50 - 1, p50_us=p50,
                             p80_us=p50 + 1, floor_us=10.0, pct_floor=100 * 10.0 / p50, gpu="synthetic",
                             sms=132, torch="t", triton="t", commit="c", timestamp="2000-01-01T00:00:00"))
    rows.append({**rows[-1], "provider": "flex", "status": "error: Unsupported: synthetic",
                 "p20_us": "", "p50_us": "", "p80_us": "", "pct_floor": ""})
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_report_tables_and_plots(tmp_path):
    path = _write_csv(tmp_path / "bench-synthetic.csv", _synthetic_rows())
    md = report([path], out_dir=tmp_path / "out")
    assert "## skattn: llamacpp-before" in md and "## Every provider: % of floor" in md
    seed_rows = [line for line in md.split("## Every provider")[0].splitlines() if line.startswith("| qwen")]
    assert len(seed_rows) == 2
    moe = seed_rows[0].split(" | ")
    assert moe[4] == "20.0 (264 general)" and moe[5] == "16.0 (264 general)" and moe[6] == "1.25x"
    assert moe[9] == "10.0 (264)" and moe[10] == "2.00x"  # auto
    assert seed_rows[1].split(" | ")[6] == "1.20x"  # 300 / 250
    floor_rows = [line for line in md.split("## Every provider")[1].splitlines() if line.startswith("| qwen")]
    assert "50% (20.0)" in floor_rows[0] and "25% (40.0)" in floor_rows[0]
    assert "| error |" in floor_rows[1] and "Unsupported: synthetic" in md
    for name in ("bench-synthetic.md", "bench-synthetic-speedup.png", "bench-synthetic-floor.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert len(data) > 1000 or name.endswith(".md")
    assert (tmp_path / "out" / "bench-synthetic-floor.png").read_bytes()[:4] == b"\x89PNG"


def test_report_merges_parts(tmp_path):
    rows = _synthetic_rows()
    part1 = _write_csv(tmp_path / "part1.csv", rows[:6])
    newer = {**rows[1], "p50_us": 10.0, "pct_floor": 100.0}  # llamacpp re-measured in part 2
    part2 = _write_csv(tmp_path / "part2.csv", rows[6:] + [newer])
    assert len(read_rows([part1, part2])) == len(rows)
    md = report([part1, part2], out_dir=tmp_path, stem="merged", plots=False)
    moe = [line for line in md.splitlines() if line.startswith("| qwen3moe")][0].split(" | ")
    assert moe[6] == "2.00x"  # 20 / 10: the later part wins


def test_cli_report_and_plans_modes(tmp_path, capsys):
    path = _write_csv(tmp_path / "bench-x.csv", _synthetic_rows())
    assert cli.run(_args("--report", str(path), "--out", str(tmp_path / "r"))) == 0
    assert (tmp_path / "r" / "bench-x-speedup.png").exists()
    assert cli.run(_args("--plans", "--models", "gpt-oss", "--n", "2", "--depth", "8192")) == 0
    out = capsys.readouterr().out
    assert "| gpt-oss (64/8/64) | 2 | 8192 |" in out and "132 SMs x 2" in out


def test_run_grid_writes_csv_json_and_report(tmp_path, monkeypatch):
    # the GPU loop with the GPU parts replaced: CPU inputs, a fake timer and fixed ceilings
    import json

    from skattn.bench import run, timing

    class FakeTimer:
        flush_bytes = 0

        def __init__(self, flush="read"):
            assert flush in timing.FLUSH_MODES

        def time(self, fn, warmup, reps):
            fn()
            return Timing(4.0, 5.0, 6.0, reps)

    def cpu_inputs(cell, seed, dtype=torch.float16):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(1, cell.n, cell.hq, cell.d, generator=g).to(dtype),
                torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g).to(dtype),
                torch.randn(1, cell.depth, cell.hkv, cell.d, generator=g).to(dtype))

    monkeypatch.setattr(timing, "ColdTimer", FakeTimer)
    monkeypatch.setattr(timing, "measure_ceilings", lambda timer, quick=False: H100)
    monkeypatch.setattr(run, "_inputs", cpu_inputs)
    monkeypatch.setattr(run, "provenance", lambda sms: {"gpu": "none (test)", "sms": sms, "torch": "t",
                                                       "triton": "t", "commit": "c"})
    exact = Provider("exact", "", lambda cell, q, k, v, o: Built(lambda: reference(q, k, v).half()))
    broken = Provider("broken", "", lambda *a: Built(lambda: 1 / 0))
    cells = [grid.Cell("tiny", 4, 2, 16, n, 48) for n in (1, 3)]
    csv_path, json_path, rows = run.run_grid(cells, [exact, broken], out_dir=tmp_path, tag="t",
                                             opts=RunOptions(sms=132, progress=False, timer="event"))
    assert [r["status"] for r in rows] == ["ok", "error: ZeroDivisionError: division by zero"] * 2
    written = read_rows([csv_path])
    assert len(written) == 4 and written[0]["p50_us"] == "5.000" and written[0]["gpu"] == "none (test)"
    assert written[0]["flush"] == "read" and (written[0]["timer"], written[0]["layers"]) == ("event", "1")
    floor = floor_us(cell_bytes(4, 2, 16, 1, 48), cell_flops(4, 16, 1, 48), H100)
    assert float(written[0]["pct_floor"]) == pytest.approx(100 * floor / 5.0, rel=1e-3)
    meta = json.loads(json_path.read_text())
    assert meta["cells_done"] == 2 and meta["copy_GBps"] == pytest.approx(3020.0)
    md = report([csv_path], plots=False)
    assert "| tiny (4/2/16) | 3 | 48 |" in md
