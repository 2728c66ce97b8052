"""skattn: stream-K flash-attention kernels for LLM inference, in Triton."""
from skattn.planner import Plan, plan

__all__ = ["Plan", "plan"]
__version__ = "0.1.0"
