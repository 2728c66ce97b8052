"""Host time of one planned skattn call, split by layer, with a cProfile of the slowest.

    PYTHONPATH=src python3 tools/host_profile.py [--calls 2000] [--top 14]

On a GPU: llama-8b-shaped decode (n = 1, L = 256, so the GPU work is small and the host
time shows), microseconds of Python per call for `skattn.attention` with a plan (its
recipe: `skattn.recipe`), without one, `launch.run` alone (the path before a recipe), the
recipe's parts, SDPA, and the launches replayed with prebuilt arguments (Triton's wrapper,
Triton's C launch function, skattn's C launcher), then the cProfile of 500 planned calls.
"""
import argparse
import cProfile
import pstats
import sys

import torch

import skattn
from skattn import api, launch, launcher
from skattn.bench.host import per_call_us


def per_call(fn, n=2000):
    """Host microseconds per call of `fn`, launches not waited for."""
    return per_call_us(fn, n)


def direct_launches(p, q, k, v, out) -> dict:
    """The planned call's kernel launches replayed with their arguments built once: through
    `CompiledKernel.run` (tensors as arguments), and through the C launch function with every
    pointer passed as an integer (no `data_ptr` call, no pointer query in the launcher)."""
    seen = []
    launch.run(p, q, k, v, out, None, scale=128 ** -0.5, record=seen)
    stream = torch.cuda.current_stream().cuda_stream
    calls = []
    for key, a, grid in seen:
        ck, tail = launch._COMPILED[key]
        ints = tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in a)
        r = ck.run
        calls.append((ck, a, ints, tail, grid, stream, r))

    def via_run():
        for ck, a, _, tail, g, s, _ in calls:
            ck.run(g[0], g[1], g[2], s, ck.function, ck.packed_metadata, None, None, None,
                   *a, *tail)

    def via_c():
        for ck, _, ints, tail, g, s, r in calls:
            r.launch(g[0], g[1], g[2], s, ck.function, r.launch_cooperative_grid, r.launch_pdl,
                     None, None, ck.packed_metadata, None, None, None, *ints, *tail)

    def pack_only():
        for _, a, _, _, _, _, _ in calls:
            tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in a)

    return {f"{len(calls)} x CompiledKernel.run": via_run,
            f"{len(calls)} x C launch, int ptrs": via_c,
            "data_ptr of every arg": pack_only}


def recipe_rows(p, q, k, v, out) -> dict:
    """The planned call's recipe (`skattn.recipe`) in parts: its per-call values alone (the
    addresses: what a repeat call reads past its signature lookup), packing the argument
    tuples of Triton's launch functions, and its launches through skattn's C launcher with
    those values made once."""
    skattn.attention(q, k, v, causal=True, plan=p, out=out)
    skattn.attention(q, k, v, causal=True, plan=p, out=out)
    rec = next(r for r in api._CHECKED.values() if r.plan is p)
    stream = torch.cuda.current_stream().cuda_stream
    tensors = (q, k, v, out, None, None, None, None, None, None, None)
    got = rec.values(stream, *tensors)
    if got is None:
        return {}
    (spec, launches), vals = got
    key = api._signature(q, k, v, None, True, None, None, None, 0.0, None, False, p, out)
    assert api._CHECKED.get(key) is rec
    rows = {"signature": lambda: api._signature(q, k, v, None, True, None, None, None, 0.0, None,
                                                False, p, out),
            "signature lookup": lambda: api._CHECKED.get(key),
            "recipe values (addresses)": lambda: rec.values(stream, *tensors),
            "recipe pack for Triton": lambda: rec.pack(stream, *tensors)}
    if spec is not None:
        fast = launcher.module().launch
        rows[f"{len(launches)} x skattn C launcher"] = lambda: fast(spec, *vals)
    else:
        print("the recipe has no C launcher spec: it launches through Triton's functions")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per row")
    ap.add_argument("--top", type=int, default=14, help="cProfile rows to print")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch.nn.functional as F

    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    p = skattn.plan(batch=1, q_len=1, kv_len=256, q_heads=32, kv_heads=8, head_dim=128,
                    causal=True)
    fused = skattn.plan(batch=1, q_len=1, kv_len=256, q_heads=32, kv_heads=8, head_dim=128,
                        causal=True, fixup="fused")  # one launch a call
    print(p.fixup, p.programs, "| fused:", fused.fixup, fused.programs)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    rows = {
        "attention planned": lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out),
        "attention unplanned": lambda: skattn.attention(q, k, v, causal=True),
        "attention unplanned, out=": lambda: skattn.attention(q, k, v, causal=True, out=out),
        "attention planned, fused": lambda: skattn.attention(q, k, v, causal=True, plan=fused,
                                                             out=out),
        "launch.run": lambda: launch.run(p, q, k, v, out, None, scale=128 ** -0.5),
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
    }
    parts = recipe_rows(p, q, k, v, out)
    if not parts:
        print("the planned call has no recipe: it runs through launch.run")
    rows.update(parts)
    rows.update(direct_launches(p, q, k, v, out))
    for name, fn in rows.items():
        print(f"{name:28s} {per_call(fn, args.calls):7.1f} us")
    print("compiled kernels called directly:", len(launch._COMPILED))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
