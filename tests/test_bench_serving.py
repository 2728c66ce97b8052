"""`skattn bench --serving` on the CPU: mixes, the skattn providers through their decode step
(interpreter), the check against float64, the markdown table."""
import pytest
import torch

from skattn.bench import serving as sb
from skattn.bench import serving_run as sr
from skattn.bench.serving_mixes import MIXES, PARTS, mix

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real bench")


def test_mixes():
    a, b, c, d = (mix(name) for name in MIXES)
    assert a.kv_lens == (4096,) * 64 and a.decode
    assert b.kv_lens == (32768,) + (1024,) * 63
    assert c.batch == 64 and 16 <= min(c.kv_lens) and max(c.kv_lens) <= 32768
    assert sorted(c.kv_lens)[32] in range(2048, 8193)  # lognormal around 4096
    assert d.q_lens == (512,) + (1,) * 31 and not d.decode
    with pytest.raises(ValueError, match="unknown mix"):
        mix("nope")


def test_mix_parts():
    # (d)'s halves alone, and a step of its loop after the chunk became a decode sequence
    d = mix("mixed")
    dec, chunk, step = (mix(name) for name in PARTS)
    assert dec.kv_lens == d.kv_lens[1:] and dec.decode and dec.max_q == 1
    assert chunk.kv_lens == d.kv_lens[:1] and chunk.q_lens == (512,) and not chunk.decode
    assert step.kv_lens == d.kv_lens and step.q_lens == (1,) * 32
    assert not step.decode and step.max_q == 512  # varlen, planned for 512 query tokens


@pytest.mark.parametrize("name,policy,extra,halves", [
    ("one-long", "auto", {}, False), ("mixed", "split", {}, True),
    ("mixed", "auto", {"q_split": None}, False), ("mixed", "auto", {"q_split": 1}, True),
    ("mixed-step", "auto", {}, True)])
def test_skattn_provider_decode_step(name, policy, extra, halves):
    m = mix(name, scale=1 / 256)
    batch = sb.make_batch(m, 2, 1, 16, 16, device="cpu")
    built = sb.build_skattn(batch, policy, dict(sms=4, occupancy=2, **extra))
    assert ("short: " in built.note) == halves  # a MixedPlan's halves (q_split="auto" default)
    built.step()
    longest = max(range(m.batch), key=lambda i: m.kv_lens[i])
    refs = sb.reference_rows(batch, sorted({0, m.batch - 1, longest}))
    assert sr._check(built, batch, refs) <= sr.TOLERANCE
    # a wrong output is caught: the check compares against float64
    bad = sb.Built(lambda: built.layer() * 1.1, built.canonical)
    assert sr._check(bad, batch, refs) > sr.TOLERANCE


@pytest.mark.parametrize("form, ratio", [("fp8", 32 / 64), ("q8_0", 34 / 64), ("q4_0", 18 / 64)])
def test_quantized_providers(form, ratio):
    # skattn-FORM:auto reads the batch's K/V quantized (its floor counts those bytes) and is
    # checked against float64 on the same K/V dequantized
    m = mix("one-long", scale=1 / 256)
    batch = sb.make_batch(m, 2, 1, 32, 16, device="cpu")
    built = sb.build(f"skattn-{form}:auto/sms=4,occupancy=2", batch)
    assert built.read.kv_bytes() == batch.kv_bytes() * ratio
    built.step()
    seqs = sorted({0, m.batch - 1})
    refs = sb.reference_rows(built.dequantized, seqs)
    assert sr._check(built, batch, refs) <= 1e-2
    bad = sb.Built(lambda: built.layer() * 1.1, built.canonical)
    assert sr._check(bad, batch, refs) > sr.TOLERANCE
    with pytest.raises(ValueError, match="fp8, q8_0 or q4_0"):
        sb.build("skattn-int4:auto", batch)


def test_markdown_table():
    rows = [dict(provider=p, model="llama-8b", mix="one-long", page_size=16, status="ok",
                 p50_us=str(t), pct_floor=str(f)) for p, t, f in
            (("skattn:auto", 50.0, 80), ("skattn:split", 100.0, 40), ("sdpa-padded", 200.0, 20))]
    rows.append(dict(provider="flex-paged", model="llama-8b", mix="one-long", page_size=16,
                     status="error: RuntimeError: x"))
    text = sr.markdown(rows, {"gpu": "H200", "layers": 8, "copy_GBps": 4200.0,
                              "mixes": {"one-long": "(b)"}})
    line = [ln for ln in text.splitlines() if ln.startswith("| llama-8b")][0]
    assert "50.0 (80%)" in line and "2.00x" in line and "4.00x" in line and "error" in line


