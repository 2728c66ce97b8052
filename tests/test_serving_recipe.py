"""Recipes of the serving functions (`skattn.serving_recipe`) on a CPU with the GPU launches
stubbed (`host_cpu.stub_gpu`): a repeat call passes the C launch functions exactly what the
checked path (`run_halves`) passes Triton's launcher, pointers as integers, for every form
of cache, plan, workspace and option; and calls on CPU tensors keep every check."""
import pytest
import torch

import skattn
import skattn.ops
from skattn import buffers as ws
from skattn import serving, serving_launch, serving_recipe
from helpers import stubbed_gpu
from serving_inputs import paged_cache, varlen_inputs

I32 = torch.int32
LENS = [40, 0, 17, 64]
HQ, HKV, D = 8, 2, 32
VARLEN_Q, VARLEN_K = [3, 0, 20, 1], [20, 5, 40, 9]


@pytest.fixture(params=["triton", "skattn"])
def gpu(monkeypatch, request):
    """The stubbed GPU (`helpers.stubbed_gpu`), with each launch stand-in."""
    with stubbed_gpu(monkeypatch, request.param, [serving_recipe.CHECKED]) as counter:
        yield counter


def _ints(args, swap):
    return tuple(swap.get(x.data_ptr(), x.data_ptr()) if isinstance(x, torch.Tensor) else x
                 for x in args)


def fast_and_slow(gpu, call):
    """The launches of `call()` through its recipe and through `run_halves` (recipes switched
    off), pointers as integers; the first must not use Triton's Python launcher."""
    gpu.log, gpu.wrapped[:] = [], []
    res = call()
    fast = gpu.log
    assert fast and not gpu.wrapped, "the call did not take its recipe"
    recipes = list(serving_recipe.CHECKED.values())
    assert recipes
    specs = [spec for r in recipes for spec, _ in r.by_align.values()]
    assert all((spec is not None) == bool(gpu.c_launcher) for spec in specs)
    for r in recipes:
        r.serves = False
    gpu.log = []
    res2 = call()
    for r in recipes:
        r.serves = True
    slow = gpu.log
    gpu.log = None
    swap = {}
    if isinstance(res, tuple):  # a fresh output and lse each call
        swap = {res2[0].data_ptr(): res[0].data_ptr(), res2[1].data_ptr(): res[1].data_ptr()}
    else:
        swap = {res2.data_ptr(): res.data_ptr()}
    return fast, [_ints(a, swap) for a in slow]


def kv_inputs(dense=False, lq=2):
    k, v, table = paged_cache(LENS, page_size=16, hkv=HKV, d=D, seed=1)
    if dense:
        B, n = len(LENS), max(LENS)
        k, v = torch.randn(B, n, HKV, D).half(), torch.randn(B, n, HKV, D).half()
        table = None
    q = torch.randn(len(LENS), lq, HQ, D).half()
    return q, k, v, torch.tensor(LENS, dtype=I32), table


def kv_plan(q, k, table, **kw):
    paged = table is not None
    bounds = (dict(page_size=16, max_pages=table.shape[1], max_kv_len=16 * table.shape[1])
              if paged else dict(max_kv_len=k.shape[1]))
    dtype = kw.pop("dtype", k.dtype)
    return skattn.serving_plan(batch=q.shape[0], q_len=q.shape[1], q_heads=HQ, kv_heads=HKV,
                               head_dim=D, dtype=dtype, sms=4, occupancy=2, **bounds, **kw)


FEATURES = {
    "plain": {},
    "lse": dict(return_lse=True),
    "sinks+alibi+softcap": dict(sinks=True, alibi=True, softcap=20.0),
    "scale+window": dict(scale=0.3, window=24),
}


def _extra(q, sinks=False, alibi=False, **kw):
    if sinks:
        kw["sinks"] = torch.randn(q.shape[-2])
    if alibi:
        kw["alibi_slopes"] = skattn.alibi_slopes(q.shape[-2], 8.0)
    return kw


