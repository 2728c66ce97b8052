"""Call recipes: what a repeat call of `skattn.attention` does instead of `launch.run`.

A call's signature (`api._signature`: the plan, every tensor's shape, strides, dtype and
device, the options) fixes everything its launches need except the tensors' addresses, the
stream and the workspace: the bound plan, the features, the strides, the compiled kernels
and their constant tails, the grids. The first call of a signature (one per alignment) runs
`launch.run` on fresh aliases of its tensors and records the launches; the `Recipe` learned
from them holds a spec for skattn's C launcher (`skattn.launcher`: every launch's
parameter block with its constants in place) and, per launch, the C launch function of the
compiled kernel with an assembler that builds its whole argument tuple from the constants
it binds and the per-call values (stream, the addresses of q, k, v, out and the optional
tensors present, the workspace views' addresses, all read anew each call). A repeat call:
signature lookup (in `skattn.api`), addresses, their 16-byte alignment (Triton specialises
on it: each alignment pattern has its own launches), then one call of the C launcher with
the stream and the addresses; where it has no spec (it could not be built, or a launch it
does not pack) or no CUDA context is current on the thread, Triton's C launch functions
with integer pointers, so they neither call `data_ptr` nor ask the driver about them.

The warp-specialised prompt-chunk kernel takes K and V as TMA descriptors: its launch goes
through Triton's C launch function with each descriptor's tensor map made from the call's
address (once per address: `TensorMaps`), its shape and strides as constants.

A plan that dequantizes K/V first (`Plan.dequant`) replays the pass's two launches, then
its 16-bit plan's: the call allocates the 16-bit K and V the pass writes (as `launch.run`
does, here in one allocation), and their addresses follow the workspace's in the per-call
values.

Calls that a recipe does not serve go through `launch.run` as before: CPU tensors and the
interpreter, Triton launch hooks (profilers), a current device other than q's, the TMA
prompt-chunk kernel (`Tuning(prefill="tma")`), and any launch whose arguments hold
something the recipe does not know.
"""
from __future__ import annotations

import operator
from functools import reduce
from types import SimpleNamespace

import torch

from skattn import buffers as ws
from skattn import launch, launcher

STREAM = 0  # index of the stream in the per-call values; the addresses follow
# the tensors a call passes, in the order of their addresses in the per-call values
ROLES = ("q", "k", "v", "out", "lse", "mask", "sinks", "alibi_slopes", "k_scale", "v_scale")
OPTIONAL = ROLES[4:]
ALIGN = 16  # the pointer alignment Triton specialises on


