"""Call recipes (`skattn.recipe`) on a CPU with the GPU launches stubbed: a repeat call passes
the C launch function exactly the arguments `launch.run` passes Triton's launcher, with
pointers as integers, and no two calls share launches wrongly."""
import pytest
import torch

import skattn
from skattn import api, launch, ops, recipe
from skattn import buffers as ws
from skattn.bench import host_cpu
from helpers import stubbed_gpu

SHAPE = dict(batch=1, q_len=2, kv_len=512, q_heads=8, kv_heads=2, head_dim=64)


@pytest.fixture(params=["triton", "skattn"])
def gpu(monkeypatch, request):
    """The stubbed GPU (`helpers.stubbed_gpu`), with each launch stand-in."""
    with stubbed_gpu(monkeypatch, request.param, [api._CHECKED, ops._RECIPES]) as counter:
        yield counter


def _plan(**kw):
    return skattn.plan(causal=True, **{**SHAPE, **kw}, sms=4, occupancy=2)


def _qkv(dtype=torch.float16, **kw):
    s = {**SHAPE, **kw}
    q = torch.randn(s["batch"], s["q_len"], s["q_heads"], s["head_dim"], dtype=torch.float16)
    k = torch.randn(s["batch"], s["kv_len"], s["kv_heads"], s["head_dim"], dtype=torch.float16)
    v = torch.randn_like(k)
    return q, k.to(dtype), v.to(dtype), torch.empty_like(q)


def _ints(args, swap=None):
    swap = swap or {}
    return tuple(swap.get(x.data_ptr(), x.data_ptr()) if isinstance(x, torch.Tensor) else x
                 for x in args)


def fast_and_slow(gpu, call):
    """The launches of `call()` through its recipe and through `launch.run` (the recipe
    switched off), pointers as integers; the first must not use Triton's Python launcher."""
    gpu.log, gpu.wrapped[:] = [], []
    res = call()
    fast = gpu.log
    assert fast and not gpu.wrapped, "the call did not take its recipe"
    specs = [spec for r in [*api._CHECKED.values(), *ops._RECIPES.values()]
             for spec, _ in r.by_align.values()]
    assert all((spec is not None) == bool(gpu.c_launcher) for spec in specs)
    recipes = [*api._CHECKED.values(), *ops._RECIPES.values()]
    serves = {id(r): r.serves for r in recipes}
    for r in recipes:
        r.serves = False
    gpu.log = []
    res2 = call()
    for r in recipes:
        r.serves = serves[id(r)]
    slow = gpu.log
    gpu.log = None
    swap = {}
    if isinstance(res, tuple):  # a fresh lse each call
        swap = {res2[1].data_ptr(): res[1].data_ptr()}
    elif isinstance(res, torch.Tensor):  # a fresh output each call (the custom op's)
        swap = {res2.data_ptr(): res.data_ptr()}
    return fast, [_ints(a, swap) for a in slow]


VARIANTS = {
    "plain": dict(),
    "lse": dict(return_lse=True),
    "mask": dict(mask=True),
    "sinks+alibi+softcap+lse": dict(sinks=True, alibi=True, softcap=20.0, return_lse=True),
    "scale": dict(scale=0.3),
    "fp8": dict(fp8=True),
    "q8_0": dict(q8_0=True),
    "q4_0": dict(q4_0=True),
}


def _call(p, q, k, v, out, mask=False, sinks=False, alibi=False, fp8=False, q8_0=False,
          q4_0=False, **kw):
    extra = {}
    if mask:
        extra["mask"] = torch.randn(1, q.shape[1], k.shape[1], dtype=torch.float16)
    if sinks:
        extra["sinks"] = torch.randn(q.shape[2])
    if alibi:
        extra["alibi_slopes"] = skattn.alibi_slopes(q.shape[2], 8.0)
    if fp8:
        k, ks = skattn.quant.fp8(k)
        v, vs = skattn.quant.fp8(v, per_head=True)
        extra.update(k_scale=ks, v_scale=vs)
    if q8_0:
        k, v = skattn.quant.q8_0(k), skattn.quant.q8_0(v)
    if q4_0:
        k, v = skattn.quant.q4_0(k), skattn.quant.q4_0(v)
    return lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out, **extra, **kw)


