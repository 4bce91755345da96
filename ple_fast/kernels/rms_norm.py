"""RMSNorm with the residual add before it, in one kernel each way: the glue of Llama-family layers.

A layer spends, per token, one residual add and one RMSNorm between its matmuls, twice. Eager
PyTorch runs the norm as ~7 kernels forward (upcast, pow, mean, add eps, rsqrt, mul, cast, weight
mul) and more backward, and the add as one more; at decode batch sizes each is a few microseconds
of launch for a few KB of work, and in training each re-reads the activations. Here the add +
norm is one program per row forward, and one pass over the rows backward (dW accumulated in fp32
per program, then summed).

Rounding follows the Hugging Face modules exactly (LlamaRMSNorm, Qwen2/Qwen3/Mistral alike): the
residual sum has the promoted dtype of its two terms (fp32 stream + bf16 branch under autocast),
the norm is computed in fp32 and rounded to the sum's dtype before the weight multiply, whose
result is rounded once more. The backward treats those roundings as identities, as autograd does,
and computes in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, next_power_of_2, require_runnable, round_to



@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, rows, hidden, stride_x, stride_r, stride_o,
                         stride_s, eps, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    ok = (row < rows) & (cols < hidden)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:     # HF: hidden = residual + hidden, in the promoted dtype
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = round_to(x, sum_ptr.dtype.element_ty).to(tl.float32)
        tl.store(sum_ptr + row * stride_s + cols, x.to(sum_ptr.dtype.element_ty), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hidden + eps)
    normed = round_to(x * rstd[:, None], sum_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(w * normed, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, dx_ptr, dw_ptr, rows, hidden, rows_per_program,
                              stride_dy, stride_ds, stride_s, stride_dx, eps, HAS_DS: tl.constexpr,
                              BLOCK: tl.constexpr):
    """Rows [pid * rows_per_program, ...): dx = rstd (g - x̂ mean(g x̂)) (+ ds, the gradient reaching the
    sum through the residual stream), g = dy w; this program's fp32 dW partial sum(dy round(x̂))."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    first = pid * rows_per_program
    for r in range(first, tl.minimum(first + rows_per_program, rows)):
        row = tl.cast(r, tl.int64)
        s = tl.load(s_ptr + row * stride_s + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / hidden + eps)
        x_hat = s * rstd
        dw += dy * round_to(x_hat, s_ptr.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / hidden))
        if HAS_DS:
            dx += tl.load(ds_ptr + row * stride_ds + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + pid.to(tl.int64) * hidden + cols, dw, mask=ok)


INTERPRETED_ROWS = 32        # rows per program under the interpreter, which pays per program, not per lane


def _warps(hidden: int) -> int:
    return 4 if hidden <= 4096 else 8


