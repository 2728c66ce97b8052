"""Attention implementations under test; optional ones are imported only when asked for."""
from __future__ import annotations


import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch

from skattn.bench.grid import SKATTN_VARIANTS, VARIANT_TUNING, Cell

# Default provider order; "skattn" expands to every variant in SKATTN_VARIANTS.
ALL_PROVIDERS = ("skattn", "sdpa-flash", "sdpa-cudnn", "sdpa-flash-nomask", "sdpa-cudnn-nomask", "flex",
                 "flashinfer", "flash-attn")
QUICK_PROVIDERS = ("skattn", "sdpa-flash", "sdpa-cudnn", "sdpa-cudnn-nomask")
# SDPA without a mask attends to every key: for n > 1 a lower bound on its causal time (with
# `causal_lower_right`, PyTorch runs cuDNN on a materialised mask, not at cuDNN's kernel speed).
# At n = 1 the causal window holds every key, so the two are the same computation.
NOMASK = ("sdpa-flash-nomask", "sdpa-cudnn-nomask")
NOMASK_NOTE = "no mask: a lower bound on the causal time for n > 1"
_OPTIONAL = {"flashinfer": "flashinfer", "flash-attn": "flash_attn"}


@dataclass(frozen=True)
class BuildOptions:
    """What a builder may need besides the inputs: the grid size for skattn's plans."""

    sms: int | None = None
    occupancy: int | None = None


@dataclass
class Built:
    """A ready-to-time callable returning out [B, n, Hq, D], and what it was planned as."""

    fn: Callable[[], torch.Tensor]
    policy: str = ""
    fixup: str = ""
    programs: int | None = None


@dataclass(frozen=True)
class Provider:
    """One row source of the CSV: `name` (and `variant` for skattn) with its builder.

    `causal` is what the output is checked against: False for the unmasked SDPA anchors,
    whose output is attention over every key.
    """

    name: str
    variant: str
    build: Callable[[Cell, torch.Tensor, torch.Tensor, torch.Tensor, BuildOptions], Built] = field(
        compare=False, repr=False)
    causal: bool = True

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name


# -- skattn
def _skattn_builder(policy: str, fixup: str | None, tuning: dict | None = None):
    workspaces = {}  # the last plan's workspace, shared by every layer built with that plan

    def build(cell, q, k, v, opts):
        import skattn

        p = skattn.plan(batch=q.shape[0], q_len=cell.n, kv_len=cell.depth, q_heads=cell.hq,
                        kv_heads=cell.hkv, head_dim=cell.d, dtype=k.dtype, causal=True,
                        sms=opts.sms, occupancy=opts.occupancy, policy=policy, fixup=fixup)
        if tuning:  # the variant's fields over the plan's own tuning (auto's prompt kernel kept)
            p = replace(p, tuning=replace(p.tuning, **tuning))
        if p not in workspaces:  # a caller's workspace, as under CUDA graphs (skattn.workspace)
            workspaces.clear()
            workspaces[p] = skattn.workspace(p, device=q.device)
        ws = workspaces[p]
        out = torch.empty(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)
        return Built(lambda: skattn.attention(q, k, v, causal=True, plan=p, out=out, workspace=ws),
                     policy, p.fixup, p.programs)

    return build


# -- PyTorch SDPA and FlexAttention (inputs in SDPA's own contiguous [B, H, L, D] layout)
def _bhld(*tensors):
    return [t.transpose(1, 2).contiguous() for t in tensors]


def _sdpa_builder(backend_name: str, masked: bool = True):
    def build(cell, q, k, v, opts):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        backend = getattr(SDPBackend, backend_name)
        qt, kt, vt = _bhld(q, k, v)
        # n = 1 sees every key: no mask needed
        mask = causal_lower_right(cell.n, cell.depth) if masked and cell.n > 1 else None

        def fn():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2)

        return Built(fn)

    return build


_FLEX_COMPILED = None


def _flex_compiled():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled graph per shape: raise the limits so no shape falls back to eager
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _build_flex(cell, q, k, v, opts):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = cell.depth - cell.n

    def bottom_right_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    block_mask = create_block_mask(bottom_right_causal, B=None, H=None, Q_LEN=cell.n,
                                   KV_LEN=cell.depth, device=q.device)
    compiled = _flex_compiled()
    qt, kt, vt = _bhld(q, k, v)
    return Built(lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True).transpose(1, 2))


