"""What llama.cpp's block forms share (`skattn.quant.Q8_0`, `skattn.quant.Q4_0`): packed values
and one f16 scale per 32 values, kept apart and laid out alike; the input rules, the
tensor-like facts, views of the leading dimensions and llama.cpp's interleaved bytes."""
from __future__ import annotations

import itertools

import torch

BLOCK_VALUES = 32  # values per block (llama.cpp's QK8_0 = QK4_0)
SLICE_VALUES = 1 << 24  # values a packer works on at once: its float32 temporaries stay ~64 MB each


class BlockCache:
    """Base of a frozen dataclass with fields `values` and `scales`.

    A subclass sets `VALUES_DTYPE`, `BLOCK_BYTES` (bytes of values a block: 32 for 8-bit, 16
    for 4-bit) and `VALUES_KIND`, `BLOCK_NOTE`, `SCALES_NOTE` (the words of its errors)."""

    VALUES_DTYPE: torch.dtype
    BLOCK_BYTES: int
    WORD_LOADS = False  # the kernels read the values as 32-bit words: 4-byte aligned
    VALUES_KIND: str
    BLOCK_NOTE = ""
    SCALES_NOTE = ""
    format: str

    def __post_init__(self):
        x, s, name, per = self.values, self.scales, type(self).__name__, self.BLOCK_BYTES
        if not isinstance(x, torch.Tensor) or x.dtype != self.VALUES_DTYPE:
            raise TypeError(f"{name} values must be {self.VALUES_KIND}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float16:
            raise TypeError(f"{name} scales must be a float16 tensor, got "
                            f"{getattr(s, 'dtype', type(s).__name__)}")
        if x.dim() < 1 or x.shape[-1] % per or x.shape[-1] == 0:
            raise ValueError(f"{self.format} needs a head size that is a multiple of "
                             f"{BLOCK_VALUES}{self.BLOCK_NOTE}, got values of shape {tuple(x.shape)}")
        want = (*x.shape[:-1], x.shape[-1] // per)
        if tuple(s.shape) != want:
            raise ValueError(f"{name} scales must have shape {list(want)} (one per {BLOCK_VALUES} "
                             f"values{self.SCALES_NOTE}), got {list(s.shape)}")
        if s.device != x.device:
            raise ValueError(f"{name} scales are on {s.device}, values on {x.device}")
        if x.numel() == 0:  # nothing to read (an empty sequence's keys): any strides
            return
        # (a dimension of one element has any stride: head size 32 gives one scale a row,
        # whose stride an indexing result leaves as it likes)
        if x.stride(-1) != 1 or (s.shape[-1] > 1 and s.stride(-1) != 1):
            raise ValueError(f"{name} values and scales must be contiguous in their last dimension")
        if (self.WORD_LOADS and type(x) is torch.Tensor and not torch.compiler.is_compiling()
                and x.data_ptr() % 4):  # (traced and fake tensors have no address)
            raise ValueError(f"{name} values must start at an address that is a multiple of 4 "
                             f"bytes (the kernels read them as 32-bit words), got "
                             f"{x.data_ptr():#x}")
        for i in range(x.dim() - 1):
            if x.shape[i] > 1 and x.stride(i) != per * s.stride(i):
                raise ValueError(f"{name} scales must be laid out like the values (stride {i}: "
                                 f"values {x.stride(i)}, scales {s.stride(i)}, want values = "
                                 f"{per} x scales): take both as views of caches of the same "
                                 f"shape")

    # -- tensor-like facts
    @property
    def shape(self) -> torch.Size:
        """The logical shape `[B, Lk, Hkv, D]`."""
        v = self.values.shape
        return torch.Size((*v[:-1], v[-1] * BLOCK_VALUES // self.BLOCK_BYTES))

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def requires_grad(self) -> bool:
        return False

    def dim(self) -> int:
        return self.values.dim()

    def __getitem__(self, index):
        """The same view of values and scales: an index of the leading dimensions only
        (`cache[:, :L]`, `cache[b]`); the head dimension stays whole."""
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None for i in idx) or len(idx) >= self.values.dim():
            raise IndexError(f"index a {type(self).__name__} by its leading dimensions only (no "
                             f"Ellipsis, None or head-dimension index)")
        return type(self)(self.values[idx], self.scales[idx])

    def to(self, device):
        return type(self)(self.values.to(device), self.scales.to(device))

    # -- llama.cpp's bytes
    def to_ggml(self) -> torch.Tensor:
        """llama.cpp's bytes: uint8 `[..., D / 32 * (2 + BLOCK_BYTES)]`, each block
        `{f16 d; values}`."""
        blocks = torch.cat([self.scales.contiguous().view(torch.uint8).unflatten(-1, (-1, 2)),
                            self.values.contiguous().view(torch.uint8).unflatten(
                                -1, (-1, self.BLOCK_BYTES))], dim=-1)
        return blocks.flatten(-2)

    @classmethod
    def from_ggml(cls, data: torch.Tensor):
        """The inverse of `to_ggml`: uint8 `[..., nb * (2 + BLOCK_BYTES)]` of llama.cpp's blocks."""
        size = cls.BLOCK_BYTES + 2
        if data.dtype != torch.uint8 or data.shape[-1] % size:
            raise ValueError(f"expected uint8 [..., blocks x {size}] of block_{cls.format}, got "
                             f"{data.dtype} {tuple(data.shape)}")
        blocks = data.contiguous().unflatten(-1, (-1, size))
        scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
        values = blocks[..., 2:].contiguous().view(cls.VALUES_DTYPE).flatten(-2)
        return cls(values, scales)


def slices(x: torch.Tensor, limit: int | None = None):
    """Index tuples that cut x along its leading dimensions (never the last) into slices of
    at most `limit` values (default `SLICE_VALUES`) where one row allows, keeping every
    dimension."""
    limit = limit or SLICE_VALUES
    if x.dim() <= 1:  # nothing but the last dimension: one slice, the whole
        yield (slice(None),) * x.dim()
        return
    shape = tuple(x.shape)
    axis = len(shape) - 2  # cut along this axis: the outermost whose slices of one fit
    inner = shape[-1]
    while axis > 0 and inner * shape[axis] <= limit:
        inner *= shape[axis]
        axis -= 1
    step = max(1, limit // max(1, inner))
    for head in itertools.product(*(range(n) for n in shape[:axis])):
        for i in range(0, shape[axis], step):
            yield tuple(slice(j, j + 1) for j in head) + (slice(i, i + step),)


def in_slices(fn, x: torch.Tensor, *more: torch.Tensor, limit: int | None = None):
    """`fn(x, *more)` computed on slices of the leading dimensions (`slices`) and written
    into outputs made once, so that the temporaries of `fn` stay bounded whatever the size of
    a cache. The tensors share their leading dimensions; `fn` returns one tensor or a tuple,
    each with x's leading dimensions (all but the last)."""
    limit = limit or SLICE_VALUES
    if x.numel() <= limit or x.dim() <= 1:
        return fn(x, *more)
    outs = single = None
    for idx in slices(x, limit):
        part = fn(x[idx], *(m[idx] for m in more))
        single = not isinstance(part, tuple)
        parts = (part,) if single else part
        if outs is None:
            outs = tuple(p.new_empty(x.shape[:len(idx)] + p.shape[len(idx):]) for p in parts)
        for o, p in zip(outs, parts):
            o[idx] = p
    return outs[0] if single else outs


def packed_in_slices(pack, x, form: str):
    """`pack(blocks)` over float32 blocks `[..., D / 32, 32]` of the packer input x (`form`
    "q8_0" or "q4_0"), checked first, then packed a bounded slice at a time (`in_slices`)."""
    float_blocks(x, form, convert=False)
    return in_slices(lambda part: pack(float_blocks(part, form)), x)


def float_blocks(x, form: str, convert: bool = True) -> torch.Tensor:
    """The input of a packer (`form` "q8_0" or "q4_0") checked and cut into float32 blocks
    `[..., D / 32, 32]` (only checked when not `convert`)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16,
                                                            torch.float32):
        raise TypeError(f"{form} quantizes a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] % BLOCK_VALUES or x.shape[-1] == 0:
        raise ValueError(f"{form} needs a last dimension that is a multiple of {BLOCK_VALUES}, "
                         f"got shape {tuple(x.shape)}")
    return x.float().unflatten(-1, (-1, BLOCK_VALUES)) if convert else x


def inverse_scale(d: torch.Tensor) -> torch.Tensor:
    """`1 / d` in float32 where the block scale d is not 0, else 0 (an all-zero block), as
    llama.cpp's packers compute `id = d ? 1.0f / d : 0.0f`."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)


def scaled_blocks(values: torch.Tensor, scales: torch.Tensor, block: int,
                  dtype=torch.float16, decode=None) -> torch.Tensor:
    """Integer `values` [..., D] times their block's scale ([..., D / block]), as `dtype`:
    computed in float32 (float64 for it), where small integers times f16 are exact, so
    one rounding to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32

    def scaled(values, scales):
        if decode is not None:  # packed values to integers, a slice at a time
            values = decode(values)
        x = values.to(work).unflatten(-1, (-1, block))
        return (x * scales.to(work)[..., None]).flatten(-2).to(dtype)
    return in_slices(scaled, values, scales)
