"""Inputs and providers of `skattn bench --serving`: ragged decode batches in a paged cache.

A cell is a model shape x a length mix (`serving_mixes`) x a page size. Each provider
returns `Built(step, layer, canonical)`: `step` runs once per decode step (skattn's work
list), `layer` is one layer's call (its output), `canonical` turns that output into
[total_q, Hq, D] for the check against float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from skattn.bench.serving_mixes import Mix

PROVIDERS = ("skattn:auto", "skattn:one-plan", "skattn:split", "sdpa-padded", "flex-paged",
             "flash-attn")
# skattn `auto` over the same batch's K/V quantized (opt-in: --providers): FP8 e4m3 with
# per-KV-head scales, llama.cpp's q8_0 and q4_0 blocks (`quantize_batch`)
QUANT_PROVIDERS = ("skattn-fp8:auto", "skattn-q8_0:auto", "skattn-q4_0:auto")
# skattn:one-plan: `auto` in one plan (serving_plan(q_split=None)); skattn:auto plans a
# varlen batch in two halves (q_split="auto", docs/serving.md "Mixed batches"); varlen mixes
# only


@dataclass
class Batch:
    """One ragged batch on the GPU: packed q, a paged K/V cache in random page order."""

    mix: Mix
    hq: int
    hkv: int
    d: int
    page_size: int
    q: torch.Tensor          # [total_q, Hq, D]
    k: torch.Tensor          # [num_pages, page_size, Hkv, D]
    v: torch.Tensor
    table: torch.Tensor      # [B, max_pages] int32
    lens: torch.Tensor       # [B] int32 keys
    cu_q: torch.Tensor       # [B + 1] int32
    cu_k: torch.Tensor
    k_scale: torch.Tensor | None = None  # fp8 K/V: f32 [Hkv] / [1] (`quantize_batch`)
    v_scale: torch.Tensor | None = None

    @property
    def max_pages(self) -> int:
        return self.table.shape[1]

    def kv_bytes(self) -> int:
        """K and V bytes the batch can see (what an ideal kernel reads once): a block
        cache's values and scales."""
        row = sum(x.shape[-1] * x.element_size() for x in
                  ((self.k.values, self.k.scales) if hasattr(self.k, "scales") else (self.k,)))
        return sum(self.mix.kv_lens) * self.hkv * 2 * row


