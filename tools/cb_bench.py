"""Continuous batching end to end: transformers' `generate_batch` over skattn and the paged
reference implementations, tokens/s of a request mix, same model, same run.

    PYTHONPATH=src python3 tools/cb_bench.py [--layers 32] [--requests 32] [--prompt 2048]
        [--new 64] [--providers "paged|skattn,paged|sdpa"] [--reps 2] [--graphs] [--warmup]
        [--profile] [--kernels]

A random-initialised llama-8b-shaped model (`--layers` of its 32; no download) serves
`--requests` greedy requests with lognormal prompt lengths around `--prompt` tokens
(sigma 0.8, 16 .. 4 x prompt) and `--new` new tokens each, through transformers' continuous
batching (prompt chunks and decode steps packed together; `--graphs`: transformers captures
its steps in CUDA graphs). Providers are attention implementations, named with "paged|" (a
plain name may be switched to flash-attn by transformers where that is installed).
Under `--graphs` transformers' warm-up is off unless `--warmup`: it pre-captures the
varlen graph by running one request of a full step of new tokens (8192) against the whole
cache (2.4M keys on an H200), a real attention of ~0.3 PFLOP a layer that skattn computes
(~0.74 s a layer) and SDPA cannot (its mask would take 35 GiB: it fails with out-of-memory
and goes on without), so timing it would charge one provider alone. Without it, each
provider captures a graph the first time a padded shape comes up, inside the timed call.
"paged|skattn" plans a step's short and long requests in two halves where its longest
request has more new tokens than fill a 16-row tile (`q_split="auto"`, the default);
"paged|skattn_one" is skattn registered with `q_split=None` (one plan a step). Each provider's generated tokens are compared with the first provider's (reported, not
asserted: f16 near-ties may break either way). Writes $OUT/cb_bench.csv and .json (default
benchmarks/results/latest/cb) and prints a table last. `--tiny` runs a 2-layer toy model on
the CPU (the interpreter: a check that the script works, not a measurement).

Where the time goes: `--kernels` adds GPU time by kernel over each provider's last rep
(torch.profiler, $OUT/cb_kernels.csv), each attention-kernel launch in start order
($OUT/cb_launches.csv) and each step's batch as transformers passed it, graphs or not
($OUT/cb_step_shapes.csv); `--profile` wraps the attention calls of the last rep:
their host time, a cProfile, the Triton builds they caused, and (outside CUDA graphs) each
call's span on the GPU stream with its batch shape, the longest listed
($OUT/cb_profile-<provider>.txt).
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import csv
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from skattn.bench.e2e import LLAMA_8B
from skattn.bench.run import provenance

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.3)


def prompts(n: int, mean: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * 0.8) * mean
    lens = lens.clamp(16, 4 * mean).long().tolist() if mean >= 16 else [mean] * n
    return [torch.randint(1, vocab, (m,), generator=g).tolist() for m in lens]


def build(shape: dict, impl: str, dtype, device, state=None):
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**shape), attn_implementation=impl, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def run(model, reqs, new: int, graphs: bool, tiny: bool,
        warmup: bool = False) -> tuple[float, list[list[int]]]:
    import transformers

    cfg = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)
    # --tiny: a small paged cache (by default transformers sizes it from the free memory,
    # on a CPU the machine's RAM)
    small = dict(block_size=16, num_blocks=64, max_batch_tokens=64) if tiny else {}
    cb = transformers.ContinuousBatchingConfig(use_cuda_graph=graphs, **small)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(reqs, generation_config=cfg, continuous_batching_config=cb,
                                   warmup=graphs and warmup)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = [out[k].generated_tokens for k in sorted(out, key=lambda r: int(r.split("_")[-1]))]
    return dt, tokens


def kernel_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def kernel_rows(prof, name: str, top: int = 15) -> list[dict]:
    """GPU time by kernel (every thread's launches and graph replays, as CUPTI records them):
    the `top` kernels and a row "(all kernels)" with the total; printed as well."""
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    # each launch's duration, per kernel: a few slow launches or all of them slow
    each: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            each.setdefault(e.name, []).append(e.time_range.elapsed_us())
    rows = [dict(provider=name, kernel="(all kernels)", gpu_ms=f"{total / 1e3:.1f}",
                 launches=sum(e.count for e in events), p50_us="", p90_us="", max_us="")]
    for e in events[:top]:
        d = sorted(each.get(e.key, [0.0]))
        rows.append(dict(provider=name, kernel=e.key[:120],
                         gpu_ms=f"{e.self_device_time_total / 1e3:.1f}", launches=e.count,
                         p50_us=f"{d[len(d) // 2]:.1f}", p90_us=f"{d[len(d) * 9 // 10]:.1f}",
                         max_us=f"{d[-1]:.1f}"))
    print(f"== {name}: GPU kernel time by kernel (per launch: p50 / p90 / max us)")
    for r in rows:
        print(f"{r['gpu_ms']:>10} ms {r['launches']:>7}x {r['p50_us']:>9} {r['p90_us']:>9} "
              f"{r['max_us']:>9}  {r['kernel'][:80]}")
    return rows


class StepLog:
    """Each step's batch as transformers hands it to the model (host integers, recorded
    whether the step runs eagerly or replays a CUDA graph): the requests in it and their
    longest query count (real), and as passed to the model (padded under CUDA graphs): the
    sequences, query tokens, keys read and the bounds `max_seqlen_q` / `max_seqlen_k`."""

    def __init__(self):
        from transformers.generation.continuous_batching import input_outputs

        self.cls, self.steps = input_outputs.ContinuousBatchingIOs, []

    def __enter__(self):
        inner = self.inner = self.cls.get_model_kwargs

        def logged(io, use_padding: bool = False):
            longest = io.max_seqlen_q  # padding overwrites it with the padded token count
            kw = inner(io, use_padding)
            max_k = kw["max_seqlen_k"]
            self.steps.append(dict(
                requests=io.num_request_in_batch, longest_q=longest,
                sequences=kw["cu_seq_lens_q"].numel() - 1,
                q_tokens=kw["input_ids"].shape[-1], kv_read=io.max_kv_read,
                max_seqlen_q=kw["max_seqlen_q"],
                max_seqlen_k=max(max_k.values()) if isinstance(max_k, dict) else max_k))
            return kw

        self.cls.get_model_kwargs = logged
        return self

    def __exit__(self, *exc):
        self.cls.get_model_kwargs = self.inner


def launch_rows(prof, name: str, match=("ragged", "work_list", "fixup", "sdpa", "flash")) -> list:
    """Every launch of the attention kernels in start order: start (µs from the first) and
    duration, so that the slow ones can be matched to their steps (a step runs one launch of
    each per layer)."""
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and any(m in e.name for m in match)), key=lambda e: e.time_range.start)
    t0 = ev[0].time_range.start if ev else 0
    return [dict(provider=name, kernel=e.name[:40], start_us=f"{e.time_range.start - t0:.1f}",
                 us=f"{e.time_range.elapsed_us():.1f}") for e in ev]


def _shape(args, kwargs) -> str:
    """An attention call's batch as continuous batching passes it."""
    query, cu_q = args[1], kwargs.get("cu_seq_lens_q")
    max_k = kwargs.get("max_seqlen_k")
    if isinstance(max_k, dict):
        max_k = max(max_k.values())
    batch = cu_q.numel() - 1 if cu_q is not None else "?"
    return (f"B={batch} total_q={query.shape[-2]} max_q={kwargs.get('max_seqlen_q')} "
            f"max_k={max_k}")


