"""skattn under transformers' continuous batching (`model.generate_batch`, `transformers serve`).

Continuous batching packs the new tokens of many requests, prompt chunks and decode steps
alike, into one row of `[1, H, total_q, D]` and keeps K/V in its `PagedAttentionCache`. It
calls the attention implementation named `"paged|" + name`; `skattn.transformers.register`
registers this module's forward under that name beside the plain one. The forward writes the
new K/V into the cache and runs `skattn.attention_varlen` over the packed batch with
`cu_seq_lens_q` / `cu_seq_lens_k`: on full-attention layers reading the cache's pages in
place (a block table from transformers' read index), on window layers (a ring) and batches
that read no cache from the keys `cache.update` packs. Bottom-right causal per request, a
sliding window on the model's window layers, GPT-OSS's sinks and softcapping as in the plain
forward. No mask is built: transformers builds one only for `paged|eager` and `paged|sdpa`.
"""
from __future__ import annotations

import weakref

import torch

import skattn
from skattn import serving
from skattn.serving_launch import _pow2
from skattn.serving_mixed import decode_q_split
from skattn.serving_plan import SERVING_POLICIES


class PagedForward:
    """transformers' paged attention-function signature, bound to one planner policy."""

    def __init__(self, policy: str, q_split="auto"):
        self.policy, self.q_split = policy, q_split

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        return paged_attention_forward(module, query, key, value, attention_mask,
                                       policy=self.policy, q_split=self.q_split, **kwargs)


def paged_attention_forward(module, query, key, value, attention_mask, *, cache=None,
                            cu_seq_lens_q=None, cu_seq_lens_k=None, max_seqlen_q=None,
                            max_seqlen_k=None, read_index=None, write_index=None, dropout=0.0,
                            scaling=None, sliding_window=None, softcap=None, s_aux=None,
                            policy="auto", q_split="auto", **kwargs):
    """One attention call of a continuous batch.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (`layer_idx`, `sliding_window` and `training` are read).
    query : Tensor [1, Hq, total_q, D]
    key, value : Tensor [1, Hkv, total_q, D]
        The new tokens' K/V, written into `cache` here.
    attention_mask : None
        Continuous batching builds none for skattn; a mask is refused.
    cache : transformers' PagedAttentionCache
    cu_seq_lens_q : Tensor [B + 1] int32
    cu_seq_lens_k : Tensor [B + 1] int32, or a dict of them per layer type
    max_seqlen_q : int
    max_seqlen_k : int, or a dict of them per layer type
    read_index, write_index : lists of Tensor
        Where `cache.update` reads and writes each request's keys.
    dropout, scaling, sliding_window, softcap, s_aux
        As in `skattn.transformers.attention_forward`.
    policy : str
        A ragged-batch policy ("auto", "llamacpp", "llamacpp-before", "split").
    q_split : "auto" (default), int or None
        Plan the step in two halves (a `MixedPlan`) where its longest request has more new
        tokens than this ("auto": as many as fill a 16-row tile); None: one plan.

    Returns
    -------
    (Tensor [1, total_q, Hq, D], None)
    """
    if cache is None:
        raise ValueError("a paged skattn implementation was called without transformers' paged "
                         "cache: it serves continuous batching (generate_batch); use the plain "
                         "name for a standard forward")
    if attention_mask is not None:
        raise ValueError("skattn's paged forward takes no attention mask: continuous batching "
                         "runs bottom-right causal per request")
    if dropout and module.training:
        raise ValueError("skattn has no attention dropout: use model.eval() or dropout 0")
    if policy not in SERVING_POLICIES:
        raise ValueError(f"policy {policy!r} has no ragged-batch form; continuous batching "
                         f"takes one of {SERVING_POLICIES} (register(policy=...))")
    if kwargs.get("block_table") is not None:
        raise NotImplementedError("transformers passed a block table (its flash decode path, "
                                  "which expects the kernel to write the new K/V): skattn's "
                                  "paged forward builds its own from the read index")
    window = sliding_window or getattr(module, "sliding_window", None) or None
    layer_type = _layer_type(module, window)
    if layer_type == "full_attention":
        window = None
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
    # the bounds rounded up to powers of two: steps of similar lengths share one plan and the
    # kernels it compiled (the lengths themselves are read on the GPU from cu_q, cu_k)
    max_q, max_k = _pow2(int(max_seqlen_q)), _pow2(max(16, int(max_seqlen_k)))
    q = query[0].transpose(0, 1)  # [total_q, Hq, D], the last dim contiguous
    if q.stride(-1) != 1:
        q = q.contiguous()
    table = None
    pages = _pages(cache, module.layer_idx, read_index)
    if pages is not None:  # full attention over the cache's pages, read in place
        k, v, table = _paged(cache, module.layer_idx, key, value, write_index, pages, cu_k,
                             max_k)
    else:  # the requests' keys packed: `cache.update` writes the new K/V and reads them back
        k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=read_index, write_index=write_index)
    # zeros: rows past the last request (padding, under transformers' CUDA graphs) are not
    # written by skattn, and their values flow on into later layers and the cache
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    skattn.attention_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, block_table=table, causal=True, window=window,
        sinks=float_sinks(s_aux), softcap=float(softcap or 0.0),
        scale=scaling, out=out,
        plan=_plan(q, k, v, cu_q, max_q, max_k, window, policy, table, q_split,
                   int(max_seqlen_q)))
    return out[None], None


