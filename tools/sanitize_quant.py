"""Small quantized-KV calls for compute-sanitizer: fp8 e4m3 K/V (per-KV-head scales), q8_0
(V also as int8 pairs, `Tuning.q8_0_v_blocks`) and q4_0 blocks, dense, at n = 1 (decode,
uniform fixup) and n = 70 (FP8 and q8_0 also on the dequant route, `Tuning.quant_route`, over
views of a longer cache), causal, checked against float64 on the dequantized K/V; each call
twice (the second replays its recipe, `skattn.recipe`). Run:
compute-sanitizer --tool memcheck python3 tools/sanitize_quant.py
"""
import faulthandler
import sys

import torch

import skattn
from skattn import launch, quant, reference


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    faulthandler.enable()  # a crash under the sanitizer prints the Python stack
    g = torch.Generator(device="cuda").manual_seed(0)
    bad = n = 0
    for lq in (1, 70):
        q = torch.randn(2, lq, 8, 64, device="cuda", generator=g).half()
        k, v = (torch.randn(2, 500, 2, 64, device="cuda", generator=g).half() for _ in range(2))
        (kq, ks), (vq, vs) = quant.fp8(k, per_head=True), quant.fp8(v, per_head=True)
        k8, v8 = quant.q8_0(k), quant.q8_0(v)
        k4, v4 = quant.q4_0(k), quant.q4_0(v)
        cases = [(f"fp8 n={lq}", (q, kq, vq), dict(k_scale=ks, v_scale=vs)),
                 (f"q8_0 n={lq}", (q, k8, v8), {}), (f"q4_0 n={lq}", (q, k4, v4), {})]
        if lq == 1:  # q8_0 V as pairs (decode tiles only), and at head size 96 (a masked block)
            q96 = torch.randn(2, lq, 8, 96, device="cuda", generator=g).half()
            k96, v96 = (quant.q8_0(torch.randn(2, 500, 2, 96, device="cuda", generator=g).half())
                        for _ in range(2))
            for x, kx, vx in ((q, k8, v8), (q96, k96, v96)):
                p = skattn.plan(batch=2, q_len=lq, kv_len=500, q_heads=8, kv_heads=2,
                                head_dim=x.shape[3], dtype="q8_0", causal=True,
                                tuning=skattn.Tuning(q8_0_v_blocks=True))
                assert launch.v_pairs(p)
                cases.append((f"q8_0 V pairs D={x.shape[3]} n={lq}", (x, kx, vx), dict(plan=p)))
        if lq == 70:  # the dequant route, its pass reading views of a longer cache
            k6, v6 = (torch.randn(2, 600, 2, 64, device="cuda", generator=g).half() for _ in range(2))
            (k6f, k6s), (v6f, v6s) = quant.fp8(k6, per_head=True), quant.fp8(v6, per_head=True)
            for form, kx, vx, kw in (
                    (torch.float8_e4m3fn, k6f[:, :500], v6f[:, :500], dict(k_scale=k6s, v_scale=v6s)),
                    ("q8_0", quant.q8_0(k6)[:, :500], quant.q8_0(v6)[:, :500], {})):
                p = skattn.plan(batch=2, q_len=lq, kv_len=500, q_heads=8, kv_heads=2, head_dim=64,
                                dtype=form, causal=True, tuning=skattn.Tuning(quant_route="dequant"))
                assert p.dequant is not None
                cases.append((f"{form} dequant route n={lq}", (q, kx, vx), dict(kw, plan=p)))
        for name, args, kw in cases:
            ref = reference.attention(*args, causal=True, **kw)
            for call in ("", " (replayed)"):  # the second call replays its recipe
                out = skattn.attention(*args, causal=True, **kw)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                n += 1
                if not err < 2e-2:
                    bad += 1
                    print(f"FAIL {name}{call}: rel err {err:.2e}")
    torch.cuda.synchronize()
    print(f"sanitize quant cases: {n} run, {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