def add_rms_norm_forward(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, sum): the forward launch, without autograd (the Function below, and the one-node training
    layer of ple_fast.fused_layers). x, residual: [R, H] with unit-stride rows."""
    rows, hidden = x.shape
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(rows, hidden, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    summed = x if residual is None else torch.empty(rows, hidden, dtype=sum_dtype, device=x.device)
    res = x if residual is None else residual
    if rows:
        per_program = INTERPRETED_ROWS if INTERPRETED else 1
        _add_rms_norm_kernel[(cdiv(rows, per_program),)](
            x, res, weight, out, summed, rows, hidden, x.stride(0), res.stride(0), out.stride(0), summed.stride(0),
            float(eps), HAS_RESIDUAL=residual is not None, ROWS=per_program, BLOCK=next_power_of_2(hidden),
            num_warps=_warps(hidden))
    return out, summed


def add_rms_norm_backward(grad_out: Tensor, grad_sum: Tensor | None, summed: Tensor, weight: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    """(d sum, d weight) given the normed output's gradient and the sum's own (None: unused)."""
    rows, hidden = summed.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    if grad_sum is not None and grad_sum.stride(-1) != 1:
        grad_sum = grad_sum.contiguous()
    dx = torch.empty_like(summed)
    if INTERPRETED or summed.device.type != "cuda":
        programs = cdiv(rows, 256)                     # the interpreter pays per program
    else:                                              # a few programs per SM: dW partials stay few
        programs = 4 * torch.cuda.get_device_properties(summed.device).multi_processor_count
    programs = max(1, min(programs, rows))
    rows_per_program = cdiv(rows, programs)
    programs = cdiv(rows, rows_per_program) if rows else 1
    # every program writes its row of partial sums (no rows: no program runs, the sum is 0)
    dw_partial = (torch.empty if rows else torch.zeros)(programs, hidden, dtype=torch.float32, device=summed.device)
    ds = summed if grad_sum is None else grad_sum
    if rows:
        _rms_norm_backward_kernel[(programs,)](grad_out, ds, summed, weight, dx, dw_partial, rows, hidden,
                                               rows_per_program, grad_out.stride(0), ds.stride(0), summed.stride(0),
                                               dx.stride(0), float(eps), HAS_DS=grad_sum is not None,
                                               BLOCK=next_power_of_2(hidden), num_warps=_warps(hidden))
    return dx, dw_partial.sum(0).to(weight.dtype)


class _AddRMSNorm(torch.autograd.Function):
    """(x + residual) -> (rms_norm(sum) * weight, sum), differentiable in x, residual and weight.

    Without a residual the sum is x itself, returned as a view when return_sum: its gradient then
    reaches this backward, whose kernel adds it to dx (HAS_DS), where autograd would launch an add
    of the two gradients (a layer's input feeds both its first norm and its first residual add)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, return_sum):
        out, summed = add_rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(summed, weight)
        ctx.eps = eps
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)      # an unused output's gradient stays None: no zero tensor
        if not return_sum:
            return out
        return out, (x.view_as(x) if residual is None else summed)

    @staticmethod
    def backward(ctx, grad_out, grad_sum=None):
        summed, weight = ctx.saved_tensors
        if grad_out is None:                  # only the sum was used
            dsum, dw = grad_sum, torch.zeros_like(weight)
        else:
            dsum, dw = add_rms_norm_backward(grad_out, grad_sum, summed, weight, ctx.eps)
        if dsum is None:
            return None, None, dw, None, None
        x_dtype, res_dtype = ctx.dtypes
        dres = None if res_dtype is None else dsum.to(res_dtype)
        return dsum.to(x_dtype), dres, dw, None, None


def _check(x: Tensor, weight: Tensor, residual: Tensor | None, caller: str) -> tuple[Tensor, Tensor, Tensor | None]:
    require_runnable(x.device, caller, "use add_rms_norm_reference")
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"{caller}: x {tuple(x.shape)}, weight {tuple(weight.shape)} and residual "
                         f"{None if residual is None else tuple(residual.shape)} do not match ([rows, H], [H])")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    return x, weight.contiguous(), residual


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm of x [rows, H]; differentiable. Output dtype promote(x, weight), as HF's."""
    x, weight, _ = _check(x, weight, None, "rms_norm")
    return _AddRMSNorm.apply(x, None, weight, float(eps), False)


def add_rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [R, H] (+ residual [R, H]) -> (rms_norm(sum) * weight, sum); differentiable. sum is a view of x
    without a residual; its dtype is promote(x, residual), the normed output's promote(sum, weight)."""
    x, weight, residual = _check(x, weight, residual, "add_rms_norm")
    return _AddRMSNorm.apply(x, residual, weight, float(eps), True)


def add_rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
                           ) -> tuple[Tensor, Tensor]:
    """The HF modules' arithmetic, op by op: the add, then LlamaRMSNorm.forward."""
    summed = x if residual is None else residual + x
    f = summed.float()
    normed = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(summed.dtype), summed
