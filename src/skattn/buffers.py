"""Scratch memory for split tiles' partials: one pool per (device, stream), or the caller's.

A plan needs `plan.workspace_bytes`: two partial slots per program (BLOCK_M rows x (Dv + 2)
f32: output, maximum, sum) and, for the fused fixup, one int32 counter per tile. The size
depends on the program count and the tile, never on the KV length, so plans of every decode
step share one buffer. skattn keeps one pool per (device, stream), grown to the largest plan
run on it, so two streams never share partials or counters; at most `MAX_POOLS` pools are
kept (the least recently used is dropped). Under CUDA graphs pass your own buffer
(`workspace=`, from `skattn.workspace(plan)`): a captured graph keeps the addresses it saw.
A pool that grows after a graph captured it keeps its old buffer alive for that graph.
In a caller's buffer the partials start at byte 0 and the fused fixup's counters take the
last bytes (`allocate(*plans)` sizes one for several plans).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

MAX_POOLS = 16
_VIEW_CACHE = 64


def layout(plan, tiles: int | None = None) -> tuple[int, int, int]:
    """(f32 values of partial outputs, f32 values of maxima (= of sums), int32 counters);
    `tiles`: how many output tiles get a counter (default: the plan's `ntiles_dst`). A plan
    whose 16-bit `dequant` plan runs (`Tuning.quant_route`) needs that plan's."""
    if getattr(plan, "dequant", None) is not None:
        return layout(plan.dequant, tiles)
    if plan.fixup == "none":
        return 0, 0, 0
    # two slots a program; a serving plan's tail chunks own slots too
    rows = getattr(plan, "partial_programs", plan.programs) * 2 * plan.geometry.block_m
    tiles = plan.ntiles_dst if tiles is None else tiles
    return rows * plan.head_dim_v, rows, tiles if plan.fixup == "fused" else 0


def nbytes(plan, tiles: int | None = None) -> int:
    o, m, c = layout(plan, tiles)
    return (o + 2 * m) * 4 + c * 4


def allocate(*plans, device=None) -> torch.Tensor:
    """A zeroed workspace for `attention(..., workspace=)` that serves every plan given.

    Exported as `skattn.workspace`. One buffer serves the plans one call at a time (calls
    on two streams at once need one each); use it when capturing calls in a CUDA graph.

    Parameters
    ----------
    *plans : Plan
        The plans the buffer will serve; it is sized for the largest (serving plans have
        their own, `skattn.serving.workspace`).
    device : torch.device or str, optional
        Where to allocate (default: the current CUDA device).

    Returns
    -------
    torch.Tensor
        uint8, zeroed, at least 16 bytes. The fused fixup's counters live in the last bytes
        and must stay zero between calls (each fused call leaves them so); the partials of
        every plan given fit below them.
    """
    device = torch.device("cuda") if device is None else torch.device(device)
    floats = max((sum(layout(p)[:2]) + layout(p)[1] for p in plans), default=0)
    counters = max((layout(p)[2] for p in plans), default=0)
    return torch.zeros(max(16, (floats + counters) * 4), dtype=torch.uint8, device=device)


def views(buf: torch.Tensor, plan_layout, counters: torch.Tensor | None = None):
    """ws_o, ws_m, ws_l (f32) from the start of the byte buffer `buf` and the counters
    (int32): `counters`, or else the last bytes of `buf`."""
    o, m, c = plan_layout
    f32 = buf[:(o + 2 * m) * 4].view(torch.float32)
    if counters is None:
        counters = buf[buf.numel() - max(c, 1) * 4:].view(torch.int32)
    return f32[:o], f32[o:o + m], f32[o + m:o + 2 * m], counters


def capturing(device) -> bool:
    """A CUDA graph is being captured on the current stream of `device` (a torch.device)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Pool:
    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None
        self.cache: dict = {}
        self.ptrs: dict = {}  # plan layout -> (its views, their addresses)
        self.captured = False
        self.retired: list[torch.Tensor] = []  # buffers a captured graph may still use

    def get(self, plan_layout, need: int, device) -> tuple[torch.Tensor, ...]:
        if not self.captured and capturing(device):
            self.captured = True  # also when the views come from the cache (a warmed-up call)
        hit = self.cache.get(plan_layout)
        if hit is not None:
            return hit
        floats = (plan_layout[0] + 2 * plan_layout[1]) * 4
        if self.buf is None or self.buf.numel() < floats:
            if self.buf is not None and self.captured:
                self.retired.append(self.buf)
            self.buf = torch.empty(max(floats, 16), dtype=torch.uint8, device=device)
            self.cache.clear()
            self.ptrs.clear()
        if self.counters is None or self.counters.numel() < plan_layout[2]:
            if self.counters is not None and self.captured:
                self.retired.append(self.counters)
            # zeroed: the fused fixup's counters start at 0 and every launch leaves them at 0
            self.counters = torch.zeros(max(plan_layout[2], 4), dtype=torch.int32, device=device)
            self.cache.clear()
            self.ptrs.clear()
        hit = self.cache[plan_layout] = views(self.buf, plan_layout, self.counters)
        return hit

    def addresses(self, plan_layout, need: int, device) -> tuple[int, ...]:
        """The addresses of `get`'s views (a repeat call's recipe needs no more). They are
        kept with the views they come from, and used only while `get` still returns those
        views: a pool grown by another thread in between is never read through stale
        addresses, and the views keep what they address alive."""
        views = self.get(plan_layout, need, device)
        hit = self.ptrs.get(plan_layout)
        if hit is None or hit[0] is not views:
            hit = self.ptrs[plan_layout] = (views, tuple(x.data_ptr() for x in views))
        return hit[1]

    def held_bytes(self) -> int:
        live = [b for b in (self.buf, self.counters) if b is not None]
        return sum(b.numel() * b.element_size() for b in [*self.retired, *live])


_POOLS: OrderedDict[tuple, _Pool] = OrderedDict()
_CALLER: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
_WORK_LISTS: dict[tuple, torch.Tensor] = {}  # (device, stream) -> serving work-list pool


def _pool(device, stream: int) -> _Pool:
    """The pool of (device, stream), made if new (the oldest uncaptured pool beyond
    MAX_POOLS dropped)."""
    key = (device, stream)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = _Pool()
        while len(_POOLS) > MAX_POOLS:
            old_key, old = next(iter(_POOLS.items()))
            if old.captured:  # a graph may replay on it: keep it, move it to the back
                _POOLS.move_to_end(old_key)
                if all(p.captured for p in _POOLS.values()):
                    break
                continue
            del _POOLS[old_key]
            _WORK_LISTS.pop(old_key, None)
    return pool


def pooled(plan_layout, need: int, device, stream: int) -> tuple[torch.Tensor, ...]:
    """Views of the pool of (device, stream), grown to `need` bytes if smaller."""
    return _pool(device, stream).get(plan_layout, need, device)


def pooled_addresses(plan_layout, need: int, device, stream: int) -> tuple[int, ...]:
    """The addresses of `pooled`'s views."""
    return _pool(device, stream).addresses(plan_layout, need, device)


