"""The rotary position embedding (HF's rotate-half form) of queries and keys in one kernel each way.

Eager `apply_rotary_pos_emb` costs ~10 kernels per layer forward (for q and k: multiply, slice,
negate, concatenate, multiply, add) and keeps their temporaries for backward. Here one launch
rotates every (token, head) row of q and k, ~2K elements a program; backward is the transposed
rotation. Forward
rounds as the eager ops do (each product and the sum in the promoted dtype of x and cos), so the
attention sees HF's values; backward computes in fp32. The decode attention kernel applies the same
`_rotary` to its query and new key (kernels/decode_attention.py).

cos / sin are HF's tables, cat(freqs, freqs) along the head dim: the backward reads sin at each
element's partner, which the duplication makes the same as its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, next_power_of_2, require_runnable, round_to


FP_FUSION = False         # the launch option of every kernel that calls _rotary (see there)
INTERPRETED_ROWS = 256     # (token, head) rows per program under the interpreter, which pays per program


@triton.jit
def _rotary(x, x_partner, first_half, cos, sin, OUT: tl.constexpr):
    """x * cos + rotate_half(x) * sin, each product and the sum rounded to OUT as eager bf16 / fp16
    ops round them; x_partner holds x at d + D/2 (first half) or d - D/2 (second half).

    Every kernel that calls it launches with enable_fp_fusion=False (FP_FUSION): otherwise the GPU
    compiler turns the second product and the sum into one fused multiply-add (fma.rn.bf16 in the
    PTX), which rounds once where HF rounds twice, and the rotated value can land a unit or more
    from HF's (many units of a sum that cancels)."""
    rotated = tl.where(first_half, -x_partner.to(tl.float32), x_partner.to(tl.float32))
    a = round_to(x.to(tl.float32) * cos, OUT).to(tl.float32)
    b = round_to(rotated * sin, OUT).to(tl.float32)
    return round_to(a + b, OUT)


@triton.jit
def _rotate_half_partners(ds, head_dim):
    """(first_half, partner) of head-dim lanes ds: partner = d + D/2 on the first half, d - D/2 after."""
    half = head_dim // 2
    first_half = ds < half
    return first_half, tl.where(first_half, ds + half, ds - half)


@triton.jit
def _rotate_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, first_row, n_rows, heads, head_dim, stride_xn, stride_xh,
                 stride_on, stride_oh, stride_c, stride_s, BACKWARD: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """ROWS (token, head) rows of x [N, heads, D] from row `first_row` (row = token * heads + head)."""
    rows = first_row + tl.arange(0, ROWS)
    token = (rows // heads).to(tl.int64)[:, None]
    head = (rows % heads)[:, None]
    ds = tl.arange(0, BLOCK_D)
    first_half, partner = _rotate_half_partners(ds, head_dim)
    first_half, partner, ds = first_half[None, :], partner[None, :], ds[None, :]
    ok = (rows < n_rows)[:, None] & (ds < head_dim)
    row = x_ptr + token * stride_xn + head * stride_xh
    x = tl.load(row + ds, mask=ok, other=0.0)
    x_partner = tl.load(row + partner, mask=ok, other=0.0)
    cos = tl.load(cos_ptr + token * stride_c + ds, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:     # dx[j] = dy[j] cos[j] + sign(j) dy[p(j)] sin[p(j)], sign +1 on the first half
        sin_p = tl.load(sin_ptr + token * stride_s + partner, mask=ok, other=0.0).to(tl.float32)
        out = x.to(tl.float32) * cos + tl.where(first_half, 1.0, -1.0) * x_partner.to(tl.float32) * sin_p
        out = out.to(out_ptr.dtype.element_ty)
    else:
        sin = tl.load(sin_ptr + token * stride_s + ds, mask=ok, other=0.0).to(tl.float32)
        out = _rotary(x, x_partner, first_half, cos, sin, out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_on + head * stride_oh + ds, out, mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_rows, k_rows, q_programs, q_heads,
                   kv_heads, head_dim, stride_qn, stride_qh, stride_kn, stride_kh, stride_qon, stride_qoh,
                   stride_kon, stride_koh, stride_c, stride_s, BACKWARD: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """The first q_programs programs rotate q's (token, head) rows, the rest k's: one launch for both."""
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pid * ROWS, q_rows, q_heads, head_dim, stride_qn,
                     stride_qh, stride_qon, stride_qoh, stride_c, stride_s, BACKWARD, ROWS, BLOCK_D)
    else:
        _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, (pid - q_programs) * ROWS, k_rows, kv_heads, head_dim,
                     stride_kn, stride_kh, stride_kon, stride_koh, stride_c, stride_s, BACKWARD, ROWS, BLOCK_D)


def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, k_out: Tensor, backward: bool) -> None:
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    rows = INTERPRETED_ROWS if INTERPRETED else max(1, 2048 // next_power_of_2(dim))   # ~2K elements
    q_programs = cdiv(tokens * q_heads, rows)
    grid = q_programs + cdiv(tokens * kv_heads, rows)
    if tokens:
        _rotary_kernel[(grid,)](q, k, cos, sin, q_out, k_out, tokens * q_heads, tokens * kv_heads, q_programs,
                                q_heads, kv_heads, dim, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
                                sin.stride(0), BACKWARD=backward, ROWS=rows, BLOCK_D=next_power_of_2(dim),
                                num_warps=4, enable_fp_fusion=FP_FUSION)


def rotary_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotated (q, k), without autograd (the Function below, and the one-node training layer of
    ple_fast.fused_layers); inputs as `rotary` takes them, unit-stride head dims."""
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    _launch(q, k, cos, sin, q_out, k_out, backward=False)
    return q_out, k_out


def rotary_backward(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, q_dtype: torch.dtype,
                    k_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dq, dk) in the unrotated inputs' dtypes: the rotation by -angle."""
    grad_q, grad_k = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    dq = torch.empty(grad_q.shape, dtype=q_dtype, device=grad_q.device)
    dk = torch.empty(grad_k.shape, dtype=k_dtype, device=grad_k.device)
    _launch(grad_q, grad_k, cos, sin, dq, dk, backward=True)
    return dq, dk


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return rotary_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return (*rotary_backward(grad_q, grad_k, cos, sin, *ctx.dtypes), None, None)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [N, Hq, D], k [N, Hkv, D] (unit-stride head dims), cos / sin [N, D] (HF's tables at each token's
    position) -> rotated (q, k), contiguous, in the dtype promote(x, cos) as HF's; differentiable in q, k."""
    require_runnable(q.device, "rotary", "use rotary_reference")
    if (q.dim() != 3 or k.dim() != 3 or k.shape[::2] != q.shape[::2] or cos.shape != (q.shape[0], q.shape[2])
            or sin.shape != cos.shape or q.shape[2] % 2):
        raise ValueError(f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin "
                         f"{tuple(sin.shape)} are not [N, Hq, D], [N, Hkv, D], [N, D], [N, D] with D even")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    return _Rotary.apply(q, k, cos, sin)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's apply_rotary_pos_emb for one tensor; cos / sin broadcast against x [..., D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
