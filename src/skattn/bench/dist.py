"""Context-parallel benchmark: `skattn.distributed.attention` over 1..P GPUs of one host.

    torchrun --standalone --nproc_per_node 8 -m skattn.bench.dist --out $OUT/dist

One torchrun over P GPUs measures every world size 1, 2, 4, .. P (sub-groups of the first
ranks; the others wait): decode and 512-token chunks, causal, over one sequence of L keys split
into even contiguous shards. Per cell: the step (the whole distributed call), its parts (this
rank's attention, the exchange alone, the merge), the scaling efficiency against one GPU
running `skattn.attention` on the whole sequence, and the communication share. Device time
with CUDA events after an L2 flush and a GPU spin (host launches queue behind it); each rep
takes the slowest rank. Writes dist.csv, dist.json (provenance) and dist.png; prints a table.
`--dry-run` runs the same code on CPUs (gloo, the Triton interpreter, tiny shapes, wall time).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from skattn import distributed as skd
from skattn.bench.timing import SPIN_CYCLES, ColdTimer
from skattn.bench.models import resolve

FIELDS = ["model", "q_heads", "kv_heads", "head_dim", "n", "kv_len", "world", "comm",
          "step_us", "local_us", "exchange_us", "merge_us", "comm_share", "speedup",
          "efficiency", "partial_bytes", "received_bytes", "reps", "timer", "error"]
PROVENANCE = ("gpu", "backend", "torch", "triton", "commit")  # stamped on every CSV row
DRY = dict(kv_lens="64,96", n="1,4", heads="4/2", head_dim=16, reps=2, warmup=1)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv, world_size: int) -> argparse.Namespace:
    """The options, checked against the launched world size (the number of ranks)."""
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node P -m skattn.bench.dist",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-8b", help="comma-separated skattn.bench.models names")
    p.add_argument("--heads", help="Q/KV heads instead of --models, e.g. 32/8")
    p.add_argument("--head-dim", type=int, help="head size with --heads")
    p.add_argument("--kv-lens", type=_ints, help="sequence lengths (default 131072,...,1048576)")
    p.add_argument("--q-lens", dest="n", type=_ints,
                   help="query tokens per step (default 1,512; not --n: torchrun would take it)")
    p.add_argument("--worlds", type=_ints, help="world sizes (default 1, 2, 4, .. the ranks)")
    p.add_argument("--comm", default="allgather,ring", help="allgather, ring or both")
    p.add_argument("--reps", type=int, help="timed runs per cell (default 20)")
    p.add_argument("--warmup", type=int, help="untimed runs per cell (default 3)")
    p.add_argument("--out", help="output folder (default $OUT/dist, else benchmarks/results/dist)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPUs: gloo, the interpreter, tiny shapes, wall-clock time")
    a = p.parse_args(argv)
    if a.dry_run:
        a.heads = a.heads or DRY["heads"]
        a.head_dim = a.head_dim or DRY["head_dim"]
        a.kv_lens = a.kv_lens or _ints(DRY["kv_lens"])
        a.n = a.n or _ints(DRY["n"])
        a.reps = a.reps or DRY["reps"]
        a.warmup = DRY["warmup"] if a.warmup is None else a.warmup
    a.kv_lens = a.kv_lens or [131072, 262144, 524288, 1048576]
    a.n = a.n or [1, 512]
    a.reps = a.reps or 20
    a.warmup = 3 if a.warmup is None else a.warmup
    a.worlds = a.worlds or [1 << i for i in range(world_size.bit_length()) if 1 << i <= world_size]
    if max(a.worlds) > world_size:
        p.error(f"--worlds {a.worlds} needs {max(a.worlds)} ranks; torchrun started {world_size}")
    if max(a.n) > min(a.kv_lens):
        p.error(f"--n {max(a.n)} exceeds the shortest --kv-lens {min(a.kv_lens)}")
    a.comm = [c.strip() for c in a.comm.split(",") if c.strip()]
    if not a.comm or any(c not in skd.COMMS for c in a.comm):
        p.error(f"--comm must list some of {skd.COMMS}, got {a.comm}")
    if a.heads:
        try:
            hq, hkv = (int(x) for x in a.heads.split("/"))
        except ValueError:
            p.error(f"--heads must be Q/KV such as 32/8, got {a.heads!r}")
        if not a.head_dim or hq % hkv:
            p.error("--heads needs --head-dim, and Q a multiple of KV")
        a.shapes = [(f"{hq}/{hkv}/{a.head_dim}", hq, hkv, a.head_dim)]
    else:
        try:
            a.shapes = [(name, s.q_heads, s.kv_heads, s.head_dim)
                        for name, s in (resolve(m) for m in a.models.split(","))]
        except ValueError as exc:
            p.error(str(exc))
    if a.reps < 1 or a.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    a.out = a.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "dist")
    return a


class Timer:
    """Per-rep time of a callable on this rank: CUDA events after an L2 flush and a GPU spin,
    or wall time on CPUs; `group` ranks start each rep together."""

    def __init__(self, device, group):
        self.cuda, self.group = device.type == "cuda", group
        if self.cuda:
            self.cold = ColdTimer(device)  # its read flush and spin, as `skattn bench` uses

    def __call__(self, fn, warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                self.cold.flush()
                torch.cuda.synchronize()
            dist.barrier(group=self.group)
            if self.cuda:
                torch.cuda._sleep(SPIN_CYCLES)  # ~1 ms: the call's launches queue behind it
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(1e3 * start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e6 * (time.perf_counter() - t0))
        return times


def slowest(times: list[float], group, device) -> float:
    """Median over reps of the slowest rank's time (us)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(t.tolist())


