"""The graph timer's flow on a CPU (capture replaced by eager replays), the timer column in the
reports, and the unmasked SDPA anchors' labels."""
import json

import pytest
import torch

from skattn.bench import cli, graph, grid, run, timing
from skattn.bench.providers import NOMASK, NOMASK_NOTE, Built, Provider, reference, resolve
from skattn.bench.report import anchors_table, floor_table, read_rows, report, summary
from skattn.bench.run import RunOptions, measure_graph
from skattn.bench.timing import Timing

from test_bench_report import H100, _args, _synthetic_rows, _write_csv

CELL = grid.Cell("tiny", 4, 2, 16, 3, 40)


class FakeGraph:
    """What a captured graph does: each replay reruns every layer's call into its output."""

    def __init__(self, fns):
        self.fns = fns
        self.outs = [fn() for fn in fns]
        self.replays = 0

    def replay(self):
        self.replays += 1
        for fn, out in zip(self.fns, self.outs):
            result = fn()
            if result is not out:
                out.copy_(result)


def fake_capture(fns):
    g = FakeGraph(fns)
    return g, g.outs


class FakeTimer:
    """Runs the timed callable once and reports fixed whole-graph times."""

    flush_bytes = 0

    def __init__(self, flush="read"):
        self.calls = 0

    def time(self, fn, warmup, reps):
        fn()
        self.calls += 1
        return Timing(16.0, 32.0, 48.0, reps)


def _layers(n_layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, L, h, CELL.d, generator=g).half()
                  for L, h in ((CELL.n, CELL.hq), (CELL.depth, CELL.hkv), (CELL.depth, CELL.hkv)))
            for _ in range(n_layers)]


def _exact(cell, q, k, v, opts):
    return Built(lambda: reference(q, k, v).half())


def test_graph_measure_per_layer_time(monkeypatch):
    monkeypatch.setattr(graph, "capture", fake_capture)
    layers = _layers(4)
    refs = graph.References(layers, reference)
    timer = FakeTimer()
    row = measure_graph(Provider("exact", "", _exact), CELL, layers, refs, timer,
                        RunOptions(timer="graph", layers=4, warmup=1, reps=7))
    assert row["status"] == "ok" and float(row["err"]) < 1e-3
    # 16 / 32 / 48 µs for a graph of 4 layers: 4 / 8 / 12 µs a layer
    assert (row["p20_us"], row["p50_us"], row["p80_us"], row["reps"]) == ("4.000", "8.000", "12.000", 7)
    assert timer.calls == 1


def test_graph_measure_catches_stale_and_mixed_outputs(monkeypatch):
    monkeypatch.setattr(graph, "capture", fake_capture)
    layers = _layers(3, seed=1)
    refs = graph.References(layers, reference)
    opts = RunOptions(timer="graph", layers=3)

    def stale(cell, q, k, v, o):
        out = reference(q, k, v).half()  # computed once: a replay does not rewrite it
        return Built(lambda: out)

    row = measure_graph(Provider("stale", "", stale), CELL, layers, refs, FakeTimer(), opts)
    assert row["status"].startswith("wrong: layer 0 of the replayed graph") and "p50_us" not in row

    first = layers[0]

    def mixed(cell, q, k, v, o):  # every layer computes layer 0's attention
        return Built(lambda: reference(*first).half())

    row = measure_graph(Provider("mixed", "", mixed), CELL, layers, refs, FakeTimer(), opts)
    assert row["status"].startswith("wrong: layer 2 of the replayed graph")


