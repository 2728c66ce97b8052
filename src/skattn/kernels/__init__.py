"""Triton kernels: @triton.jit code only, no host logic."""
