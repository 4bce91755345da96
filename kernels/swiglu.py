"""SiLU(gate) * up in one kernel: the MLP glue of a Llama-family layer (eager: two kernels and a
temporary). Rounds like HF's `act_fn(gate_proj(x)) * up_proj(x)`: SiLU in fp32 rounded to the
activations' dtype, then the product rounded again."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
import torch.nn.functional as F

from ple_fast.kernels.logprob import _round_to, require_runnable

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act = _round_to(g / (1.0 + tl.exp(-g)), gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, _round_to(act * u, out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    require_runnable(gate.device, "silu_mul", "use silu_mul_reference")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
