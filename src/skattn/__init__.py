"""skattn: stream-K flash-attention kernels for LLM inference, in Triton."""
from skattn.alibi import alibi_slopes
from skattn.api import attention
from skattn.planner import Plan, plan
from skattn.tuning import Tuning
from skattn.buffers import allocate as workspace
from skattn.serving import (MixedPlan, ServingPlan, attention_varlen, attention_with_kvcache,
                            serving_plan)

__all__ = ["Plan", "Tuning", "alibi_slopes", "attention", "plan", "workspace",
           "ServingPlan", "MixedPlan", "attention_varlen", "attention_with_kvcache", "serving_plan"]
__version__ = "0.1.0"
