"""Decode diagnostics on a GPU: what the access pattern can stream, and what our kernel does.

  python3 scripts/probe_decode.py stream    # bandwidth of minimal stream kernels vs N, stages
  python3 scripts/probe_decode.py kernel    # skattn's kernel: resources, cp.async, times vs N
  python3 scripts/probe_decode.py flush     # none / read / write flush on the same kernels
  python3 scripts/probe_decode.py steps     # fastdiv, GQA packing, window skipping, BLOCK_N
  python3 scripts/probe_decode.py merge     # fixup launch (PDL) and merge loops; config
  python3 scripts/probe_decode.py tma       # stream kernel: TMA descriptor loads vs cp.async
  python3 scripts/probe_decode.py prefill   # n=512: PDL and fixup rows per program
  python3 scripts/probe_decode.py prefetch  # L2 prefetch ahead of the loads (stream kernel)
  python3 scripts/probe_decode.py layout    # stream kernel: per-head rows vs contiguous reads
  python3 scripts/probe_decode.py rows64    # decode tiles of 17-32 rows: BLOCK_M 32 vs 64
  python3 scripts/probe_decode.py ncu-run   # one cell, few launches (run under ncu)

Writes probe_decode.csv to $OUT (or benchmarks/results).
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

import skattn
from skattn import launch, reference
from skattn.bench.timing import ColdTimer
from skattn.kernels.stamps import stamp
from skattn.bench.models import MODELS
from tune import inputs  # scripts/tune.py: seeded q, k, v for a (model, n, L) cell

OUT = Path(os.environ.get("OUT") or "benchmarks/results")
CELL = ("llama-8b", 1, 32768)


@triton.jit
def stream_kernel(Q, K, V, OUT, total, nprog, blocks_per_head, stride_kn, stride_kh,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  DOTS: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr = 0,
                  STAMPS=None, TIMELINE: tl.constexpr = False):
    """Each program reads K and V blocks [start, end) of the (head, block) list; PREFETCH > 0
    asks L2 for the rows of block i + PREFETCH (and the first PREFETCH blocks up front);
    TIMELINE stamps each program's start and end into STAMPS (skattn.kernels.stamps)."""
    p = tl.program_id(0)
    if TIMELINE:
        stamp(STAMPS, p, 0)
    start = (p * total) // nprog
    end = ((p + 1) * total) // nprog
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + m[:, None] * D + d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    if PREFETCH > 0:
        for i in range(start, tl.minimum(end, start + PREFETCH)):
            _stream_prefetch(K, V, i, blocks_per_head, stride_kn, stride_kh, D, BLOCK_N)
    for i in tl.range(start, end, num_stages=STAGES):
        if PREFETCH > 0:
            if i + PREFETCH < end:
                _stream_prefetch(K, V, i + PREFETCH, blocks_per_head, stride_kn, stride_kh, D,
                                 BLOCK_N)
        h = i // blocks_per_head
        j = i - h * blocks_per_head
        base = h * stride_kh + (j * BLOCK_N) * stride_kn
        if DOTS:
            kt = tl.load(K + base + n[None, :] * stride_kn + d[:, None])
            s = tl.dot(q, kt)
            v = tl.load(V + base + n[:, None] * stride_kn + d[None, :])
            acc += tl.dot(s.to(tl.float16), v)
        else:
            k = tl.load(K + base + n[:, None] * stride_kn + d[None, :])
            v = tl.load(V + base + n[:, None] * stride_kn + d[None, :])
            acc2 += k.to(tl.float32) + v.to(tl.float32)
    if DOTS:
        tl.store(OUT + p * BLOCK_M * D + m[:, None] * D + d[None, :], acc)
    else:
        tl.store(OUT + p * BLOCK_M * D + m[:, None] * D + d[None, :],
                 tl.sum(acc2, 0)[None, :] + tl.zeros([BLOCK_M, D], dtype=tl.float32))
    if TIMELINE:
        stamp(STAMPS, p, 2)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs`; nothing comes back to the SM."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _stream_prefetch(K, V, i, blocks_per_head, stride_kn, stride_kh, D: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    h = i // blocks_per_head
    base = h * stride_kh + ((i - h * blocks_per_head) * BLOCK_N) * stride_kn
    rows = base + tl.arange(0, BLOCK_N)[:, None] * stride_kn + tl.arange(0, D // 64)[None, :] * 64
    _prefetch_l2(K + rows)
    _prefetch_l2(V + rows)


@triton.jit
def stream_tma_kernel(Q, k_desc, v_desc, OUT, total, nprog, blocks_per_head,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      STAGES: tl.constexpr):
    """stream_kernel with DOTS, K/V blocks loaded by TMA from [L, Hkv * D] descriptors."""
    p = tl.program_id(0)
    start = (p * total) // nprog
    end = ((p + 1) * total) // nprog
    d = tl.arange(0, D)
    m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + m[:, None] * D + d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i in tl.range(start, end, num_stages=STAGES):
        h = i // blocks_per_head
        j = i - h * blocks_per_head
        k = k_desc.load([j * BLOCK_N, h * D])
        s = tl.dot(q, k.T)
        v = v_desc.load([j * BLOCK_N, h * D])
        acc += tl.dot(s.to(tl.float16), v)
    tl.store(OUT + p * BLOCK_M * D + m[:, None] * D + d[None, :], acc)


def _stream_inputs(L):
    """llama-8b n=1 K and V at depth L and a 16-row query block for the stream kernels."""
    q, k, v = inputs("llama-8b", 1, L)
    return k, v, torch.randn(16, k.shape[3], device="cuda", dtype=torch.float16)


def tma(rows):
    """Same grid and work as stream_kernel(DOTS): TMA loads vs cp.async, N and stages."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    timer = ColdTimer(flush="read")
    for L in (8192, CELL[2]):
        k, v, qs = _stream_inputs(L)
        Hkv, D = k.shape[2], k.shape[3]
        nbytes = 2 * k.numel() * 2
        for bn in (64, 128):
            total = Hkv * (L // bn)
            kd = TensorDescriptor.from_tensor(k.view(L, Hkv * D), [bn, D])
            vd = TensorDescriptor.from_tensor(v.view(L, Hkv * D), [bn, D])
            for stages in (2, 3, 4):
                for N in (128, 132, 264):
                    out = torch.empty(N, 16, D, device="cuda", dtype=torch.float32)
                    for how in ("cp.async", "tma"):
                        if how == "tma":
                            fn = lambda: stream_tma_kernel[(N,)](  # noqa: E731
                                qs, kd, vd, out, total, N, L // bn, D=D, BLOCK_N=bn, BLOCK_M=16,
                                STAGES=stages, num_warps=4)
                        else:
                            fn = lambda: stream_kernel[(N,)](  # noqa: E731
                                qs, k, v, out, total, N, L // bn, k.stride(1), k.stride(2),
                                D=D, BLOCK_N=bn, BLOCK_M=16, DOTS=True, STAGES=stages,
                                num_warps=4)
                        try:
                            fn()
                            t = timer.time(fn, reps=30)
                        except Exception as e:  # noqa: BLE001 (too much shared memory)
                            print("fail", how, bn, stages, N, repr(e)[:160], flush=True)
                            continue
                        rows.append(dict(what=f"stream-{how}", model="llama-8b", depth=L,
                                         block_n=bn, stages=stages, programs=N, p50_us=t.p50,
                                         tbps=nbytes / t.p50 / 1e6))
                        print(f"{how:8s} L={L} bn={bn} st={stages} N={N:4d} {t.p50:7.1f} us "
                              f"{nbytes / t.p50 / 1e6:5.2f} TB/s", flush=True)


def _cell(model, n, L):
    """Seeded inputs of a grid cell, a poisonable output, the float64 reference and the
    plan arguments of the cell (causal, batch 1)."""
    q, k, v = inputs(model, n, L)
    Hq, Hkv, D = MODELS[model][:3]
    kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True)
    return q, k, v, torch.empty_like(q), reference.attention(q, k, v, causal=True), kw


def _checked(timer, p, q, k, v, out, ref, reps=40):
    """_main_and_all, then the whole call's max relative error against `ref`."""
    t_main, t_all = _main_and_all(timer, p, q, k, v, out, reps)
    return t_main, t_all, ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _main_and_all(timer, p, q, k, v, out, reps):
    """p50 of the main kernel alone and of the whole call (main + fixup); `out` is poisoned
    first, so it holds the whole call's result afterwards."""
    D = q.shape[-1]
    run = lambda main_only=False: launch.run(p, q, k, v, out, None,  # noqa: E731
                                             scale=D ** -0.5, main_only=main_only)
    out.fill_(float("nan"))
    run()
    return timer.time(lambda: run(True), reps=reps), timer.time(run, reps=reps)


def merge(rows):
    """Separate fixup launched early (PDL, triggered at the main kernel's start or end) or
    not; fused merge with 4 or 16 pieces a step (FUSED_MERGE_ELEMENTS 64, 256)."""
    timer = ColdTimer(flush="read")
    variants = [  # (label, fixup, USE_PDL, PDL_TRIGGER, FUSED_MERGE_ELEMENTS)
        ("separate", None, False, "start", 256),
        ("separate+pdl", None, True, "start", 256),
        ("separate+pdl end", None, True, "end", 256),
        ("fused el64", "fused", False, "start", 64),
        ("fused el256", "fused", False, "start", 256),
    ]
    cells = (("llama-8b", 1, 8192), CELL, ("qwen3moe-30b-a3b", 2, 8192),
             ("qwen3-14b", 4, 16384), ("gpt-oss", 16, 32768), ("gpt-oss", 1, 8192),
             ("llama-8b", 512, 8192))
    for model, n, L in cells:
        q, k, v, out, ref, kw = _cell(model, n, L)
        for N in (128, 264):
            for label, fixup, pdl, trigger, el in variants:
                launch.USE_PDL, launch.PDL_TRIGGER, launch.FUSED_MERGE_ELEMENTS = pdl, trigger, el
                try:
                    p = skattn.plan(programs=N, fixup=fixup, **kw)
                except ValueError as e:  # N above the work items
                    print("skip", model, n, L, N, e, flush=True)
                    continue
                t_main, t_all, err = _checked(timer, p, q, k, v, out, ref)
                rows.append(dict(what="merge", model=model, n=n, depth=L, programs=N,
                                 variant=label, fixup=p.fixup, main_us=t_main.p50,
                                 p50_us=t_all.p50, max_rel_err=err))
                print(f"{model} n={n} L={L} N={N} {label:13s} {p.fixup:8s} main "
                      f"{t_main.p50:6.1f} all {t_all.p50:6.1f} us err {err:.1e}", flush=True)
    launch.USE_PDL, launch.PDL_TRIGGER, launch.FUSED_MERGE_ELEMENTS = True, "end", 256


def prefill(rows):
    """Prompt chunks at llama.cpp's N (uniform fixup): PDL off / trigger at start / at end, and
    16 or all rows of a tile per fixup program (FIXUP_ROWS)."""
    timer = ColdTimer(flush="read")
    for model, n, L in (("llama-8b", 512, 8192), ("llama-8b", 512, 32768)):
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        out = torch.empty_like(q)
        p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                        causal=True, policy="llamacpp")
        for pdl, trigger in ((False, "end"), (True, "end"), (True, "start")):
            for fix_rows in (16, 128):
                launch.USE_PDL, launch.PDL_TRIGGER, launch.FIXUP_ROWS = pdl, trigger, fix_rows
                t_main, t_all = _main_and_all(timer, p, q, k, v, out, reps=30)
                label = f"pdl={pdl:d} {trigger} rows={fix_rows}"
                rows.append(dict(what="prefill", model=model, n=n, depth=L, programs=p.programs,
                                 fixup=p.fixup, variant=label, main_us=t_main.p50,
                                 p50_us=t_all.p50))
                print(f"{model} n={n} L={L} N={p.programs} {p.fixup} {label}: main "
                      f"{t_main.p50:6.1f} all {t_all.p50:6.1f} us", flush=True)
    launch.USE_PDL, launch.PDL_TRIGGER, launch.FIXUP_ROWS = True, "end", 16


def stream(timer, rows):
    for model, L in ((CELL[0], CELL[2]), ("llama-8b", 8192)):
        k, v, qs = _stream_inputs(L)
        Hkv, D = k.shape[2], k.shape[3]
        nbytes = 2 * k.numel() * 2
        for bn in (64, 128):
            total = Hkv * (L // bn)
            for dots in (False, True):
                for stages in (2, 4, 6):
                    for N in (132, 264, 528):
                        out = torch.empty(N, 16, D, device="cuda", dtype=torch.float32)
                        args = (qs, k, v, out, total, N, L // bn, k.stride(1), k.stride(2))
                        kw = dict(D=D, BLOCK_N=bn, BLOCK_M=16, DOTS=dots, STAGES=stages,
                                  num_warps=4)
                        try:
                            ck = stream_kernel[(N,)](*args, **kw)
                            t = timer.time(lambda: stream_kernel[(N,)](*args, **kw), reps=30)
                            res = dict(n_regs=ck.n_regs, shared=ck.metadata.shared,
                                       cp_async="cp.async" in ck.asm["ptx"])
                        except Exception as e:  # noqa: BLE001 (too much shared memory)
                            print("fail", bn, dots, stages, N, repr(e)[:120])
                            continue
                        rows.append(dict(what="stream", model=model, depth=L, block_n=bn,
                                         dots=dots, stages=stages, programs=N, p50_us=t.p50,
                                         tbps=nbytes / t.p50 / 1e6, **res))
                        print(f"stream L={L} bn={bn} dots={dots:d} st={stages} N={N:5d} "
                              f"{t.p50:7.1f} us {nbytes / t.p50 / 1e6:5.2f} TB/s {res}",
                              flush=True)


def _stream_cells(depths, counts=(128, 264)):
    """llama-8b n=1 inputs at each depth, then each program count: (L, k, v, qs, out, N)."""
    for L in depths:
        k, v, qs = _stream_inputs(L)
        for N in counts:
            yield L, k, v, qs, torch.empty(N, 16, k.shape[3], device="cuda", dtype=torch.float32), N


def _time_stream(timer, rows, L, N, k, args, label, **fields):
    """Time stream_kernel (4 stages, 64-row blocks, dots) on `args`; one row and one line."""
    kw = dict(D=k.shape[3], BLOCK_N=64, BLOCK_M=16, DOTS=True, STAGES=4, num_warps=4,
              PREFETCH=fields.get("prefetch", 0))
    stream_kernel[(N,)](*args, **kw)
    t = timer.time(lambda: stream_kernel[(N,)](*args, **kw), reps=30)
    tbps = 4 * k.numel() / t.p50 / 1e6  # K and V, 2 bytes an element
    rows.append(dict(model="llama-8b", depth=L, programs=N, p50_us=t.p50, tbps=tbps, **fields))
    print(f"stream L={L} N={N} {label:14s} {t.p50:7.1f} us {tbps:5.2f} TB/s", flush=True)


def prefetch(rows):
    """L2 prefetch PF blocks ahead in the minimal stream kernel (4 stages). It lost at every
    distance, here and in skattn's decode kernel (PERF.md), so the kernel has none."""
    timer = ColdTimer(flush="read")
    for L, k, v, qs, out, N in _stream_cells((8192, CELL[2])):
        Hkv = k.shape[2]
        for pf in (0, 2, 4, 8, 16, 64):
            args = (qs, k, v, out, Hkv * (L // 64), N, L // 64, k.stride(1), k.stride(2))
            _time_stream(timer, rows, L, N, k, args, f"pf={pf}", what="stream-prefetch",
                         prefetch=pf)


def layout(rows):
    """The minimal stream kernel (N programs, 4 stages, 64-row blocks) over the same K/V bytes
    read per KV head (rows of 256 B, 2 KB apart: how skattn reads) or contiguously (the
    cache seen as one head of L x Hkv rows): does DRAM locality cost bandwidth?"""
    timer = ColdTimer(flush="read")
    for L, k, v, qs, out, N in _stream_cells((8192, 16384, CELL[2])):
        Hkv, D = k.shape[2], k.shape[3]
        for how in ("per-head", "contiguous"):
            if how == "per-head":
                args = (qs, k, v, out, Hkv * (L // 64), N, L // 64, k.stride(1), k.stride(2))
            else:
                args = (qs, k, v, out, Hkv * L // 64, N, Hkv * L // 64, D, 0)
            _time_stream(timer, rows, L, N, k, args, how, what="stream-layout", layout=how)


def rows64(rows):
    """Decode tiles of 17-32 rows (n=4 at ratio 8, n=8 at ratio 4) stream slower than 16- or
    64-row tiles (fixed_cost.py on a bench CSV): the default BLOCK_M vs 64."""
    timer = ColdTimer(flush="read")
    cells = (("gpt-oss", 4, 8192), ("gpt-oss", 4, 32768), ("llama-8b", 8, 8192),
             ("llama-8b", 8, 32768), ("qwen3moe-30b-a3b", 4, 16384), ("llama-70b", 4, 32768),
             ("qwen3-14b", 4, 16384), ("llama-8b", 1, 8192), ("llama-8b", 1, 32768))
    for model, n, L in cells:
        q, k, v, out, ref, kw = _cell(model, n, L)
        for bm in (None, 64):
            p = skattn.plan(block_m=bm, **kw)
            t_main, t_all, err = _checked(timer, p, q, k, v, out, ref)
            g = p.geometry
            rows.append(dict(what="rows64", model=model, n=n, depth=L, programs=p.programs,
                             fixup=p.fixup, block_m=g.block_m, block_n=g.block_n,
                             main_us=t_main.p50, p50_us=t_all.p50, max_rel_err=err))
            print(f"{model} n={n} L={L} N={p.programs} {p.fixup} BLOCK_M={g.block_m} "
                  f"BLOCK_N={g.block_n} main {t_main.p50:6.1f} all {t_all.p50:6.1f} us "
                  f"err {err:.1e}", flush=True)


def kernel(timer, rows):
    from skattn.kernels.attention import attention_kernel

    t = timer.time(lambda: None, reps=30)
    rows.append(dict(what="empty", p50_us=t.p50))
    print(f"timer floor (nothing between events): {t.p50:.1f} us", flush=True)
    for model, n, L in (CELL, ("llama-8b", 1, 8192), ("qwen3moe-30b-a3b", 2, 8192)):
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        nbytes = 2 * k.numel() * 2
        out = torch.empty_like(q)
        for N, fixup in ((128, None), (128, "fused"), (132, None), (264, None), (264, "fused"),
                         (396, None)):
            for stages in (4,):
                p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv,
                                head_dim=D, causal=True, programs=N, num_stages=stages,
                                fixup=fixup)
                launch.run(p, q, k, v, out, None, scale=D ** -0.5)
                torch.cuda.synchronize()
                ck = list(attention_kernel.device_caches[0][0].values())[-1]
                ptx = ck.asm["ptx"]
                res = dict(n_regs=ck.n_regs, shared=ck.metadata.shared,
                           cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                           ld_global=ptx.count("ld.global"))
                t_main = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=D ** -0.5,
                                                       main_only=True), reps=30)
                t_all = timer.time(lambda: launch.run(p, q, k, v, out, None, scale=D ** -0.5),
                                   reps=30)
                rows.append(dict(what="skattn", model=model, depth=L, block_n=p.geometry.block_n,
                                 stages=stages, programs=N, fixup=p.fixup, p50_us=t_all.p50,
                                 main_us=t_main.p50, tbps=nbytes / t_all.p50 / 1e6, **res))
                print(f"skattn {model} n={n} L={L} N={N} st={stages} {p.fixup}: main "
                      f"{t_main.p50:6.1f} all {t_all.p50:6.1f} us {res}", flush=True)


def flush_modes(rows):
    """The same kernels timed with no flush, a read flush and a write flush (do_bench's)."""
    import torch.nn.functional as F

    class HotTimer(ColdTimer):
        def flush(self):
            pass

    timers = {"none": HotTimer(), "read": ColdTimer(flush="read"), "write": ColdTimer(flush="write")}
    for model, n, L in (("llama-8b", 1, 8192), CELL):
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        nbytes = 2 * k.numel() * 2
        out = torch.empty_like(q)
        qs = torch.randn(16, D, device="cuda", dtype=torch.float16)
        sout = torch.empty(132, 16, D, device="cuda", dtype=torch.float32)
        sargs = (qs, k, v, sout, Hkv * (L // 64), 132, L // 64, k.stride(1), k.stride(2))
        skw = dict(D=D, BLOCK_N=64, BLOCK_M=16, DOTS=True, STAGES=4, num_warps=4)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fns = {"stream N=132": lambda: stream_kernel[(132,)](*sargs, **skw)}
        for N, fixup in ((128, None), (128, "fused")):
            p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                            causal=True, programs=N, fixup=fixup)
            fns[f"skattn N={N} {p.fixup}"] = (
                lambda p=p: launch.run(p, q, k, v, out, None, scale=D ** -0.5))
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            def sdpa(backend=backend):
                with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                    F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            fns[f"sdpa {backend.split('_')[0].lower()}"] = sdpa
        for name, fn in fns.items():
            fn()
            for mode, timer in timers.items():
                t = timer.time(fn, reps=40)
                rows.append(dict(what=f"flush-{mode}", model=model, depth=L, kernel=name,
                                 p50_us=t.p50, tbps=nbytes / t.p50 / 1e6))
                print(f"L={L:<6d} {name:22s} flush={mode:5s} {t.p50:7.1f} us "
                      f"({nbytes / t.p50 / 1e6:.2f} TB/s of K+V)", flush=True)
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for mode, timer in timers.items():
        t = timer.time(lambda: dst.copy_(src), reps=20)
        print(f"copy 2 GiB + 2 GiB flush={mode}: {4 * 2**30 / t.p50 / 1e6:.2f} TB/s", flush=True)
        rows.append(dict(what=f"flush-{mode}", kernel="copy 2GiB", p50_us=t.p50,
                         tbps=4 * 2**30 / t.p50 / 1e6))


def fused(rows):
    """Fused fixup vs the separate one (uniform/general, launched early) at the same N, with
    every output checked against float64."""
    timer = ColdTimer(flush="read")
    cells = (("llama-8b", 1, 8192), CELL, ("qwen3moe-30b-a3b", 1, 8192), ("gpt-oss", 1, 8192),
             ("qwen3-14b", 4, 16384), ("gpt-oss", 16, 32768))
    for model, n, L in cells:
        q, k, v, out, ref, kw = _cell(model, n, L)
        for N in (128, 264):
            for fixup in (None, "fused"):
                p = skattn.plan(programs=N, fixup=fixup, **kw)
                t_main, t_all, err = _checked(timer, p, q, k, v, out, ref)
                rows.append(dict(what="fused", model=model, n=n, depth=L, programs=N,
                                 fixup=p.fixup, main_us=t_main.p50, p50_us=t_all.p50,
                                 max_rel_err=err, src=skattn.__file__))
                print(f"{model} n={n} L={L} N={N} {p.fixup:8s} main {t_main.p50:6.1f} "
                      f"all {t_all.p50:6.1f} us err {err:.1e}", flush=True)


def steps(rows):
    """What single features are worth: fastdiv, GQA packing, skipping invisible (window) KV
    blocks, and decode BLOCK_N 64 vs 128 for head size 64."""
    timer = ColdTimer(flush="read")

    def timed(what, model, n, L, fn):
        fn()
        t = timer.time(fn, reps=40)
        rows.append(dict(what=what, model=model, n=n, depth=L, p50_us=t.p50))
        print(f"{what:38s} {model} n={n} L={L}: {t.p50:7.1f} us", flush=True)

    for model, n, L in (("llama-8b", 1, 32768), ("qwen3-14b", 4, 16384), ("llama-8b", 512, 8192)):
        q, k, v = inputs(model, n, L)
        Hq, Hkv, D = MODELS[model][:3]
        kw = dict(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, causal=True)
        for fd in (True, False):
            p = skattn.plan(fastdiv=fd, **kw)
            timed(f"fastdiv={fd}", model, n, L,
                  lambda p=p: skattn.attention(q, k, v, causal=True, plan=p))
        # no GQA packing: every query head reads its own copy of K/V (ratio 1)
        ratio = Hq // Hkv
        ke, ve = (x.repeat_interleave(ratio, dim=2) for x in (k, v))
        pe = skattn.plan(**{**kw, "kv_heads": Hq})
        timed("GQA packing off (K/V per query head)", model, n, L,
              lambda: skattn.attention(q, ke, ve, causal=True, plan=pe))
        del ke, ve
    for n in (1, 8):
        q, k, v = inputs("gpt-oss", n, 32768)
        kw = dict(batch=1, q_len=n, kv_len=32768, q_heads=64, kv_heads=8, head_dim=64, causal=True)
        for window in (None, 128):
            p = skattn.plan(window=window, **kw)
            timed(f"window={window}", "gpt-oss", n, 32768,
                  lambda p=p, w=window: skattn.attention(q, k, v, causal=True, window=w, plan=p))
        for bn in (64, 128):
            p = skattn.plan(block_n=bn, **kw)
            timed(f"decode block_n={bn}", "gpt-oss", n, 32768,
                  lambda p=p: skattn.attention(q, k, v, causal=True, plan=p))


def ncu_run():
    model, n, L = CELL[0], CELL[1], int(os.environ.get("PROBE_L", CELL[2]))
    q, k, v = inputs(model, n, L)
    Hq, Hkv, D = MODELS[model][:3]
    out = torch.empty_like(q)
    p = skattn.plan(batch=1, q_len=n, kv_len=L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                    causal=True, programs=int(os.environ.get("PROBE_N", "128")),
                    fixup=os.environ.get("PROBE_FIXUP") or None)
    for _ in range(3):
        launch.run(p, q, k, v, out, None, scale=D ** -0.5)
    torch.cuda.synchronize()


def main():
    if sys.argv[1:] == ["ncu-run"]:
        return ncu_run()
    timer = ColdTimer()
    probes = {"merge": merge, "prefill": prefill, "tma": tma, "steps": steps, "fused": fused,
              "flush": flush_modes, "prefetch": prefetch, "rows64": rows64, "layout": layout, "kernel": lambda rows: kernel(timer, rows),
              "stream": lambda rows: stream(timer, rows)}
    rows = []
    try:
        for name, probe in probes.items():
            if name in sys.argv:
                probe(rows)
    finally:
        _write(rows)


def _write(rows):
    OUT.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(OUT / "probe_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
