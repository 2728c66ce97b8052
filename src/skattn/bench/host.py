"""Host time of one attention call (`skattn bench --host`): wall clock over many back-to-back
calls whose GPU work is tiny, so that the host, not the GPU, is the bottleneck.

Every provider runs in the same process on the same tensors; batches of calls are interleaved
across providers so that a change in CPU speed during the run reaches all of them alike. Each
batch starts on an idle GPU; "drain" is the wait for the GPU after a batch's last call
returned (a long drain means the GPU, not the host, set the pace).
"""
from __future__ import annotations

import csv
import gc
import importlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from skattn.bench.timing import summarize

# B = 1, n = 1, Lk = 256, 32/8/128 (llama-8b's heads), f16: a few µs of GPU work per call
HOST_SHAPE = dict(n=1, depth=256, hq=32, hkv=8, d=128)
PROVIDERS = {
    "skattn-planned": "skattn.attention(q, k, v, causal=True, plan=p)",
    "skattn-unplanned": "skattn.attention(q, k, v, causal=True) (plan cache hit)",
    "skattn-planned-out": "skattn.attention(q, k, v, causal=True, plan=p, out=out) (an output "
                          "buffer of the caller's)",
    "skattn-fused-out": "the same with a plan of fixup='fused' (one launch a call)",
    "skattn-fp8-planned": "skattn.attention over FP8 K/V (k_scale, v_scale tensors) with a plan",
    "skattn-fp8-route": "the same with a plan of Tuning(quant_route='dequant') (K/V written in "
                        "f16 first, then the f16 plan: two launches more)",
    "skattn-op": "torch.ops.skattn.attention (the custom op)",
    "skattn-paged-planned": "skattn.attention_with_kvcache over the same K/V as a paged cache "
                            "(pages of 16, cache_seqlens and block_table on the GPU) with a "
                            "plan, out and workspace of the caller's",
    "skattn-paged-unplanned": "the same without plan, out or workspace (plan cache hit, the "
                              "stream's pool)",
    "skattn-paged-op": "torch.ops.skattn.attention_with_kvcache (the custom op, a workspace "
                       "of its own each call)",
    "sdpa": "F.scaled_dot_product_attention(q, k, v, enable_gqa=True)",
    "sdpa-flash-ctx": "the same inside sdpa_kernel([SDPBackend.FLASH_ATTENTION])",
    "sdpa-cudnn-ctx": "the same inside sdpa_kernel([SDPBackend.CUDNN_ATTENTION])",
}
COLUMNS = ("provider", "status", "err", "us_per_call_p20", "us_per_call_p50", "us_per_call_p80",
           "drain_us_p50", "calls", "reps", "n", "depth", "hq", "hkv", "d", "gpu", "sms", "torch",
           "triton", "commit", "timestamp")
TOLERANCE = 2e-2  # f16, as the grid's check


