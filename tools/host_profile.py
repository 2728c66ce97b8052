"""Host time of one planned skattn call, split by layer, with a cProfile of the slowest."""
import cProfile
import pstats
import time

import torch

import skattn
from skattn import launch


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.float16)
k = torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.float16)
v = torch.randn_like(k)
out = torch.empty_like(q)
p = skattn.plan(batch=1, q_len=1, kv_len=256, q_heads=32, kv_heads=8, head_dim=128, causal=True)
print(p.fixup, p.programs)
import torch.nn.functional as F
qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
rows = {
    "attention planned": lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out),
    "attention unplanned": lambda: skattn.attention(q, k, v, causal=True),
    "launch.run": lambda: launch.run(p, q, k, v, out, None, scale=0.088),
    "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
}
for name, fn in rows.items():
    print(f"{name:22s} {per_call(fn):7.1f} us")
print("compiled keys:", len(launch._COMPILED))
pr = cProfile.Profile()
pr.enable()
for _ in range(500):
    skattn.attention(q, k, v, causal=True, plan=p, out=out)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
