"""tools/prefill_ab.py on the CPU: its cells, plans, reference, worker processes and table
(the kernels under the interpreter, on a tiny shape; the timing needs a GPU)."""
import sys
from pathlib import Path

import pytest
import torch

from skattn import reference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import prefill_ab as ab  # noqa: E402
import prefill_variants as pv  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests of the tool")


def test_cells():
    full = ab.cells()
    assert len(full) == 30 and len(set(full)) == 30
    assert {(n, L) for _, n, L in full} == {(512, 8192), (512, 16384), (512, 32768),
                                            (128, 32768), (1024, 32768), (2048, 32768)}
    assert len(ab.cells(quick=True)) == 3
    assert ab.cells(("gpt-oss",), quick=True) == [("gpt-oss", 512, 32768)]
    assert ab.cells(picked="llama-8b:128:32768,gpt-oss:512:8192") == [("llama-8b", 128, 32768),
                                                                      ("gpt-oss", 512, 8192)]
    with pytest.raises(SystemExit, match="unknown model"):
        ab.cells(picked="llama-9b:128:32768")


def test_variants_on_given_programs():
    names = [v.name for v in ab.chosen("ws@132,base,ws@128")]
    assert names == ["base", "ws@132", "ws@128"]
    v = pv.on_programs("ws@132")
    p = ab.make_plan("gpt-oss", 128, 32768, torch.float16, v, sms=132, occupancy=2)
    assert (p.programs, p.geometry.block_n, p.tuning.prefill) == (132, 128, "ws")
    for bad in ("ws@0", "ws@x", "tma@128"):
        with pytest.raises(SystemExit, match="unknown variants"):
            ab.chosen(bad)


def test_custom_variants():
    names = [v.name for v in ab.chosen("base/128:block_n=128:num_stages=3,base,ws@132")]
    assert names == ["base", "base/128:block_n=128:num_stages=3", "ws@132"]  # named: as given
    v = pv.custom("base/128:block_n=128:num_stages=3")
    p = ab.make_plan("llama-8b", 1, 8192, torch.float16, v, sms=132, occupancy=2)
    g = p.geometry
    assert (g.block_m, g.block_n, g.num_stages, p.tuning.prefill) == (16, 128, 3, "base")
    # geometry at its head size only; Tuning fields everywhere
    v = pv.custom("ws/64:block_n=128:prefill_sum_mma=false")
    assert v.geometry == {64: {"block_n": 128}} and v.tuning == {"prefill_sum_mma": False}
    p = ab.make_plan("llama-8b", 512, 8192, torch.float16, v, sms=132, occupancy=2)
    assert p.tuning.prefill_sum_mma is False and p.tuning.prefill == "ws"
    assert pv.custom("ws@132") is None and pv.custom("fast/128:block_n=64") is None
    for bad, match in (("base/128:block_n", "not key=value"), ("base/128:colour=red",
                       "not key=value"), ("base/128:prefill=ws", "first part"),
                       ("base/128:fixup_rows=3", "power of two")):
        with pytest.raises(SystemExit, match=match):
            ab.chosen(bad)
    with pytest.raises(SystemExit, match="unknown variants"):
        ab.chosen("base/x:block_n=64")


def test_plan_only_counts_compiles(capsys):
    ab.main(["--plan-only", "--quick", "--dtypes", "f16"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 * len(ab.VARIANTS) + 1
    assert out[-1].startswith("distinct kernels to compile:")
    # tma and tma-alt run the TMA kernel; ws and ws-alt the base kernel under the interpreter
    assert sum(" tma " in line for line in out) == 3 * 2
    assert sum(" base " in line for line in out) == 3 * (len(ab.VARIANTS) - 2)


def test_reference_f32_matches_float64():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 8, 16, generator=g).half()
    k = torch.randn(1, 90, 2, 16, generator=g).half()
    v = torch.randn(1, 90, 2, 16, generator=g).half()
    ref = reference.attention(q, k, v, causal=True)
    out = ab.reference_f32(q, k, v, rows=16)
    assert (out.double() - ref).abs().max() < 1e-5


def test_workers_check_every_variant(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the worker processes run the interpreter
    job = dict(model=[8, 2, 64], n=40, L=100, dtype="f16", device="cpu", sms=4, occupancy=2,
               block_n=16)
    got = ab.run_workers([job, dict(job, model="no-such-model")], workers=2)
    bad = got[("no-such-model", 40, 100, "f16")]
    assert [r["variant"] for r in bad] == [v.name for v in ab.VARIANTS]
    assert all(r["status"].startswith("error: worker exited") for r in bad)
    good = got[((8, 2, 64), 40, 100, "f16")]
    assert [r["status"] for r in good] == ["ok"] * len(ab.VARIANTS), good
    # auto: no Tuning; on this tiny shape the base kernel (the interpreter runs no Gluon)
    assert [r["kernel"] for r in good] == ["base", "base", "tma", "tma", "base", "base", "base"]
    assert all(r["err"] < ab.TOLERANCE[torch.float16] for r in good)


def test_interleaved_rounds_rotate():
    from skattn.bench.timing import Timing

    calls = []

    class Graph:
        def __init__(self, name, us):
            self.name, self.us = name, us

        def replay(self):
            calls.append(self.name)

    class Timer:  # one replay a call, its time from the graph
        def time(self, fn, warmup, reps):
            assert (warmup, reps) == (0, 1)
            fn()
            return Timing(0.0, fn.__self__.us, 0.0, 1)

    graphs = [Graph("a", 40.0), Graph("b", 80.0), Graph("c", 120.0)]
    got = ab.interleaved(graphs, Timer(), layers=4, reps=3, warmup=1)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [(t.p50, t.reps) for t in got] == [(10.0, 3), (20.0, 3), (30.0, 3)]


def test_table():
    base = dict(model="llama-8b", n=512, L=8192, dtype="f16")
    rows = [dict(base, provider="sdpa-cudnn-nomask", variant="no mask", status="ok", p50_us=100.0),
            dict(base, provider="skattn", variant="base", status="ok", p50_us=150.0, pct_peak=50.0),
            dict(base, provider="skattn", variant="tma", status="ok", p50_us=120.0, pct_peak=62.5),
            dict(base, provider="skattn", variant="tma-alt",
                 status="wrong: relative error 1 > 0.005")]
    text = ab.table(rows)
    line = text.splitlines()[1]
    assert "150.0" in line and "120.0" in line and "tma" in line and "50/62" in line
    assert "1.25" in line and "0.83" in line
    assert "NOT OK: llama-8b n=512 L=8192 f16 tma-alt: wrong" in text
