"""RMSNorm with the residual add before it, in one kernel: the glue of a decode step's layers.

A Llama-family layer spends, per token, one residual add and one RMSNorm between its matmuls,
twice. Eager PyTorch runs the norm as ~7 kernels (upcast, pow, mean, add eps, rsqrt, mul, cast,
weight mul) and the add as one more; at decode batch sizes each of those is a few microseconds
of launch and tail for a few KB of work, so a 16-layer step pays ~250 of them. Here each
add + norm is one program per row.

Rounding follows the Hugging Face modules exactly (LlamaRMSNorm, Qwen2/Qwen3/Mistral alike):
the residual sum is rounded to the activations' dtype, the norm is computed in fp32 and rounded
to that dtype before the weight multiply, whose result is rounded once more. So the fused step
feeds the next matmul the same values the HF layer would.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels.logprob import _round_to, require_runnable


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, hidden, stride_x, stride_r, stride_o,
                         stride_s, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:     # HF: hidden = residual + hidden, in the activations' dtype
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
        x = _round_to(x, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = _round_to(xf * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, _round_to(w * normed, out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [R, H] (+ residual [R, H]) -> (rms_norm(sum) * weight, sum); sum is x itself without a residual.

    The normed output has dtype promote(x, weight), as `weight * normed.to(x.dtype)` has in HF."""
    require_runnable(x.device, "add_rms_norm", "use add_rms_norm_reference")
    rows, hidden = x.shape
    if weight.shape != (hidden,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)} and residual "
                         f"{None if residual is None else tuple(residual.shape)} do not match")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    out = torch.empty(rows, hidden, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = x if residual is None else torch.empty_like(x)
    res = x if residual is None else residual
    if rows:
        _add_rms_norm_kernel[(rows,)](x, res, weight, out, summed, hidden, x.stride(0), res.stride(0),
                                      out.stride(0), summed.stride(0), float(eps),
                                      HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
                                      num_warps=4 if hidden <= 4096 else 8)
    return out, summed


def add_rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
                           ) -> tuple[Tensor, Tensor]:
    """The HF modules' arithmetic, op by op: the add, then LlamaRMSNorm.forward."""
    summed = x if residual is None else residual + x
    f = summed.float()
    normed = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(summed.dtype), summed