def _check(gpu, call, launches=None):
    call()  # learns
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow
    assert launches is None or len(fast) == launches
    return fast


@pytest.mark.parametrize("fixup", ["fused", "uniform", "general", "none"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_kvcache_recipe_passes_what_run_halves_passes(gpu, fixup, feature):
    q, k, v, lens, table = kv_inputs()
    kw = dict(FEATURES[feature])
    # "uniform" and "none": the fixed-split policy (splits of 2 and 1)
    opts = (dict(fixup=fixup, programs=7) if fixup in ("fused", "general")
            else dict(policy="split", programs=2 * 16 if fixup == "uniform" else 8))
    p = kv_plan(q, k, table, window=kw.get("window"), **opts)
    assert p.fixup == fixup, p.describe()
    out = torch.empty_like(q)
    wsb = serving.workspace(p, "cpu")
    extra = _extra(q, **kw)
    call = lambda: skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table,  # noqa: E731
                                                 plan=p, out=out, workspace=wsb, **extra)
    _check(gpu, call, 2 + (fixup in ("uniform", "general")))


@pytest.mark.parametrize("form", ["fp8", "fp8-float", "q8_0", "q4_0"])
def test_quantized_caches(gpu, monkeypatch, form):
    q, k, v, lens, table = kv_inputs(dense=True)
    extra = {}
    if form == "fp8-float":  # a float scale's [1] tensor made each call: one address here
        one = torch.empty(1)
        real = torch.full
        monkeypatch.setattr(torch, "full", lambda size, x, **kw: one.fill_(x) if size == (1,)
                            else real(size, x, **kw))
    if form.startswith("fp8"):
        k, ks = skattn.quant.fp8(k)
        v, vs = skattn.quant.fp8(v, per_head=True)
        extra = dict(k_scale=float(ks) if form == "fp8-float" else ks, v_scale=vs)
    else:
        make = getattr(skattn.quant, form)
        k, v = make(k), make(v)
    # unplanned, the pool, a fresh output each call
    call = lambda: skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, **extra)  # noqa: E731
    _check(gpu, call)


@pytest.mark.parametrize("given", ["pool", "workspace", "work_list", "both"])
@pytest.mark.parametrize("paged", [False, True])
def test_varlen_mixed_plans_and_where_their_buffers_live(gpu, paged, given):
    # a MixedPlan: two halves, each its work list, main kernel(s) and fixup, sharing one
    # workspace (at the halves' offsets), one work list, or the stream's pool
    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, pad_q=2)
    table = None
    bounds = dict(total_k=k.shape[0])
    if paged:
        k, v, table = paged_cache(VARLEN_K, page_size=16, hkv=HKV, d=D, seed=2)
        bounds = dict(page_size=16, max_pages=table.shape[1])
    p = skattn.serving_plan(batch=len(VARLEN_Q), max_q_len=max(VARLEN_Q), total_q=q.shape[0],
                            max_kv_len=max(VARLEN_K), q_heads=HQ, kv_heads=HKV, head_dim=D, sms=4,
                            occupancy=2, q_split=3, **bounds)
    assert isinstance(p, skattn.MixedPlan)
    wsb = serving.workspace(p, "cpu") if given in ("workspace", "both") else None
    wl = None
    if given in ("work_list", "both"):
        wl = torch.empty(p.work_list_words + 8, dtype=I32)
    out = torch.empty(q.shape[0], HQ, D, dtype=q.dtype)

    def call():
        skattn.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K),
                                block_table=table, plan=p, out=out, workspace=wsb, work_list=wl)
        return out

    fast = _check(gpu, call)
    builds = sum(1 for a in fast if a[4] >> 20 == 5)
    assert builds == (0 if wl is not None else 2)


