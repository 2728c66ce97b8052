"""Mixed batches in two halves (docs/serving.md, "Mixed batches: two halves"): a varlen
batch planned as two ServingPlans, decode tiles for the sequences of few query tokens,
prompt tiles for the others; each half's work list keeps only its own sequences."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from skattn.serving_launch import INT32_MAX
from skattn.serving_plan import ServingPlan, serving_plan

__all__ = ["MixedPlan", "mixed_plan", "step_plan", "decode_q_split"]

# what a MixedPlan answers as a ServingPlan does: the batch's bounds, the long half's (the
# halves differ in max_q_len, and where the short half reads KV heads in pairs in kv_heads,
# head_dim, head_dim_v and gqa_ratio: the kernel's, ServingPlan.head_pairs)
BOUNDS = ("max_q_len", "total_q", "max_kv_len", "q_heads", "kv_heads", "head_dim",
          "head_dim_v", "dtype", "causal", "window", "layout", "page_size", "max_pages",
          "total_k", "policy", "sms", "gqa_ratio", "key_capacity")

# q_split="auto": the short half's tiles hold at most this many rows. A decode row in a
# 64-row tile costs the ragged kernel 1.5x its time in a 16-row tile (PERF.md, "Serving
# batches"), so the short half takes what fits the smallest decode tile.
DECODE_ROWS = 16


def decode_q_split(q_heads: int, kv_heads: int) -> int:
    """The most query tokens of a sequence that a MixedPlan's short half runs: as many as
    fill a decode tile of DECODE_ROWS rows with the query heads of one KV head."""
    return max(1, DECODE_ROWS // max(1, q_heads // max(1, kv_heads)))


@dataclass(frozen=True)
class MixedPlan:
    """A varlen batch planned in two halves (docs/serving.md, "Mixed batches").

    `short` runs the sequences of at most `q_split` query tokens with decode tiles, `long`
    the others with prompt tiles; each builds its own work list on the GPU from the same
    lengths (the other half's sequences count as empty), so a CUDA graph still serves every
    step. Both write one output. Made by `skattn.serving_plan(..., q_split=...)`.

    Attributes
    ----------
    short, long : ServingPlan
        The halves: sequences of 1 .. q_split query tokens, and of more.
    q_split : int
        The most query tokens of a sequence in the short half.
    work_list_words : int
        int32 words of both work lists (`skattn.serving.work_list(plan)` builds them).
    max_q_len, total_q, max_kv_len, q_heads, ... : the batch's bounds (`BOUNDS`), as a
        ServingPlan has them (the long half's: the short half's max_q_len is q_split). What
        differs by half (geometry, programs, fixup, workspace) is read from `short`, `long`.
    """

    short: ServingPlan
    long: ServingPlan

    def __getattr__(self, name):  # only for names the class does not define
        if name in BOUNDS:
            return getattr(self.long, name)
        raise AttributeError(f"MixedPlan has no attribute {name!r}: a plan in two halves; "
                             f"read a half's from .short or .long (ServingPlans)")

    @property
    def q_split(self) -> int:
        return self.short.max_q_len

    @property
    def halves(self) -> tuple[ServingPlan, ServingPlan]:
        return (self.short, self.long)

    @property
    def varlen(self) -> bool:
        return True

    @property
    def q_len(self) -> None:
        return None

    @property
    def batch(self) -> int:
        return self.long.batch

    @property
    def work_list_words(self) -> int:
        """int32 words of both work lists: the short half's at 0, the long half's at
        `work_list_offsets[1]` (16-byte aligned)."""
        return self.work_list_offsets[1] + self.long.work_list_words

    @property
    def work_list_offsets(self) -> tuple[int, int]:
        return 0, -(-self.short.work_list_words // 4) * 4

    def describe(self) -> str:
        return "\n".join([f"mixed batch: sequences of <= {self.q_split} query tokens in the "
                          f"short half, the others in the long half",
                          "short half: " + self.short.describe(),
                          "long half: " + self.long.describe()])


def mixed_plan(q_split, args: dict) -> ServingPlan | MixedPlan:
    """`serving_plan(**args, q_split=q_split)`: a MixedPlan, or one plan where "auto" finds
    nothing to split (`step_plan`); a q_split that would give both halves the same tiles
    is refused."""
    if args["q_len"] is not None:
        if q_split == "auto":  # one query count: nothing to split
            return _one(args)
        raise ValueError("q_split splits a varlen batch (max_q_len, total_q); attention_with_kvcache "
                         "plans have one q_len")
    max_q_len = args["max_q_len"]
    if q_split == "auto":
        return step_plan(q_split, args)
    if not isinstance(q_split, bool) and isinstance(q_split, numbers.Integral):
        q_split = int(q_split)
    if (not isinstance(q_split, int) or isinstance(q_split, bool) or q_split < 1
            or (max_q_len is not None and q_split >= max_q_len)):
        raise ValueError(f"q_split must be 'auto', None (one plan) or an integer in [1, max_q_len) = [1, "
                         f"{max_q_len}), got {q_split!r}")
    plan = _halves(q_split, args)
    if not isinstance(plan, MixedPlan):
        raise ValueError(f"q_split={q_split} gives both halves tiles of {plan.geometry.block_m} "
                         f"rows at max_q_len={max_q_len}, so a second half would only cost "
                         f"time; split where the halves' tiles differ (a smaller q_split or "
                         f"a larger max_q_len)")
    return plan


def step_plan(q_split, args: dict) -> ServingPlan | MixedPlan:
    """The plan of one step of a serving loop with a fixed `q_split` ("auto" or a token
    count): two halves where they help, else one plan — where no sequence can have more
    than q_split query tokens (`args["max_q_len"]`), or where both halves would get the same
    tiles. A loop's steps move between these cases; `mixed_plan` refuses the last one."""
    split = decode_q_split(args["q_heads"], args["kv_heads"]) if q_split == "auto" else int(q_split)
    if args.get("max_q_len") is None or args["max_q_len"] <= split:
        return _one(args)
    return _halves(split, args)


def _one(args: dict) -> ServingPlan:
    """One plan of these bounds (q_split=None)."""
    return serving_plan(**dict(args, q_split=None))


def _halves(q_split: int, args: dict) -> ServingPlan | MixedPlan:
    """A MixedPlan split at q_split, or the long half's plan alone where the short half's
    tiles would be no smaller."""
    short = _one(dict(args, max_q_len=q_split))
    # head_pairs=True asks for pairs where rows allow them: the short half (it raises if
    # it cannot); a long half's tiles hold more than 16 rows and never pair
    long = _one(dict(args, head_pairs=None) if args.get("head_pairs") else args)
    if short.geometry.block_m >= long.geometry.block_m:
        return long
    return MixedPlan(replace(short, q_range=(0, q_split)),
                     replace(long, q_range=(q_split, INT32_MAX)))
