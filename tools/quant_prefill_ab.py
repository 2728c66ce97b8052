"""Prompt chunks over quantized K/V on a GPU: skattn over the quantized K/V against K/V
dequantized to f16 first and then skattn's f16 path (the Hopper prompt kernel, which reads
16-bit K/V only), and f16 K/V alone, same run, graph timer (4 layers, cold L2).

    PYTHONPATH=src python3 tools/quant_prefill_ab.py [--cells llama-8b:512:8192,...]
        [--formats fp8,q8_0] [--reps 10]

Rows per cell: `f16`; per format `<fmt>` (skattn's native route, over the quantized K/V), `<fmt>+torch` and
`<fmt>+fused` (a dequantizing pass, then skattn on its f16 K/V, both inside the timed graph)
and `<fmt>:torch`, `<fmt>:fused` (the pass alone), and `<fmt>+route`: skattn's own route
(`Tuning(quant_route="dequant")`: its one-launch pass, then the call's f16 plan); the column
`auto` names the route skattn's default takes for the cell, `host_us` the host time of one
eager call (50 back to back, wall clock). The torch pass: FP8 as `to(float16)`, then
a multiply by the per-KV-head scale computed in f32 and written as f16 (two kernels); q8_0 by
`Q8_0.dequantize` (several). The fused pass is skattn's own (`launch.dequantize`, one launch
that reads the cache once and writes f16 once: value times scale in f32, then f16). Every row is checked against
float64 on the dequantized K/V before it is timed (output poisoned with NaN). Writes
$OUT/quant_prefill_ab.csv and its provenance, quant_prefill_ab.json (default
benchmarks/results/latest/quant_prefill_ab), and prints
one line per row.
"""
from __future__ import annotations

import argparse
import json

import torch

import skattn
from skattn import launch
from skattn.bench.grid import Cell
from skattn.bench.host import per_call_us
from skattn.bench.quant import quantize
from skattn.bench.run import layer_inputs, provenance
from skattn.bench.timing import ColdTimer
from quant_sweep import checked, parse_cells, results_dir, timed, write_rows  # tools/, beside this file

LAYERS = 4


def dequantize(fmt: str, k, v, kw: dict, out_k, out_v, fused: bool = False):
    """K/V of `fmt` as f16: into out_k, out_v by torch's kernels, or as new tensors by
    skattn's one-launch pass (`fused`: `launch.dequantize`, the pass of its dequant route)."""
    if fused:
        form = "float8_e4m3fn" if fmt == "fp8" else "q8_0"
        return tuple(launch.dequantize(*((x, s.reshape(-1)) if fmt == "fp8"
                                         else (x.values, x.scales)), form, torch.float16)
                     for x, s in ((k, kw.get("k_scale")), (v, kw.get("v_scale"))))
    if fmt == "fp8":
        for x, s, o in ((k, kw["k_scale"], out_k), (v, kw["v_scale"], out_v)):
            torch.mul(x.to(torch.float16), s.reshape(1, 1, -1, 1), out=o)
    else:
        out_k.copy_(k.dequantize(torch.float16))
        out_v.copy_(v.dequantize(torch.float16))
    return out_k, out_v


def cell_plan(fmt: str, cell: Cell, route: str = "auto"):
    """skattn's plan of the cell over `fmt` K/V on `route` (`Tuning.quant_route`)."""
    return skattn.plan(batch=1, q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                       kv_heads=cell.hkv, head_dim=cell.d, causal=True,
                       dtype=torch.float8_e4m3fn if fmt == "fp8" else fmt,
                       tuning=skattn.Tuning(quant_route=route))


def layer_calls(fmt: str, variant: str, layers: list, cell: Cell) -> list:
    """One callable a layer for the row `variant`: "plain", "torch", "fused" (a pass, then
    f16 attention), "route" (skattn's dequantizing route), ":torch" or ":fused" (the pass
    alone)."""
    fns, route = [], None
    if variant in ("plain", "route") and fmt != "f16":
        route = cell_plan(fmt, cell, "native" if variant == "plain" else "dequant")
    for q, k, v, kw in layers:
        out = torch.empty_like(q)
        shape = (1, cell.depth, cell.hkv, cell.d)
        kd, vd = (torch.empty(shape, dtype=torch.float16, device=q.device) for _ in range(2))
        if variant in ("plain", "route"):
            fns.append(lambda q=q, k=k, v=v, kw=kw, out=out: skattn.attention(
                q, k, v, causal=True, out=out, plan=route, **kw))
        elif not variant.startswith(":"):
            fused = variant == "fused"
            fns.append(lambda q=q, k=k, v=v, kw=kw, out=out, kd=kd, vd=vd, f=fused:
                       skattn.attention(q, *dequantize(fmt, k, v, kw, kd, vd, f), causal=True,
                                        out=out))
        else:
            fused = variant == ":fused"
            fns.append(lambda k=k, v=v, kw=kw, kd=kd, vd=vd, f=fused: dequantize(
                fmt, k, v, kw, kd, vd, f)[1])
    return fns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # n = 512 chunks, and the shorter chunks about `quant_route.ROUTE_ROWS` (query rows a KV
    # head: 256 and 512 at llama-8b's ratio 4, 640 at qwen3-14b's 5, 512 at gpt-oss's 8)
    ap.add_argument("--cells", default="llama-8b:64:32768,llama-8b:128:32768,llama-8b:512:8192,"
                                        "llama-8b:512:32768,qwen3-14b:128:16384,"
                                        "qwen3-14b:512:16384,gpt-oss:64:32768,gpt-oss:512:32768")
    ap.add_argument("--formats", default="fp8,q8_0")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    out_dir = results_dir("quant_prefill_ab")
    timer = ColdTimer()
    rows = []
    for ci, cell in enumerate(parse_cells(args.cells)):
        base = layer_inputs(cell, 3000 + ci, LAYERS)
        runs = [("f16", "plain")] + [(f, v) for f in args.formats.split(",")
                                    for v in ("plain", "torch", "fused", "route", ":torch",
                                              ":fused")]
        auto = {f: "dequant" if cell_plan(f, cell).dequant else "native"  # the default's route
                for f in args.formats.split(",")}
        for fmt, variant in runs:
            name = fmt if variant == "plain" else fmt + ("" if variant[0] == ":" else "+") + variant
            row = dict(model=cell.model, n=cell.n, L=cell.depth, row=name, auto=auto.get(fmt, ""))
            layers = [quantize(fmt, *x) for x in base]
            fns = layer_calls(fmt, variant, layers, cell)
            if variant.startswith(":") or checked(fns, layers[0], row):
                row.update(status="ok", p50_us=f"{timed(fns, timer, args.reps).p50:.2f}",
                           host_us=f"{per_call_us(fns[0], n=50, warmup=1):.1f}")
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del layers, fns
        del base
        torch.cuda.empty_cache()
    write_rows(out_dir / "quant_prefill_ab.csv", rows)
    meta = {**provenance(torch.cuda.get_device_properties(0).multi_processor_count),
            "timer": "graph", "layers": LAYERS, "reps": args.reps, "cells": args.cells,
            "formats": args.formats, "csv": "quant_prefill_ab.csv"}
    (out_dir / "quant_prefill_ab.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