def caller_views(buf: torch.Tensor, plan_layout, need: int, device) -> tuple[torch.Tensor, ...]:
    """Views of a caller's workspace, checked once per (buffer, layout)."""
    key = (buf.data_ptr(), buf.numel() * buf.element_size(), plan_layout)
    hit = _CALLER.get(key)
    if hit is not None:
        return hit
    if not isinstance(buf, torch.Tensor) or not buf.is_contiguous() or buf.device != device:
        raise ValueError(f"workspace must be a contiguous tensor on {device}")
    if buf.numel() * buf.element_size() < need:
        raise ValueError(f"workspace holds {buf.numel() * buf.element_size()} bytes, the plan needs "
                         f"{need} (plan.workspace_bytes; skattn.workspace(plan) allocates one)")
    if buf.data_ptr() % 16:
        raise ValueError("workspace must be 16-byte aligned")
    hit = _CALLER[key] = views(buf.view(-1).view(torch.uint8), plan_layout)
    while len(_CALLER) > _VIEW_CACHE:
        _CALLER.popitem(last=False)
    return hit


class Scratch:
    """A workspace of one call alone, freed with it (`scratch`): its views, or just their
    addresses (what a repeat call's recipe needs, without making the views)."""

    __slots__ = ("buf",)

    def __init__(self, buf: torch.Tensor):
        self.buf = buf

    def views(self, plan_layout) -> tuple[torch.Tensor, ...]:
        return views(self.buf, plan_layout)

    def addresses(self, plan_layout) -> tuple[int, int, int, int]:
        """The addresses of `views(plan_layout)`, computed as `views` lays them out."""
        o, m, c = plan_layout
        base = self.buf.data_ptr()
        return base, base + 4 * o, base + 4 * (o + m), base + self.buf.numel() - 4 * max(c, 1)


def scratch(plan_layout, device) -> Scratch:
    """A fresh buffer for one call, freed with it: the custom op's workspace. Under
    torch.compile's CUDA graphs (mode="reduce-overhead") every allocation during warm-up and
    capture comes from the graph's private pool and must not outlive the call, so the op
    holds no pool; the counters are zeroed here (a memset the graph replays)."""
    o, m, c = plan_layout
    floats = (o + 2 * m) * 4
    buf = torch.empty(max(16, floats + c * 4), dtype=torch.uint8, device=device)
    if c:
        buf[floats:].zero_()
    return Scratch(buf)


def held_bytes() -> int:
    """Bytes of workspace skattn holds now (pools, including buffers kept for graphs)."""
    return sum(p.held_bytes() for p in _POOLS.values())


def work_list(words: int, device, stream: int) -> torch.Tensor:
    """The serving work-list pool of (device, stream) (int32), grown to `words` if smaller.
    An outgrown buffer is kept with the stream's pool where a CUDA graph was captured with
    it (the graph still addresses it), else freed."""
    key = (device, stream)
    wl = _WORK_LISTS.get(key)
    if wl is None or wl.numel() < words:
        pool = _pool(device, stream)
        if wl is not None and (pool.captured or capturing(device)):
            pool.retired.append(wl)
        size = max(words, 256, 2 * (wl.numel() if wl is not None else 0))
        wl = _WORK_LISTS[key] = torch.empty(size, dtype=torch.int32, device=device)
    return wl


def release() -> None:
    """Drop every pool. Only when no captured CUDA graph that ran skattn without its own
    `workspace=` will replay: such a graph keeps the addresses of the pool it saw."""
    _POOLS.clear()
    _CALLER.clear()
    _WORK_LISTS.clear()
