"""Test-session set-up that must happen before any test module imports Triton.

Without CUDA, Triton kernels run on CPU tensors under Triton's interpreter; triton.jit decides
between compiled and interpreted kernels when a kernel module is imported, so the switch has to
be set here, before collection imports anything that imports ple_fast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