def cell(shape, n, L, world, comm, group, rank, device, a) -> dict:
    """One measurement on the ranks of `group` (world ranks)."""
    name, hq, hkv, d = shape
    gen = torch.Generator(device=device).manual_seed(n * 7919 + L)
    dt = torch.float16
    q = torch.randn(1, n, hq, d, device=device, dtype=dt, generator=gen)
    start, stop = skd.even_shards(L, world)[rank]
    k = torch.randn(1, stop - start, hkv, d, device=device, dtype=dt, generator=gen)
    v = torch.randn_like(k)
    timer = Timer(device, group)
    row = dict(model=name, q_heads=hq, kv_heads=hkv, head_dim=d, n=n, kv_len=L, world=world,
               comm=comm, reps=a.reps, timer="events" if device.type == "cuda" else "wall")
    nbytes = skd._layout(1, n, hq, d, dt)[2]
    row.update(partial_bytes=nbytes, received_bytes=(world - 1) * nbytes)
    with torch.no_grad():
        if comm == "single":  # the one-GPU baseline: skattn.attention on the whole sequence
            t = timer(lambda: skd.partial(q, k, v, shard_offset=0, kv_len=L, causal=True),
                      a.warmup, a.reps)
            row.update(step_us=slowest(t, group, device), received_bytes=0, partial_bytes=0)
            return row
        step = lambda: skd.attention(q, k, v, group=group, shard_offset=start, kv_len=L,  # noqa: E731
                                     causal=True, comm=comm)
        local = lambda: skd.partial(q, k, v, shard_offset=start, kv_len=L, causal=True)  # noqa: E731
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        exchange = lambda: skd.exchange(buf, group=group, comm=comm, fold=lambda i, b: None)  # noqa: E731
        gathered = skd.exchange(buf, group=group)
        lses, outs = skd._views(gathered, 1, n, hq, d, dt)
        lses.fill_(0.0)
        merge = lambda: skd.merge(outs, lses)  # noqa: E731
        row["step_us"] = slowest(timer(step, a.warmup, a.reps), group, device)
        row["local_us"] = slowest(timer(local, a.warmup, a.reps), group, device)
        row["exchange_us"] = slowest(timer(exchange, a.warmup, a.reps), group, device)
        if comm == "allgather":
            row["merge_us"] = slowest(timer(merge, a.warmup, a.reps), group, device)
    row["comm_share"] = row["exchange_us"] / row["step_us"]
    return row


def run(a) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if not a.dry_run else torch.device("cpu")
    groups = {w: dist.new_group(list(range(w))) for w in sorted(set(a.worlds))}
    rows = []
    for shape in a.shapes:
        for n in a.n:
            for L in a.kv_lens:
                for w in sorted(set(a.worlds)):
                    for comm in (["single"] if w == 1 else a.comm):
                        row = None
                        if rank < w:
                            try:
                                row = cell(shape, n, L, w, comm, groups[w], rank, device, a)
                            except torch.OutOfMemoryError as exc:  # L too long for w GPUs
                                row = dict(model=shape[0], n=n, kv_len=L, world=w, comm=comm,
                                           error=f"out of memory: {str(exc).splitlines()[0]}")
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        dist.barrier()
                        if rank == 0:
                            rows.append(row)
                            print(f"{shape[0]} n={n} L={L} world={w} {comm}: "
                                  f"{row.get('step_us', row.get('error'))}", file=sys.stderr,
                                  flush=True)
    return add_scaling(rows)