@pytest.mark.parametrize("fixup", ["uniform", "general", "fused", "none"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recipe_passes_what_launch_run_passes(gpu, fixup, variant):
    opts = dict(VARIANTS[variant])
    dtype = (torch.float8_e4m3fn if opts.get("fp8") else "q8_0" if opts.get("q8_0")
             else "q4_0" if opts.get("q4_0") else None)
    programs = {"uniform": 8, "general": 7, "fused": 7, "none": 2}[fixup]
    p = _plan(programs=programs, fixup=None if fixup != "fused" else "fused",
              dtype=dtype or torch.float16)
    assert p.fixup == fixup
    q, k, v, out = _qkv()
    call = _call(p, q, k, v, out, **opts)
    call()  # learns
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow
    assert len(fast) == (2 if fixup in ("uniform", "general") else 1)


@pytest.mark.parametrize("shape", ["seed", "features", "odd"])
@pytest.mark.parametrize("form", ["fp8", "q8_0"])
def test_the_dequant_route_replays_the_pass_and_the_16_bit_plan(gpu, monkeypatch, form, shape):
    # a routed plan (`Plan.dequant`): the pass's two launches, then the 16-bit plan's, with
    # one allocation for the 16-bit K/V every call (so that the two paths' addresses
    # compare); "features": a mask, sinks, ALiBi slopes, softcap; "odd": K's values not a
    # multiple of 128 (V after padding), Dv != Dk, lse
    odd = dict(kv_len=333, kv_heads=1, head_dim_v=128) if shape == "odd" else {}
    p = _plan(programs=5 if odd else 8,
              dtype=torch.float8_e4m3fn if form == "fp8" else "q8_0",
              tuning=skattn.Tuning(quant_route="dequant"), **odd)
    assert p.dequant is not None
    q, k, v, out = _qkv(**{n: x for n, x in odd.items() if n != "head_dim_v"})
    if odd:
        v = torch.randn(*k.shape[:3], 128, dtype=k.dtype)
        out = torch.empty(*q.shape[:3], 128, dtype=q.dtype)
    rec = recipe.Recipe(launch.bind(p, q.device), p)
    assert rec.route and rec.route_split % 128 == 0 and rec.route_split >= k.numel()
    assert rec.route_numel == rec.route_split + v.numel()
    buf = torch.empty(rec.route_numel, dtype=q.dtype)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: buf if a == (buf.numel(),)
                        else real_empty(*a, **kw))  # the route's one allocation, every call
    fixed = rec.route_views(buf)
    assert fixed[0].shape == k.shape and fixed[1].shape == v.shape
    assert rec.route_addresses(buf) == tuple(x.data_ptr() for x in fixed)
    assert all(a % 16 == 0 for a in rec.route_addresses(buf))
    real, passes = launch.dequantize, []

    def dequantize(x, scales, kv_format, dtype, out=None, *rest):
        passes.append(x)
        into = fixed[(len(passes) - 1) % 2] if out is None else out  # (launch.run's own)
        return real(x, scales, kv_format, dtype, into, *rest)

    monkeypatch.setattr(launch, "dequantize", dequantize)
    features = dict(mask=True, sinks=True, alibi=True, softcap=20.0) if shape == "features" else {}
    call = _call(p, q, k, v, out, **{form: True}, **features, return_lse=shape == "odd")
    call()  # learns
    (rec,) = api._CHECKED.values()
    assert rec.route and rec.bound.plan is p.dequant
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow
    assert len(fast) == 2 + (2 if p.dequant.fixup in ("uniform", "general") else 1)
    functions = [launch_args[4] for launch_args in fast]
    assert [f >> 20 for f in functions[:2]] == [4, 4]  # the pass (`host_cpu.stub_gpu`)
    assert all(fixed[0].data_ptr() in a for a in (fast[0], fast[2]))
    assert fixed[1].data_ptr() in fast[1] and fixed[1].data_ptr() in fast[2]
    # another allocation: its addresses are read anew
    buf = real_empty(buf.numel(), dtype=q.dtype)
    gpu.log = []
    call()
    other = rec.route_addresses(buf)
    assert other[0] in gpu.log[0] and other[1] in gpu.log[1] and set(other) <= set(gpu.log[2])
    gpu.log = None


def test_block_forms_get_an_output_of_their_logical_head_size(gpu):
    # a Q4_0 packs two values a byte: out is [.., Dv], not [.., Dv / 2]
    p = _plan(programs=8, dtype="q4_0")
    q, k, v, _ = _qkv()
    for _ in range(2):
        out = skattn.attention(q, skattn.quant.q4_0(k), skattn.quant.q4_0(v), causal=True, plan=p)
        assert out.shape == q.shape


def test_fresh_tensors_of_one_signature_get_their_own_addresses(gpu):
    p = _plan(programs=8)
    q, k, v, out = _qkv()
    skattn.attention(q, k, v, causal=True, plan=p, out=out)
    q2, k2, v2, out2 = _qkv()
    fast, slow = fast_and_slow(gpu, lambda: skattn.attention(q2, k2, v2, causal=True, plan=p,
                                                             out=out2))
    assert fast == slow
    assert q2.data_ptr() in fast[0] and q.data_ptr() not in fast[0]


def test_one_tensor_passed_as_k_and_v_teaches_no_wrong_slots(gpu):
    # the first call passes k as v too; a later call with its own v must read v's address
    p = _plan(programs=8)
    q, k, v, out = _qkv()
    skattn.attention(q, k, k, causal=True, plan=p, out=out)
    fast, slow = fast_and_slow(gpu, lambda: skattn.attention(q, k, v, causal=True, plan=p,
                                                             out=out))
    assert fast == slow and v.data_ptr() in fast[0]


def test_strides_dtypes_and_optional_tensors_get_their_own_recipes(gpu):
    p, p_bf = _plan(programs=8), _plan(programs=8, dtype=torch.bfloat16)
    q, k, v, out = _qkv()
    big = torch.randn(1, SHAPE["kv_len"], 2 * SHAPE["kv_heads"], SHAPE["head_dim"],
                      dtype=torch.float16)
    kv_view = big[:, :, ::2]  # a strided view of a larger cache: other strides
    k_bf, v_bf, q32, out32 = k.bfloat16(), v.bfloat16(), q.float(), out.float()
    sinks = torch.randn(SHAPE["q_heads"])
    calls = [
        lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out),
        lambda: skattn.attention(q, kv_view, kv_view, causal=True, plan=p, out=out),
        lambda: skattn.attention(q, k_bf, v_bf, causal=True, plan=p_bf, out=out),
        lambda: skattn.attention(q32, k, v, causal=True, plan=p, out=out32),
        lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out, return_lse=True),
        lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out, sinks=sinks),
    ]
    for call in calls:
        call()
    assert len(api._CHECKED) == len(calls)
    for call in calls * 2:  # interleaved: each call keeps to its own launches
        fast, slow = fast_and_slow(gpu, call)
        assert fast == slow


