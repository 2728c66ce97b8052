"""tools/timeline.py and tools/tuning_ab.py on the CPU: variant parsing, the dry runs, and the
timeline's own kernels compiled for sm_90 (their GPU runs are the lead's)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import skattn

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled(code: str):
    """Run `code` (which prints JSON last) without the interpreter, so that kernels compile
    for sm_90 (scripts/resources.py); its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


tuning_ab = _load("tuning_ab")
timeline = _load("timeline")


def test_variants_parse_into_plan_keywords_and_tuning():
    assert tuning_ab.parse_variant("default") == ({}, skattn.Tuning())
    plan_kw, t = tuning_ab.parse_variant("fixup=fused, fused_merge_elements=64,pdl=0")
    assert plan_kw == {"fixup": "fused"}
    assert t == skattn.Tuning(fused_merge_elements=64, pdl=False)
    assert tuning_ab.parse_variant("pdl_trigger=start,fused_dv=32,policy=llamacpp") == (
        {"policy": "llamacpp"}, skattn.Tuning(pdl_trigger="start", fused_dv=32))
    assert tuning_ab.parse_variant("fused_dv=none")[1].fused_dv is None


@pytest.mark.parametrize("text, match", [
    ("no_such_field=1", "unknown variant key"),
    ("pdl=maybe", "pdl takes 0/1"),
    ("fixup_rows=3", "power of two"),  # Tuning's own check
    ("pdl", "not key=value"),
])
def test_bad_variants_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        tuning_ab.parse_variant(text)