def add_scaling(rows: list[dict]) -> list[dict]:
    """Speed-up and efficiency against the one-GPU row of the same cell, or, where the
    sequence did not fit one GPU, against the longest one that did (scaled by L)."""
    base = {(r["model"], r["n"], r["kv_len"]): r["step_us"] for r in rows
            if r["world"] == 1 and r.get("step_us")}
    for r in rows:
        if not r.get("step_us") or r["world"] == 1:
            continue
        key = (r["model"], r["n"], r["kv_len"])
        t1 = base.get(key)
        if t1 is None:
            fits = [L for (m, n, L) in base if m == r["model"] and n == r["n"]]
            if not fits:
                continue
            t1 = base[(r["model"], r["n"], max(fits))] * r["kv_len"] / max(fits)
        r["speedup"] = t1 / r["step_us"]
        r["efficiency"] = r["speedup"] / r["world"]
    return rows


def provenance(a, world_size: int) -> dict:
    import triton

    from skattn.bench.run import commit

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.dry_run else "cpu"
    return dict(gpu=gpu, ranks=world_size, backend=dist.get_backend(), torch=torch.__version__,
                triton=triton.__version__, commit=commit(), dry_run=a.dry_run,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                args={k: v for k, v in vars(a).items() if k != "shapes"})


def write(rows: list[dict], prov: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "dist.csv"), "w", newline="") as f:
        stamp = {k: prov[k] for k in PROVENANCE}
        w = csv.DictWriter(f, fieldnames=FIELDS + list(PROVENANCE))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in FIELDS}, **stamp})
    with open(os.path.join(out, "dist.json"), "w") as f:
        json.dump(dict(provenance=prov, rows=rows), f, indent=1, default=str)
    plot(rows, os.path.join(out, "dist.png"))


def plot(rows: list[dict], path: str) -> None:
    """Per n: step time and scaling efficiency against L, one line per (world, comm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(2, len(ns), figsize=(5 * len(ns), 7), squeeze=False)
    for j, n in enumerate(ns):
        lines = sorted({(r["world"], r["comm"]) for r in rows if r["n"] == n})
        for world, comm in lines:
            pts = sorted((r["kv_len"], r.get("step_us"), r.get("efficiency")) for r in rows
                         if r["n"] == n and r["world"] == world and r["comm"] == comm
                         and r.get("step_us"))
            if not pts:
                continue
            label = f"{world} x {comm}"
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            eff = [p for p in pts if p[2] is not None]
            if eff:
                axes[1][j].plot([p[0] for p in eff], [p[2] for p in eff], "o-", label=label)
        for i, ylabel in enumerate(("step time (us)", "scaling efficiency")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("KV length L")
            ax.set_ylabel(ylabel)
            ax.set_title(f"n = {n}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][j].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = f"{'model':>14} {'n':>4} {'L':>8} {'P':>2} {'comm':>9} {'step us':>9} {'local':>8} " \
           f"{'exch':>7} {'share':>6} {'eff':>5}"
    out = [head]
    for r in rows:
        def f(key, fmt):
            x = r.get(key)
            width = int(fmt.split(".")[0])
            ok = isinstance(x, (int, float)) and not math.isnan(x)
            return format(x, fmt) if ok else "-".rjust(width)
        out.append(f"{r['model']:>14} {r['n']:>4} {r['kv_len']:>8} {r['world']:>2} {r['comm']:>9} "
                   f"{f('step_us', '9.1f')} {f('local_us', '8.1f')} {f('exchange_us', '7.1f')} "
                   f"{f('comm_share', '6.2f')} {f('efficiency', '5.2f')}"
                   + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(out)


def main(argv=None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    a = parse_args(sys.argv[1:] if argv is None else argv, world_size)
    if a.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run runs the kernels in Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before the command")
        dist.init_process_group("gloo")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --dry-run on CPUs")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        rows = run(a)
        if dist.get_rank() == 0:
            write(rows, provenance(a, world_size), a.out)
            print(table(rows))
            print(f"wrote {a.out}/dist.csv, dist.json, dist.png")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
