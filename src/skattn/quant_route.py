"""Which route a call over FP8 or q8_0 K/V takes (`Tuning.quant_route`): its kernels read
the quantized K/V ("native"), or one pass writes K and V in q's dtype and the plan the same
call gets with 16-bit K/V runs ("dequant", `Plan.dequant`).

The pass reads the K/V once and writes a 16-bit copy (about copy bandwidth: 53 µs for FP8
llama-8b at L = 32768 on an H200), a cost that grows with L alone, while the attention's
grows with L x the query rows a KV head serves. For prompt chunks the 16-bit plan runs the
Hopper prompt kernel, which reads 16-bit K/V only, and the native route the base kernel:
"auto" takes the dequant route where the rows a KV head serves (q_len x Hq / Hkv) reach
`ROUTE_ROWS`, Lk reaches `ROUTE_KEYS` and the prompt kernel takes the 16-bit plan
(measurements: docs/quant.md). The rule does not ask the GPU: measured on an H200 only.
"""
from __future__ import annotations

from dataclasses import replace

from skattn import prefill_launch
from skattn.policy import canonical_policy
from skattn.tuning import Tuning

ROUTE_ROWS = 512  # q_len x (Hq / Hkv) from which "auto" dequantizes first
ROUTE_KEYS = 8192  # and Lk: the shortest measured (shorter caches stay native)
ROUTED = ("float8_e4m3fn", "q8_0")  # q4_0 stays native
# what the 16-bit plan keeps of the call: its shape, GPU, policy, mask, fastdiv, cost model;
# the caller's programs, fixup and tile sizes belong to the quantized plan
_KEEP = ("batch", "q_len", "kv_len", "q_heads", "kv_heads", "head_dim", "head_dim_v",
         "causal", "window", "sms", "occupancy", "policy", "smem_limit", "has_mask",
         "fastdiv", "cost_model")
_FORCED = ("programs", "fixup", "block_m", "block_n", "num_warps", "num_stages")


def _may_pay(given: dict) -> bool:
    """Whether "auto" asks the 16-bit plan at all: enough query rows a KV head and keys, the
    auto policy and no launch shape forced by the caller (arguments the planner refuses: no,
    and it says why)."""
    try:
        return (given["q_len"] * given["q_heads"] >= ROUTE_ROWS * given["kv_heads"]
                and given["kv_len"] >= ROUTE_KEYS
                and all(given[name] is None for name in _FORCED)
                and canonical_policy(given["policy"]) == "auto")
    except (TypeError, ValueError):
        return False


def routed(plan_fn, given: dict, kv_format: str | None):
    """The plan of the call `given` (the arguments of `skattn.plan`) with its `dequant` plan
    set where the route is "dequant", else None (the caller plans it as usual)."""
    tuning = given["tuning"] or Tuning()
    route = tuning.quant_route
    if kv_format not in ROUTED or route == "native" or (route == "auto" and not _may_pay(given)):
        return None
    own = replace(tuning, quant_route="auto")
    try:
        inner = plan_fn(**{k: given[k] for k in _KEEP}, tuning=None if own == Tuning() else own)
    except ValueError:
        if route == "auto":
            return None  # no 16-bit plan of this call: it stays native
        raise
    if route == "auto" and prefill_launch.refusal(inner) is not None:
        return None  # no prompt kernel to route to
    native = plan_fn(**dict(given, tuning=replace(tuning, quant_route="native")))
    return replace(native, tuning=tuning, dequant=inner)
