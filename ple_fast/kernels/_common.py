"""What every kernel module shares: whether Triton runs interpreted, the check that says how to run a
kernel on CPU tensors, two device helpers (rounding, tanh), and the host side's launch arithmetic.

The launch arithmetic is plain Python on purpose: triton.cdiv and triton.next_power_of_2 are
ConstexprFunctions (triton 3.6 and 3.9), each call ~2-3 us on the host against ~0.1 us here, and a
fused training layer computes ~30 grids and block sizes (~1.5 ms of host time in a 22-layer step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Kernels decorated under TRITON_INTERPRET=1 run on CPU tensors (slowly); compiled ones need CUDA.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
_BF16_RTNE_BY_HAND = tl.constexpr(INTERPRETED)


def require_runnable(device: torch.device, caller: str, otherwise: str) -> None:
    """CPU tensors need the interpreter: say how to get it, or what to call instead."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"{caller} got CPU tensors but Triton is not in interpreter mode: set "
                           f"TRITON_INTERPRET=1 before importing triton, or {otherwise}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting: tf32 tensor cores only if torch allows tf32
    for matmuls, else exact fp32 (FMA, slow). For half inputs the setting is moot."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even as a GPU (and torch) rounds. The interpreter's own
    fp32 -> bf16 cast truncates, so there the rounding is done on the bits first."""
    if _BF16_RTNE_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh without libdevice (the interpreter has none): stable for both signs, exp never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for n >= 1 (0 for 0, as triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