def _custom_op(q, k, v) -> Callable | str:
    """A call of torch.ops.skattn.attention with q, k, v, causal=True and every other argument
    at its neutral value, or why there is none."""
    try:
        importlib.import_module("skattn.ops")  # registers the op where it exists
    except ModuleNotFoundError:
        pass
    try:
        op = torch.ops.skattn.attention
        schema = op.default._schema
    except (AttributeError, RuntimeError):
        return "skipped: torch.ops.skattn.attention does not exist"
    given = {"q": q, "k": k, "v": v, "causal": True, "softcap": 0.0, "policy": "auto"}
    args = []
    for a in schema.arguments:
        if a.name in given:
            args.append(given[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        elif str(a.type).endswith("?") or str(a.type).startswith("Optional"):
            args.append(None)
        else:
            return f"skipped: no value for the op's argument {a.name!r} ({a.type})"

    def call():
        out = op(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    return call


def _fp8_calls(q, k, v, plan_kw: dict) -> dict:
    """The FP8 providers: planned calls over FP8 K/V (per-tensor scales), as read and on
    the dequant route; each call's `reference_kv` holds the dequantized K/V its output is
    checked against."""
    import skattn
    from skattn import quant

    try:
        (k8, ks), (v8, vs) = quant.fp8(k), quant.fp8(v)
        fp8 = torch.float8_e4m3fn
        plans = {"skattn-fp8-planned": skattn.plan(**plan_kw, dtype=fp8),
                 "skattn-fp8-route": skattn.plan(**plan_kw, dtype=fp8, tuning=skattn.Tuning(
                     quant_route="dequant"))}
    except (ValueError, TypeError, RuntimeError) as exc:  # no FP8 here
        return dict.fromkeys(("skattn-fp8-planned", "skattn-fp8-route"), f"skipped: {exc}")
    kd, vd = quant.dequantize_kv(k8, v8, ks, vs, q.dtype)
    calls = {}
    for name, p in plans.items():
        def call(p=p):
            return skattn.attention(q, k8, v8, causal=True, plan=p, k_scale=ks, v_scale=vs)

        call.reference_kv = (kd, vd)
        calls[name] = call
    return calls


def _paged_calls(q, k, v, *, sms, occupancy) -> dict:
    """The serving providers: `attention_with_kvcache` over k and v cut into pages of 16 (a
    block table in order), planned with the caller's buffers, unplanned, and the custom op."""
    import skattn
    import skattn.ops

    B, n, hq, d = q.shape
    L, hkv = k.shape[1], k.shape[2]
    names = ("skattn-paged-planned", "skattn-paged-unplanned", "skattn-paged-op")
    if B != 1 or L % 16:
        return dict.fromkeys(names, "skipped: the paged rows take one sequence of a multiple "
                                    "of 16 keys")
    kp, vp = k.reshape(L // 16, 16, hkv, d), v.reshape(L // 16, 16, hkv, d)
    table = torch.arange(L // 16, dtype=torch.int32, device=q.device)[None]
    lens = torch.full((1,), L, dtype=torch.int32, device=q.device)
    p = skattn.serving_plan(batch=1, q_len=n, max_kv_len=L, page_size=16, max_pages=L // 16,
                            q_heads=hq, kv_heads=hkv, head_dim=d, dtype=k.dtype, sms=sms,
                            occupancy=occupancy)
    out, wsb = torch.empty_like(q), skattn.serving.workspace(p, q.device)
    kw = dict(cache_seqlens=lens, block_table=table)
    return {
        names[0]: lambda: skattn.attention_with_kvcache(q, kp, vp, **kw, plan=p, out=out,
                                                        workspace=wsb),
        names[1]: lambda: skattn.attention_with_kvcache(q, kp, vp, **kw),
        names[2]: lambda: skattn.ops.attention_with_kvcache(q, kp, vp, **kw),
    }


def host_calls(q, k, v, *, sms: int | None = None, occupancy: int | None = None) -> dict:
    """Provider name -> a call returning out [B, n, Hq, D], or a status string where the
    provider cannot run here. A call with a `reference_kv` attribute (quantized K/V) is
    checked against the reference over those K/V.

    Parameters
    ----------
    q, k, v : Tensor
        [1, n, Hq, D], [1, L, Hkv, D], [1, L, Hkv, D].
    sms, occupancy : int, optional
        The grid of the planned call's plan (the device's by default).
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    import skattn

    B, n, hq, d = q.shape
    L, hkv = k.shape[1], k.shape[2]
    plan_kw = dict(batch=B, q_len=n, kv_len=L, q_heads=hq, kv_heads=hkv, head_dim=d, causal=True,
                   sms=sms, occupancy=occupancy)
    p = skattn.plan(**plan_kw, dtype=k.dtype)
    fused = skattn.plan(**plan_kw, dtype=k.dtype, fixup="fused")
    out, out_fused = torch.empty_like(q), torch.empty_like(q)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    mask = causal_lower_right(n, L) if n > 1 else None  # n = 1 sees every key

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def inside(backend):
        def call():
            with sdpa_kernel([backend]):
                return sdpa()

        return call

    return {
        "skattn-planned": lambda: skattn.attention(q, k, v, causal=True, plan=p),
        "skattn-unplanned": lambda: skattn.attention(q, k, v, causal=True),
        "skattn-planned-out": lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out),
        "skattn-fused-out": lambda: skattn.attention(q, k, v, causal=True, plan=fused,
                                                     out=out_fused),
        **_fp8_calls(q, k, v, plan_kw),
        "skattn-op": _custom_op(q, k, v),
        **_paged_calls(q, k, v, sms=sms, occupancy=occupancy),
        "sdpa": sdpa,
        "sdpa-flash-ctx": inside(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn-ctx": inside(SDPBackend.CUDNN_ATTENTION),
    }


def per_call_us(fn: Callable, n: int = 2000, warmup: int = 50) -> float:
    """Host microseconds per call of `fn` over `n` back-to-back calls (launches not waited
    for; the GPU is drained before and after)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def time_calls(fns: dict[str, Callable], *, calls: int, reps: int, warmup: int,
               sync: Callable[[], None]) -> dict[str, tuple]:
    """Wall-clock µs per call of each function, batches interleaved across functions.

    Parameters
    ----------
    fns : dict of name -> callable
    calls : int
        Back-to-back calls per batch.
    reps : int
        Batches per function.
    warmup : int
        Untimed calls of each function first.
    sync : callable
        Waits for the device (torch.cuda.synchronize; a no-op on a CPU).

    Returns
    -------
    dict of name -> (Timing, Timing)
        Per-call host time and per-batch drain time, both in µs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    per_call = {name: [] for name in fns}
    drain = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                t1 = time.perf_counter_ns()
                sync()
                t2 = time.perf_counter_ns()
                per_call[name].append((t1 - t0) / 1e3 / calls)
                drain[name].append((t2 - t1) / 1e3)
    finally:
        gc.enable()
    return {name: (summarize(per_call[name]), summarize(drain[name])) for name in fns}


def run_host(out_dir, tag: str, *, calls: int = 200, reps: int = 30, warmup: int = 20,
             shape: dict | None = None, sms: int | None = None, occupancy: int | None = None,
             device: str = "cuda") -> tuple[Path, list[dict]]:
    """Measure every provider's host time; write `host-<tag>.csv`, `host-<tag>.md` and
    `host-<tag>.json` (provenance: GPU, versions, commit, command, shape).

    Parameters
    ----------
    out_dir : str or Path
    tag : str
    calls, reps, warmup : int
        See `time_calls`.
    shape : dict, optional
        Values that replace HOST_SHAPE's (n, depth, hq, hkv, d).
    sms, occupancy : int, optional
        The planned call's grid.
    device : str
        "cuda"; "cpu" runs skattn under the Triton interpreter (for tests only: the times
        are then the interpreter's).

    Returns
    -------
    (Path, list of dict)
    """
    from skattn.bench.providers import reference, relative_error

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("skattn bench --host times calls on a CUDA GPU; none is available here")
    unknown = set(shape or {}) - set(HOST_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}; use {sorted(HOST_SHAPE)}")
    shape = {**HOST_SHAPE, **(shape or {})}
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, shape["n"], shape["hq"], shape["d"], generator=g, device=device).half()
    k = torch.randn(1, shape["depth"], shape["hkv"], shape["d"], generator=g, device=device).half()
    v = torch.randn(1, shape["depth"], shape["hkv"], shape["d"], generator=g, device=device).half()
    ref = reference(q, k, v)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows, ready = [], {}
    for name, fn in host_calls(q, k, v, sms=sms, occupancy=occupancy).items():
        row = {"provider": name, "status": "ok"}
        rows.append(row)
        if isinstance(fn, str):
            row["status"] = fn
            continue
        kv = getattr(fn, "reference_kv", None)
        try:
            err = relative_error(fn(), ref if kv is None else reference(q, *kv))
        except Exception as exc:  # a back end that refuses these inputs
            text = str(exc).strip().splitlines()
            row["status"] = f"error: {type(exc).__name__}: {text[0][:300] if text else ''}"
            continue
        row["err"] = f"{err:.3e}"
        if err > TOLERANCE:
            row["status"] = f"wrong: relative error {err:.3e} > {TOLERANCE:g}"
            continue
        ready[name] = fn
    times = time_calls(ready, calls=calls, reps=reps, warmup=warmup, sync=sync)
    prov = _provenance(device)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        if row["provider"] in times:
            t, drained = times[row["provider"]]
            row.update(us_per_call_p20=f"{t.p20:.2f}", us_per_call_p50=f"{t.p50:.2f}",
                       us_per_call_p80=f"{t.p80:.2f}", drain_us_p50=f"{drained.p50:.1f}")
        row.update(calls=calls, reps=reps, **shape, **prov, timestamp=stamp)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"host-{tag}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"host-{tag}.md").write_text(host_markdown(rows, title=csv_path.name))
    meta = dict(prov, timestamp=stamp, command="python3 -m skattn.cli bench --host",
                calls=calls, reps=reps, warmup=warmup, shape=shape,
                providers={name: PROVIDERS.get(name, "") for name in (r["provider"] for r in rows)})
    (out_dir / f"host-{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path, rows


def _provenance(device: str) -> dict:
    if device == "cuda":
        from skattn.bench.run import provenance

        return provenance(torch.cuda.get_device_properties(0).multi_processor_count)
    return {"gpu": f"none ({device}, Triton interpreter)"}


def read_host_rows(csv_paths) -> list[dict]:
    """Rows of host-time CSVs, in file order."""
    rows = []
    for path in csv_paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _float(row: dict, key: str) -> float | None:
    try:
        return float(row.get(key, ""))
    except (TypeError, ValueError):
        return None


def host_markdown(rows: list[dict], title: str = "") -> str:
    """Markdown: one row per provider, µs per call p20/p50/p80 and the ratio to plain SDPA."""
    first = rows[0] if rows else {}
    sdpa = _float(next((r for r in rows if r["provider"] == "sdpa"), {}), "us_per_call_p50")
    prov = ", ".join(f"{k} {first[k]}" for k in ("gpu", "torch", "triton", "commit") if first.get(k))
    md = [f"# skattn host time{': ' + title if title else ''}", "",
          f"Wall clock per call over {first.get('calls', '?')} back-to-back calls, {first.get('reps', '?')} "
          "batches interleaved across providers, with GPU work small enough that the host is the "
          f"bottleneck: B = 1, n = {first.get('n', '?')}, Lk = {first.get('depth', '?')}, "
          f"{first.get('hq', '?')}/{first.get('hkv', '?')}/{first.get('d', '?')}, f16. Drain: the "
          "wait for the GPU after a batch's last call (long: the GPU set the pace). " + prov, "",
          "| provider | call | µs/call p20 | p50 | p80 | p50 / plain SDPA | drain µs | status |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = _float(r, "us_per_call_p50")
        ratio = f"{p50 / sdpa:.2f}x" if p50 is not None and sdpa else "—"
        cells = [r["provider"], PROVIDERS.get(r["provider"], "")]
        cells += [r.get(k) or "—" for k in ("us_per_call_p20", "us_per_call_p50", "us_per_call_p80")]
        cells += [ratio, r.get("drain_us_p50") or "—", r.get("status", "")]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"
