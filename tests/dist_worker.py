"""The ranks of the gloo tests of `skattn.distributed` (spawned by tests/test_distributed.py).

Every rank builds the same inputs from a case's seed, keeps its shard of K/V, runs
`skattn.distributed.attention` (and `partial` into NaN-poisoned buffers), and writes what it
measured against the float64 reference of the whole sequence to a JSON file per rank.
"""
import json
import os

import torch
import torch.distributed as dist

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, Lq, L, (Hq, Hkv), D = case["B"], case["Lq"], case["L"], case["heads"], case["D"]
    dt = DTYPES[case.get("dtype", "f16")]
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dt)
    k = torch.randn(B, L, Hkv, D, generator=g).to(dt)
    v = torch.randn(B, L, Hkv, D, generator=g).to(dt)
    sinks = torch.randn(Hq, generator=g) if case.get("sinks") else None
    return q, k, v, sinks


def check_case(case, rank, world, device):
    from skattn import distributed as skd
    from skattn import reference
    from tolerance import bounds, row_rel_err, rel_err

    q, k, v, sinks = (None if x is None else x.to(device) for x in inputs(case))
    start, stop = case["shards"][rank]
    kw = dict(causal=case.get("causal", True), window=case.get("window"),
              softcap=case.get("softcap", 0.0))
    ks, vs = k[:, start:stop], v[:, start:stop]
    offsets = {} if case.get("find_offsets") else dict(shard_offset=start, kv_len=case["L"])
    out, lse = skd.attention(q, ks, vs, sinks=sinks, return_lse=True, comm=case["comm"],
                             **offsets, **kw)
    ref, ref_lse = reference.attention(q, k, v, sinks=sinks, return_lse=True, **kw)
    whole, row = bounds(q, k, v, causal=kw["causal"], ref=ref)
    # this rank's partial, into poisoned buffers: every element must be written
    B, Lq, Hq, _ = q.shape
    p_out = torch.full((B, Lq, Hq, v.shape[3]), float("nan"), dtype=q.dtype, device=device)
    p_lse = torch.full((B, Hq, Lq), float("nan"), device=device)
    skd.partial(q, ks, vs, shard_offset=start, kv_len=case["L"], out=p_out, lse=p_lse, **kw)
    p_ref, p_ref_lse = skd.partial(q, ks, vs, shard_offset=start, kv_len=case["L"],
                                   attend=reference.attention, **kw)
    fin = torch.isfinite(ref_lse)
    p_fin = torch.isfinite(p_ref_lse)
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    return dict(
        name=case["name"], rank=rank,
        err=rel_err(out, ref), row_err=row_rel_err(out, ref).max().item(), bound=whole,
        row_bound=row, nan=bool(out.isnan().any() or lse.isnan().any()),
        lse_inf_match=bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
        lse_err=(lse.double()[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0,
        partial_unwritten=bool(p_out.isnan().any() or p_lse.isnan().any()),
        partial_err=rel_err(p_out, p_ref) if p_ref.norm() > 0 else p_out.double().norm().item(),
        partial_inf_match=bool(torch.equal(torch.isneginf(p_lse), torch.isneginf(p_ref_lse))),
        partial_lse_err=((p_lse.double()[p_fin] - p_ref_lse[p_fin]).abs().max().item()
                         if p_fin.any() else 0.0),
        masked_rows=int((~p_fin).sum()),
        same_on_ranks=all(torch.equal(x, gathered[0]) for x in gathered),
    )


def run(rank, world, init_file, cases, out_dir, backend="gloo"):
    """torch.multiprocessing.spawn entry: one process group (gloo on CPUs, or nccl with rank r
    on GPU r), every case, results to JSON."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        with torch.no_grad():
            results = [check_case(c, rank, world, device) for c in cases]
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