def test_not_capturable_is_a_status(monkeypatch):
    def refuse(fns):
        raise graph.NotCapturable("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(graph, "capture", refuse)
    layers = _layers(2)
    row = measure_graph(Provider("eager-only", "", _exact), CELL, layers, graph.References(layers, reference),
                        FakeTimer(), RunOptions(timer="graph", layers=2))
    assert row["status"] == ("not capturable: RuntimeError: operation not permitted when stream is "
                             "capturing")


def test_references_are_cached_per_layer_and_mask():
    calls = []

    def counting(q, k, v, causal=True):
        calls.append(causal)
        return reference(q, k, v, causal=causal)

    layers = _layers(3)
    refs = graph.References(layers, counting)
    assert set(refs.checked()) == {0, 2}
    refs.get(-1)
    assert calls == [True, True]  # layer -1 is layer 2, already computed
    unmasked = refs.get(0, causal=False)
    assert calls == [True, True, False]
    # n = 3 queries over 40 keys: the unmasked output differs from the causal one
    assert not torch.allclose(unmasked, refs.get(0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_gpu_parts_fail_clearly_without_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        graph.capture([lambda: torch.zeros(1)])
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        timing.ColdTimer()


def test_run_options_and_arguments():
    assert RunOptions().timer == "graph" and RunOptions().n_layers == graph.DEFAULT_LAYERS
    assert RunOptions(timer="event", layers=16).n_layers == 1
    with pytest.raises(ValueError, match="timer"):
        RunOptions(timer="wall")
    with pytest.raises(ValueError, match="layers"):
        RunOptions(layers=0)
    opts = cli.run_options(_args())
    assert (opts.timer, opts.layers) == ("graph", 16)
    opts = cli.run_options(_args("--timer", "event", "--layers", "4", "--reps", "9"))
    assert (opts.timer, opts.layers, opts.reps) == ("event", 4, 9)
    args = _args("--seed-table", "--host", "--host-calls", "50")
    assert args.seed_table and args.host and args.host_calls == 50
    with pytest.raises(SystemExit):
        _args("--timer", "wall")
    assert cli.run(_args("--layers", "0", "--plans")) == 2


def test_run_grid_on_the_graph_timer(tmp_path, monkeypatch):
    # every layer gets its own inputs; rows say timer graph and the layer count
    seen = []

    def cpu_inputs(cell, seed, dtype=torch.float16):
        seen.append(seed)
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(1, L, h, cell.d, generator=g).to(dtype)
                     for L, h in ((cell.n, cell.hq), (cell.depth, cell.hkv), (cell.depth, cell.hkv)))

    monkeypatch.setattr(graph, "capture", fake_capture)
    monkeypatch.setattr(timing, "ColdTimer", FakeTimer)
    monkeypatch.setattr(timing, "measure_ceilings", lambda timer, quick=False: H100)
    monkeypatch.setattr(run, "_inputs", cpu_inputs)
    monkeypatch.setattr(run, "provenance", lambda sms: {"gpu": "none (test)", "sms": sms})
    nomask = resolve(("sdpa-flash-nomask",))[0][0]
    assert nomask.causal is False
    # the unmasked provider checked against attention over every key (SDPA runs on a CPU too)
    providers = [Provider("exact", "", _exact), nomask]
    csv_path, json_path, rows = run.run_grid([CELL], providers, out_dir=tmp_path, tag="g",
                                             opts=RunOptions(sms=132, progress=False, layers=3))
    assert len(set(seen)) == 3
    assert [r["status"] for r in rows] == ["ok", "ok"]
    written = read_rows([csv_path])
    assert {(r["timer"], r["layers"], r["p50_us"]) for r in written} == {("graph", "3", "10.667")}
    assert json.loads(json_path.read_text())["options"]["timer"] == "graph"


def _nomask_rows():
    rows = [{**r, "timer": "graph"} for r in _synthetic_rows()]
    base = next(r for r in rows if r["provider"] == "sdpa-flash" and r["n"] == 512)
    rows.append({**base, "provider": "sdpa-cudnn-nomask", "p50_us": 5.0, "pct_floor": 200.0})
    return rows


def test_unmasked_anchors_are_labelled(tmp_path):
    rows = _nomask_rows()
    table = floor_table(rows)
    assert f"sdpa-cudnn-nomask ({NOMASK_NOTE})" in table.splitlines()[0]
    intro, anchors = anchors_table(rows, [dict(model="x", hq=40, hkv=8, d=128, n=512, depth=8192,
                                               floor_us=130.1, llamacpp_us=625.0, sdpa_flash_us=385.3,
                                               sdpa_cudnn_us=438.9, gpu="G", date="D", source="S")])
    assert f"sdpa-cudnn-nomask ({NOMASK_NOTE}) % (ours)" in anchors.splitlines()[0]
    assert "| 200% | no |" in anchors  # the unmasked cuDNN column, then "beats llama.cpp"
    text = summary(rows)
    assert "sdpa-cudnn-nomask 5.0*" in text and text.splitlines()[-1] == f"* {NOMASK_NOTE}"
    md = report([_write_csv(tmp_path / "b.csv", rows)], plots=False)
    assert "`sdpa-cudnn-nomask`: SDPA without a mask" in md and "materialised mask" in md
    assert set(NOMASK) == {"sdpa-flash-nomask", "sdpa-cudnn-nomask"}


def test_report_keeps_timers_apart(tmp_path):
    graph_rows = [{**r, "timer": "graph", "layers": 16} for r in _synthetic_rows()]
    event_rows = [{**r, "timer": "event", "p50_us": 2 * float(r["p50_us"]) if r["p50_us"] else ""}
                  for r in _synthetic_rows()]
    path = _write_csv(tmp_path / "bench-two.csv", event_rows + graph_rows)
    assert len(read_rows([path])) == 2 * len(_synthetic_rows())
    md = report([path], out_dir=tmp_path / "out")
    graph_part, event_part = md.split("(graph timer)", 1)[1].split("(event timer)", 1)
    assert md.index("(graph timer)") < md.index("(event timer)")
    assert "| 20.0 (264 general) |" in graph_part and "| 40.0 (264 general) |" in event_part
    assert "- graph timer: per layer: replay time of one CUDA graph" in md
    for timer in ("graph", "event"):
        assert (tmp_path / "out" / f"bench-two-{timer}-speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_skattn_provider_on_the_graph_flow(monkeypatch):
    # the real skattn provider under the interpreter: each layer writes its own output buffer
    # (poisoned before the replay), all layers share one caller-owned workspace
    monkeypatch.setattr(graph, "capture", fake_capture)
    cell = grid.Cell("tiny", 8, 2, 16, 1, 300)  # 6 programs, 2 tiles: a general fixup
    g = torch.Generator().manual_seed(5)
    layers = [tuple(torch.randn(1, L, h, 16, generator=g).half() for L, h in ((1, 8), (300, 2), (300, 2)))
              for _ in range(2)]
    provider = resolve(("skattn:llamacpp-before",))[0][0]
    row = measure_graph(provider, cell, layers, graph.References(layers, reference), FakeTimer(),
                        RunOptions(timer="graph", layers=2, sms=4, occupancy=2))
    assert row["status"] == "ok" and row["fixup"] == "general" and row["programs"] == 6
    assert row["p50_us"] == "16.000"  # 32 µs for a graph of 2 layers


def test_skattn_variant_with_tuning_fields(monkeypatch):
    # "skattn:auto/pdl_wait=false": auto's plan with the fields over its own tuning, timed as
    # its own provider (an A/B of a launch choice without a new variant)
    import skattn

    plans, real = [], skattn.attention
    monkeypatch.setattr(skattn, "attention", lambda *a, **kw: plans.append(kw["plan"]) or real(*a, **kw))
    provider = resolve(("skattn:auto/pdl_wait=false/merge_elements=32",))[0][0]
    assert provider.label == "skattn:auto/pdl_wait=false/merge_elements=32"
    cell = grid.Cell("tiny", 8, 2, 16, 1, 300)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, L, h, 16, generator=g).half() for L, h in ((1, 8), (300, 2), (300, 2)))
    built = provider.build(cell, q, k, v, RunOptions(sms=4, occupancy=2))
    assert torch.allclose(built.fn().double(), reference(q, k, v), atol=2e-3)
    t = plans[-1].tuning
    assert (t.pdl_wait, t.merge_elements, plans[-1].policy) == (False, 32, "auto")
    for bad, match in (("skattn:auto/pdl_wait", "not key=value"), ("skattn:auto/colour=red",
                       "not key=value"), ("skattn:fast/pdl_wait=false", "unknown skattn variant"),
                       ("skattn:auto/fixup_rows=3", "power of two")):
        with pytest.raises(ValueError, match=match):
            resolve((bad,))
