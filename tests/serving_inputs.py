"""Ragged and paged test inputs, and the tolerance rule per sequence (tests of skattn.serving)."""
import torch

from skattn import reference
from skattn.reference_serving import gather_keys
from tolerance import rel_err, torch_same_dtype


def randn(shape, g, dtype, device):
    return torch.randn(*shape, generator=g, device=device).to(dtype)


def paged_cache(lens, *, page_size, hkv, d, dv=None, dtype=torch.float16, seed=0, device="cpu",
                extra_pages=2, share=0, max_pages=None):
    """k/v caches [num_pages, page_size, hkv, d] in a random page order and a block table.

    share > 0: sequences 1.. reuse sequence 0's first `share` pages (a shared prefix, read
    only). Unused block-table entries hold an id far out of range: the kernels must not
    read them.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    dv = d if dv is None else dv
    need = [-(-n // page_size) for n in lens]
    max_pages = max_pages or max(1, max(need))
    num_pages = sum(need) + extra_pages
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(lens), max_pages), 10**6, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(need):
        for j in range(n):
            if b > 0 and j < min(share, need[0]):
                table[b, j] = table[0, j]
            else:
                table[b, j] = perm[nxt]
                nxt += 1
    k = randn((num_pages, page_size, hkv, d), g, dtype, device)
    v = randn((num_pages, page_size, hkv, dv), g, dtype, device)
    return k, v, table.to(device)


def varlen_inputs(lq, lk, *, hq, hkv, d, dv=None, dtype=torch.float16, seed=0, device="cpu",
                  pad_q=0):
    """Packed q [sum lq + pad_q, hq, d], k/v [sum lk, hkv, d] and cu_seqlens (int32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dv = d if dv is None else dv
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=device)
    q = randn((sum(lq) + pad_q, hq, d), g, dtype, device)
    k = randn((max(1, sum(lk)), hkv, d), g, dtype, device)
    v = randn((max(1, sum(lk)), hkv, dv), g, dtype, device)
    return q, k, v, cu_q, cu_k


def sequences_kvcache(q, k_cache, v_cache, lens, block_table=None):
    """Per sequence (q [1, Lq, Hq, D], k [1, Lk, Hkv, D], v) for the tolerance rule."""
    out = []
    for b, n in enumerate(lens):
        if n:
            out.append((q[b:b + 1], gather_keys(k_cache, n, b=b, block_table=block_table)[None],
                        gather_keys(v_cache, n, b=b, block_table=block_table)[None]))
    return out


def sequences_varlen(q, k, v, cu_q, cu_k, block_table=None):
    out = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        n = ck[b + 1] - ck[b]
        if n and cq[b + 1] > cq[b]:
            out.append((q[cq[b]:cq[b + 1]][None],
                        gather_keys(k, n, b=b, start=ck[b], block_table=block_table)[None],
                        gather_keys(v, n, b=b, start=ck[b], block_table=block_table)[None]))
    return out


def ragged_bound(seqs, *, causal=True, k_factor=3.0, floor=2e-3) -> float:
    """k x (PyTorch's own error in the inputs' dtype over all sequences) + floor: the rule of
    tests/tolerance.py, with each sequence run by PyTorch on its own keys."""
    pts, refs = [], []
    for q, k, v in seqs:
        refs.append(reference.attention(q, k, v, causal=causal).flatten())
        pts.append(torch_same_dtype(q, k, v, causal=causal).double().flatten())
    if not refs:
        return floor
    ref = torch.cat(refs)
    if not torch.isfinite(ref).all() or ref.norm() == 0:
        return floor
    return k_factor * rel_err(torch.cat(pts), ref) + floor
