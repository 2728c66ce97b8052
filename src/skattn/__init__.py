"""skattn: stream-K flash-attention kernels for LLM inference, in Triton."""
from skattn.alibi import alibi_slopes
from skattn.api import attention
from skattn.planner import Plan, plan
from skattn.tuning import Tuning
from skattn.buffers import allocate as workspace

__all__ = ["Plan", "Tuning", "alibi_slopes", "attention", "plan", "workspace"]
__version__ = "0.1.0"
