"""`skattn bench --quant`: its cells, byte floors and tables, and one run of its flow under the
Triton interpreter (CUDA graph and timer replaced by plain calls)."""
import pytest
import torch

from skattn.bench import cli, graph, grid, quant, run, timing
from skattn.bench.floors import Ceilings
from skattn.bench.run import RunOptions
from skattn.bench.timing import Timing

from test_bench_report import _args


def test_cells_and_bytes():
    decode, prompt = quant.cells()
    assert {c.model for c in decode} == set(quant.DEFAULT_MODELS)
    assert {c.n for c in decode} == {1, 4, 16} and {c.n for c in prompt} == {512}
    assert {c.depth for c in decode} == set(grid.SEED_DEPTHS) and len(prompt) == 3 * 3
    d, p = quant.cells(("llama-8b",), (1, 2, 8, 16), (8192,))
    assert len(d) == 4 and not p
    c = grid.Cell("llama-8b", 32, 8, 128, 1, 8192)
    qo = 2 * 1 * 32 * 128 * 2  # q read and out written, f16
    assert quant.cell_bytes(c, "f16") == 2 * 8192 * 8 * 128 * 2 + qo
    assert quant.cell_bytes(c, "fp8") == 2 * 8192 * 8 * 128 + qo
    assert quant.cell_bytes(c, "q8_0") == 2 * 8192 * 8 * 4 * 34 + qo  # 4 blocks of 34 bytes
    assert quant.cell_bytes(c, "q4_0") == 2 * 8192 * 8 * 4 * 18 + qo  # 4 blocks of 18 bytes


def _rows():
    # SYNTHETIC numbers (not measurements)
    rows = []
    for fmt, p50, speed in (("f16", "40.0", ""), ("fp8", "22.0", "1.818"), ("q8_0", "", "")):
        rows.append(dict(model="llama-8b", hq=32, hkv=8, d=128, n=1, depth=16384, format=fmt,
                         status="ok" if p50 else "error: synthetic", p50_us=p50, pct_floor="70",
                         speedup_vs_f16=speed, err="1e-3", err_unquantized="2e-2"))
    return rows


def test_tables():
    md = quant.markdown_table(_rows())
    line = md.splitlines()[2]
    assert ("| llama-8b (32/8/128) | 1 | 16384 | 40.0 (70%) | 22.0 (70%) 1.82x | error | — | "
            "2e-2 / 2e-2 / — |") in line
    short = quant.short_table(_rows()).splitlines()
    assert short[1].split()[:6] == ["llama-8b", "1", "16384", "40.0", "22.0", "—"]


def test_quant_flow_under_the_interpreter(tmp_path, monkeypatch):
    # tiny cells through run_quant: plan, check against float64 on the dequantized K/V, the
    # replay check (every layer's output poisoned first), timing and the CSV
    class FakeGraph:
        def __init__(self, fns):
            self.fns = fns

        def replay(self):
            for fn, out in zip(self.fns, self.outs):
                out.copy_(fn())

    def capture(fns):
        g = FakeGraph(fns)
        g.outs = [fn().clone() for fn in fns]
        return g, g.outs

    class FakeTimer:
        def __init__(self, flush="read"):
            self.flush_bytes = 0

    def cpu_inputs(c, s, dtype=torch.float16):
        g = torch.Generator().manual_seed(s)
        return tuple(torch.randn(1, L, h, c.d, generator=g).to(dtype)
                     for L, h in ((c.n, c.hq), (c.depth, c.hkv), (c.depth, c.hkv)))

    monkeypatch.setattr(graph, "capture", capture)
    monkeypatch.setattr(graph, "time_graph", lambda g, n, t, warmup, reps: (
        g.replay(), Timing(1.0, 2.0, 3.0, reps))[1])
    monkeypatch.setattr(timing, "ColdTimer", FakeTimer)
    monkeypatch.setattr(timing, "measure_ceilings", lambda t, quick: Ceilings(4e12, 1e15))
    monkeypatch.setattr(run, "_inputs", cpu_inputs)
    monkeypatch.setattr(run, "provenance", lambda sms: {"gpu": "none (test)", "sms": sms})
    decode, prompt = [grid.Cell("tiny", 4, 2, 32, 1, 40)], [grid.Cell("tiny", 4, 2, 32, 2, 40)]
    opts = RunOptions(sms=4, occupancy=2, warmup=0, reps=1, progress=False, layers=2)
    csv_path, json_path, rows = quant.run_quant(decode, prompt, out_dir=tmp_path, tag="t", opts=opts)
    assert [(r["n"], r["format"], r["status"]) for r in rows] == [
        (1, "f16", "ok"), (1, "fp8", "ok"), (1, "q8_0", "ok"), (1, "q4_0", "ok"), (2, "f16", "ok"),
        (2, "fp8", "ok"), (2, "q8_0", "ok")]
    assert {r["route"] for r in rows if r["format"] != "f16"} == {"native"}  # 4 rows a KV head
    errs = {r["format"]: (float(r["err"]), float(r["err_unquantized"])) for r in rows[:4]}
    # f16: the same reference (err is the worst of layer 0 and, after a replay, the last)
    assert errs["f16"][1] <= errs["f16"][0] < 2e-3
    assert errs["q8_0"][0] < 2e-3 < errs["fp8"][1]  # e4m3 costs more than q8_0's 8 bits
    assert errs["q4_0"][0] < 2e-3 and errs["q4_0"][1] > errs["fp8"][1]  # 4 bits cost more
    assert all(float(r["speedup_vs_f16"]) == 1.0 for r in rows)
    md = quant.write_markdown(csv_path, rows, {"layers": 2})
    assert "| tiny (4/2/32) | 1 | 40 |" in md.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plans-only mode of a machine without a GPU")
def test_quant_without_gpu_prints_plans(capsys):
    assert cli.run(_args("--quant", "--models", "llama-8b", "--depth", "8192")) == 0
    out = capsys.readouterr().out
    assert "| llama-8b (32/8/128) | 1 | 8192 | 128 uniform, 16 x 64 x 4, 102 | " in out
    assert "| llama-8b (32/8/128) | 512 | 8192 |" in out and "timings need a GPU" in out