def test_out_as_q_and_new_tensors_each_call(gpu):
    # out = q (one tensor in two roles), then other tensors of the same signature: the
    # launches follow the call's addresses
    q, k, v, lens, table = kv_inputs()
    p = kv_plan(q, k, table)
    call = lambda: skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens,  # noqa: E731
                                                 block_table=table, plan=p, out=q)
    fast = _check(gpu, call)
    q2, k2, v2, lens2, table2 = (x.clone() for x in (q, k, v, lens, table))
    call2 = lambda: skattn.attention_with_kvcache(q2, k2, v2, cache_seqlens=lens2,  # noqa: E731
                                                  block_table=table2, plan=p, out=q2)
    fast2, slow2 = fast_and_slow(gpu, call2)
    assert fast2 == slow2 and fast2 != fast
    assert len(serving_recipe.CHECKED) == 1


def test_each_alignment_its_launches(gpu):
    q, k, v, lens, table = kv_inputs()
    p = kv_plan(q, k, table)
    outs = [torch.empty_like(q), torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)]
    for out in outs:  # aligned, then 2 bytes past it: a pattern of its own
        call = (lambda o: lambda: skattn.attention_with_kvcache(
            q, k, v, cache_seqlens=lens, block_table=table, plan=p, out=o))(out)
        _check(gpu, call)
    (rec,) = serving_recipe.CHECKED.values()
    assert len(rec.by_align) == 2


def test_the_pool_read_anew_after_it_grows(gpu):
    q, k, v, lens, table = kv_inputs()
    small = kv_plan(q, k, table, programs=5, fixup="general")
    out = torch.empty_like(q)
    call = lambda: skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens,  # noqa: E731
                                                 block_table=table, plan=small, out=out)
    before = _check(gpu, call, 3)
    big_q = torch.randn(len(LENS), 16, HQ, D).half()
    big = kv_plan(big_q, k, table, programs=64, fixup="general")
    skattn.attention_with_kvcache(big_q, k, v, cache_seqlens=lens, block_table=table, plan=big)
    fast, slow = fast_and_slow(gpu, call)
    assert fast == slow
    assert fast != before  # the workspace's views moved with the pool
    pool = ws._pool(torch.device("cpu"), 0).buf
    assert pool.data_ptr() in fast[1] and pool.data_ptr() not in before[1]


def test_the_custom_op_replays_with_a_workspace_of_its_own(gpu, monkeypatch):
    q, k, v, lens, table = kv_inputs()
    fixed = {}
    real = torch.empty

    def empty(*size, **kw):  # the op's workspace: one buffer, so the two paths' addresses compare
        if kw.get("dtype") is torch.uint8 and len(size) == 1:
            if size not in fixed:
                fixed[size] = real(*size, **kw)
            return fixed[size]
        return real(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    call = lambda: skattn.ops.attention_with_kvcache(q, k, v, cache_seqlens=lens,  # noqa: E731
                                                     block_table=table)
    fast = _check(gpu, call)
    (wsb,) = fixed.values()
    ends = {wsb.data_ptr() + wsb.numel()}
    assert any(type(x) is int and wsb.data_ptr() <= x < max(ends) for a in fast for x in a[13:])


def test_cpu_calls_keep_every_check():
    # no recipe is kept where the kernels run under the interpreter: bad lengths on the CPU
    # are refused on every call, also after a good call of the same signature
    serving_recipe.CHECKED.clear()
    q, k, v, lens, table = kv_inputs()
    p = kv_plan(q, k, table)
    skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, plan=p)
    assert not serving_recipe.CHECKED
    bad = lens.clone()
    bad[0] = 10**6
    with pytest.raises(ValueError):
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=bad, block_table=table, plan=p)


def test_out_over_the_cache_refused_on_the_first_call(gpu):
    q, k, v, lens, table = kv_inputs()
    p = kv_plan(q, k, table)
    over = k.view(-1)[:q.numel()].view(q.shape)
    with pytest.raises(ValueError, match="out"):
        skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, plan=p,
                                      out=over)
    assert not serving_recipe.CHECKED