def test_misaligned_tensors_get_their_own_compiled_kernels(gpu):
    # Triton specialises pointers on 16-byte alignment: q one element into a buffer has the
    # signature of an aligned q but needs other kernels
    p = _plan(programs=8)
    _, k, v, out = _qkv()
    buf = torch.randn(1 + 2 * 8 * 64, dtype=torch.float16)
    q_aligned = buf[:-1].view(1, 2, 8, 64)
    q_off = buf[1:].view(1, 2, 8, 64)
    assert q_off.data_ptr() % 16 and not q_aligned.data_ptr() % 16
    for q in (q_aligned, q_off):
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
    assert len(api._CHECKED) == 1
    functions = set()
    for q in (q_aligned, q_off, q_aligned):
        fast, slow = fast_and_slow(gpu, lambda: skattn.attention(q, k, v, causal=True, plan=p,
                                                                 out=out))
        assert fast == slow
        functions.add(fast[0][4])
    assert len(functions) == 2


def test_a_grown_pool_and_a_caller_workspace_are_read_anew(gpu):
    small, big = _plan(programs=8), _plan(programs=8, kv_len=1024, q_len=16)
    q, k, v, out = _qkv()
    qb, kb, vb, outb = _qkv(kv_len=1024, q_len=16)
    call = lambda: skattn.attention(q, k, v, causal=True, plan=small, out=out)  # noqa: E731
    call()
    before, _ = fast_and_slow(gpu, call)
    ws.release()  # the pool is dropped: new buffers
    skattn.attention(qb, kb, vb, causal=True, plan=big, out=outb)  # grows the new pool
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow and fast != before
    buf = skattn.workspace(small, big, device="cpu")
    call = lambda: skattn.attention(q, k, v, causal=True, plan=small, out=out,  # noqa: E731
                                    workspace=buf)
    call()  # learns: the buffer's counters for `small` are not 16-byte aligned (sized for big)
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow and buf.data_ptr() in fast[0]


def test_unplanned_calls_keep_their_plan(gpu):
    q, k, v, out = _qkv()
    call = lambda: skattn.attention(q, k, v, causal=True, out=out)  # noqa: E731
    call()
    (rec,) = api._CHECKED.values()
    assert rec.plan is api._cached_plan(1, 2, 512, 8, 2, 64, 64, torch.float16, True, None,
                                        torch.device("cpu"), False)
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow


