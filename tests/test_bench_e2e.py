"""The end-to-end benchmark's harness on a CPU: cache, step, rows, report (a tiny model)."""
import csv
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skattn[transformers]')")
from skattn.bench import e2e, e2e_model  # noqa: E402
from skattn.bench.e2e_report import e2e_report, table  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on the CPU")


def test_fixed_depth_cache_does_not_advance():
    cache = e2e_model.FixedDepthCache(2, 2, 16, depth=10, room=4, dtype=torch.float16, device="cpu")
    before = cache.keys[1][:, :, :10].clone()
    new = torch.randn(1, 2, 3, 16, dtype=torch.float16)
    for _ in range(2):  # a repeated step writes the same slots and sees the same keys
        k, v = cache.update(new, new + 1, 1)
        assert k.shape == (1, 2, 13, 16) and v.shape == (1, 2, 13, 16)
        assert torch.equal(k[:, :, 10:], new) and torch.equal(v[:, :, 10:], new + 1)
        assert torch.equal(k[:, :, :10], before)
    assert cache.get_seq_length() == 10 and cache.get_mask_sizes(3) == (13, 0)
    with pytest.raises(ValueError, match="room for 4"):
        cache.update(torch.randn(1, 2, 5, 16, dtype=torch.float16), new, 0)


def test_graph_step_computes_what_the_model_computes():
    # the captured step replaces model(...) by its layers with the mask made beforehand:
    # with sdpa (a bool mask for n > 1 at a depth) it must give the same logits
    torch.manual_seed(0)
    model = e2e_model.build_model(e2e.TINY, torch.float16, "cpu")
    cache = e2e_model.FixedDepthCache(2, 2, e2e.TINY["head_dim"], depth=20, room=3,
                                      dtype=torch.float16, device="cpu")
    step = e2e_model.Step(model, cache, 3, seed=1)
    with torch.no_grad():
        mask = step.mask()
        assert mask is not None and mask.dtype == torch.bool  # sdpa: materialised
        torch.testing.assert_close(step.graph_step(mask), step.eager(), rtol=0, atol=0)
        model.set_attn_implementation(e2e_model.implementation("skattn:auto"))
        assert step.mask() is None  # skattn: bottom-right causal, no mask


def test_run_writes_rows_and_report(tmp_path):
    opts = e2e.E2EOptions(ns=(3,), depths=(24,), modes=("eager",), shape=dict(e2e.TINY),
                          model="tiny", providers=("sdpa", "skattn:llamacpp-before", "skattn:auto"),
                          warmup=0, reps=1, progress=False)
    csv_path, json_path, rows = e2e.run_e2e(opts, out_dir=tmp_path, tag="t", device="cpu")
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["tokens_per_s"]) > 0 and float(row["err"]) < 1e-2
    with open(csv_path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["policy"] for r in written[:3]] == ["", "llamacpp-before", "auto"]
    assert json.loads(json_path.read_text())["options"]["ns"] == [3]
    md = e2e_report([csv_path], plots=False)
    assert "| eager | 3 | 24 |" in md and (tmp_path / "e2e-t.md").exists()


def test_table_speedups():
    def row(provider, policy, tps):
        return dict(provider=provider, policy=policy, mode="graph", model="llama-8b", n="1",
                    depth="8192", status="ok", tokens_per_s=str(tps))

    rows = [row("sdpa", "", 100.0), row("skattn", "llamacpp-before", 150.0),
            row("skattn", "llamacpp", 180.0), row("skattn", "auto", 250.0)]
    line = table(rows).splitlines()[2]
    assert line.split(" | ")[-3:] == ["1.20x", "2.50x", "2.50x |"]
    rows[-1]["status"] = "error: boom"  # an untimed row: its column says why, ratios skip it
    line = table(rows).splitlines()[2]
    assert "error" in line and line.split(" | ")[-3:] == ["1.20x", "—", "1.80x |"]


def test_without_gpu_and_report_only(tmp_path, capsys):
    assert e2e.main(["--quick"]) == 2  # the 16 GB model: only on a GPU
    assert "needs a CUDA GPU" in capsys.readouterr().err
    rows = [dict(provider="sdpa", policy="", mode="eager", model="llama-8b", n="1", depth="8192",
                 status="ok", tokens_per_s="100")]
    path = tmp_path / "e2e-x.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=e2e.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert e2e.main(["--report", str(path), "--tag", "y"]) == 0
    assert "| eager | 1 | 8192 | 100.0 |" in (tmp_path / "e2e-y.md").read_text()
