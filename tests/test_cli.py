"""The `skattn` command line: plan by model name or by heads, errors exit 2 with a message."""
import pytest
import torch

from skattn.cli import build_parser, main
from skattn.bench.models import ALIASES, MODELS, resolve

PLAN = ["plan", "--n", "4", "--depth", "16384", "--sms", "132", "--occupancy", "2"]


def test_plan_by_model(capsys):
    assert main([*PLAN, "--model", "llama-8b"]) == 0
    out = capsys.readouterr().out
    assert "heads 32/8" in out and "programs" in out and "fixup" in out and "causal=True" in out


def test_plan_png(tmp_path, capsys):
    path = tmp_path / "plan.png"
    assert main([*PLAN, "--model", "qwen3-14b", "--policy", "llamacpp", "--png", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


def test_plan_by_heads(capsys):
    args = [*PLAN, "--heads", "40/8", "--head-dim", "128", "--no-causal", "--programs", "40",
            "--fixup", "fused"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "heads 40/8 (ratio 5)" in out and "programs 40, fixup fused" in out
    assert "causal=False" in out


def test_heads_needs_head_dim(capsys):
    assert main([*PLAN, "--heads", "40/8"]) == 2
    assert "--head-dim" in capsys.readouterr().err


def test_unknown_model(capsys):
    assert main([*PLAN, "--model", "gpt-5"]) != 0
    err = capsys.readouterr().err
    assert "gpt-5" in err and "llama-8b" in err


def test_bad_shape_exits_2(capsys):
    assert main([*PLAN, "--heads", "30/8", "--head-dim", "128"]) == 2
    assert "q_heads" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_sms_without_gpu(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else the interpreter's pretend grid
    assert main(["plan", "--model", "llama-8b", "--n", "1", "--depth", "8192"]) == 2
    err = capsys.readouterr().err
    assert "sms" in err and "Traceback" not in err


def test_models_table():
    # the grid order of docs/benchmarks.md, and aliases to the same shapes
    assert list(MODELS) == ["qwen3moe-30b-a3b", "gpt-oss", "llama-8b", "qwen3-14b", "llama-70b"]
    assert resolve("GPT_OSS_120B") == ("gpt-oss", MODELS["gpt-oss"])
    assert resolve("qwen2-32b")[1][:3] == (40, 8, 128)
    assert all(target in MODELS for target in ALIASES.values())


def test_parser_takes_more_subcommands():
    parser = build_parser()
    extra = parser.subcommands.add_parser("hello")
    extra.set_defaults(func=lambda args: 0)
    assert parser.parse_args(["hello"]).func(None) == 0


def test_missing_plugins_are_skipped(monkeypatch, capsys):
    import skattn.cli as cli

    monkeypatch.setattr(cli, "PLUGINS", (("nope", "skattn.no_such_module"),))
    assert "nope" not in build_parser().subcommands.choices
    assert main([]) == 2 and "plan" in capsys.readouterr().err  # no command: help, exit 2
