"""Launch arithmetic for the host side of the kernels, in plain Python.

triton.cdiv and triton.next_power_of_2 are ConstexprFunctions (triton 3.6 and 3.9): each call unwraps
its arguments for use inside a kernel and costs ~2-3 us on the host, where this arithmetic costs
~0.1 us. A fused training layer computes ~30 grids and block sizes, so in a 22-layer step they were
~1.5 ms of host time (CPU timing of the wrappers with the launches stubbed).
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for n >= 1 (0 for 0, as triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