def _pages(cache, layer_idx, read_index):
    """The layer's read index where its keys can be read from the cache's pages in place: a
    full-attention layer (the cache reads each request's pages in order, whole pages then the
    last one's first rows), a batch that reads the cache, pages of a multiple of 16 rows. None
    otherwise (sliding-window layers read a ring; a batch of fresh prompts reads nothing,
    unless transformers pads it for a CUDA graph)."""
    windows = getattr(cache, "sliding_windows", None)
    if windows is None or windows[layer_idx] != 1 or cache.block_size % 16:
        return None
    group, _ = cache.layer_index_to_group_indices[layer_idx]
    read = read_index[group]
    return read if read.numel() else None


def _paged(cache, layer_idx, key, value, write_index, read, cu_k, max_k):
    """Write the new K/V into the cache's pages and describe the pages to skattn: K/V as
    [num_pages, page_size, Hkv, D] views, and a block table [B, pages] whose entry (b, j) is
    the page of request b's keys j x page_size .. (from its read index: row
    cu_k[b] + j x page_size lies on that page)."""
    group, in_group = cache.layer_index_to_group_indices[layer_idx]
    kc, vc = cache.key_cache[in_group], cache.value_cache[in_group]
    write = write_index[group]
    kc.index_copy_(0, write, key[0].transpose(0, 1))
    vc.index_copy_(0, write, value[0].transpose(0, 1))
    bs = cache.block_size
    shape = (-1, bs) + tuple(kc.shape[1:])
    return kc.view(shape), vc.view(shape), block_table(read, cu_k, max_k, bs)


# [(read, cu_k (weak references), versions and sizes, table)]: the last block table made
# outside a graph capture
_TABLE: list = []


def float_sinks(s_aux) -> torch.Tensor | None:
    """The model's sinks (`s_aux`) in float32, as skattn takes them. A 16-bit parameter's
    copy is made once and kept on it while its storage, dtype and version counter stay (a
    layer's cast each call is a launch in eager decode); the copy holds the storage it was
    made from, so no other tensor can take its address meanwhile. Not inside torch.compile,
    while a CUDA graph is captured (the graph casts on each replay, so it follows in-place
    updates of the weights), nor for inference tensors. Writes through `.data` bypass the
    version counter and are not seen."""
    if s_aux is None or s_aux.dtype == torch.float32:
        return s_aux
    if (torch.compiler.is_compiling() or s_aux.is_inference()
            or (s_aux.is_cuda and torch.cuda.is_current_stream_capturing())):
        return s_aux.float()
    key = (s_aux.data_ptr(), s_aux.dtype, s_aux._version, s_aux.shape, s_aux.device)
    kept = getattr(s_aux, "_skattn_f32", None)
    if kept is None or kept[0] != key:
        kept = (key, s_aux.detach().float(), s_aux.detach())
        s_aux._skattn_f32 = kept
    return kept[1]


def block_table(read, cu_k, max_k: int, bs: int) -> torch.Tensor:
    """The block table [B, pages] of a step: entry (b, j) is the page that holds row
    cu_k[b] + j x bs of the read index. Every full-attention layer of a step reads the same
    index, so the last table is kept and reused while `read` and `cu_k` are the same tensors,
    unmodified (their version counters: an in-place write makes a new table); not while a
    CUDA graph is captured (the graph must compute its own), nor for inference tensors
    (which have no version counter). The two tensors are held by weak references, so a
    finished step's buffers are freed with it."""
    keep = not (read.is_inference() or cu_k.is_inference()
                or (read.is_cuda and torch.cuda.is_current_stream_capturing()))
    key = (read._version, cu_k._version, max_k, bs) if keep else None
    last = _TABLE[0] if keep and _TABLE else None  # read once (threads)
    if last is not None:
        read_ref, cu_ref, last_key, table = last
        if read_ref() is read and cu_ref() is cu_k and last_key == key:
            return table
    pages = -(-max_k // bs)
    at = cu_k[:-1, None].long() + torch.arange(pages, device=read.device) * bs
    # entries past a request's own pages are never read by skattn (it reads keys < Lk only)
    table = (read[at.clamp_(max=read.numel() - 1)] // bs).to(torch.int32)
    if keep:
        _TABLE[:] = [(weakref.ref(read), weakref.ref(cu_k), key, table)]
    return table


def _layer_type(module, window) -> str:
    """The layer's type as transformers keys its per-type lengths: the config's `layer_types`
    where it has them (a model that passes `sliding_window` to every layer keeps full layers
    full), else by the window."""
    types = getattr(getattr(module, "config", None), "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if types is not None and idx is not None and idx < len(types) and types[idx] in (
            "full_attention", "sliding_attention"):
        return types[idx]
    return "sliding_attention" if window else "full_attention"


def _plan(q, k, v, cu_q, max_q, max_k, window, policy, table, q_split, longest):
    """The serving plan of this call's bounds and policy, from the serving functions' plan
    cache.
    q_split: two halves where the step's longest request (`longest`, before rounding) has
    more new tokens than the split and the halves' tiles differ
    (`serving_mixed.step_plan`)."""
    if q_split == "auto":
        q_split = decode_q_split(q.shape[1], k.shape[-2])
    split = int(q_split) if q_split is not None and longest > q_split else None
    layout = (dict(page_size=k.shape[1], max_pages=table.shape[1]) if table is not None
              else dict(total_k=k.shape[0]))
    return serving._cached_plan(q.device, q_split=split, batch=cu_q.numel() - 1,
                                max_q_len=max_q, total_q=q.shape[0], max_kv_len=max_k,
                                q_heads=q.shape[1], kv_heads=k.shape[-2], head_dim=q.shape[2],
                                head_dim_v=v.shape[-1], dtype=k.dtype, causal=True,
                                window=window, policy=policy, **layout)
