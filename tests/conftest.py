"""Test-session set-up that must happen before any test module imports Triton; and the test order.

Without CUDA, Triton kernels run on CPU tensors under Triton's interpreter; triton.jit decides
between compiled and interpreted kernels when a kernel module is imported, so the switch has to
be set here, before collection imports anything that imports ple_fast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist, one CPU thread per worker, for the worker and the runs it starts (torchrun,
# `python -m ple_fast.train`): two workers each running OpenMP on every core oversubscribe a 2-core
# machine, and OpenMP's spinning threads then slowed the embedded default run from 53 s alone to 367 s.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Whole training runs (a minute or more each on 2 CPU cores) go first: pytest-xdist hands tests out in
# collection order, and one of these started last ran alone at the end while the other worker idled.
WHOLE_RUNS = ("test_train.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in WHOLE_RUNS)      # stable: each group keeps its order
