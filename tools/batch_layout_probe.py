"""Decode over 64 equal sequences: where the time goes between the paged kernel and SDPA.

    PYTHONPATH=src python3 tools/batch_layout_probe.py [--models llama-8b,gpt-oss]
        [--batch 64] [--keys 4096] [--layers 8] [--reps 20]

One decode step (one new token a sequence) of B sequences of the same length, timed with
the graph timer (LAYERS calls in one CUDA graph, each layer its own K/V, cold L2) for:
SDPA (cuDNN, no mask: every key is visible) on a head-major cache [B, Hkv, L, D]; skattn's
dense kernel on the token-major cache [B, L, Hkv, D] and on the head-major cache through a
strided view; skattn's ragged kernel on the token-major cache (`attention_with_kvcache`
without a block table) and paged (pages of 16 and 64, random page order; token-major
pages [pages, page, Hkv, D] and head-major ones [pages, Hkv, page, D] through a view;
`auto` and `split`, one KV head a row (`head_pairs=False`); the number in parentheses is
the plan's grid). Every row is checked
against float64 on two sequences first (outputs poisoned with NaN before the checked
replay). Prints one line a row and writes $OUT/batch_layout.csv (default benchmarks/results/latest/probe).
"""
from __future__ import annotations

import argparse
import csv
import os

import torch


def _err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def _reference(q, k, v, seqs):
    """Float64 output [len(seqs), Hq, D] of one query row a sequence (k, v: [B, L, Hkv, D])."""
    ratio = q.shape[2] // k.shape[2]
    outs = []
    for b in seqs:
        kk = k[b].double().repeat_interleave(ratio, 1)    # [L, Hq, D]
        vv = v[b].double().repeat_interleave(ratio, 1)
        s = torch.einsum("hd,lhd->hl", q[b, 0].double(), kk) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), vv))
    return torch.stack(outs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-8b,gpt-oss")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import skattn
    from skattn import serving
    from skattn.bench.graph import capture, time_graph
    from skattn.bench.models import MODELS
    from skattn.bench.timing import ColdTimer

    timer = ColdTimer()
    B, L, NL = args.batch, args.keys, args.layers
    rows = []
    out_dir = os.environ.get("OUT", "benchmarks/results/latest/probe")
    os.makedirs(out_dir, exist_ok=True)
    for name in args.models.split(","):
        hq, hkv, d = MODELS[name][:3]
        gen = torch.Generator(device="cuda").manual_seed(0)
        # head-major K/V per layer: [B, Hkv, L, D]
        layers = [(torch.randn(B, 1, hq, d, device="cuda", dtype=torch.float16, generator=gen),
                   torch.randn(B, hkv, L, d, device="cuda", dtype=torch.float16, generator=gen),
                   torch.randn(B, hkv, L, d, device="cuda", dtype=torch.float16, generator=gen))
                  for _ in range(NL)]
        q0, kh0, vh0 = layers[0]
        ref = _reference(q0, kh0.transpose(1, 2), vh0.transpose(1, 2), [0, B - 1])
        del kh0, vh0
        nbytes = 2 * B * L * hkv * d * 2

        def run(label, fns, pick):
            try:
                graph, outs = capture(fns)
                for o in outs:
                    o.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                err = max(_err(pick(outs[0])[i], ref[i]) for i in range(2))
                if not err < 2e-2:
                    raise RuntimeError(f"relative error {err:.2e}")
                t = time_graph(graph, NL, timer, warmup=3, reps=args.reps)
                row = dict(model=name, provider=label, batch=B, keys=L, p50_us=round(t.p50, 2),
                           tb_s=round(nbytes / t.p50 / 1e6, 3), err=f"{err:.2e}", status="ok")
            except Exception as exc:  # one failing row must not stop the others
                row = dict(model=name, provider=label, batch=B, keys=L, p50_us="", tb_s="",
                           err="", status=f"{type(exc).__name__}: {str(exc)[:120]}")
            rows.append(row)
            _write(out_dir, rows)
            print(f"{name:10} {label:28} {row['p50_us']:>9} us {row['tb_s']:>7} TB/s "
                  f"{row['err']:>9} {row['status']}", flush=True)
            torch.cuda.empty_cache()

        def sdpa(q, kh, vh):
            qh = q.transpose(1, 2)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)

        run("sdpa-cudnn head-major", [lambda l=l: sdpa(*l) for l in layers],
            lambda o: o.transpose(1, 2)[[0, B - 1], 0])
        run("skattn dense head-major", [lambda l=l: skattn.attention(
            l[0], l[1].transpose(1, 2), l[2].transpose(1, 2)) for l in layers],
            lambda o: o[[0, B - 1], 0])
        # token-major copies of every layer; the head-major ones are dropped after the dense rows
        tok = [(q, kh.transpose(1, 2).contiguous(), vh.transpose(1, 2).contiguous())
               for q, kh, vh in layers]
        run("skattn dense token-major", [lambda l=l: skattn.attention(*l) for l in tok],
            lambda o: o[[0, B - 1], 0])
        del layers
        torch.cuda.empty_cache()
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        p = serving.serving_plan(batch=B, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=1,
                                 max_kv_len=L, dtype=torch.float16)
        wl = serving.work_list(p, cache_seqlens=lens)
        ws = [serving.workspace(p, device="cuda") for _ in tok]
        run(f"skattn ragged dense ({p.programs} programs)",
            [lambda l=l, w=w, p=p, wl=wl: serving.attention_with_kvcache(
                *l, cache_seqlens=lens, plan=p, workspace=w, work_list=wl)
             for l, w in zip(tok, ws)], lambda o: o[[0, B - 1], 0])
        for page, major in ((16, "token"), (64, "token"), (16, "head"), (64, "head")):
            pages = B * L // page
            paged = []
            for q, k, v in tok:
                perm = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
                table = perm.view(B, L // page).contiguous()
                # token-major pages [pages, page, Hkv, D]; head-major [pages, Hkv, page, D]
                # passed as their [pages, page, Hkv, D] view
                shape = (pages, page, hkv, d) if major == "token" else (pages, hkv, page, d)
                kp = torch.empty(shape, device="cuda", dtype=torch.float16)
                vp = torch.empty_like(kp)
                if major == "head":
                    kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)
                kp[table.long()] = k.view(B, L // page, page, hkv, d)
                vp[table.long()] = v.view(B, L // page, page, hkv, d)
                paged.append((q, kp, vp, table))
            for policy in ("auto", "split"):
                p = serving.serving_plan(batch=B, q_heads=hq, kv_heads=hkv, head_dim=d,
                                         page_size=page, max_pages=L // page, q_len=1,
                                         max_kv_len=L, dtype=torch.float16, policy=policy,
                                         head_pairs=False)
                wl = serving.work_list(p, cache_seqlens=lens)
                ws = [serving.workspace(p, device="cuda") for _ in paged]
                run(f"skattn paged {page} {major}-major {policy} ({p.programs})",
                    [lambda l=l, w=w, p=p, wl=wl: serving.attention_with_kvcache(
                        l[0], l[1], l[2], cache_seqlens=lens, block_table=l[3], plan=p,
                        workspace=w, work_list=wl) for l, w in zip(paged, ws)],
                    lambda o: o[[0, B - 1], 0])
            del paged, kp, vp
            torch.cuda.empty_cache()
        del tok
        torch.cuda.empty_cache()
    return 0


def _write(out_dir, rows):
    """The rows so far (a later row that kills the process leaves the earlier ones)."""
    with open(os.path.join(out_dir, "batch_layout.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
