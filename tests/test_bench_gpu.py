"""The bench's GPU paths on a CUDA GPU: graph timer, seed table and host time on one cell each."""
import pytest
import torch

from skattn.bench import grid, host, seed
from skattn.bench.providers import resolve
from skattn.bench.run import RunOptions, run_grid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DECODE = grid.Cell("llama-8b", 32, 8, 128, 4, 8192)


def _p50(rows, label):
    from skattn.bench.report import label as label_of

    row = next(r for r in rows if label_of(r) == label)
    assert row["status"] == "ok", row["status"]
    return float(row["p50_us"])


def test_graph_timer_checks_and_times_every_provider(tmp_path):
    # each provider's replayed outputs (poisoned before) are checked on the first and last of
    # 4 layers; a provider that cannot be captured must say so in its status, never vanish
    providers, _ = resolve(("skattn:llamacpp", "sdpa-flash", "sdpa-cudnn-nomask"))
    opts = RunOptions(timer="graph", layers=4, warmup=2, reps=10, progress=False)
    _, _, graph_rows = run_grid([DECODE], providers, out_dir=tmp_path, tag="graph", opts=opts)
    assert len(graph_rows) == 3
    assert all(r["status"] == "ok" or r["status"].startswith("not capturable") for r in graph_rows)
    assert {(r["timer"], r["layers"]) for r in graph_rows} == {("graph", 4)}
    graph_time = _p50(graph_rows, "skattn:llamacpp")
    _, _, event_rows = run_grid([DECODE], providers[:1], out_dir=tmp_path, tag="event",
                                opts=RunOptions(timer="event", warmup=2, reps=10, progress=False))
    event_time = _p50(event_rows, "skattn:llamacpp")
    # a graph pays one launch for all layers; the event timer pays one per call
    assert 0 < graph_time < 1.05 * event_time, (graph_time, event_time)


def test_seed_table_on_one_cell(tmp_path):
    cell = grid.Cell("llama-8b", 32, 8, 128, 1, 8192)
    opts = RunOptions(timer="graph", layers=4, warmup=2, reps=10, progress=False)
    csv_path, rows = seed.run_seed_table([cell], out_dir=tmp_path, tag="gpu", opts=opts)
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["status"] for r in rows]
    res = seed.cell_results(rows)[0]
    assert res["llamacpp-before"]["call"]["fixup"] == "general"
    assert res["llamacpp"]["call"]["fixup"] == "uniform"
    assert res["speedup"] is not None and 0.5 < res["speedup"] < 2.0
    for policy in seed.SEED_POLICIES:  # the fixup adds time; noise may not take more than 1 µs
        assert res[policy]["fixup_us"] > -1.0, (policy, res[policy]["fixup_us"])
    assert "## Speed-up of llamacpp over llamacpp-before" in seed.seed_report([csv_path], plots=False)


@pytest.mark.serial
def test_host_time_is_host_bound(tmp_path):
    calls = 50
    _, rows = host.run_host(tmp_path, "gpu", calls=calls, reps=5, warmup=5)
    by = {r["provider"]: r for r in rows}
    for name in ("skattn-planned", "skattn-unplanned", "sdpa"):
        r = by[name]
        assert r["status"] == "ok", (name, r["status"])
        per_call = float(r["us_per_call_p50"])
        # host-bound: once the last call returned, the GPU is done within a fraction of the batch
        assert 0 < float(r["drain_us_p50"]) < 0.5 * calls * per_call, (name, r)