class Recipe:
    """The launches of one signature: per alignment pattern, (function, assembler) pairs
    (`learn_launches`)."""

    def __init__(self, bound, plan):
        self.route = getattr(plan, "dequant", None) is not None  # K/V written in 16 bits first
        if self.route:  # its 16-bit plan runs: that plan's workspace, tables and kernels
            bound = launch.bind(plan.dequant, bound.device)
            # the pass's 16-bit K and V in one allocation: V from element `route_split` on
            # (a multiple of 128 elements: 256 bytes, so both stay 16-byte aligned for TMA)
            kv = (plan.batch, plan.kv_len, plan.kv_heads)
            self.route_shapes = ((*kv, plan.head_dim), (*kv, plan.head_dim_v))
            self.route_sizes = tuple(reduce(operator.mul, x) for x in self.route_shapes)
            self.route_split = -(-self.route_sizes[0] // 128) * 128
            self.route_numel = self.route_split + self.route_sizes[1]
        self.bound = bound
        self.plan = plan          # the call's plan (an unplanned call's, made once)
        self.out_like_q = plan.head_dim_v == plan.head_dim  # out allocated as q is shaped
        # misaligned-tensor bits -> (C launcher spec or None, [(function, assembler)])
        self.by_align: dict = {}
        self.optional = True      # whether the signature has optional tensors (learned)
        # (the TMA prompt kernel stays on launch.run; the warp-specialised prompt kernel's
        # K/V tensor maps are made from the call's addresses: `descriptor_parts`, `with_maps`)
        prefill = bound.prefill
        self.serves = bound.cuda and (prefill is None or prefill.kind == "ws")
        self.index = bound.device.index
        self.fast = launcher.function() if self.serves else None  # skattn's C launcher
        self.first_spec = None  # the spec of the first alignment learned (all aligned, mostly)

    def values(self, stream, q, k, v, out, lse, mask, sinks, alibi_slopes, k_scale, v_scale,
               workspace, routed=()):
        """(launches, per-call values) of this call, or None where the recipe has no
        launches for its alignment yet. Reads every address anew (`routed`: the addresses
        of the call's 16-bit K and V on the dequant route, `route_addresses`). `launches` is
        (spec, [(function, assembler)]): the C launcher's spec (None where it has none) and
        the same launches for Triton's C launch functions."""
        ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()]
        if self.optional:
            for x in (lse, mask, sinks, alibi_slopes, k_scale, v_scale):
                if x is not None:
                    ptrs.append(x.data_ptr())
        ptrs += self.workspace_addresses(workspace, stream)
        if self.route and len(routed) != 2:
            raise TypeError("a dequant-route recipe takes the call's two 16-bit K/V addresses "
                            "(`route_addresses`)")
        ptrs += routed
        hit = self.by_align.get(misaligned(ptrs))
        if hit is None:
            return None
        return hit, [stream, *ptrs]

    def workspace_addresses(self, workspace, stream) -> tuple | list:
        """The addresses of the call's workspace views: the pool of (device, stream), a
        buffer of the call's own (`buffers.Scratch`) or a caller's buffer."""
        b = self.bound
        if workspace is None:
            return ws.pooled_addresses(b.layout, b.need, b.device, stream)
        if type(workspace) is ws.Scratch:
            return workspace.addresses(b.layout)
        return [x.data_ptr() for x in self.views(workspace)]

    def views(self, workspace) -> tuple:
        """The workspace views of a call given `workspace=`: a caller's buffer (its views,
        cached per buffer) or a buffer of the call's own (`buffers.Scratch`)."""
        b = self.bound
        if type(workspace) is ws.Scratch:
            return workspace.views(b.layout)
        return ws.caller_views(workspace, b.layout, b.need, b.device)

    def pack(self, stream, *tensors):
        """The launches of this call for Triton's C launch functions, as (function, argument
        tuple) pairs, or None (`values`)."""
        got = self.values(stream, *tensors)
        if got is None:
            return None
        (_, launches), vals = got
        return [(fn, make(vals)) for fn, make in launches]

    def run(self, q, k, v, out, lse, scale, mask, sinks, softcap, alibi_slopes, workspace,
            k_scale, v_scale) -> None:
        """`launch.run` for this signature (`scale`, `softcap` as the caller gave them): the
        recipe's launches where it has them, else `launch.run` itself, learning the launches
        where a recipe may serve the call."""
        direct = (self.serves and torch._C._cuda_getDevice() == self.index
                  and launch._no_hooks())
        if direct:
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            buf, routed = None, ()
            if self.route:  # (buf is kept until the launches are queued)
                buf = torch.empty(self.route_numel, device=q.device, dtype=q.dtype)
                routed = self.route_addresses(buf)
            spec = self.first_spec
            if spec is not None:  # one C call: addresses, their alignment, the launches
                wptrs = self.workspace_addresses(workspace, stream)
                if self.optional:
                    extra = [x for x in (lse, mask, sinks, alibi_slopes, k_scale, v_scale)
                             if x is not None]
                    done = self.fast(spec, stream, q, k, v, out, *extra, *wptrs, *routed)
                else:
                    done = self.fast(spec, stream, q, k, v, out, *wptrs, *routed)
                if done:
                    return
            got = self.values(stream, q, k, v, out, lse, mask, sinks, alibi_slopes, k_scale,
                              v_scale, workspace, routed)
            if got is not None:
                (spec, launches), vals = got
                if spec is not None and self.fast(spec, *vals):
                    return
                for fn, make in launches:
                    fn(*make(vals))
                return
        kw = dict(scale=launch.default_scale(self.plan.head_dim) if scale is None else float(scale),
                  mask=mask, sinks=sinks, softcap=float(softcap), alibi_slopes=alibi_slopes,
                  workspace=workspace, k_scale=k_scale, v_scale=v_scale)
        if not direct:
            launch.run(self.plan, q, k, v, out, lse, **kw)
            return
        self.learn(q, k, v, out, lse, stream, kw, buf)

    def route_addresses(self, buf) -> tuple:
        """The addresses of the 16-bit K and V in `buf`, a call's allocation on the dequant
        route (`route_numel` values of q's dtype, 16 bits)."""
        a = buf.data_ptr()
        return a, a + buf.element_size() * self.route_split

    def route_views(self, buf) -> tuple:
        """The 16-bit K and V tensors in `buf` (`route_addresses`)."""
        (sk, sv), (nk, nv) = self.route_shapes, self.route_sizes
        return buf.narrow(0, 0, nk).view(sk), buf.narrow(0, self.route_split, nv).view(sv)

    def learn(self, q, k, v, out, lse, stream, kw, buf=None) -> None:
        """Run the call through `launch.run` on fresh aliases of its tensors (so that every
        argument slot names one role, even where the caller passed one tensor twice) and
        keep its launches for the call's alignment when each argument is known."""
        given = dict(q=q, k=k, v=v, out=out, lse=lse, **{name: kw[name] for name in OPTIONAL[1:]})
        alias = {name: x.detach() for name, x in given.items() if isinstance(x, torch.Tensor)}
        for name, x in alias.items():
            if name in kw:
                kw[name] = x
        b = self.bound
        if type(kw["workspace"]) is ws.Scratch:  # launch.run gets the views named here
            kw["workspace"] = kw["workspace"].views(b.layout)
        record: list = []
        routed = self.route_views(buf) if self.route else ()
        launch.run(self.plan, alias["q"], alias["k"], alias["v"], alias["out"], alias.get("lse"),
                   record=record, routed=routed, **kw)
        if b.main_const["V_PAIRS"] and v.data_ptr() % 16:
            # launch.run reads V as pairs only where its address is even; the alignment
            # patterns of recipes do not tell even from odd, so this signature keeps launch.run
            self.serves = False
            return
        if kw["workspace"] is None:
            views = ws.pooled(b.layout, b.need, b.device, stream)
        elif type(kw["workspace"]) is tuple:
            views = kw["workspace"]
        else:
            views = self.views(kw["workspace"])
        order = [alias[name] for name in ROLES if name in alias]
        self.optional = len(order) > 4
        sources = [*order, *views, *routed]
        tables = {id(t): t for t in (b.qblock_off, b.kv_first,
                                     *(b.prefill.tables if b.prefill is not None else ()))}
        if not keep_learned(self, record, sources, tables):
            self.serves = False  # launches it cannot replay: this signature keeps launch.run