def test_report_from_csvs_writes_the_table_and_the_plot(tmp_path):
    # `skattn bench --report serving.csv`: a later CSV's cell replaces an earlier one's; the
    # markdown and the plot (% of floor per provider, a panel per model) are written
    import csv

    from skattn.bench.cli import main as cli_main
    from skattn.bench.records import have_matplotlib

    cols = ("provider", "model", "mix", "page_size", "status", "p50_us", "pct_floor", "commit",
            "gpu", "layers")

    def write(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow(dict(zip(cols, r)))

    a, b = tmp_path / "serving-a.csv", tmp_path / "serving-b.csv"
    write(a, [("skattn:auto", m, "mixed", 16, "ok", 500.0, 40, "c1", "H200", 8)
              for m in ("llama-8b", "gpt-oss")]
          + [("skattn:one-plan", "llama-8b", "mixed", 16, "ok", 600.0, 33, "c1", "H200", 8),
             ("sdpa-padded", "llama-8b", "equal", 64, "ok", 250.0, 99, "c1", "H200", 8)])
    write(b, [("skattn:auto", "llama-8b", "mixed", 16, "ok", 300.0, 66, "c2", "H200", 8)])
    out = tmp_path / "report"
    assert cli_main(["--report", str(a), str(b), "--out", str(out), "--tag", "t"]) == 0
    text = (out / "serving-t.md").read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("| llama-8b | mixed")][0]
    assert "300.0 (66%)" in line and "600.0 (33%)" in line and "c1" in text and "c2" in text
    assert text.index("| gpt-oss") < text.index("| llama-8b | mixed")
    assert (out / "serving-t.png").exists() == have_matplotlib()
    # an eager run's CSV is reported on its own, and says so; mixed with a graph run, refused
    from skattn.bench.serving_plot import report

    cols += ("timer",)
    c = tmp_path / "serving-c.csv"
    write(c, [("skattn:auto", "llama-8b", "equal", 16, "ok", 90.0, 30, "c3", "H200", 8, "eager")])
    assert "launched one by one" in report([c], out_dir=out, stem="e")
    with pytest.raises(ValueError, match="report them apart"):
        report([b, c], out_dir=out, stem="m")


def test_skattn_variants_name_a_policy_and_plan_overrides():
    from skattn.bench.serving import skattn_variant

    assert skattn_variant("skattn:auto") == ("auto", {})
    assert skattn_variant("skattn:auto/programs=256,block_n=128") == (
        "auto", {"programs": 256, "block_n": 128})
    assert skattn_variant("skattn:auto/fixup=fused,programs=132") == (
        "auto", {"fixup": "fused", "programs": 132})
    assert skattn_variant("skattn:auto/prefill=ws") == ("auto", {"prefill": "ws"})
    with pytest.raises(ValueError, match="key=integer"):
        skattn_variant("skattn:auto/programs=many")
    with pytest.raises(ValueError, match="comes from the batch"):
        skattn_variant("skattn:auto/batch=4")


def test_one_plan_provider_on_varlen_mixes_only(monkeypatch):
    names = sb.PROVIDERS
    assert "skattn:one-plan" in sr.providers_for(names, "llama-8b", decode=False)
    assert "skattn:one-plan" not in sr.providers_for(names, "llama-8b", decode=True)
    assert sr.providers_for(["skattn:auto/q_split=4"], "llama-8b", decode=True) == []
    seen = []
    monkeypatch.setattr(sb, "build_skattn", lambda batch, policy, extra=None: seen.append((policy, extra)))
    sb.build("skattn:one-plan", None)
    sb.build("skattn:auto", None)
    assert seen == [("auto", {"q_split": None}), ("auto", {})]


def test_eager_mode_times_the_calls_one_by_one(monkeypatch):
    # the eager timer gets the step's calls themselves (the work list first, then the
    # layers), after the graph's replay was checked; the row and the table say which timer
    from skattn.bench.timing import Timing

    m = mix("one-long", scale=1 / 256)
    batch = sb.make_batch(m, 2, 1, 16, 16, device="cpu")
    refs = sb.reference_rows(batch, [0, m.batch - 1])
    monkeypatch.setattr(sr, "capture", lambda fns: (type("G", (), {"replay": lambda self: [
        f() for f in fns]})(), [f() for f in fns]))
    seen = {}

    def eager(fns, layers, timer, warmup, reps):
        seen.update(fns=list(fns), layers=layers)
        return Timing(1.0, 2.0, 3.0, reps)

    monkeypatch.setattr(sr, "time_eager", eager)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # (after the replay)
    monkeypatch.setattr(sr, "time_graph", lambda *a, **kw: pytest.fail("the graph was timed"))
    row = sr.measure("skattn:auto/sms=4,occupancy=2", batch, refs, None, layers=1, warmup=1,
                     reps=5, mode="eager")
    assert row["status"] == "ok" and row["timer"] == "eager" and row["p50_us"] == "2.000"
    assert seen["layers"] == 1 and len(seen["fns"]) == 2  # the work-list step, then the layer
    text = sr.markdown([dict(row, model="llama-8b", mix="one-long", page_size=16,
                             pct_floor="50")], {"gpu": "H200", "layers": 3, "timer": "eager"})
    assert "launched one by one" in text and "CUDA graph of" not in text
    with pytest.raises(ValueError, match="mode must be one of"):
        sr.run_serving(models=(), mixes=(), page_sizes=(), names=(), out_dir=".", tag="x",
                       mode="event")
