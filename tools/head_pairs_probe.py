"""Head size 64 decode as head size 128: two KV heads read as one, what it would gain.

    PYTHONPATH=src python3 tools/head_pairs_probe.py [--layers 8] [--reps 20]

gpt-oss's shape (64 query heads, 8 KV heads of 64) at n = 1 fills 8 of a decode tile's 16
rows, and its 128-byte key rows make pages of 16 scattered reads. In a token-major cache
[.., Hkv, 64] KV heads 2j and 2j + 1 are one row of 128 values, so the same cache is
[.., Hkv / 2, 128]; a query head of KV head g, its vector put in half g % 2 of a 128-wide
row (zeros in the other half), scores against the pair's keys what it scores against its
own, and its output is that half of the pair's (the other half is discarded). This probe
times the transformed call as it is (q already widened, the output 128 wide) against the
plain one, graph timer (LAYERS calls in one CUDA graph, each its own K/V, cold L2):
decode cells n = 1 at 8192, 16384 and 32768 keys, and 64 sequences x 4096 keys dense and
paged (pages of 16 and 64, `auto`). SDPA's cuDNN kernel (no mask, head-major cache) beside.
Every row is checked against float64 first (outputs poisoned with NaN before the checked
replay). The serving plans read one KV head a row here (`head_pairs=False`): the kernel's own
pairs are timed by `tools/serving_sweep.py --variants "auto;auto/head_pairs=0"`. Writes
$OUT/head_pairs.csv (default benchmarks/results/latest/probe).
"""
from __future__ import annotations

import argparse
import csv
import os

import torch

HQ, HKV, D = 64, 8, 64


def widen(q):
    """q [B, n, Hq, D] -> [B, n, Hq, 2D]: each head's vector in half (its KV head % 2)."""
    ratio = HQ // HKV
    odd = (torch.arange(HQ, device=q.device) // ratio) % 2 == 1
    q2 = q.new_zeros(*q.shape[:-1], 2 * D)
    q2[..., ~odd, :D] = q[..., ~odd, :]
    q2[..., odd, D:] = q[..., odd, :]
    return q2


def narrow(o2):
    """The halves of a [.., Hq, 2D] output that belong to each head."""
    ratio = HQ // HKV
    odd = ((torch.arange(HQ, device=o2.device) // ratio) % 2 == 1)[:, None]
    return torch.where(odd, o2[..., D:], o2[..., :D])


def rel(out, ref) -> float:
    """Relative error of `out` against float64 `ref` (inf where it is not finite)."""
    err = float((out.double() - ref).norm() / ref.norm())
    return err if err == err and err != float("inf") else float("inf")


def reference(q, k, v, b):
    """Float64 output [Hq, D] of sequence b's last query row (k, v token-major [B, L, Hkv, D])."""
    ratio = HQ // HKV
    kk = k[b].double().repeat_interleave(ratio, 1)
    vv = v[b].double().repeat_interleave(ratio, 1)
    s = torch.einsum("hd,lhd->hl", q[b, -1].double(), kk) * D ** -0.5
    return torch.einsum("hl,lhd->hd", s.softmax(-1), vv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import skattn
    from skattn import serving
    from skattn.bench.graph import capture, check_replay, time_graph
    from skattn.bench.timing import ColdTimer

    timer = ColdTimer()
    NL = args.layers
    out_dir = os.environ.get("OUT", "benchmarks/results/latest/probe")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)

    def run(cell, label, fns, pick, ref, nbytes):
        try:
            graph, outs = capture(fns)  # outputs poisoned, one replay checked, then timed
            err = check_replay(graph, outs, {0: ref}, 2e-2, lambda o, r: rel(pick(o), r))
            t = time_graph(graph, NL, timer, warmup=3, reps=args.reps)
            row = dict(cell=cell, provider=label, p50_us=round(t.p50, 2),
                       tb_s=round(nbytes / t.p50 / 1e6, 3), err=f"{err:.2e}", status="ok")
        except Exception as exc:  # one failing row must not stop the others
            row = dict(cell=cell, provider=label, p50_us="", tb_s="", err="",
                       status=f"{type(exc).__name__}: {str(exc)[:120]}")
        rows.append(row)
        with open(os.path.join(out_dir, "head_pairs.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"{cell:22} {label:30} {row['p50_us']:>9} us {row['tb_s']:>7} TB/s "
              f"{row['err']:>9} {row['status']}", flush=True)
        torch.cuda.empty_cache()

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)

    cells = [(1, 8192), (1, 16384), (1, 32768), (64, 4096)]
    for B, L in cells:
        cell = f"B={B} L={L}"
        layers = [tuple(torch.randn(B, *s, device="cuda", dtype=torch.float16, generator=gen)
                        for s in ((1, HQ, D), (L, HKV, D), (L, HKV, D))) for _ in range(NL)]
        wide = [(widen(q), k.view(B, L, HKV // 2, 2 * D), v.view(B, L, HKV // 2, 2 * D))
                for q, k, v in layers]
        q0, k0, v0 = layers[0]
        ref = reference(q0, k0, v0, B - 1)
        nbytes = 2 * B * L * HKV * D * 2
        last = (lambda o: o[B - 1, -1])
        heads = [(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
                 for q, k, v in layers]
        run(cell, "sdpa-cudnn head-major", [lambda l=l: sdpa(*l) for l in heads],
            lambda o: o.transpose(1, 2)[B - 1, -1], ref, nbytes)
        del heads
        run(cell, "skattn dense", [lambda l=l: skattn.attention(*l, causal=True)
                                   for l in layers], last, ref, nbytes)
        run(cell, "skattn dense, head pairs",
            [lambda l=l: skattn.attention(*l, causal=True, scale=D ** -0.5) for l in wide],
            lambda o: narrow(o[B - 1, -1]), ref, nbytes)
        if B == 1:
            continue
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        for page in (16, 64):
            pages = B * L // page
            paged, wpaged = [], []
            for q, k, v in layers:
                table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
                table = table.view(B, L // page).contiguous()
                kp = torch.empty(pages, page, HKV, D, device="cuda", dtype=torch.float16)
                vp = torch.empty_like(kp)
                kp[table.long()] = k.view(B, L // page, page, HKV, D)
                vp[table.long()] = v.view(B, L // page, page, HKV, D)
                paged.append((q, kp, vp, table))
                wpaged.append((widen(q), kp.view(pages, page, HKV // 2, 2 * D),
                               vp.view(pages, page, HKV // 2, 2 * D), table))
            for label, sets, hkv, d, pick in (("paged", paged, HKV, D, last),
                                             ("paged, head pairs", wpaged, HKV // 2, 2 * D,
                                              lambda o: narrow(o[B - 1, -1]))):
                # one KV head a row in both (the pairs of the second are made outside)
                p = serving.serving_plan(batch=B, q_heads=HQ, kv_heads=hkv, head_dim=d,
                                         page_size=page, max_pages=L // page, q_len=1,
                                         max_kv_len=L, dtype=torch.float16, head_pairs=False)
                wl = serving.work_list(p, cache_seqlens=lens)
                ws = [serving.workspace(p, device="cuda") for _ in sets]
                run(cell, f"skattn {label} {page} ({p.programs})",
                    [lambda s=s, w=w, p=p, wl=wl: serving.attention_with_kvcache(
                        s[0], s[1], s[2], cache_seqlens=lens, block_table=s[3], plan=p,
                        workspace=w, work_list=wl, scale=D ** -0.5) for s, w in zip(sets, ws)],
                    pick, ref, nbytes)
            del paged, wpaged
        del layers, wide
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
