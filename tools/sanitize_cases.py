"""Small attention calls covering every fixup kind and feature, and the Hopper prompt kernels
(TMA: cut, fused and whole tiles; warp-specialised: cut, whole, ping-pong, and a whole prompt
as `auto` plans it), checked against float64, each made twice (the second replays its recipe
through skattn's C launcher): what `scripts/gpu_run.sh` runs under compute-sanitizer
(memcheck, racecheck, synccheck). `--quick`: fewer shapes; `--only TEXT`: the cases whose
name contains TEXT; `--ws`: only the calls whose plan runs the warp-specialised kernel,
`--no-ws`: the others (racecheck reports hazards in Triton's warp-specialisation protocol,
docs/prefill.md, "Checking it"). Each case's name is printed before it runs, and a crash
prints the Python stack (faulthandler), so a log cut short shows where."""
import faulthandler
import sys

import torch

import skattn
from skattn import reference


def cases(quick: bool = False, device: str = "cuda"):
    """Every fixup kind and feature at three shapes; `quick`: two shapes (for the slower
    racecheck and synccheck)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    shape = dict(batch=2, q_heads=8, kv_heads=2, head_dim=64)
    for Lq, Lk in ((1, 1000), (70, 300)) if quick else ((1, 1000), (5, 777), (70, 300)):
        q, k, v = rand(2, Lq, 8, 64), rand(2, Lk, 2, 64), rand(2, Lk, 2, 64)
        kw = dict(shape, q_len=Lq, kv_len=Lk, causal=True)
        plans = {"llamacpp": skattn.plan(policy="llamacpp", **kw),
                 "before": skattn.plan(policy="llamacpp-before", **kw),
                 "fused": skattn.plan(policy="llamacpp", fixup="fused", **kw),
                 "split": skattn.plan(policy="split", **kw),
                 "auto": skattn.plan(**kw)}
        for name, p in plans.items():
            yield f"Lq={Lq} Lk={Lk} {name} ({p.fixup})", (q, k, v), dict(causal=True, plan=p)
        mask = torch.where(torch.rand(2, Lq, Lk, device=device, generator=g) < 0.2,
                           float("-inf"), 0.0).half()
        feats = dict(mask=mask, sinks=rand(8, dtype=torch.float32), softcap=20.0,
                     alibi_slopes=skattn.alibi_slopes(8, 8.0).to(device))
        yield f"Lq={Lq} Lk={Lk} all features", (q, k, v), dict(causal=True, **feats)
        yield f"Lq={Lq} Lk={Lk} window", (q, k, v), dict(causal=True, window=100)
        if Lq * 4 >= 64:  # prompt-chunk tiles: the Hopper prompt kernel, cut and whole
            tma = skattn.Tuning(prefill="tma")
            for name, p in {"tma llamacpp": skattn.plan(policy="llamacpp", tuning=tma, **kw),
                            "tma fused": skattn.plan(fixup="fused", tuning=tma, **kw),
                            "tma whole": skattn.plan(tuning=tma, fixup="none",
                                                     programs=skattn.plan(**kw).ntiles_dst,
                                                     **kw)}.items():
                yield f"Lq={Lq} Lk={Lk} {name} ({p.fixup})", (q, k, v), dict(causal=True, plan=p)
            ws, pp = skattn.Tuning(prefill="ws"), skattn.Tuning(prefill="ws", prefill_pingpong=True)
            for name, p in {"ws llamacpp": skattn.plan(policy="llamacpp", tuning=ws, **kw),
                            "ws ping-pong": skattn.plan(policy="llamacpp", tuning=pp, **kw),
                            "ws whole": skattn.plan(tuning=ws, fixup="none",
                                                    programs=skattn.plan(**kw).ntiles_dst,
                                                    **kw)}.items():
                yield f"Lq={Lq} Lk={Lk} {name} ({p.fixup})", (q, k, v), dict(causal=True, plan=p)
    # a whole prompt as `auto` plans it on a GPU of 4 SMs: whole tiles, the warp-specialised
    # kernel in 128-key blocks
    q, k, v = rand(2, 256, 8, 64), rand(2, 256, 2, 64), rand(2, 256, 2, 64)
    p = skattn.plan(q_len=256, kv_len=256, causal=True, sms=4, **shape)
    assert (p.fixup, p.tuning.prefill, p.geometry.block_n) == ("none", "ws", 128), p
    yield "Lq=Lk=256 auto whole prompt (ws)", (q, k, v), dict(causal=True, plan=p)


def runs_ws(kw: dict) -> bool:
    """Whether a case's call runs the warp-specialised kernel (on sm_90: its plan says so)."""
    plan = kw.get("plan")
    return plan is not None and plan.tuning.prefill == "ws"


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    faulthandler.enable()
    bad = 0
    n = 0
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    for name, (q, k, v), kw in cases(quick="--quick" in sys.argv):
        if only not in name:
            continue
        if ("--ws" in sys.argv and not runs_ws(kw)) or ("--no-ws" in sys.argv and runs_ws(kw)):
            continue
        print(f"case {name}", flush=True)
        rkw = {key: val for key, val in kw.items() if key != "plan"}
        ref = reference.attention(q, k, v, **rkw)
        # the first call learns the signature's recipe through launch.run, the second
        # replays it (skattn.recipe): through skattn's C launcher (skattn.launcher), or for
        # the warp-specialised prompt kernel through Triton's C launch functions with the
        # K/V tensor maps the recipe makes
        for call in ("first", "repeat"):
            out, lse = skattn.attention(q, k, v, return_lse=True, **kw)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            n += 1
            if not err < 2e-2 or out.isnan().any():
                bad += 1
                print(f"FAIL {name} ({call} call): rel err {err:.2e}")
    torch.cuda.synchronize()
    print(f"sanitize cases: {n} run, {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