class AttentionProbe:
    """Host time of an attention implementation's calls inside `generate_batch`: while active,
    the registered function is wrapped so that each call is timed (wall clock, no GPU sync;
    outside a graph capture also its span on the stream, by CUDA events, with its batch's
    shape)
    and cProfiled (continuous batching calls it from its own thread, out of reach of a
    profiler started in this one)."""

    def __init__(self, name: str):
        from transformers import AttentionInterface

        self.name, self.table = name, AttentionInterface._global_mapping
        self.calls, self.seconds, self.prof = 0, 0.0, cProfile.Profile()

    def __enter__(self):
        self.inner = inner = self.table[self.name]

        self.events = []  # (start, end, shape) of the calls outside a graph capture

        def timed(*args, **kwargs):
            ev = None
            if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            t0 = time.perf_counter()
            self.prof.enable()
            try:
                return inner(*args, **kwargs)
            finally:
                self.prof.disable()
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                if ev is not None:
                    ev[1].record()
                    self.events.append((*ev, _shape(args, kwargs)))

        self.table[self.name] = timed
        # and every Triton compile in that time (a kernel not in Triton's in-memory cache)
        from triton import knobs

        self.compiles, self.hook = [], knobs.runtime.jit_cache_hook

        def compiled(*args, **kw):
            self.compiles.append(kw["repr"].split("(")[0])
            return False

        knobs.runtime.jit_cache_hook = compiled
        return self

    def __exit__(self, *exc):
        from triton import knobs

        self.table[self.name] = self.inner
        knobs.runtime.jit_cache_hook = self.hook

    def write(self, path: Path, total: float) -> None:
        buf = io.StringIO()
        stats = pstats.Stats(self.prof, stream=buf)
        for key in ("tottime", "cumulative"):
            stats.sort_stats(key).print_stats(20)
        head = (f"{self.name}: {self.calls} attention calls, {self.seconds:.3f} s of host time "
                f"in them ({self.seconds / max(1, self.calls) * 1e6:.0f} us a call, cProfile "
                f"on), {total:.3f} s generate_batch")
        head += f"; {len(self.compiles)} Triton builds (in-memory cache misses): {sorted(set(self.compiles))}"
        if "skattn" in self.name:
            from skattn import serving
            head += f"; serving plan cache {serving._cached_plan.cache_info()}"
        slow = ""
        if self.events:  # GPU time of the eager calls, the slowest with their shapes
            torch.cuda.synchronize()
            timed = sorted(((a.elapsed_time(b), shape) for a, b, shape in self.events),
                           key=lambda x: -x[0])
            slow = (f"stream span of the {len(timed)} calls outside graphs (CUDA events around "
                    f"each call: GPU time plus any idle while the host prepares it): "
                    f"{sum(t for t, _ in timed):.1f} ms; the longest:\n" + "\n".join(
                        f"{t * 1e3:10.1f} us  {shape}" for t, shape in timed[:10]) + "\n")
        path.write_text(head + "\n" + slow + buf.getvalue())
        print("== " + head)
        print(slow + "\n".join(buf.getvalue().splitlines()[:32]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--providers", default="paged|skattn,paged|sdpa")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--warmup", action="store_true",
                    help="with --graphs: let transformers pre-capture its graphs at the largest "
                    "sizes, inside the timed call (off by default: see the module's doc)")
    ap.add_argument("--kernels", action="store_true",
                    help="torch.profiler over each provider's last rep: GPU time by kernel, "
                    "$OUT/cb_kernels.csv")
    ap.add_argument("--profile", action="store_true",
                    help="time and cProfile the attention calls of each provider's last "
                    "rep: $OUT/cb_profile-<provider>.txt")
    args = ap.parse_args(argv)
    import skattn.transformers as skt

    skt.register()
    skt.register(name="skattn_one", q_split=None)  # every step in one plan
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    shape = dict(TINY) if args.tiny else dict(LLAMA_8B, num_hidden_layers=args.layers)
    reqs = prompts(args.requests, args.prompt, shape["vocab_size"])
    out_dir = Path(os.environ.get("OUT", "benchmarks/results/latest/cb"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, first, state, kernels, launches, steps = [], None, None, [], [], []
    for name in args.providers.split(","):
        model = build(shape, name, torch.float16, device, state)
        state = state or model.state_dict()
        times, tokens = [], None
        for rep in range(args.reps):
            probe = AttentionProbe(name) if args.profile and rep == args.reps - 1 else None
            last = rep == args.reps - 1
            kern = kernel_profiler() if args.kernels and last and cuda else None
            log = StepLog() if args.kernels and last else None
            with probe or contextlib.nullcontext(), kern or contextlib.nullcontext(), \
                    log or contextlib.nullcontext():
                dt, tokens = run(model, reqs, args.new, graphs=args.graphs and cuda,
                                 tiny=args.tiny, warmup=args.warmup)
            times.append(dt)
            if kern:
                kernels += kernel_rows(kern, name)
                launches += launch_rows(kern, name)
            if log:
                steps += [dict(provider=name, step=i, **s) for i, s in enumerate(log.steps)]
        if probe:
            probe.write(out_dir / f"cb_profile-{name.replace('|', '_')}.txt", dt)
        first = first or tokens
        same = sum(a == b for a, b in zip(tokens, first))
        best = min(times)
        rows.append(dict(provider=name, layers=shape["num_hidden_layers"], requests=len(reqs),
                         prompt_tokens=sum(map(len, reqs)), new_tokens=args.new,
                         seconds=f"{best:.3f}", tokens_per_s=f"{len(reqs) * args.new / best:.1f}",
                         same_tokens_as_first=f"{same}/{len(reqs)}", reps=args.reps))
        del model
        if cuda:
            torch.cuda.empty_cache()
    path = out_dir / "cb_bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = dict(provenance(torch.cuda.get_device_properties(0).multi_processor_count)
                if cuda else {}, command="python3 tools/cb_bench.py " + " ".join(
                    sys.argv[1:] if argv is None else argv),
                tiny=args.tiny, graphs=args.graphs, warmup=args.warmup, prompt_mean=args.prompt, timer="wall clock, min of reps, "
                "generate_batch end to end (prompt and decode)")
    for file, table in (("cb_kernels.csv", kernels), ("cb_launches.csv", launches),
                        ("cb_step_shapes.csv", steps)):  # --kernels
        if table:
            with open(out_dir / file, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(table[0]))
                w.writeheader()
                w.writerows(table)
    if kernels or steps:
        meta["kernels"] = ("cb_kernels.csv: GPU time by kernel, torch.profiler over the last "
                           "rep; cb_launches.csv: each attention-kernel launch in order; "
                           "cb_step_shapes.csv: each step's batch as transformers passed it")
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{'provider':14} {'s':>8} {'tok/s':>9} same")
    for r in rows:
        print(f"{r['provider']:14} {r['seconds']:>8} {r['tokens_per_s']:>9} {r['same_tokens_as_first']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