# -- optional libraries
def _build_flashinfer(cell, q, k, v, opts):
    import flashinfer

    if q.shape[0] != 1:
        raise ValueError("the flashinfer provider times batch 1 only")
    q3, k3, v3 = q[0], k[0], v[0]
    if cell.n == 1:
        return Built(lambda: flashinfer.single_decode_with_kv_cache(q3[0], k3, v3,
                                                                    kv_layout="NHD")[None, None])
    # flashinfer aligns causal masks bottom-right when qo_len < kv_len
    return Built(lambda: flashinfer.single_prefill_with_kv_cache(q3, k3, v3, causal=True,
                                                                  kv_layout="NHD")[None])


def _build_flash_attn(cell, q, k, v, opts):
    from flash_attn import flash_attn_with_kvcache

    # causal=True is bottom-right aligned in flash-attn >= 2.1; the whole cache is visible
    return Built(lambda: flash_attn_with_kvcache(q, k, v, causal=True))


_BUILDERS = {"sdpa-flash": _sdpa_builder("FLASH_ATTENTION"),
             "sdpa-cudnn": _sdpa_builder("CUDNN_ATTENTION"),
             "sdpa-flash-nomask": _sdpa_builder("FLASH_ATTENTION", masked=False),
             "sdpa-cudnn-nomask": _sdpa_builder("CUDNN_ATTENTION", masked=False),
             "flex": _build_flex, "flashinfer": _build_flashinfer, "flash-attn": _build_flash_attn}


def importable(module: str) -> str | None:
    """None when `module` imports, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken binary raising anything
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def tuning_fields(texts: list[str], name: str) -> dict:
    """`skattn.Tuning` fields from "key=value" texts (integers, true/false or words), for a
    variant named `name` such as "auto/pdl_wait=false" (an A/B of a launch choice)."""
    import skattn

    known = {f.name for f in fields(skattn.Tuning)}
    out = {}
    for text in texts:
        key, eq, value = text.partition("=")
        if not eq or key not in known:
            raise ValueError(f"skattn variant {name!r}: {text!r} is not key=value of a "
                             f"skattn.Tuning field")
        out[key] = (int(value) if value.lstrip("-").isdigit()
                    else {"true": True, "false": False}.get(value.lower(), value))
    skattn.Tuning(**out)  # the field's own checks, before any GPU work
    return out


def resolve(names: tuple[str, ...]) -> tuple[list[Provider], list[str]]:
    """Providers for names like 'skattn', 'skattn:llamacpp', 'sdpa-flash', 'flex', and
    'skattn:auto/pdl_wait=false' (a variant with `skattn.Tuning` fields over its own).

    Parameters
    ----------
    names : tuple of str
        Provider names; "skattn" means every variant in `SKATTN_VARIANTS`.

    Returns
    -------
    (list of Provider, list of str)
        The providers to run, and one line per optional provider skipped because it does
        not import.
    """
    providers, skipped = [], []
    for name in names:
        base, _, variant = name.partition(":")
        if base == "skattn":
            variants = [variant] if variant else list(SKATTN_VARIANTS)
            for var in variants:
                known, *texts = var.split("/")
                if known not in SKATTN_VARIANTS:
                    raise ValueError(f"unknown skattn variant {known!r}; choose from "
                                     f"{list(SKATTN_VARIANTS)}")
                tuning = {**VARIANT_TUNING.get(known, {}), **tuning_fields(texts, var)}
                providers.append(Provider("skattn", var, _skattn_builder(
                    *SKATTN_VARIANTS[known], tuning or None)))
        elif base in _BUILDERS and not variant:
            why = importable(_OPTIONAL[base]) if base in _OPTIONAL else None
            if why:
                skipped.append(f"{base}: skipped, it does not import ({why})")
            else:
                providers.append(Provider(base, "", _BUILDERS[base], causal=base not in NOMASK))
        else:
            raise ValueError(f"unknown provider {name!r}; choose from {list(ALL_PROVIDERS)} "
                             f"or skattn:<variant>")
    return providers, skipped


# -- the float64 reference each provider is checked against
def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """GQA attention in float64, [B, n, Hq, D], bottom-right causal unless `causal=False`."""
    from skattn.reference import attention as ref_attention

    return ref_attention(q, k, v, causal=causal).to(torch.float64)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64 (inf when out has a NaN or a wrong shape)."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    diff = torch.linalg.vector_norm(out.to(torch.float64) - ref)
    err = (diff / torch.linalg.vector_norm(ref)).item()
    return err if err == err else float("inf")
