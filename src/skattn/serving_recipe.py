"""Call recipes of the serving functions: what a repeat call of `attention_with_kvcache` or
`attention_varlen` does instead of checking and packing its launches again.

As `skattn.recipe` for `skattn.attention`: a call's signature (`signature`: every tensor's
shape, strides, dtype and device, the options, the plan) fixes all that its launches need but
the tensors' addresses and the stream: the plan (an unplanned call's, made once), its bound
halves, the features, strides, compiled kernels and grids. The first call of a signature is
checked (`serving_checks`), runs `run_halves` on fresh aliases of its tensors and records the
launches: the work-list step, the main kernel (and its whole-tile or Hopper build), the fixup,
for each half of a mixed plan. A repeat call reads the addresses of its tensors and of the
workspace's views (the pool of its stream, a caller's or its own buffer, a caller's work
list: each at the offset the first call found) and hands them to skattn's C launcher in one
call; where that launcher has no spec (a launch it does not pack: the Hopper kernel's tensor
maps) Triton's C launch functions take the same values.

Served on CUDA only (CPU tensors keep every check, the values of lengths and page ids
included), without Triton launch hooks, with q's device current. A repeat call is not
checked again: out's memory overlap with the other tensors is refused on a signature's first
call, as `skattn.attention` does.
"""
from __future__ import annotations

import torch

from skattn import launch, launcher, quant
from skattn import serving_launch as sl
from skattn.api import _meta, plan_token, remember
from skattn.recipe import keep_learned, misaligned
from skattn.serving_mixed import MixedPlan

CHECKED: dict = {}  # signature -> Recipe
_METAS: list = []   # the C launcher's `metas` (None where it could not be built), once known


def signature(tensors: tuple, options: tuple, plan):
    """What the checks of a serving call depend on: `tensors` (every tensor argument, None
    where absent), `options` (the other arguments with their types) and the plan (by a token
    it carries, as `skattn.api` keys plans)."""
    if not _METAS:
        _METAS.append(launcher.metas_function())
    metas = _METAS[0](*tensors) if _METAS[0] is not None else None
    if metas is None:  # a block form, a float scale or a subclass: Python reads them
        metas = tuple(None if x is None else _meta(x) for x in tensors)
    return metas, options, plan_token(plan), torch.is_grad_enabled()


def lookup(key):
    """The recipe of a checked signature, or None (also for unhashable options)."""
    try:
        return CHECKED.get(key)
    except TypeError:
        return None


def keep(key, recipe: Recipe) -> Recipe:
    """Remember `recipe` under `key` where it may serve repeat calls; returns it."""
    if recipe.serves:
        try:
            remember(CHECKED, key, recipe)
        except TypeError:
            pass
    return recipe


