"""`skattn bench --host`: the wall-clock loop, the table, and a run on a CPU (interpreter)."""
import time

import pytest
import torch

from skattn.bench import cli, host

from test_bench_report import _args


def test_time_calls_interleaves_batches_and_counts_per_call():
    order, syncs = [], []

    def quick():
        order.append("q")

    def slow():
        order.append("s")
        time.sleep(5e-3)  # far above any scheduling hiccup of a loaded CI machine

    times = host.time_calls({"quick": quick, "slow": slow}, calls=3, reps=4, warmup=2,
                            sync=lambda: syncs.append(1))
    assert order[:4] == ["q", "q", "s", "s"]  # warm-up
    assert order[4:] == (["q"] * 3 + ["s"] * 3) * 4  # batches alternate between providers
    assert len(syncs) == 1 + 2 * 2 * 4  # after warm-up, then before and after every batch
    (t_quick, _), (t_slow, drain) = times["quick"], times["slow"]
    assert t_quick.reps == t_slow.reps == 4
    assert t_slow.p20 >= 5000 > t_quick.p80  # µs per call, not per batch
    assert drain.p50 >= 0


def _host_rows():
    # SYNTHETIC numbers (not measurements)
    base = dict(calls=200, reps=30, n=1, depth=256, hq=32, hkv=8, d=128, gpu="synthetic")
    return [dict(base, provider="skattn-planned", status="ok", us_per_call_p20="9.00",
                 us_per_call_p50="10.00", us_per_call_p80="11.00", drain_us_p50="5.0"),
            dict(base, provider="skattn-op", status="skipped: torch.ops.skattn.attention does not exist"),
            dict(base, provider="sdpa", status="ok", us_per_call_p20="24.00", us_per_call_p50="25.00",
                 us_per_call_p80="26.00", drain_us_p50="4.0")]


def test_host_markdown():
    md = host.host_markdown(_host_rows(), title="host-x.csv")
    lines = [line.split(" | ") for line in md.splitlines() if line.startswith("| skattn") or
             line.startswith("| sdpa")]
    assert lines[0][2:6] == ["9.00", "10.00", "11.00", "0.40x"]  # 10 / 25
    assert lines[1][2:6] == ["—", "—", "—", "—"] and lines[1][-1].startswith("skipped: torch.ops")
    assert lines[2][5] == "1.00x"
    assert "B = 1, n = 1, Lk = 256, 32/8/128" in md and "200 back-to-back calls" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs skattn under the interpreter on a CPU")
def test_run_host_on_a_cpu(tmp_path):
    # tiny heads so the interpreter is quick; the same code path as on a GPU but for device
    shape = dict(n=1, depth=48, hq=4, hkv=2, d=16)
    csv_path, rows = host.run_host(tmp_path, "cpu", calls=1, reps=2, warmup=0, shape=shape,
                                   sms=4, occupancy=2, device="cpu")
    by = {r["provider"]: r for r in rows}
    assert list(by) == list(host.PROVIDERS)
    # (the FP8 rows against float64 over their dequantized K/V: the rounding of K/V to FP8
    # is not the call's error)
    for name in ("skattn-planned", "skattn-unplanned", "sdpa", "skattn-fp8-planned",
                 "skattn-fp8-route", "skattn-paged-planned", "skattn-paged-unplanned",
                 "skattn-paged-op"):
        assert by[name]["status"] == "ok" and float(by[name]["err"]) < 2e-2, by[name]
        assert float(by[name]["us_per_call_p50"]) > 0
    assert by["skattn-op"]["status"] == "ok" or by["skattn-op"]["status"].startswith("skipped")
    assert all(r["status"].split(":")[0] in ("ok", "skipped", "error") for r in rows)
    assert host.read_host_rows([csv_path])[0]["depth"] == "48"
    assert (tmp_path / "host-cpu.md").read_text().startswith("# skattn host time: host-cpu.csv")
    import json

    meta = json.loads((tmp_path / "host-cpu.json").read_text())
    assert meta["shape"] == {**host.HOST_SHAPE, **shape} and meta["calls"] == 1
    assert set(meta["providers"]) == set(host.PROVIDERS) and "Triton interpreter" in meta["gpu"]
    with pytest.raises(ValueError, match="unknown shape keys"):
        host.run_host(tmp_path, "x", shape={"heads": 3}, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_host_needs_a_gpu(tmp_path, capsys):
    assert cli.run(_args("--host", "--out", str(tmp_path))) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        host.run_host(tmp_path, "x")
