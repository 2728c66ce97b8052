"""Small serving calls for compute-sanitizer (memcheck, racecheck, synccheck): every fixup
kind (and a dynamic tail) on ragged dense, paged (page sizes 16, 48, 64) and packed varlen
batches (one plan, and a MixedPlan's two halves), KV heads of 64 read in pairs and one a row
at every page size, a prompt step in whole tiles (on the Hopper kernel and the base
kernel), a paged fp8
cache with per-head K and per-tensor V scales, paged q8_0 (V as values and as int8 pairs)
and q4_0 caches, and the device-side behaviour on bad lengths and page ids (clamped and
masked: no out-of-bounds read). Run: compute-sanitizer --tool memcheck python3 tools/sanitize_serving.py
"""
import faulthandler
import sys

import torch

import skattn
from skattn import quant, reference, serving

I32 = torch.int32


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    faulthandler.enable()  # a crash under the sanitizer prints the Python stack
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).half()

    bad, n = 0, 0
    lens = [0, 1, 700, 45, 130]
    B, Hq, Hkv, D = len(lens), 8, 2, 64
    q = rand(B, 2, Hq, D)
    lens_t = torch.tensor(lens, dtype=I32, device="cuda")
    for ps in (None, 16, 48, 64):
        if ps:
            need = [-(-x // ps) for x in lens]
            pages = torch.randperm(sum(need), device="cuda", generator=g).to(I32)
            table = torch.full((B, max(need)), 10**6, dtype=I32, device="cuda")
            at = 0
            for b, m in enumerate(need):
                table[b, :m] = pages[at:at + m]
                at += m
            k, v = rand(sum(need), ps, Hkv, D), rand(sum(need), ps, Hkv, D)
            bounds = dict(max_kv_len=table.shape[1] * ps, page_size=ps, max_pages=table.shape[1])
        else:
            table = None
            k, v = rand(B, max(lens), Hkv, D), rand(B, max(lens), Hkv, D)
            bounds = dict(max_kv_len=max(lens))
        kw = dict(batch=B, q_len=2, q_heads=Hq, kv_heads=Hkv, head_dim=D, **bounds)
        plans = {"auto": skattn.serving_plan(**kw),
                 "general": skattn.serving_plan(fixup="general", **kw),
                 "tail": skattn.serving_plan(tail=40, **kw),
                 "split": skattn.serving_plan(policy="split", programs=4 * B * Hkv, **kw),
                 "llamacpp": skattn.serving_plan(policy="llamacpp", **kw),
                 # two KV heads of 64 read as one of 128 (the default with pages of 16 only)
                 "pairs": skattn.serving_plan(head_pairs=True, **kw),
                 "no pairs": skattn.serving_plan(head_pairs=False, **kw)}
        ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                               sinks=torch.zeros(Hq, device="cuda"))
        for name, p in plans.items():
            out = skattn.attention_with_kvcache(q, k, v, cache_seqlens=lens_t, block_table=table,
                                                plan=p, sinks=torch.zeros(Hq, device="cuda"))
            n += 1
            if rel(out, ref) > 2e-2:
                bad += 1
                print(f"FAIL page {ps} {name}: {rel(out, ref):.2e}")
        if ps:  # bad values on the device: clamped lengths, a page id out of range
            wild = table.clone()
            wild[2, 0] = -7
            for name in ("auto", "tail", "pairs"):
                serving.attention_with_kvcache(q, k, v, plan=plans[name], block_table=wild,
                                               cache_seqlens=torch.tensor(
                                                   [-4, 10**7, 700, 45, 130], dtype=I32,
                                                   device="cuda"))
                n += 1
    lq, lk = [40, 1, 0, 3], [300, 77, 5, 2]
    cu_q = torch.tensor([0, 40, 41, 41, 44], dtype=I32, device="cuda")
    cu_k = torch.tensor([0, 300, 377, 382, 384], dtype=I32, device="cuda")
    qv, kv_, vv = rand(46, Hq, D), rand(384, Hkv, D), rand(384, Hkv, D)
    ref = reference.attention_varlen(qv, kv_, vv, cu_q, cu_k, 40, 300)
    for fixup, q_split in ((None, None), ("fused", None), (None, 3), ("fused", 3)):
        # q_split: a MixedPlan, the two halves side by side in one workspace
        p = skattn.serving_plan(batch=4, max_q_len=40, total_q=46, max_kv_len=300, total_k=384,
                                q_heads=Hq, kv_heads=Hkv, head_dim=D, fixup=fixup,
                                q_split=q_split)
        ws = serving.workspace(p) if q_split else None
        out = skattn.attention_varlen(qv, kv_, vv, cu_q, cu_k, 40, 300, plan=p, workspace=ws)
        rows = ~torch.isnan(ref[:, 0, 0])
        n += 1
        if rel(out[rows], ref[rows]) > 2e-2:
            bad += 1
            print(f"FAIL varlen {fixup} q_split {q_split}")
    # a prompt step in whole tiles (auto, planned for a pretend GPU of 4 SMs so that its 64
    # tiles outnumber the resident programs), packed and paged (pages of 64)
    from skattn.kernels.worklist import WHOLE_FLAG
    cu_q = torch.tensor([0, 1024, 1025], dtype=I32, device="cuda")
    cu_k = torch.tensor([0, 1024, 1524], dtype=I32, device="cuda")
    qv, kv_, vv = rand(1025, Hq, D), rand(1524, Hkv, D), rand(1524, Hkv, D)
    ref = reference.attention_varlen(qv, kv_, vv, cu_q, cu_k, 1024, 1024)
    pages = torch.randperm(24, device="cuda", generator=g).to(I32)
    table = torch.full((2, 16), 10**6, dtype=I32, device="cuda")  # unused entries: out of range
    table[0], table[1, :8] = pages[:16], pages[16:]
    kp = torch.zeros(24, 64, Hkv, D, dtype=kv_.dtype, device="cuda")
    vp = torch.zeros_like(kp)
    for b, (k0, n_keys) in enumerate(((0, 1024), (1024, 500))):
        for j in range(-(-n_keys // 64)):
            rows = slice(k0 + 64 * j, k0 + min(64 * (j + 1), n_keys))
            m = rows.stop - rows.start
            kp[table[b, j], :m], vp[table[b, j], :m] = kv_[rows], vv[rows]
    # (by default on the Hopper kernel, kernels/ragged_ws.py; Tuning(): the base kernel's)
    for paged, tuning in ((False, None), (True, None), (False, skattn.Tuning()),
                          (True, skattn.Tuning())):
        bounds = dict(page_size=64, max_pages=16) if paged else dict(total_k=1524)
        p = skattn.serving_plan(batch=2, max_q_len=1024, total_q=1025, max_kv_len=1024,
                                q_heads=Hq, kv_heads=Hkv, head_dim=D, sms=4, q_split=None,
                                tuning=tuning, **bounds)
        wl = serving.work_list(p, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        for layer in range(2):  # two layers' calls share the work list
            out = skattn.attention_varlen(qv, kp if paged else kv_, vp if paged else vv, cu_q,
                                          cu_k, 1024, 1024, plan=p, work_list=wl,
                                          block_table=table if paged else None)
            n += 1
            if rel(out, ref) > 2e-2 or int(wl[WHOLE_FLAG.value]) != 1:
                bad += 1
                print(f"FAIL whole tiles paged={paged} {p.tuning.prefill} layer {layer}: {rel(out, ref):.2e}, "
                      f"flag {int(wl[WHOLE_FLAG.value])}")
    # fp8 e4m3 K/V, paged (16), with a page id out of range in one sequence's unused entries
    ps, need = 16, [-(-x // 16) for x in lens]
    table = torch.full((B, max(need)), 10**6, dtype=I32, device="cuda")
    pages = torch.randperm(sum(need), device="cuda", generator=g).to(I32)
    at = 0
    for b, m in enumerate(need):
        table[b, :m] = pages[at:at + m]
        at += m
    k8 = rand(sum(need), ps, Hkv, D).to(torch.float8_e4m3fn)
    v8 = rand(sum(need), ps, Hkv, D).to(torch.float8_e4m3fn)
    ks = torch.rand(Hkv, device="cuda", generator=g) + 0.5
    vs = torch.full((1,), 0.75, device="cuda")
    ref = reference.attention_with_kvcache(q, k8, v8, cache_seqlens=lens_t, block_table=table,
                                           k_scale=ks, v_scale=vs)
    for fixup in (None, "fused"):
        p = skattn.serving_plan(batch=B, q_len=2, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                max_kv_len=table.shape[1] * ps, page_size=ps,
                                max_pages=table.shape[1], dtype=torch.float8_e4m3fn, fixup=fixup)
        out = skattn.attention_with_kvcache(q, k8, v8, cache_seqlens=lens_t, block_table=table,
                                            plan=p, k_scale=ks, v_scale=vs)
        n += 1
        if rel(out, ref) > 2e-2:
            bad += 1
            print(f"FAIL fp8 paged {fixup}: {rel(out, ref):.2e}")
    # q8_0 (V read as values and as pairs) and q4_0 blocks over the same block table (pages
    # of 16, ids out of range unused)
    for form, pairs in (("q8_0", False), ("q8_0", True), ("q4_0", False)):
        kq, vq = (getattr(quant, form)(rand(sum(need), ps, Hkv, D)) for _ in range(2))
        ref = reference.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t, block_table=table)
        p = skattn.serving_plan(batch=B, q_len=2, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                max_kv_len=table.shape[1] * ps, page_size=ps,
                                max_pages=table.shape[1], dtype=form,
                                tuning=skattn.Tuning(q8_0_v_blocks=pairs))
        out = skattn.attention_with_kvcache(q, kq, vq, cache_seqlens=lens_t, block_table=table,
                                            plan=p)
        n += 1
        if rel(out, ref) > 2e-2:
            bad += 1
            print(f"FAIL {form} paged (V pairs {pairs}): {rel(out, ref):.2e}")
    torch.cuda.synchronize()
    print(f"sanitize serving cases: {n} run, {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