def test_launch_hooks_and_another_device_take_triton_s_launcher(gpu, monkeypatch):
    p = _plan(programs=8)
    q, k, v, out = _qkv()
    call = lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out)  # noqa: E731
    call()
    call()
    gpu.wrapped[:] = []
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1)  # not q's device
    call()
    assert len(gpu.wrapped) == 2  # both launches through CudaLauncher.__call__
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: None)
    from triton import knobs

    kernel = host_cpu._main.attention_kernel
    compiles = kernel.compiles
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda meta: None)
    call()
    assert kernel.compiles == compiles + 1  # a hook: Triton's JIT launcher, every call


def test_bad_input_after_a_recipe_is_still_refused(gpu):
    p = _plan(programs=8)
    q, k, v, out = _qkv()
    skattn.attention(q, k, v, causal=True, plan=p, out=out)
    with pytest.raises(ValueError):
        skattn.attention(q, k[:, :50], v[:, :50], causal=True, plan=p, out=out)
    with pytest.raises(TypeError):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, softcap=[1.0])
    # equal to the values of a remembered signature (False == 0.0, True == 1.0), not floats
    skattn.attention(q, k, v, causal=True, plan=p, out=out, scale=1.0)
    with pytest.raises(TypeError, match="softcap"):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, softcap=False)
    with pytest.raises(TypeError, match="scale"):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, scale=True)


def test_signatures_read_in_c_equal_those_read_in_python(monkeypatch):
    # `api._signature` reads plain tensors (and None) in one C call where it can; Python
    # reads the same tuple where it cannot (here forced): one key either way
    from skattn import launcher

    if launcher.metas_function() is None:
        pytest.skip("skattn's C launcher could not be built here")
    q, k, v, out = _qkv()
    (k8, ks), (v8, vs) = skattn.quant.fp8(k), skattn.quant.fp8(v)
    sinks, mask = torch.randn(SHAPE["q_heads"]), torch.zeros(1, 2, SHAPE["kv_len"])
    calls = [(q, k, v, None, True, None, None, None, 0.0, None, False, None, out),
             (q, k8, v8, 0.3, True, 64, mask, sinks, 5.0, sinks, True, None, None, ks, vs)]
    api._METAS[:] = [launcher.metas_function()]
    in_c = [api._signature(*c) for c in calls]
    monkeypatch.setattr(api, "_METAS", [None])
    assert [api._signature(*c) for c in calls] == in_c
    assert in_c[0] != in_c[1] and hash(in_c[1]) is not None


def test_remembered_signatures_keep_option_types_and_scale_values(gpu):
    # return_lse=1 equals True, a numpy scale hashes like a float: neither may pass as a
    # remembered signature's (the checks would refuse them on a fresh cache)
    import numpy as np

    p = _plan(programs=8)
    q, k, v, out = _qkv()
    skattn.attention(q, k, v, causal=True, plan=p, out=out, return_lse=True)
    with pytest.raises(TypeError, match="return_lse"):
        skattn.attention(q, k, v, causal=True, plan=p, out=out, return_lse=1)
    pf = _plan(programs=8, dtype=torch.float8_e4m3fn)
    q, k8, v8, out = _qkv(torch.float8_e4m3fn)
    skattn.attention(q, k8, v8, causal=True, plan=pf, out=out, k_scale=np.float32(0.5),
                     v_scale=np.float32(0.5))
    for bad in (np.float32("nan"), np.float32(-1.0)):
        with pytest.raises(ValueError, match="k_scale"):
            skattn.attention(q, k8, v8, causal=True, plan=pf, out=out, k_scale=bad,
                             v_scale=np.float32(0.5))


def test_a_copied_or_pickled_plan_is_a_new_plan(gpu):
    # a plan's api token and bound tables stay in its process: a pickled plan's token could
    # name another plan with the same shapes there, whose launches the call would replay
    import copy
    import pickle

    a, b = _plan(programs=8), _plan(programs=3)
    q, k, v, out = _qkv()
    skattn.attention(q, k, v, causal=True, plan=a, out=out)
    for c in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert "_token" not in c.__dict__ and "_bound" not in c.__dict__ and c == a
    b.__dict__["_token"] = a.__dict__["_token"]  # what an unpickled plan could carry before
    b2 = pickle.loads(pickle.dumps(b))
    before = gpu.calls
    skattn.attention(q, k, v, causal=True, plan=b2, out=out)
    rec = next(r for r in api._CHECKED.values() if r.plan is b2)
    assert rec.bound.main_grid == (3, 1, 1) and gpu.calls - before == 2