def keep_learned(owner, record, sources, tables) -> bool:
    """Keep `record`'s launches in `owner.by_align` (a recipe's) under the alignment pattern
    of `sources`, with the C launcher's spec where `owner.fast` is set (`learn_launches`,
    `learn_spec`); False where they cannot be replayed."""
    learned = learn_launches(record, sources, tables)
    if learned is None:
        return False
    pattern = misaligned([x.data_ptr() for x in sources])
    spec = None
    if owner.fast is not None:
        spec = learn_spec(record, sources, tables, roles=len(sources), pattern=pattern)
    owner.by_align[pattern] = (spec, learned)
    if owner.first_spec is None:
        owner.first_spec = spec
    return True


def misaligned(ptrs) -> int:
    """Bit i set where address i is not a multiple of `ALIGN`: 0 in the common case."""
    if not reduce(operator.or_, ptrs) % ALIGN:
        return 0
    return sum(1 << i for i, p in enumerate(ptrs) if p % ALIGN)


def learn_launches(record, sources, tables, compiled=None):
    """[(function, assembler)] per launch of `record`, the (key, args, grid) of each launch
    of `launch.run`, or None where a launch cannot be replayed: no compiled kernel for its
    key, or an argument that is neither one of `sources` (the tensors whose addresses each
    call reads, in the per-call values' order after the stream), one of `tables` (id ->
    tensors that live as long as the bound plan: their addresses are constants), nor a
    number; a TMA descriptor over one of `sources` becomes its tensor map (made from the
    call's address, `with_maps`), shape and strides. `assembler(values)` returns the
    launch's whole argument tuple."""
    found = compiled_launches(record, sources, tables, compiled, descriptors=True)
    if found is None:
        return None
    launches = []
    for ck, grid, kernel_parts in found:
        r = ck.run
        # parts: an int is an index into the per-call values, a 1-tuple holds a constant
        parts = [(grid[0],), (grid[1],), (grid[2],), STREAM, (ck.function,)]
        maps = []
        scratch = r.global_scratch_size or r.profile_scratch_size
        if any(type(x) is Desc for x in kernel_parts):
            fn = None if scratch else raw_launch(r.launch)
            if fn is not None:
                kernel_parts = descriptor_parts(ck, kernel_parts, len(sources) + 1, maps)
            if fn is None or kernel_parts is None:
                return None
        else:  # the wrapper allocates the kernel's scratch; else its C function
            fn = r if scratch else r.launch
        if fn is not r:  # the C function, past Triton's Python wrapper
            parts += [(r.launch_cooperative_grid,), (r.launch_pdl,), (None,), (None,)]
        parts += [(ck.packed_metadata,), (None,), (None,), (None,)]
        make = assembler(parts + kernel_parts)
        launches.append((fn, with_maps(make, maps) if maps else make))
    return launches


