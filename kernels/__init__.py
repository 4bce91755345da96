"""Triton kernels of ple_fast (installed as ple_fast.kernels)."""