class _Launcher:
    launch = None
    launch_cooperative_grid = launch_pdl = False

    def __init__(self, scratch):
        self.global_scratch_size, self.profile_scratch_size = scratch, 0


class _Compiled:
    function, packed_metadata = 7, (4, 1, 0)

    def __init__(self, scratch):
        self.run = _Launcher(scratch)


def test_learned_launch_tuples_and_scratch_kernels_keep_triton_s_wrapper():
    a, b = torch.empty(4), torch.empty(4)
    table = torch.empty(2, dtype=torch.int32)
    record = [("k1", (a, 3, b, table, 0.5, a), (5, 1, 1)), ("k2", (b, 9), (2, 3, 4))]
    compiled = {"k1": (_Compiled(0), (True, 16)), "k2": (_Compiled(64), ())}
    l1, l2 = recipe.learn_launches(record, [a, b], {id(table): table}, compiled)
    vals = [11, 1000, 2000]
    assert l1[0] is None  # the C function (None in this stand-in)
    assert l1[1](vals) == (5, 1, 1, 11, 7, False, False, None, None, (4, 1, 0), None, None, None,
                           1000, 3, 2000, table.data_ptr(), 0.5, 1000, True, 16)
    assert isinstance(l2[0], _Launcher)  # global scratch: Triton's wrapper allocates it
    assert l2[1](vals) == (2, 3, 4, 11, 7, (4, 1, 0), None, None, None, 2000, 9)
    assert recipe.learn_launches(record, [a, b], {}, compiled) is None  # unknown tensor
    assert recipe.learn_launches(record, [a, a], {id(table): table}, compiled) is None
    assert recipe.learn_launches([(None, (a,), (1, 1, 1))], [a], {}, compiled) is None


def test_assembler_splices_constants_around_per_call_values():
    make = recipe.assembler([(1,), (None,), 0, ((4, 1, 0),), 2, 1, (2.5,), (True,)])
    assert make(["a", "b", "c"]) == (1, None, "a", (4, 1, 0), "c", "b", 2.5, True)
    assert recipe.assembler([0])(["x"]) == ("x",)
    assert recipe.assembler([(7,)])([]) == (7,)


def test_misaligned_bits():
    assert recipe.misaligned([0, 16, 4096]) == 0
    assert recipe.misaligned([16, 18, 32, 2]) == 0b1010


def test_remembered_signatures_are_bounded_oldest_first():
    table: dict = {}
    for i in range(5):
        api.remember(table, i, str(i), limit=3)
    assert list(table) == [2, 3, 4]


@pytest.mark.parametrize("policy", ["llamacpp", "auto"])
def test_the_custom_op_replays_its_recipe_with_its_own_workspace(gpu, monkeypatch, policy):
    # the op's repeat call launches what launch.run launches, with a workspace of the call's
    # own (here one buffer every call, so that the two paths' addresses compare)
    q, k, v, _ = _qkv()
    layout = ws.layout(ops.plan_for(q, k, v, causal=True, policy=policy))
    fixed = ws.scratch(layout, q.device)
    monkeypatch.setattr(ws, "scratch", lambda plan_layout, device: fixed)
    call = lambda: torch.ops.skattn.attention(q, k, v, None, None, None, 0.2, True, None,  # noqa: E731
                                              0.0, policy, None, None)
    call()
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow and len(fast) >= 1
    assert fixed.buf.data_ptr() in fast[0] and q.data_ptr() in fast[0]
    # the addresses a recipe computes are those of the views launch.run makes
    for plan_layout in (layout, (5, 3, 0), (5, 3, 7)):
        buf = ws.scratch(plan_layout, q.device)
        assert buf.addresses(plan_layout) == tuple(x.data_ptr() for x in buf.views(plan_layout))
    (rec,) = ops._RECIPES.values()
    assert rec.plan.policy == policy and rec.by_align


def test_a_workspace_that_is_not_a_tensor_is_refused(gpu):
    # the internal workspace forms (a Scratch, a tuple of views) are not for callers: they
    # skip the checks a caller's buffer gets
    p = _plan(programs=8)
    q, k, v, out = _qkv()
    views = ws.scratch(ws.layout(p), q.device)
    for bad in (views, views.views(ws.layout(p)), [1, 2]):
        for _ in range(2):  # a new signature and a remembered one
            with pytest.raises(TypeError, match="workspace must be a tensor"):
                skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=bad)
        skattn.attention(q, k, v, causal=True, plan=p, out=out)
