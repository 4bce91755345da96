"""SiLU(gate) * up in one kernel each way: the MLP glue of a Llama-family layer (eager: two kernels
forward, more backward, and a temporary each). Rounds like HF's `act_fn(gate_proj(x)) * up_proj(x)`:
SiLU in fp32 rounded to the activations' dtype, then the product rounded again; the backward
recomputes SiLU from the gate in fp32 instead of saving it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ple_fast.kernels._common import INTERPRETED, cdiv, require_runnable, round_to


BLOCK = 1024 if not INTERPRETED else 65536       # the interpreter pays per program, not per lane
# A GPU build's tl.exp is ex2.approx after a rounded multiply by log2(e), and its fp32 division is
# div.full (approximate): on an H200 fp32 SiLU landed more than 4 units in the last place from
# torch's (bench/results/2026-11-28-h200-session2, run A). libdevice's expf and a correctly rounded
# division keep it within them (run B; the interpreter has no libdevice, and numpy's exp and
# division are already correctly rounded there).
PRECISE = not INTERPRETED


@triton.jit
def _over_one_plus_exp_neg(x, g, PRECISE: tl.constexpr):
    """x / (1 + exp(-g)) in fp32: SiLU for x = g (as torch computes it), the sigmoid for x = 1."""
    if PRECISE:
        return tl.math.div_rn(x, 1.0 + libdevice.exp(-g))
    return x / (1.0 + tl.exp(-g))


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, width, row_stride, BLOCK: tl.constexpr, PRECISE: tl.constexpr,
                     STRIDED: tl.constexpr):
    """out (contiguous, n elements) = silu(gate) * up; STRIDED: gate / up rows of `width` elements lie
    `row_stride` apart (the halves of a merged [gate; up] projection's output), else contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    src = offs
    if STRIDED:
        src = (offs // width) * row_stride + offs % width
    g = tl.load(gate_ptr + src, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + src, mask=ok, other=0.0).to(tl.float32)
    act = round_to(_over_one_plus_exp_neg(g, g, PRECISE), gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, round_to(act * u, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_backward_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr,
                              PRECISE: tl.constexpr):
    """d up = dy silu(g); d gate = dy u silu'(g), silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = _over_one_plus_exp_neg(1.0, g, PRECISE)
    tl.store(dup_ptr + offs, (dy * g * sig).to(dup_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=ok)


def silu_mul_forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, without autograd (the Function below, the one-node training layer and the decode
    step of ple_fast.fused_layers). gate / up: contiguous, or [rows, width] with unit column stride and
    one row stride (the two halves of a merged gate / up matmul's output, read in place); the output
    is contiguous."""
    n = gate.numel()
    strided = not (gate.is_contiguous() and up.is_contiguous())
    if strided and (gate.dim() != 2 or gate.shape != up.shape or gate.stride(1) != 1 or up.stride(1) != 1
                    or gate.stride(0) != up.stride(0)):
        gate, up, strided = gate.contiguous(), up.contiguous(), False
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if n:
        width = gate.shape[-1] if gate.dim() else 1
        _silu_mul_kernel[(cdiv(n, BLOCK),)](gate, up, out, n, width, gate.stride(0) if strided else width,
                                            BLOCK=BLOCK, PRECISE=PRECISE, STRIDED=strided, num_warps=4)
    return out


def silu_mul_backward(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) of silu(gate) * up."""
    grad_out = grad_out.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _silu_mul_backward_kernel[(cdiv(n, BLOCK),)](grad_out, gate, up, dgate, dup, n, BLOCK=BLOCK,
                                                     PRECISE=PRECISE, num_warps=4)
    return dgate, dup


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return silu_mul_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        return silu_mul_backward(grad_out, *ctx.saved_tensors)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for two tensors of one shape and dtype; differentiable."""
    require_runnable(gate.device, "silu_mul", "use silu_mul_reference")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    return _SiluMul.apply(gate.contiguous(), up.contiguous())


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
