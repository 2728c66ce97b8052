"""Context parallelism over torch.distributed: one sequence's keys sharded over the ranks of a
process group, each rank's partial attention merged by log-sum-exp (docs/distributed.md).

    import torch.distributed as dist, skattn.distributed as skd
    start, stop = skd.even_shards(kv_len, dist.get_world_size())[dist.get_rank()]
    out = skd.attention(q, k[:, start:stop], v[:, start:stop], shard_offset=start,
                        kv_len=kv_len, causal=True)      # the same out on every rank

Each rank runs `skattn.attention(..., return_lse=True)` on its shard (`skattn.shard` turns
the global bottom-right mask into calls on the shard), the ranks exchange their (O, lse)
pairs, by one all-gather or around a ring, and every rank merges them with the same
rescaling the fixups use; sinks join the merge once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from skattn import checks
from skattn.shard import ShardCall, band_mask_rows, even_shards, shard_calls

__all__ = ["attention", "partial", "merge", "exchange", "even_shards", "COMMS"]

COMMS = ("allgather", "ring")
_ALIGN = 16  # bytes: each rank's packed (lse, O) starts aligned
# torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def partial(q, k_shard, v_shard, *, shard_offset: int, kv_len: int, causal=False, window=None,
            scale=None, softcap=0.0, attend=None, out=None, lse=None):
    """This shard's partial attention: every query row against the keys it sees in the shard.

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk]
        The queries: the last Lq positions of the sequence.
    k_shard, v_shard : Tensor [B, n, Hkv, Dk] and [B, n, Hkv, Dv]
        Keys ``[shard_offset, shard_offset + n)`` of the sequence (n may be 0).
    shard_offset, kv_len : int
        Where the shard starts; keys in the whole sequence.
    causal, window, scale, softcap
        As in `skattn.attention`, for the whole sequence.
    attend : callable, optional
        The attention function (default `skattn.attention`; `skattn.reference.attention`
        gives the float64 partials).
    out, lse : Tensor, optional
        [B, Lq, Hq, Dv] in q's dtype and [B, Hq, Lq] f32 to write into.

    Returns
    -------
    (out [B, Lq, Hq, Dv], lse [B, Hq, Lq])
        Rows that see no key of the shard give 0 and lse -inf.
    """
    kernel = attend is None  # the kernel writes into `out` itself
    if kernel:
        from skattn.api import attention as attend
    B, Lq, Hq, _ = q.shape
    n, Dv = k_shard.shape[1], v_shard.shape[3]
    calls = shard_calls(q_len=Lq, kv_len=kv_len, start=shard_offset,
                        stop=shard_offset + n, causal=causal, window=window)
    kw = dict(scale=scale, softcap=softcap, return_lse=True)
    if out is None:
        out = torch.empty(B, Lq, Hq, Dv, device=q.device, dtype=q.dtype)
    if lse is None:
        f = torch.float64 if q.dtype == torch.float64 else torch.float32  # f64: the reference
        lse = torch.empty(B, Hq, Lq, device=q.device, dtype=f)
    for call in calls:
        r0, r1 = call.rows
        k0, k1 = call.keys
        mask = _band_mask(call, Lq, kv_len, shard_offset, window, q) if call.band else None
        if kernel:
            kw["out"] = out[:, r0:r1]
        o, l = attend(q[:, r0:r1], k_shard[:, k0:k1], v_shard[:, k0:k1], causal=call.causal,
                      window=call.window, mask=mask, **kw)
        if not kernel:
            out[:, r0:r1] = o
        lse[:, :, r0:r1] = l
    edges = [0, *(x for c in sorted(calls, key=lambda c: c.rows) for x in c.rows), Lq]
    for r0, r1 in zip(edges[::2], edges[1::2]):  # the gaps: rows that see nothing here
        if r0 < r1:
            out[:, r0:r1] = 0
            lse[:, :, r0:r1] = float("-inf")
    return out, lse


def _band_mask(call: ShardCall, q_len, kv_len, start, window, q) -> torch.Tensor:
    """[1, rows, keys] f32 additive mask of a band call (the fallback for Lq > 1 rows whose
    window starts inside the shard)."""
    first = torch.tensor(band_mask_rows(call, q_len=q_len, kv_len=kv_len, start=start,
                                        window=window), device=q.device)
    j = torch.arange(call.keys[1] - call.keys[0], device=q.device)
    keep = j[None, :] >= first[:, None]
    return torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))[None]


def merge(outs, lses, sinks=None):
    """Merge per-shard partials of the same rows by log-sum-exp; sinks join once.

    Parameters
    ----------
    outs : Tensor [P, B, Lq, Hq, Dv]
        Each shard's normalised output (0 where it saw no key).
    lses : Tensor [P, B, Hq, Lq]
        Each shard's natural-log softmax denominator (-inf where it saw no key).
    sinks : Tensor [Hq], optional
        One logit per head in the denominator only.

    Returns
    -------
    (out [B, Lq, Hq, Dv] in outs' dtype, lse [B, Hq, Lq] f32, f64 for f64 inputs)
        Rows no shard saw give 0 and lse -inf (the sink, with sinks), never NaN.
    """
    f = torch.float64 if outs.dtype == torch.float64 else torch.float32
    lse = lses.to(f)
    m = lse.amax(0)
    if sinks is not None:
        sink = sinks.to(f)[None, :, None]
        m = torch.maximum(m, sink)
    m_use = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_use)                                    # [P, B, Hq, Lq]
    den = w.sum(0)
    if sinks is not None:
        den = den + torch.exp(sink - m_use)
    seen = den > 0
    safe = torch.where(seen, den, torch.ones_like(den))
    w = (w / safe).transpose(2, 3).unsqueeze(-1)                  # [P, B, Lq, Hq, 1]
    out = (w * outs.to(f)).sum(0).to(outs.dtype)
    return out, torch.where(seen, m_use + torch.log(safe), torch.full_like(m, float("-inf")))


# -- packing one rank's (lse, O) into one byte buffer, so one collective carries both
def _layout(B, Lq, Hq, Dv, dtype):
    lse_bytes = 4 * B * Hq * Lq
    o_bytes = B * Lq * Hq * Dv * dtype.itemsize
    return lse_bytes, o_bytes, -(-(lse_bytes + o_bytes) // _ALIGN) * _ALIGN


def _views(buf, B, Lq, Hq, Dv, dtype):
    """(lse [.., B, Hq, Lq] f32, out [.., B, Lq, Hq, Dv]) views of packed buffers [.., nbytes]."""
    lse_bytes, o_bytes, _ = _layout(B, Lq, Hq, Dv, dtype)
    lead = buf.shape[:-1]
    lse = buf[..., :lse_bytes].view(torch.float32).view(*lead, B, Hq, Lq)
    out = buf[..., lse_bytes:lse_bytes + o_bytes].view(dtype).view(*lead, B, Lq, Hq, Dv)
    return lse, out


def exchange(buf: torch.Tensor, *, group=None, comm: str = "allgather", fold=None):
    """Share one packed partial with every rank of `group`.

    "allgather": one all-gather (`all_gather_single`, or `all_gather_into_tensor` on older
    torch); returns [P, nbytes], rank order.
    "ring": P - 1 steps of send to the next rank and receive from the previous; `fold(i, b)` is
    called on each received buffer b (the partial of rank i) while the next step's transfer
    runs; returns None.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if comm == "allgather":
        gathered = buf.new_empty(world * buf.numel())
        _all_gather(gathered, buf, group=group)
        return gathered.view(world, -1)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    spare = [torch.empty_like(buf), torch.empty_like(buf)]
    send, pending = buf, None
    for step in range(1, world):
        recv = spare[step % 2]
        ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
        reqs = dist.batch_isend_irecv(ops)
        if pending is not None:
            fold(*pending)
        for r in reqs:
            r.wait()
        pending, send = ((rank - step) % world, recv), recv
    if pending is not None:
        fold(*pending)
    return None


def attention(q, k_shard, v_shard, *, group=None, shard_offset=None, kv_len=None,
              causal=False, window=None, scale=None, sinks=None, softcap=0.0,
              return_lse=False, comm="allgather"):
    """Attention of one sequence whose keys are sharded over the ranks of a process group.

    Rank r holds the contiguous keys ``[shard_offset, shard_offset + n_r)``, in rank order;
    every rank passes the same queries and gets the same output, the attention of q over the
    whole sequence (bottom-right causal against its full length).

    Parameters
    ----------
    q : Tensor [B, Lq, Hq, Dk]
        The same on every rank (f16, bf16 or f32, as `skattn.attention`).
    k_shard, v_shard : Tensor [B, n_r, Hkv, Dk] and [B, n_r, Hkv, Dv]
        This rank's keys and values (n_r may be 0).
    group : ProcessGroup, optional
        Default: the world.
    shard_offset, kv_len : int, optional
        This shard's first key and the sequence's length. When None (both), they are found
        with an all-gather of the shard lengths (one more collective per call).
    causal, window, scale, softcap
        As in `skattn.attention`, for the whole sequence.
    sinks : Tensor [Hq] f32, optional
        Counted once, in the merge.
    return_lse : bool
        Also return lse [B, Hq, Lq] f32 of the whole sequence.
    comm : {"allgather", "ring"}
        One all-gather of every rank's (O, lse), or P - 1 ring steps merged as they arrive
        (each rank then merges in its own order: outputs agree to rounding, not bitwise).

    Returns
    -------
    out [B, Lq, Hq, Dv] in q's dtype, or (out, lse)

    Raises
    ------
    TypeError, ValueError
        Before any launch or collective: bad arguments (as `skattn.attention`), a shard
        outside the sequence, an unknown `comm`.
    """
    B, Lq, Hq, Dv = _check(q, k_shard, v_shard, shard_offset, kv_len, causal, window, scale,
                           sinks, softcap, return_lse, comm)
    n = k_shard.shape[1]
    if shard_offset is None:
        shard_offset, kv_len = _offsets(n, q.device, group)
    if not shard_offset + n <= kv_len:
        raise ValueError(f"shard [{shard_offset}, {shard_offset + n}) ends past kv_len={kv_len}")
    nbytes = _layout(B, Lq, Hq, Dv, q.dtype)[2]
    buf = torch.empty(nbytes, device=q.device, dtype=torch.uint8)
    my_lse, my_out = _views(buf, B, Lq, Hq, Dv, q.dtype)
    partial(q, k_shard, v_shard, shard_offset=shard_offset, kv_len=kv_len, causal=causal,
            window=window, scale=scale, softcap=softcap, out=my_out, lse=my_lse)
    if comm == "allgather":
        lses, outs = _views(exchange(buf, group=group), B, Lq, Hq, Dv, q.dtype)
        out, lse = merge(outs, lses, sinks)
    else:
        state = _start(my_out, my_lse)
        exchange(buf, group=group, comm="ring",
                 fold=lambda i, b: _fold(state, *reversed(_views(b, B, Lq, Hq, Dv, q.dtype))))
        out, lse = _finish(state, sinks, q.dtype)
    return (out, lse.float()) if return_lse else out


# -- the ring's running merge: acc = sum_r e^(lse_r - m) O_r, l = sum_r e^(lse_r - m)
def _start(out, lse):
    m = lse.clone()
    seen = ~torch.isneginf(m)
    return {"acc": out.float(), "m": m, "l": seen.float()}


def _fold(state, out, lse):
    m_old = state["m"]
    m = torch.maximum(m_old, lse)
    m_use = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    a, b = torch.exp(m_old - m_use), torch.exp(lse - m_use)
    state["acc"] = state["acc"] * a.transpose(1, 2)[..., None] + out.float() * b.transpose(1, 2)[..., None]
    state["l"] = state["l"] * a + b
    state["m"] = m


def _finish(state, sinks, dtype):
    l, m = state["l"], state["m"]
    seen = l > 0
    safe = torch.where(seen, l, torch.ones_like(l))
    out = state["acc"] / safe.transpose(1, 2)[..., None]
    m_use = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    lse = torch.where(seen, m_use + torch.log(safe), torch.full_like(m, float("-inf")))
    if sinks is not None:
        out, lse = merge(out[None], lse[None], sinks)
    return out.to(dtype), lse


def _offsets(n: int, device, group) -> tuple[int, int]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(sizes, mine, group=group)
    sizes = sizes.tolist()
    return sum(sizes[:rank]), sum(sizes)


def _check(q, k, v, shard_offset, kv_len, causal, window, scale, sinks, softcap, return_lse, comm):
    if comm not in COMMS:
        raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
    if (shard_offset is None) != (kv_len is None):
        raise ValueError("pass shard_offset and kv_len together (or neither, to have them found "
                         "with an all-gather of the shard lengths)")
    for name, x in (("shard_offset", shard_offset), ("kv_len", kv_len)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    # the kernels' rules on a non-empty stand-in for the shard (an empty shard is allowed here)
    kk, vv = k, v
    if all(isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 0 for x in (k, v)):
        kk, vv = (x.new_empty(x.shape[0], 1, *x.shape[2:]) for x in (k, v))
    checks.attention_args(q, kk, vv, scale=scale, causal=causal, window=window, sinks=sinks,
                          softcap=softcap, return_lse=return_lse)
    return (*q.shape[:3], v.shape[3])
