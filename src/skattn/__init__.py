"""skattn: stream-K flash-attention kernels for LLM inference, in Triton."""
from skattn.alibi import alibi_slopes
from skattn.api import attention
from skattn.planner import Plan, plan

__all__ = ["Plan", "alibi_slopes", "attention", "plan"]
__version__ = "0.1.0"
