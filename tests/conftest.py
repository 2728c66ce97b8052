"""Test setup: without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates skattn's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