class Desc:
    """A TMA descriptor argument of a recorded launch (the prompt kernel's K or V): the
    per-call value `index` holds its base's address; shape, strides and padding are the
    signature's."""

    __slots__ = ("index", "shape", "strides", "nan", "address")

    def __init__(self, index: int, desc):
        self.index, self.shape, self.strides = index, tuple(desc.shape), tuple(desc.strides)
        self.nan = desc.padding == "nan"
        self.address = desc.base.data_ptr()  # the recorded call's (for `descriptor_parts`)


class _Base:
    """What Triton's `make_tensordesc_arg` reads of a descriptor's base: its address."""

    __slots__ = ("address",)

    def __init__(self, address: int):
        self.address = address

    def data_ptr(self) -> int:
        return self.address


def expanded(desc: Desc, address: int, meta) -> list:
    """The launch arguments Triton's launcher makes of a descriptor like `desc` at `address`
    (`make_tensordesc_arg`, its own function: with `meta` a tensor map, made by the driver,
    then shape and strides)."""
    from triton.backends.nvidia.driver import make_tensordesc_arg

    like = SimpleNamespace(base=_Base(address), shape=list(desc.shape),
                           strides=list(desc.strides), padding="nan" if desc.nan else "zero")
    return make_tensordesc_arg(like, meta)


class TensorMaps:
    """The CUDA tensor maps of one descriptor argument by base address (made by Triton's own
    `make_tensordesc_arg`, as its launcher makes them per call). Everything else a map holds
    (shape, strides, box, swizzle, element type) is fixed by the recipe's signature, so a map
    made once for an address serves every later call at that address; at most `KEEP` kept."""

    KEEP = 256

    def __init__(self, index: int, desc: Desc, meta: dict):
        self.index, self.desc, self.meta = index, desc, meta
        self.made: dict = {}

    def __call__(self, address: int):
        hit = self.made.get(address)
        if hit is None:
            if len(self.made) >= self.KEEP:
                self.made.clear()
            hit = self.made[address] = expanded(self.desc, address, self.meta)[0]
        return hit


def raw_launch(fn):
    """Triton's C launch function of a launcher whose kernel takes descriptors: Triton wraps
    it in a Python function that turns each descriptor into its launch arguments (a tensor
    map, then the shape and strides), which the recipe makes itself. None where the wrapper
    is not the one known here."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn  # already the C function
    names = code.co_freevars
    if "launcher" not in names or fn.__closure__ is None:
        return None
    return fn.__closure__[names.index("launcher")].cell_contents


def descriptor_parts(ck, parts, first: int, maps: list) -> list | None:
    """`parts` with each `Desc` replaced by the arguments Triton's launcher passes for it:
    with the kernel's descriptor metadata, a tensor map (per-call value `first + j` for the
    j-th map, made by the `TensorMaps` appended to `maps`), shape and strides; without, the
    base's address, shape, strides, the padding flag, shape and strides again. None where
    Triton's own expansion of the descriptor (`expanded`, once here) has another form."""
    descs = [x for x in parts if type(x) is Desc]
    meta = getattr(ck.metadata, "tensordesc_meta", None) or [None] * len(descs)
    if len(meta) != len(descs):
        return None
    out, j = [], 0
    for x in parts:
        if type(x) is not Desc:
            out.append(x)
            continue
        m, j = meta[j], j + 1
        dims = [(d,) for d in (*x.shape, *x.strides)]
        if m is None:
            tail = [*dims, (x.nan,), *dims]
            out += [x.index, *tail]
        elif m.get("fp4_padded"):
            return None
        else:
            tail = dims
            out += [first + len(maps), *tail]
            maps.append(TensorMaps(x.index, x, m))
        # Triton's expansion at the address the recording saw: its constants must be these
        if expanded(x, x.address, m)[1:] != [c for (c,) in tail]:
            return None
    return out