def make_batch(mix: Mix, hq: int, hkv: int, d: int, page_size: int, seed: int = 0,
               device="cuda") -> Batch:
    g = torch.Generator(device=device).manual_seed(seed)
    need = [-(-n // page_size) for n in mix.kv_lens]
    num_pages = sum(need)
    perm = torch.randperm(num_pages, device=device, generator=g).to(torch.int32)
    table = torch.zeros(mix.batch, max(need), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    shape = (num_pages, page_size, hkv, d)
    k = torch.randn(*shape, generator=g, device=device, dtype=torch.float16)
    v = torch.randn(*shape, generator=g, device=device, dtype=torch.float16)
    q = torch.randn(sum(mix.q_lens), hq, d, generator=g, device=device, dtype=torch.float16)

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                            device=device)

    return Batch(mix, hq, hkv, d, page_size, q, k, v, table,
                 torch.tensor(mix.kv_lens, dtype=torch.int32, device=device),
                 cu(mix.q_lens), cu(mix.kv_lens))


def dense_keys(batch: Batch, cache: torch.Tensor, b: int) -> torch.Tensor:
    """Keys of sequence b gathered from the pages: [Lk_b, Hkv, D]."""
    n = batch.mix.kv_lens[b]
    pos = torch.arange(n, device=cache.device)
    return cache[batch.table[b].long()[pos // batch.page_size], pos % batch.page_size]


@dataclass
class Built:
    layer: Callable[[], torch.Tensor]
    canonical: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[], object] | None = None
    note: str = ""
    # quantized K/V: the batch the provider reads (its bytes) and the same batch with K/V
    # dequantized to f16 (what its outputs are checked against)
    read: Batch | None = None
    dequantized: Batch | None = None


def quantize_batch(batch: Batch, form: str) -> tuple[Batch, Batch]:
    """(the batch with K/V in `form`, the same with those K/V dequantized to f16): "fp8"
    (e4m3, f32 scales per KV head), "q8_0" or "q4_0" (`skattn.quant`'s blocks)."""
    from dataclasses import replace

    from skattn import quant

    if form == "fp8":
        pairs = [quant.fp8(x.reshape(1, -1, batch.hkv, batch.d), per_head=True)
                 for x in (batch.k, batch.v)]
        (k8, ks), (v8, vs) = ((x.reshape(batch.k.shape), s) for x, s in pairs)
        deq = [(x.float() * s[:, None]).half() for x, s in ((k8, ks), (v8, vs))]
        return replace(batch, k=k8, v=v8, k_scale=ks, v_scale=vs), replace(batch, k=deq[0],
                                                                            v=deq[1])
    if form not in ("q8_0", "q4_0"):
        raise ValueError(f"quantized form must be fp8, q8_0 or q4_0, got {form!r}")
    kq, vq = (getattr(quant, form)(x) for x in (batch.k, batch.v))
    return (replace(batch, k=kq, v=vq),
            replace(batch, k=kq.dequantize(torch.float16), v=vq.dequantize(torch.float16)))


def _same(out):
    return out


# -- skattn
def build_skattn(batch: Batch, policy: str, overrides: dict | None = None) -> Built:
    """`overrides`: `serving_plan` keywords (sms=, occupancy=, programs=, block_n=, ...), and
    `Tuning`'s switches as integers: pdl_wait=0 for `Tuning(pdl_wait=False)` (the main kernel
    launched without PDL), fp8_v_pairs=0 (FP8 V read as bytes), q8_0_v_blocks=1 (q8_0 V as
    int8 pairs with its scales on p); prefill=ws (`Tuning(prefill="ws")`)."""
    from skattn import Tuning, quant, serving

    m = batch.mix
    overrides = dict(overrides or {})
    tuning = {k: bool(overrides.pop(k)) for k in ("pdl_wait", "fp8_v_pairs", "q8_0_v_blocks")
              if k in overrides}
    if "prefill" in overrides:  # prefill=ws: whole prompt tiles on the Hopper kernel
        tuning["prefill"] = overrides.pop("prefill")
    if tuning:
        overrides["tuning"] = Tuning(**tuning)
    if "head_pairs" in overrides:  # head_pairs=0: one KV head a row (serving_plan)
        overrides["head_pairs"] = bool(overrides["head_pairs"])
    common = dict(batch=m.batch, q_heads=batch.hq, kv_heads=batch.hkv, head_dim=batch.d,
                  page_size=batch.page_size, max_pages=batch.max_pages, policy=policy,
                  dtype=quant.kv_dtype(batch.k), **overrides)
    scales = dict(k_scale=batch.k_scale, v_scale=batch.v_scale)
    wl_args = {}
    if m.decode:
        p = serving.serving_plan(q_len=1, max_kv_len=batch.max_pages * batch.page_size, **common)
        q4 = batch.q.view(m.batch, 1, batch.hq, batch.d)
        out = torch.empty_like(q4)
        wl_args = dict(cache_seqlens=batch.lens)
    else:
        p = serving.serving_plan(max_q_len=m.max_q, total_q=batch.q.shape[0],
                                 max_kv_len=max(m.kv_lens), **common)
        out = torch.empty_like(batch.q)
        wl_args = dict(cu_seqlens_q=batch.cu_q, cu_seqlens_k=batch.cu_k)
    ws = serving.workspace(p, device=batch.q.device)
    wl = torch.empty(p.work_list_words, dtype=torch.int32, device=batch.q.device)

    def step():
        return serving.work_list(p, out=wl, **wl_args)

    if m.decode:
        def layer():
            return serving.attention_with_kvcache(q4, batch.k, batch.v, cache_seqlens=batch.lens,
                                                  block_table=batch.table, plan=p, out=out,
                                                  workspace=ws, work_list=wl, **scales)
    else:
        def layer():
            return serving.attention_varlen(batch.q, batch.k, batch.v, batch.cu_q, batch.cu_k,
                                            m.max_q, max(m.kv_lens), block_table=batch.table,
                                            plan=p, out=out, workspace=ws, work_list=wl,
                                            **scales)
    note = "; ".join(f"{name}grid {h.programs}, fixup {h.fixup}"
                     + (f", split {h.split}" if h.split > 1 else "")
                     for name, h in zip(("short: ", "long: ") if hasattr(p, "halves") else ("",),
                                        getattr(p, "halves", (p,))))
    return Built(layer, lambda o: o.reshape(-1, batch.hq, batch.d), step, note)


# -- PyTorch SDPA on a padded dense batch (masked to each sequence's keys)
def build_sdpa(batch: Batch) -> Built:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = batch.mix
    B, lq, lk = m.batch, max(m.q_lens), max(m.kv_lens)
    kd = torch.zeros(B, batch.hkv, lk, batch.d, device="cuda", dtype=batch.k.dtype)
    vd = torch.zeros_like(kd)
    qd = torch.zeros(B, batch.hq, lq, batch.d, device="cuda", dtype=batch.q.dtype)
    mask = torch.zeros(B, 1, lq, lk, device="cuda", dtype=torch.bool)
    rows = []
    cq = batch.cu_q.tolist()
    for b in range(B):
        n, nq = m.kv_lens[b], m.q_lens[b]
        kd[b, :, :n] = dense_keys(batch, batch.k, b).transpose(0, 1)
        vd[b, :, :n] = dense_keys(batch, batch.v, b).transpose(0, 1)
        qd[b, :, :nq] = batch.q[cq[b]:cq[b] + nq].transpose(0, 1)
        i = torch.arange(nq, device="cuda")[:, None]
        mask[b, 0, :nq, :n] = torch.arange(n, device="cuda")[None, :] <= n - nq + i
        rows += [(b, i) for i in range(nq)]
    bi = torch.tensor([r[0] for r in rows], device="cuda")
    ii = torch.tensor([r[1] for r in rows], device="cuda")
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.FLASH_ATTENTION]

    def layer():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)

    return Built(layer, lambda o: o[bi, :, ii], note=f"padded to {lk} keys")


# -- FlexAttention over the page pool, the mask found through the page table
def build_flex(batch: Batch) -> Built:
    from torch.nn.attention.flex_attention import create_block_mask

    from skattn.bench.providers import _flex_compiled

    m, ps = batch.mix, batch.page_size
    num_pages = batch.k.shape[0]
    owner = torch.full((num_pages,), -1, dtype=torch.int32, device="cuda")
    logical = torch.zeros(num_pages, dtype=torch.int32, device="cuda")
    for b, n in enumerate(m.kv_lens):
        pages = batch.table[b, :-(-n // ps)].long()
        owner[pages] = b
        logical[pages] = torch.arange(pages.numel(), dtype=torch.int32, device="cuda")
    seq = torch.repeat_interleave(torch.arange(m.batch, device="cuda", dtype=torch.int32),
                                  torch.tensor(m.q_lens, device="cuda"))
    qpos = torch.cat([torch.arange(n, device="cuda", dtype=torch.int32) + (kl - n)
                      for n, kl in zip(m.q_lens, m.kv_lens)])

    def visible(b, h, q_idx, kv_idx):
        page = kv_idx // ps
        return (owner[page] == seq[q_idx]) & (logical[page] * ps + kv_idx % ps <= qpos[q_idx])

    total_q = batch.q.shape[0]
    block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=total_q,
                                   KV_LEN=num_pages * ps, device="cuda")
    qf = batch.q.transpose(0, 1)[None].contiguous()
    kf = batch.k.view(num_pages * ps, batch.hkv, batch.d).transpose(0, 1)[None].contiguous()
    vf = batch.v.view(num_pages * ps, batch.hkv, batch.d).transpose(0, 1)[None].contiguous()
    compiled = _flex_compiled()
    note = "page pool + block mask from the page table"
    try:  # its decoding kernel (short q) can find no configuration: then its general kernel
        compiled(qf, kf, vf, block_mask=block_mask, enable_gqa=True)
        options = None
    except Exception as exc:
        options = {"FORCE_USE_FLEX_ATTENTION": True}
        note += f"; general kernel (decoding kernel: {type(exc).__name__})"
    return Built(lambda: compiled(qf, kf, vf, block_mask=block_mask, enable_gqa=True,
                                  kernel_options=options),
                 lambda o: o[0].transpose(0, 1), note=note)


# -- flash-attn's kvcache kernel on the padded dense cache (its paged form needs pages of 256)
def build_flash_attn(batch: Batch) -> Built:
    from flash_attn import flash_attn_with_kvcache

    m = batch.mix
    if not m.decode:
        raise ValueError("flash-attn provider: decode mixes only")
    lk = max(m.kv_lens)
    kd = torch.zeros(m.batch, lk, batch.hkv, batch.d, device="cuda", dtype=batch.k.dtype)
    vd = torch.zeros_like(kd)
    for b in range(m.batch):
        kd[b, :m.kv_lens[b]] = dense_keys(batch, batch.k, b)
        vd[b, :m.kv_lens[b]] = dense_keys(batch, batch.v, b)
    q4 = batch.q.view(m.batch, 1, batch.hq, batch.d)
    return Built(lambda: flash_attn_with_kvcache(q4, kd, vd, cache_seqlens=batch.lens, causal=True),
                 lambda o: o.reshape(-1, batch.hq, batch.d), note="dense padded cache")


def skattn_variant(name: str) -> tuple[str, dict]:
    """`skattn:POLICY` or `skattn:POLICY/key=int,...` -> (policy, serving_plan overrides);
    `fixup=KIND` takes a fixup's name (`fixup=fused`: the merge inside the main kernel),
    `prefill=KERNEL` `Tuning.prefill`'s (`prefill=ws`: whole prompt tiles on the Hopper
    kernel)."""
    policy, _, extra = name.split(":", 1)[1].partition("/")
    overrides = {}
    for item in filter(None, extra.split(",")):
        key, sep, value = item.partition("=")
        if key.strip() in ("fixup", "prefill") and sep:
            overrides[key.strip()] = value.strip()
            continue
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{name!r}: a plan override is key=integer, got {item!r}")
        if key.strip() in ("policy", "batch", "q_heads", "kv_heads", "head_dim", "page_size",
                           "max_pages", "q_len", "max_q_len", "total_q", "max_kv_len"):
            raise ValueError(f"{name!r}: {key.strip()} comes from the batch and policy, not an override")
        overrides[key.strip()] = int(value)
    return policy, overrides


def build(name: str, batch: Batch) -> Built:
    if name.startswith("skattn-"):  # skattn-FORM:POLICY: over the batch's K/V quantized
        form, _, variant = name[len("skattn-"):].partition(":")
        read, dequantized = quantize_batch(batch, form)
        built = build_skattn(read, *skattn_variant(f"skattn:{variant}"))
        built.read, built.dequantized = read, dequantized
        return built
    if name == "skattn:one-plan":
        return build_skattn(batch, "auto", {"q_split": None})
    if name.startswith("skattn:"):
        return build_skattn(batch, *skattn_variant(name))
    return {"sdpa-padded": build_sdpa, "flex-paged": build_flex,
            "flash-attn": build_flash_attn}[name](batch)


def reference_rows(batch: Batch, seqs: list[int]) -> dict[int, torch.Tensor]:
    """Float64 outputs [Lq_b, Hq, D] of the sequences `seqs` (per sequence, gathered keys)."""
    from skattn.reference_serving import _one

    out = {}
    cq = batch.cu_q.tolist()
    for b in seqs:
        q = batch.q[cq[b]:cq[b + 1]]
        o, _ = _one(q, dense_keys(batch, batch.k, b), dense_keys(batch, batch.v, b),
                    return_lse=True, causal=True)
        out[b] = o
    return out
