"""Launch choices that leave the decomposition unchanged: a plan field, set per plan."""
from __future__ import annotations

from dataclasses import dataclass

PDL_TRIGGERS = ("start", "end")
PREFILL_KERNELS = ("base", "tma", "ws")
QUANT_ROUTES = ("auto", "native", "dequant")
TILE_ORDERS = ("longest", "index")


@dataclass(frozen=True)
class Tuning:
    """How a plan's kernels are launched; the defaults are the measured best (PERF.md).

    Pass one to `skattn.plan(..., tuning=Tuning(...))`. None of these fields changes the
    decomposition (tiles, work list, programs, fixup kind), only how it is launched, except
    `quant_route`, which may hand the call to the plan of its 16-bit K/V (`Plan.dequant`).

    Attributes
    ----------
    pdl : bool
        Launch the separate fixup with programmatic dependent launch (sm_90+) where tiles
        have many pieces: it starts while the main kernel runs and waits on the GPU.
    pdl_trigger : str
        Where the main kernel lets the fixup start, "end" (after its last store;
        0.4-2.8 us faster than "start" in every decode cell measured) or "start".
    pdl_wait : bool
        Launch the main kernel itself with programmatic dependent launch (sm_90+), so that
        its programs are scheduled while the previous kernel on the stream ends, and make
        each wait (`griddepcontrol.wait`: every earlier grid complete, its memory visible)
        before its first load; serving plans' main kernel so waits on its work list. On by
        default: 0.5-0.9 us a call faster in 26 of 27 decode cells on the graph timer (the
        27th 0.15 us slower), serving mixes unchanged (PERF.md, "The main kernel launched
        by PDL").
    merge_loads_first : bool
        The separate fixups wait for all loads of a merge step at once (one
        memory latency a step instead of two: fixup 2.1-4.1 -> 1.4-2.4 us a call).
    fixup_dv, fixup_rows : int
        Dv columns and tile rows per separate-fixup program (tiles with
        many pieces; tiles with few pieces get one program a tile).
    merge_elements : int
        f32 values of partials one separate-fixup merge step loads per thread.
    fused_merge_elements : int
        The same in the fused merge, whose registers are free after the KV
        loop (16 pieces a step: qwen3moe n=2 28.5 vs 32.5 us with 4).
    fused_dv : int or None
        Dv columns per fused merge step (None: all of Dv; 32-column steps were
        1.1-1.2x slower at decode).
    prefill : str
        The kernel of prompt-chunk tiles (128 or 64 rows) on Hopper: "base" (the
        stream-K kernel every plan runs) or "tma" (`kernels/prefill.py`: K/V through tensor
        descriptors, docs/prefill.md) or "ws" (`kernels/prefill_ws.py`, Gluon: a TMA loader
        warp and two consumer warpgroups; 128-row tiles, no fused fixup, not under the
        interpreter). Calls these cannot take (a mask, ALiBi, softcap, a window, head sizes
        other than 64/128 or Dk != Dv, unaligned K/V, a GPU before sm_90) run the base kernel.
    tile_order : str
        Plans of one whole tile a program whose tiles grow with their token block (causal
        prompts): "longest" runs the longest tiles first (program p takes token block
        ntiles_x - 1 - p // groups of group p % groups), so the shortest end the call;
        "index" runs tile p on program p (each group's token blocks short to long).
    fp8_v_pairs : bool
        FP8 K/V, tiles under 64 rows (decode): read V as 16-bit pairs of values, so that the
        MMAs take it through the 16-bit transposing shared-memory load as they take f16 V,
        instead of gathering its bytes one at a time (`kernels/quant.fp8_pairs`).
    prefill_pingpong : bool
        "ws" only: its two consumer warpgroups take turns to issue their MMAs, so one's
        softmax runs under the other's (FlashAttention 3's ping-pong).
    prefill_sum_mma : bool or None
        "ws" only: each row's sum of the probabilities taken by a warpgroup MMA of P with a
        block of ones beside P·V (the tensor cores are idle half of the time at head size
        64), instead of additions in registers. None: at head size 64.
    q8_0_v_blocks : bool or None
        q8_0 K/V, tiles under 64 rows: read V as 16-bit pairs too and apply its scales to p,
        one dot per 32-column block of V (`kernels/quant.q8_0_pair_blocks`), instead of
        multiplying every V value by its scale and staging V in f16. None: at V head size 128,
        and at 64 in two-warp tiles (`config.q8_0_narrow_decode`): 1.00-1.13x and 1.03-1.05x
        on an H200; 0.92-0.96x at 64 with 128-key blocks and four warps; other sizes not
        measured.
    quant_route : str
        FP8 or q8_0 K/V: "native" reads them in the plan's kernels; "dequant" writes them as
        q's dtype first (one pass, `kernels/dequant.py`, into a new 16-bit copy of the K/V
        read) and runs the plan's `dequant`, the 16-bit plan of the same call (for prompt
        chunks, the Hopper prompt kernel, which reads 16-bit K/V only); "auto" takes
        "dequant" where `skattn.quant_route` finds it pays (prompt chunks of at least 512
        query rows a KV head over 8192 keys or more, policy "auto", no launch shape given,
        and a 16-bit plan that the prompt kernel takes), "native" otherwise.
    prefill_device_desc : bool
        "tma" only: make the K/V descriptors in the kernel, one per tile,
        instead of on the host once per call (their 128 bytes a program come from torch,
        or from the allocator given to `triton.set_allocator`).
    """

    pdl: bool = True
    pdl_trigger: str = "end"
    pdl_wait: bool = True
    merge_loads_first: bool = True
    fixup_dv: int = 32
    fixup_rows: int = 16
    merge_elements: int = 64
    fused_merge_elements: int = 256
    fused_dv: int | None = None
    prefill: str = "base"
    prefill_device_desc: bool = False
    prefill_pingpong: bool = False
    prefill_sum_mma: bool | None = None
    fp8_v_pairs: bool = True
    q8_0_v_blocks: bool | None = None
    quant_route: str = "auto"
    tile_order: str = "longest"

    def __post_init__(self):
        if self.prefill not in PREFILL_KERNELS:
            raise ValueError(f"prefill must be one of {PREFILL_KERNELS}, got {self.prefill!r}")
        if self.quant_route not in QUANT_ROUTES:
            raise ValueError(f"quant_route must be one of {QUANT_ROUTES}, got {self.quant_route!r}")
        if self.tile_order not in TILE_ORDERS:
            raise ValueError(f"tile_order must be one of {TILE_ORDERS}, got {self.tile_order!r}")
        if self.pdl_trigger not in PDL_TRIGGERS:
            raise ValueError(f"pdl_trigger must be one of {PDL_TRIGGERS}, got {self.pdl_trigger!r}")
        for name in ("fixup_dv", "fixup_rows", "merge_elements", "fused_merge_elements"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value!r}")
        if self.fused_dv is not None and (self.fused_dv < 16 or self.fused_dv & (self.fused_dv - 1)):
            raise ValueError(f"fused_dv must be None or a power of two >= 16, got {self.fused_dv!r}")