def with_maps(make, maps: list):
    """`make` after the per-call values gain each descriptor's tensor map, from its base's
    address."""
    pairs = tuple((m.index, m) for m in maps)
    return lambda v: make([*v, *(m(v[i]) for i, m in pairs)])


def learn_spec(record, sources, tables, compiled=None, roles=0, pattern=0) -> bytes | None:
    """The C launcher's spec (`skattn.launcher`) of `record`'s launches, with the per-call
    values of `learn_launches` (the stream, then the addresses of `sources`, the first
    `roles` of them aligned as `pattern` says), or None where it cannot launch them
    (Triton's launchers then do)."""
    found = compiled_launches(record, sources, tables, compiled)
    return None if found is None else launcher.spec(found, len(sources), roles, pattern)


def compiled_launches(record, sources, tables, compiled=None,
                      descriptors: bool = False) -> list | None:
    """[(CompiledKernel, grid, kernel argument parts)] of `record`'s launches (see
    `learn_launches` for the arguments), or None where one cannot be replayed. With
    `descriptors`, a TMA descriptor over one of `sources` is a `Desc` part."""
    compiled = launch._COMPILED if compiled is None else compiled
    slot = {id(x): i + 1 for i, x in enumerate(sources)}
    if len(slot) != len(sources):
        return None  # two roles in one tensor object: the slots would be ambiguous
    found = []
    for key, args, grid in record:
        hit = compiled.get(key) if key is not None else None
        if hit is None:
            return None
        ck, tail = hit
        parts = arg_parts(args, tail, slot, tables, descriptors)
        if parts is None:
            return None
        found.append((ck, grid, parts))
    return found


def arg_parts(args, tail, slot, tables, descriptors: bool = False) -> list | None:
    """A launch's kernel arguments as assembler parts (an int: the per-call value of that
    index, a source's address; a 1-tuple: a constant; with `descriptors`, a `Desc` for a
    TMA descriptor over a source), or None for an unknown argument."""
    parts = []
    for a in args:
        if descriptors and hasattr(a, "block_shape") and id(getattr(a, "base", None)) in slot:
            parts.append(Desc(slot[id(a.base)], a))
        elif isinstance(a, torch.Tensor):
            if id(a) in slot:
                parts.append(slot[id(a)])
            elif id(a) in tables:
                parts.append((a.data_ptr(),))
            else:
                return None
        elif isinstance(a, (int, float)):
            parts.append((a,))
        else:
            return None
    return parts + [(x,) for x in tail]


def assembler(parts):
    """A function of the per-call values that returns the tuple `parts` describes (an int:
    that per-call value; a 1-tuple: a constant). Generated once per launch, as
    `collections.namedtuple` generates its class: runs of constants are bound as tuples and
    spliced, so a call copies them at C speed and reads only the per-call values."""
    pieces, runs, run = [], {}, []
    for part in [*parts, None]:
        if isinstance(part, tuple):
            run.append(part[0])
            continue
        if run:
            name = f"c{len(runs)}"
            runs[name] = tuple(run)
            pieces.append("*" + name)
            run = []
        if part is not None:
            pieces.append(f"v[{int(part)}]")
    source = f"def make({', '.join(runs)}):\n    return lambda v: ({', '.join(pieces)},)\n"
    scope: dict = {}
    exec(source, scope)  # noqa: S102 (the source is made here from integers and names)
    return scope["make"](**runs)