def workspace_offsets(plan: MixedPlan) -> tuple[int, int]:
    """Byte offsets of the halves' workspaces in a MixedPlan's (16-byte aligned)."""
    return 0, -(-sl.workspace_bytes(plan.short) // 16) * 16


def mixed_workspace_bytes(plan: MixedPlan) -> int:
    return workspace_offsets(plan)[1] + sl.workspace_bytes(plan.long)


def halves(plan, workspace, work_list):
    """(half plan, its workspace, its work list) per half of a MixedPlan; the plan itself
    otherwise."""
    if not isinstance(plan, MixedPlan):
        return [(plan, workspace, work_list)]
    need = mixed_workspace_bytes(plan)
    if workspace is not None and (not isinstance(workspace, torch.Tensor)
                                  or not workspace.is_contiguous()
                                  or workspace.numel() * workspace.element_size() < need):
        raise ValueError(f"workspace must be a contiguous tensor of at least {need} bytes for "
                         f"this MixedPlan (skattn.serving.workspace(plan) allocates one)")
    raw = workspace.view(-1).view(torch.uint8) if workspace is not None else None
    parts = []
    for half, at, wl_at in zip(plan.halves, workspace_offsets(plan), plan.work_list_offsets):
        ws = raw[at:at + sl.workspace_bytes(half)] if raw is not None else None
        wl = work_list[wl_at:wl_at + half.work_list_words] if work_list is not None else None
        parts.append((half, ws, wl))
    return parts


def check_work_list(plan, wl, device) -> None:
    if (not isinstance(wl, torch.Tensor) or wl.dtype != torch.int32 or wl.device != device
            or wl.numel() < plan.work_list_words or not wl.is_contiguous()):
        raise ValueError(f"work_list must be a contiguous int32 tensor of at least "
                         f"{plan.work_list_words} elements on {device} (skattn.serving.work_list)")


def run_halves(plan, q, k, v, out, lse, *, seq_k, seq_q, block_table, scale, sinks, softcap,
               alibi_slopes, workspace, work_list, k_scale=None, v_scale=None,
               record: list | None = None) -> list:
    """Build each half's work list (unless given) and launch its kernels; returns, per half,
    the workspace views it used (ws_o, ws_m, ws_l, counters, work list) and where they came
    from: (views, from the caller's workspace, work list from the caller's). `record` as
    `serving_launch.run`'s."""
    if isinstance(plan, MixedPlan) and work_list is not None:
        check_work_list(plan, work_list, q.device)
    if v.dtype in quant.FP8_DTYPES and v.data_ptr() % 4:  # (head size, strides: the checks)
        raise ValueError(f"FP8 v must start at an address that is a multiple of 4 bytes (the "
                         f"serving kernel reads its rows as 32-bit words), got {v.data_ptr():#x}")
    used = []
    for half, ws_buf, wl_given in halves(plan, workspace, work_list):  # both write `out`
        device = q.device
        b = sl.bind(half, device)
        stream = sl._stream(b, device)
        ws_o, ws_m, ws_l, counters, wl = sl._views(half, b, ws_buf, device, stream)
        if wl_given is None:
            sl.build(half, wl, seq_k=seq_k, cu_k=half.varlen, seq_q=seq_q, counters=counters,
                     record=record)
        else:
            check_work_list(half, wl_given, device)
            wl = wl_given
        sl.run(half, q, k, v, out, lse, wl=wl, block_table=block_table, scale=scale,
               sinks=sinks, softcap=float(softcap), alibi_slopes=alibi_slopes,
               ws_views=(ws_o, ws_m, ws_l, counters), k_scale=k_scale, v_scale=v_scale,
               record=record)
        used.append(((ws_o, ws_m, ws_l, counters, wl), ws_buf is not None, wl_given is not None))
    return used


class Recipe:
    """The launches of one checked signature: per alignment pattern, the C launcher's spec
    (None where it has none) and (function, assembler) pairs for Triton's C launch functions
    (`skattn.recipe.learn_launches`)."""

    def __init__(self, plan, device: torch.device, out_shape: tuple, lse_shape: tuple):
        self.plan = plan
        self.out_shape, self.lse_shape = out_shape, lse_shape
        self.halves = plan.halves if isinstance(plan, MixedPlan) else (plan,)
        mixed = isinstance(plan, MixedPlan)  # (a workspace of the call's own: the ops')
        self.workspace_bytes = max(16, mixed_workspace_bytes(plan) if mixed
                                   else sl.workspace_bytes(plan))
        self.bounds = [sl.bind(h, device) for h in self.halves]
        self.serves = all(b.cuda for b in self.bounds)
        self.device, self.index = device, device.index
        self.fast = launcher.function() if self.serves else None
        self.by_align: dict = {}
        self.first_spec = None
        self.where = None  # per workspace source: ("ws" | "wl", offset) or ("pool", half, slot)
        self.pooled: list = []  # the halves whose views come from the stream's pool

    def run(self, q, k, v, out, lse, seq_k, seq_q, block_table, sinks, alibi_slopes, k_scale,
            v_scale, workspace, work_list, scale: float, softcap: float) -> None:
        """`run_halves` for this signature: the recorded launches where there are some for
        the call's alignment, else `run_halves` itself (learning its launches where a recipe
        may serve the call)."""
        # the per-call values: these tensors but those a signature has as None, then the
        # addresses of the workspace views (`addresses`)
        tensors = (q, k, v, out, lse, seq_k, seq_q, block_table, sinks, alibi_slopes, k_scale,
                   v_scale)
        direct = (self.serves and torch._C._cuda_getDevice() == self.index
                  and launch._no_hooks())
        if direct and self.where is not None:
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            vals = [x for x in tensors if x is not None]
            vals += self.addresses(workspace, work_list, stream)
            spec = self.first_spec
            if spec is not None and self.fast(spec, stream, *vals):
                return
            ptrs = [x if type(x) is int else x.data_ptr() for x in vals]
            hit = self.by_align.get(misaligned(ptrs))
            if hit is not None:
                spec, launches = hit
                if spec is not None and self.fast(spec, stream, *ptrs):
                    return
                for fn, make in launches:
                    fn(*make([stream, *ptrs]))
                return
        kw = dict(scale=scale, sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                  workspace=workspace, work_list=work_list, k_scale=k_scale, v_scale=v_scale)
        if not direct:
            run_halves(self.plan, q, k, v, out, lse, seq_k=seq_k, seq_q=seq_q,
                       block_table=block_table, **kw)
            return
        self.learn(tensors, kw)

    def addresses(self, workspace, work_list, stream) -> list:
        """The call's addresses of the workspace views the launches read, in the order
        `learn` found them. The pool is grown for every half that uses it before any of its
        addresses is read: a half's growth would free the buffer an earlier half's
        addresses point into."""
        if len(self.pooled) > 1:  # grown for each half first
            for h in self.pooled:
                sl.pooled_addresses(self.halves[h], self.bounds[h], self.device, stream)
        pooled = {h: sl.pooled_addresses(self.halves[h], self.bounds[h], self.device, stream)
                  for h in self.pooled}
        base = {"ws": workspace.data_ptr() if workspace is not None else 0,
                "wl": work_list.data_ptr() if work_list is not None else 0}
        return [base[kind] + a if kind != "pool" else pooled[a][b] for kind, a, b in self.where]

    def learn(self, tensors: tuple, kw: dict) -> None:
        """Run the call on fresh aliases of its tensors (every argument slot then names one
        role, even where the caller passed one tensor twice, as out=q) and keep its launches
        for the call's alignment where each argument is known."""
        alias = tuple(None if x is None else x.detach() for x in tensors)
        q, k, v, out, lse, seq_k, seq_q, bt, sinks, slopes, k_scale, v_scale = alias
        kw.update(sinks=sinks, alibi_slopes=slopes, k_scale=k_scale, v_scale=v_scale)
        record: list = []
        used = run_halves(self.plan, q, k, v, out, lse, seq_k=seq_k, seq_q=seq_q,
                          block_table=bt, record=record, **kw)
        if v.dtype in quant.FP8_DTYPES and v.data_ptr() % 16:
            # V read as 32-bit words needs a check (an address a multiple of 4) that alignment
            # patterns cannot make: this signature keeps run_halves, as `skattn.recipe` does
            self.serves = False
            return
        sources = [x for x in alias if x is not None]
        where = []
        for h, (views, from_ws, from_wl) in enumerate(used):
            for slot, x in enumerate(views):
                if any(x is s for s in sources):
                    continue  # (the pool's counters, shared by both halves of a mixed plan)
                if slot == 4 and from_wl:
                    where.append(("wl", x.data_ptr() - kw["work_list"].data_ptr(), None))
                elif from_ws:
                    where.append(("ws", x.data_ptr() - kw["workspace"].data_ptr(), None))
                else:
                    where.append(("pool", h, slot))
                sources.append(x)
        if self.where is not None and where != self.where:
            return  # the views found elsewhere than before: this alignment keeps run_halves
        tables = {id(b.cost): b.cost for b in self.bounds}
        if not keep_learned(self, record, sources, tables):
            self.serves = False  # launches it cannot replay: the signature keeps run_halves
            return
        self.where = where
        self.pooled = sorted({a for kind, a, _ in where if kind == "pool"})
