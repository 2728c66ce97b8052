"""The GPU half of `skattn calibrate`: time every program count N for a few cells."""
from __future__ import annotations

import sys

import torch

import skattn
from skattn.bench.models import MODELS


def sweep(cells, *, occupancy: int = 2, step: int = 2, reps: int = 20):
    """Rows (model, n, depth, programs, fixup, p50_us) for N = 1, 1+step, ... up to 2 x max_programs."""
    from skattn.bench.timing import ColdTimer

    if not torch.cuda.is_available():
        raise RuntimeError("the sweep needs a CUDA GPU; use --from-csv to fit a measured sweep")
    timer = ColdTimer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for model, n, depth in cells:
        hq, hkv, d = MODELS[model][:3]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, L, h, d, device="cuda", generator=g, dtype=torch.float16)
                   for L, h in ((n, hq), (depth, hkv), (depth, hkv)))
        out = torch.empty_like(q)
        kw = dict(batch=1, q_len=n, kv_len=depth, q_heads=hq, kv_heads=hkv, head_dim=d,
                  causal=True, sms=sms, occupancy=occupancy)
        top = min(skattn.plan(**kw).work, 2 * sms * occupancy)
        for programs in range(1, top + 1, step):
            for fixup in (None, "fused"):
                p = skattn.plan(programs=programs, fixup=fixup, **kw)
                if fixup == "fused" and p.fixup == "none":
                    continue
                t = timer.time(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out),
                               warmup=3, reps=reps)
                rows.append(dict(model=model, n=n, depth=depth, programs=programs, fixup=p.fixup,
                                 ntiles_dst=p.ntiles_dst, work=p.work, p20_us=t.p20, p50_us=t.p50,
                                 p80_us=t.p80))
        sys.stderr.write(f"swept {model} n={n} L={depth}\n")
    return rows, sms