def test_tuning_ab_plan_only_lists_every_variant(capsys):
    variants = "default;merge_loads_first=0;fixup=fused"
    assert tuning_ab.main(["--plan-only", "--cells", "decode", "--variants", variants]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 * 3  # decode cells x variants
    assert sum("{'merge_loads_first': False}" in line for line in lines) == 6
    assert all(" fused " in line for line in lines if "fixup=fused" in line)
    # a forced N the plan refuses is left out, not fatal (llama-8b n=1 L=8192: 8 x 128 items)
    assert tuning_ab.main(["--plan-only", "--cells", "decode", "--programs", "2048"]) == 0
    assert "skip llama-8b n=1 L=8192 N=2048" in capsys.readouterr().err


def test_tuning_ab_refuses_bad_variants_before_any_work():
    with pytest.raises(SystemExit) as err:
        tuning_ab.main(["--plan-only", "--variants", "default;pdl=2"])
    assert err.value.code == 2


def test_timeline_plan_only_stamps_the_uniform_fixup(capsys):
    assert timeline.main(["attention", "--plan-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(timeline.ATTENTION_CELLS)
    assert all("uniform" in line and "(stamped)" in line for line in lines)
    with pytest.raises(SystemExit):
        timeline.main(["bogus", "--plan-only"])


def test_timeline_kernels_compile_for_sm90():
    # the stream-only and empty kernels, compiled ahead of time as scripts/resources.py does
    code = (
        "import json, sys, torch\n"
        "sys.path[:0] = ['scripts', 'tools']\n"
        "import resources, timeline\n"
        "L, H, D, N = 8192, 8, 128, 128\n"
        "q = torch.zeros(16, D, dtype=torch.float16)\n"
        "k = torch.zeros(1, L, H, D, dtype=torch.float16)\n"
        "out, st = torch.zeros(N, 16, D), torch.zeros(N, 4, dtype=torch.int64)\n"
        "args = (q, k, k, out, st, H * (L // 64), N, L // 64, k.stride(1), k.stride(2))\n"
        "kw = dict(D=D, BLOCK_N=64, BLOCK_M=16, STAGES=4, num_warps=4)\n"
        "print(json.dumps([resources.compile_launch(timeline.stream_kernel, args, kw),\n"
        "                  resources.compile_launch(timeline.empty_kernel, (st,), {})]))\n")
    stream, empty = _compiled(code)
    assert stream["spill_bytes"] == 0 and 0 < stream["shared"] <= 232448, stream
    assert empty["regs"] > 0 and empty["shared"] == 0, empty


def test_prompt_square_variants_plan_every_default_cell():
    # tools/prompt_square.py (GPU): every variant of every default cell plans on the CPU, the
    # cut and whole-tile variants are what they say, and the default plan of a whole prompt
    # is whole tiles on the Hopper prompt kernel
    import torch

    import skattn
    from skattn.bench.models import MODELS

    ps = _load("prompt_square")
    for cell in ps.CELLS.split(","):
        model, n, L = cell.split(":")
        hq, hkv, d = MODELS[model][:3]
        shape = dict(batch=1, q_len=int(n), kv_len=int(L), q_heads=hq, kv_heads=hkv, head_dim=d,
                     dtype=torch.float16, sms=132, occupancy=2)
        tiles = skattn.plan(causal=True, **shape).ntiles_dst
        for name, kw in ps.variants(tiles, 132).items():
            kw = dict(kw)
            p = skattn.plan(causal=kw.pop("causal", True), **shape, **kw)
            if name.startswith("cut"):
                assert (p.programs, p.fixup) == (132, "general")
            if "whole" in name:
                assert (p.programs, p.fixup) == (tiles, "none")
        if n == L:
            p = skattn.plan(causal=True, **shape)
            assert (p.programs, p.tuning.prefill) == (tiles, "ws")


def test_write_table_writes_rows_and_provenance(tmp_path):
    # the CSV + JSON pair the GPU tools leave under $OUT
    import csv
    import json

    from skattn.bench.records import write_table

    rows = [dict(case="a", us=1.5, whole=True), dict(case="b", us=None, whole=False)]
    path = write_table(rows, tmp_path / "new", "steps", {"gpu": "x", "commit": "c"})
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert [r["case"] for r in back] == ["a", "b"]
    assert back[0]["us"] == "1.5" and back[1]["us"] == ""
    assert json.loads((tmp_path / "new" / "steps.json").read_text()) == {"gpu": "x", "commit": "c"}


def test_serving_timeline_counts_each_programs_blocks_and_tiles(capsys):
    # tools/serving_timeline.py: per program the KV blocks and tiles of its range (host work
    # list), which the duration fit reads; checked against a direct count over the tiles
    st = _load("serving_timeline")
    plan, m = st.plan_for("llama-8b", "one-long", 16, sms=132, occupancy=2, tail=0)
    items, tiles, work, n = st.program_work(plan, list(m.kv_lens))
    assert sum(items) == work == 8 * (32768 + 63 * 1024) // plan.geometry.block_n
    assert len(items) == plan.programs and all(i == 0 for i in items[n:])
    ranges = []  # every tile's [first, last item], in list order
    at = 0
    for n_keys in m.kv_lens:
        c = -(-n_keys // plan.geometry.block_n)
        for _ in range(plan.hz):
            ranges.append((at, at + c))
            at += c
    from skattn.serving_worklist import host_work_list

    wl = host_work_list(plan, lens_k=list(m.kv_lens))   # the plan's shares (tiles counted)
    for p in range(n):
        a, b = wl.program_range(p)
        assert items[p] == b - a
        assert tiles[p] == sum(1 for lo, hi in ranges if lo < b and hi > a), p
    assert max(tiles) >= 3  # programs of the short sequences cross tiles
    # with a dynamic tail the static shares hold the first S items
    plan, m = st.plan_for("llama-8b", "one-long", 16, sms=132, occupancy=2, tail=15)
    items, _, work, n = st.program_work(plan, list(m.kv_lens))
    assert plan.tail and sum(items) == work - work * plan.tail // 100
    assert st.main(["--models", "gpt-oss", "--mixes", "equal", "--pages", "64",
                    "--plan-only"]) == 0
    assert "grid 264" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        st.main(["--mixes", "mixed", "--plan-only"])  # a prompt mix: not a decode step


def test_serving_timeline_fit_recovers_block_and_tile_costs():
    st = _load("serving_timeline")
    items = [40, 47, 47, 30, 12, 47, 20, 0]
    tiles = [1, 3, 4, 2, 2, 1, 3, 0]
    dur = [0.9 * i + 2.5 * t + 4.0 for i, t in zip(items, tiles)]
    got = st.fit(dur, items, tiles)
    assert abs(got["us_per_block"] - 0.9) < 1e-9 and abs(got["us_per_tile"] - 2.5) < 1e-9
    assert abs(got["us_fixed"] - 4.0) < 1e-9 and got["fit_rms_us"] < 1e-9
    assert st.fit([1.0] * 4, [5] * 4, [1] * 4) == {}  # equal programs: nothing to fit


def test_stamped_serving_kernels_compile_for_sm90():
    # the serving main kernel and both separate fixups with TIMELINE stamps, the main kernel
    # with tile stamps too (serving_launch.run(stamps=)), compiled ahead of time as
    # scripts/compile_serving.py does
    code = (
        "import json, sys, torch\n"
        "sys.path[:0] = ['scripts']\n"
        "import compile_serving as cs, resources\n"
        "res = []\n"
        "split = dict(kw=dict(q_len=1, max_kv_len=8192, page_size=16, policy='split'),\n"
        "             layout='paged', batch=2)\n"
        "for case in (cs.CASES['paged16-features'], split):\n"
        "    for kernel, args, const in cs.capture('stamped', case):\n"
        "        name = kernel.fn.__name__\n"
        "        if name == 'work_list_kernel':\n"
        "            continue\n"
        "        const.pop('launch_pdl', None)\n"
        "        const.update(STAMPS=torch.zeros(4096, 4, dtype=torch.int64), TIMELINE=True)\n"
        "        info = resources.compile_launch(kernel, args, const,\n"
        "                                        loops=name == 'ragged_attention_kernel')\n"
        "        res.append(dict(kernel=name, **info))\n"
        "        if name == 'ragged_attention_kernel' and not const['WHOLE']:  # tile stamps\n"
        "            const.update(TSTAMPS=torch.zeros(4096, 8, 8, dtype=torch.int64),\n"
        "                         TILE_STAMPS=8)\n"
        "            info = resources.compile_launch(kernel, args, const, loops=True)\n"
        "            import sass_loop\n"
        "            sass = sass_loop.disassemble(resources.build(kernel, args, const)\n"
        "                                         .asm['cubin']).splitlines()\n"
        "            reads = [l.split(';')[0].split('*/')[-1].strip() for l in sass\n"
        "                     if 'SR_GLOBALTIMERLO' in l]\n"
        "            info['timer_reads'] = [r.startswith('@') for r in reads]\n"
        "            res.append(dict(kernel=name + ' tiles', **info))\n"
        "print(json.dumps(res))\n")
    built = _compiled(code)
    assert sorted(b["kernel"] for b in built) == [
        "ragged_attention_kernel", "ragged_attention_kernel", "ragged_attention_kernel tiles",
        "ragged_attention_kernel tiles", "ragged_general_fixup_kernel",
        "ragged_uniform_fixup_kernel"], built
    for b in built:
        if b["kernel"] == "ragged_attention_kernel tiles":
            # tile stamps read the clock under a predicate on the value they follow (at least
            # one read for each of the six stamps), not hoisted above the value's wait
            assert sum(b["timer_reads"]) >= 6, b
        if b["kernel"].startswith("ragged_attention_kernel"):
            assert b["loop_spills"] == 0, b  # the stamps stay out of the KV loop
        else:
            assert b["spill_bytes"] == 0, b


def test_sanitize_cases_split_the_warp_specialised_calls():
    # racecheck gates every call but the warp-specialised kernel's (--no-ws), whose hazards
    # in Triton's own protocol go to a log of their own (--ws): each call in exactly one
    sc = _load("sanitize_cases")
    quick = list(sc.cases(quick=True, device="cpu"))
    ws = {name for name, _, kw in quick if sc.runs_ws(kw)}
    assert {"Lq=70 Lk=300 ws ping-pong (general)", "Lq=Lk=256 auto whole prompt (ws)"} <= ws
    assert any(" auto " in name for name in ws)  # auto's own choice of the kernel counts too
    assert not any("tma" in name or "features" in name for name in ws)
    assert 0 < len(ws) < len(quick)


def test_warp_split_probe_tiles_agree_with_float64():
    # tools/warp_split_probe.py's two decode loops (the usual 16-row tile and warps on their
    # own keys) under the interpreter on a small cache: the partials, merged on the host,
    # match float64 attention
    import torch

    probe = _load("warp_split_probe")
    torch.manual_seed(0)
    Hkv, ratio, D, L, M, P = 2, 4, 32, 128, 16, 4
    CH, Lc = P // Hkv, L // (P // Hkv)
    k = torch.randn(L, Hkv, D, dtype=torch.float16)
    v = torch.randn(L, Hkv, D, dtype=torch.float16)
    q = torch.randn(Hkv * ratio, D, dtype=torch.float16)
    s = torch.einsum("hrd,lhd->hrl", q.double().view(Hkv, ratio, D), k.double()) * D ** -0.5
    ref = torch.einsum("hrl,lhd->hrd", torch.softmax(s, -1), v.double())
    scale = D ** -0.5 * 1.4426950408889634
    for W in (1, 2):
        oa, om, ol = torch.empty(P * M, D), torch.empty(P * M), torch.empty(P * M)
        if W == 1:
            probe.dec2[(P,)](q, k, v, oa, om, ol, Lc, Hkv * D, ratio, scale, CH, D=D, BN=32, M=M)
        else:
            probe.dec3[(P,)](q, k, v, oa, om, ol, Lc, Hkv * D, ratio, scale, CH, D=D, BN=32, M=M,
                             W=W)
        out = probe.merge(oa, om, ol, P, CH, Hkv, ratio, M)
        assert (out - ref).abs().max() < 2e-3 * ref.abs().max(), W


def test_batch_layout_probe_reference_matches_skattn_reference():
    # tools/batch_layout_probe.py checks every timed row against its own float64 decode
    # reference (GQA heads repeated per query head): it must equal skattn's reference
    import torch

    from skattn import reference

    probe = _load("batch_layout_probe")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 8, 16, generator=g, dtype=torch.float16)
    k = torch.randn(3, 40, 2, 16, generator=g, dtype=torch.float16)
    v = torch.randn(3, 40, 2, 16, generator=g, dtype=torch.float16)
    ref = reference.attention(q, k, v)
    got = probe._reference(q, k, v, [0, 2])
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref[[0, 2], 0].double(), rtol=0, atol=1e-6)


def test_serving_timeline_tile_phases_and_loop_fit():
    # tools/serving_timeline.py --tiles: phases between a tile's stamps, the gap to the next
    # tile's start, and the KV loop (q in to loop done) fitted to the tile's blocks
    st = _load("serving_timeline")
    empty = [[0] * 8]
    prog = []
    t = 1000
    for k, blocks in enumerate((5, 2, 9)):
        meta, q, first, store = 200, 800, 4000, 400
        rest = 1800 * (blocks - 1) + 100  # the loop: 4000 + 1800 (b - 1) + 100 = 2300 + 1800 b
        s = [t, t + meta, t + meta + q, t + meta + q + first, t + meta + q + first + rest]
        s.append(s[-1] + store)
        prog.append(s + [blocks, 10 + k])
        t = s[-1] + 300
    rows = st.tile_rows([prog + empty * 2, empty * 5], "m", "x", 16)
    assert [(r["program"], r["k"], r["tile"], r["blocks"]) for r in rows] == [
        (0, 0, 10, 5), (0, 1, 11, 2), (0, 2, 12, 9)]
    assert rows[0]["meta"] == 0.2 and rows[0]["q"] == 0.8 and rows[0]["store"] == 0.4
    assert rows[0]["next"] == 0.3 and rows[2]["next"] is None
    got = st.tile_summary(rows)
    assert abs(got["loop_us_per_block"] - 1.8) < 1e-9 and abs(got["loop_us_fixed"] - 2.3) < 1e-9
    assert got["tile_first_med"] == 4.0 and got["tiles_stamped"] == 3
    assert got["stamps_ordered"] == 3
    assert "loop" in st.tile_table([dict(model="m", mix="x", page_size=16, **got)])
