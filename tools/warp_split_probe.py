"""A decode KV loop whose warps each take their own keys, against the usual 16-row tile.

    PYTHONPATH=src python3 tools/warp_split_probe.py [D] [f16|fp8]   # D 128 (ratio 4) or 64 (8)

`dec2` is the usual decode tile: 16 query rows of one KV head, a [16, D] x [D, BN] dot
whose keys Triton spreads over the warps, so every KV block's row maxima and sums cross the
warps (shared memory and barriers) and p is staged in shared memory for the P V dot. `dec3`
gives each of W warps its own BN / W keys of a block as a 3-D tile ([W, 16, D] x
[W, D, BN / W], Triton's batched MMA puts one batch on each warp): every warp keeps its own
online softmax and accumulator, merged once after the loop, and the loop holds no barrier
but the pipeline's. Each program reads one contiguous key range of one head (L = 32768,
8 KV heads; P programs), writes its unnormalised partial, and the host merges the partials in
float64 against a float64 reference (err). Timed as one CUDA graph over six K/V copies (no
L2 reuse), p50 of 20 replays. Prints one line per configuration and writes
$OUT/warp_split.csv (default benchmarks/results/latest/probe).
"""
import argparse
import csv
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _program(Q, Lc, ratio, CH, D: tl.constexpr, M: tl.constexpr):
    """Program p's KV head g, first key lo, row and column ranges and its 16-row query tile."""
    p = tl.program_id(0)
    g = p // CH
    lo = (p % CH) * Lc
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    q = tl.load(Q + (g * ratio + r[:, None]) * D + d[None, :], mask=r[:, None] < ratio, other=0.0)
    return p, g, lo, r, d, q