def test_a_mixed_plan_on_a_new_pool_reads_its_addresses_after_growing_it(gpu):
    # the recipe learned where the stream's pool held both halves; the pool then dropped (a
    # new stream's is the same): replaying grows it for each half in turn, and every launch
    # must read the final buffer, not the one the long half's growth freed
    q, k, v, cu_q, cu_k = varlen_inputs(VARLEN_Q, VARLEN_K, hq=HQ, hkv=HKV, d=D, pad_q=2)
    p = skattn.serving_plan(batch=len(VARLEN_Q), max_q_len=max(VARLEN_Q), total_q=q.shape[0],
                            max_kv_len=max(VARLEN_K), total_k=k.shape[0], q_heads=HQ,
                            kv_heads=HKV, head_dim=D, sms=4, occupancy=2, q_split=3)
    layouts = [ws.layout(h, h.tiles_max) for h in p.halves]
    assert sum(layouts[1][:2]) > sum(layouts[0][:2])  # the long half grows the pool
    out = torch.empty(q.shape[0], HQ, D, dtype=q.dtype)

    def call():
        skattn.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), plan=p,
                                out=out)
        return out

    call()
    freed = []
    real = ws._Pool.get

    def get(self, layout, need, device):
        before = self.buf
        got = real(self, layout, need, device)
        if before is not None and self.buf is not before:
            freed.append((before.data_ptr(), before.numel()))
        return got

    ws.release()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ws._Pool, "get", get)
        fast, slow = fast_and_slow(gpu, call)
    assert freed, "the pool did not grow between the halves"
    assert fast == slow
    for lo, n in freed:
        assert not any(type(x) is int and lo <= x < lo + n for a in fast for x in a[13:])


def test_work_lists_and_workspace_cut_from_one_allocation(gpu):
    # where each view came from decides its address, not which allocation it is in: a
    # second work list of the same buffer is read at its own offset
    q, k, v, lens, table = kv_inputs()
    p = kv_plan(q, k, table)
    need, words = serving_launch.workspace_bytes(p), p.work_list_words * 4
    arena = torch.zeros(need + 2 * words + 64, dtype=torch.uint8)
    wsb = arena[:need]
    lists = [arena[need + i * words:need + (i + 1) * words].view(I32) for i in range(2)]
    out = torch.empty_like(q)
    for wl in lists:
        call = (lambda wl: lambda: skattn.attention_with_kvcache(
            q, k, v, cache_seqlens=lens, block_table=table, plan=p, out=out, workspace=wsb,
            work_list=wl))(wl)
        fast = _check(gpu, lambda c=call: (c(), out)[1])
        ints = {x for a in fast for x in a[13:] if type(x) is int}
        assert wl.data_ptr() in ints
        assert all(other.data_ptr() not in ints for other in lists if other is not wl)


def test_fp8_v_off_16_bytes_keeps_the_checked_path(gpu):
    # FP8 V is read as 32-bit words: an address that is a multiple of 4 but not of 16 runs,
    # on the checked path every call (an alignment pattern cannot tell 4 from 2), and one
    # that is not a multiple of 4 is refused on every call, a repeat one included
    q, k, v, lens, _ = kv_inputs(dense=True)
    k8, ks = skattn.quant.fp8(k)
    v8, vs = skattn.quant.fp8(v)
    for shift, ok in ((4, True), (2, False)):
        serving_recipe.CHECKED.clear()
        raw = torch.empty(v8.numel() + 16, dtype=torch.uint8)
        at = -raw.data_ptr() % 16 + shift
        vv = raw[at:at + v8.numel()].view(torch.float8_e4m3fn).view(v8.shape)
        vv.copy_(v8)
        for i in range(3):
            gpu.wrapped[:] = []
            call = lambda: skattn.attention_with_kvcache(q, k8, vv, cache_seqlens=lens,  # noqa: E731
                                                         k_scale=ks, v_scale=vs)
            if not ok:
                with pytest.raises(ValueError, match="multiple of 4"):
                    call()
                continue
            call()
            assert bool(gpu.wrapped) == (i > 0)  # compiled, then Triton's launcher each call
        if ok:
            (rec,) = serving_recipe.CHECKED.values()
            assert not rec.serves and not rec.by_align
