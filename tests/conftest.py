"""Test-session set-up that must happen before any test module imports Triton; and the test order.

Without CUDA, Triton kernels run on CPU tensors under Triton's interpreter; triton.jit decides
between compiled and interpreted kernels when a kernel module is imported, so the switch has to
be set here, before collection imports anything that imports ple_fast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Whole training runs (a minute or more each on 2 CPU cores) go first: pytest-xdist hands tests out in
# collection order, and one of these started last ran alone at the end while the other worker idled.
WHOLE_RUNS = ("test_train.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in WHOLE_RUNS)      # stable: each group keeps its order