@triton.jit
def dec2(Q, K, V, OA, OM, OL, Lc, stride_n, ratio, qk_scale, CH,
         D: tl.constexpr, BN: tl.constexpr, M: tl.constexpr):
    p, g, lo, r, d, q = _program(Q, Lc, ratio, CH, D, M)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for blk in range(lo, lo + Lc, BN):
        n = blk + tl.arange(0, BN)
        k = tl.load(K + n[:, None] * stride_n + g * D + d[None, :])
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pp = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pp, 1)
        v = tl.load(V + n[:, None] * stride_n + g * D + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(pp.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    tl.store(OA + (p * M + r[:, None]) * D + d[None, :], acc)
    tl.store(OM + p * M + r, m_i)
    tl.store(OL + p * M + r, l_i)


@triton.jit
def dec3(Q, K, V, OA, OM, OL, Lc, stride_n, ratio, qk_scale, CH,
         D: tl.constexpr, BN: tl.constexpr, M: tl.constexpr, W: tl.constexpr):
    p, g, lo, r, d, q = _program(Q, Lc, ratio, CH, D, M)
    q3 = tl.broadcast_to(q[None, :, :], [W, M, D])
    NW: tl.constexpr = BN // W
    w = tl.arange(0, W)
    j = tl.arange(0, NW)
    m_i = tl.full([W, M], float("-inf"), tl.float32)
    l_i = tl.zeros([W, M], tl.float32)
    acc = tl.zeros([W, M, D], tl.float32)
    for blk in range(lo, lo + Lc, BN):
        n = blk + w[:, None] * NW + j[None, :]
        k = tl.load(K + n[:, :, None] * stride_n + g * D + d[None, None, :])
        s = tl.dot(q3, tl.permute(k.to(q.dtype), (0, 2, 1))) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 2))
        pp = tl.exp2(s - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pp, 2)
        v = tl.load(V + n[:, :, None] * stride_n + g * D + d[None, None, :])
        acc = acc * alpha[:, :, None] + tl.dot(pp.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    mm = tl.max(m_i, 0)
    a = tl.exp2(m_i - mm[None, :])
    l_t = tl.sum(l_i * a, 0)
    acc_t = tl.sum(acc * a[:, :, None], 0)
    tl.store(OA + (p * M + r[:, None]) * D + d[None, :], acc_t)
    tl.store(OM + p * M + r, mm)
    tl.store(OL + p * M + r, l_t)


def merge(oa, om, ol, P, CH, Hkv, ratio, M):
    oa = oa.view(Hkv, CH, M, -1)[:, :, :ratio].double()
    om = om.view(Hkv, CH, M)[:, :, :ratio].double()
    ol = ol.view(Hkv, CH, M)[:, :, :ratio].double()
    mm = om.max(1, keepdim=True).values
    a = torch.exp2(om - mm)
    return (oa * a[..., None]).sum(1) / (ol * a).sum(1)[..., None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("D", type=int, nargs="?", default=128, choices=(64, 128),
                    help="head size (GQA ratio 4 at 128, 8 at 64)")
    ap.add_argument("fmt", nargs="?", default="f16", choices=("f16", "fp8"))
    args = ap.parse_args(argv)
    D, fmt = args.D, args.fmt
    ratio = 4 if D == 128 else 8
    Hkv, L, M = 8, 32768, 16
    dt = torch.float8_e4m3fn if fmt == "fp8" else torch.float16
    copies = 6
    torch.manual_seed(0)
    Ks = [(torch.randn(L, Hkv, D, device="cuda") * 1).to(dt) for _ in range(copies)]
    Vs = [torch.randn(L, Hkv, D, device="cuda").to(dt) for _ in range(copies)]
    q = torch.randn(Hkv * ratio, D, device="cuda", dtype=torch.float16)
    scale = D ** -0.5 * 1.4426950408889634
    kf, vf = Ks[0].double(), Vs[0].double()
    s = torch.einsum("hrd,lhd->hrl", q.double().view(Hkv, ratio, D), kf) * (D ** -0.5)
    ref = torch.einsum("hrl,lhd->hrd", torch.softmax(s, -1), vf)
    bytes_ = 2 * L * Hkv * D * Ks[0].element_size()
    print(f"D={D} ratio={ratio} {fmt} L={L} bytes={bytes_/1e6:.1f}MB floor={bytes_/4.29e6:.2f}us")
    rows = []
    for P in (128, 256, 512):
        CH = P // Hkv
        Lc = L // CH
        for name, W, BN, warps, stages in (("2d", 1, 64, 4, 3), ("2d", 1, 128, 4, 3),
                                           ("3d", 4, 64, 4, 3), ("3d", 4, 128, 4, 3),
                                           ("3d", 4, 256, 4, 2), ("3d", 2, 64, 2, 3),
                                           ("3d", 8, 128, 8, 3)):
            if Lc % BN:
                continue
            oa = torch.empty(P * M, D, device="cuda")
            om = torch.empty(P * M, device="cuda")
            ol = torch.empty(P * M, device="cuda")

            def call(i=0):
                if W == 1:
                    dec2[(P,)](q, Ks[i], Vs[i], oa, om, ol, Lc, Hkv * D, ratio, scale, CH, D=D,
                               BN=BN, M=M, num_warps=warps, num_stages=stages)
                else:
                    dec3[(P,)](q, Ks[i], Vs[i], oa, om, ol, Lc, Hkv * D, ratio, scale, CH, D=D,
                               BN=BN, M=M, W=W, num_warps=warps, num_stages=stages)
            try:
                call(0)
                torch.cuda.synchronize()
            except Exception as e:
                print(name, W, BN, warps, "FAIL", str(e)[:200]); continue
            out = merge(oa, om, ol, P, CH, Hkv, ratio, M)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(copies):
                    call(i)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            ts = []
            for _ in range(20):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(); g.replay(); e1.record(); e1.synchronize()
                ts.append(e0.elapsed_time(e1) * 1000 / copies)
            ts.sort()
            t = ts[len(ts) // 2]
            print(f"P={P:4d} {name} W={W} BN={BN:3d} warps={warps} stages={stages} "
                  f"{t:7.2f} us  {bytes_/t/1e6:5.2f} TB/s err={err:.1e}", flush=True)
            rows.append(dict(head_dim=D, ratio=ratio, kv=fmt, depth=L, programs=P, tile=name,
                             warp_groups=W, block_n=BN, num_warps=warps, num_stages=stages,
                             p50_us=round(t, 2), tb_s=round(bytes_ / t / 1e6, 2),
                             err=f"{err:.1e}"))
    out = os.environ.get("OUT", "benchmarks/results/latest/probe")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "warp_split.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
