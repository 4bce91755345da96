"""Varlen causal attention with bottom-right alignment, forward and backward, in Triton.

The contract of flash-attn's `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...,
causal=True, window_size=(W-1, 0))`, which is what the tree layout needs (ple_fast.attention):
segment s owns query rows cu_q[s]:cu_q[s+1] and key rows cu_k[s]:cu_k[s+1] (its ancestors' rows
gathered in front of its own, so k_len >= q_len), and query i of the segment sees key j when
j <= i + (k_len - q_len), and with a window W only when j > i + (k_len - q_len) - W. We ship it
because flash-attn is an optional install (and absent on our GPU image) while Triton comes with
torch; without it the tree layout falls back to `segments`, which pads every segment to the
longest one.

FlashAttention-2's algorithm: the forward streams key blocks through an online softmax and keeps
the per-row logsumexp; the backward recomputes probabilities from it, with one kernel per KV head
and key block accumulating dK, dV over every query head of its group (no atomics), and one per
query block accumulating dQ. fp32 accumulation throughout; inputs fp16, bf16 or fp32.

A tree layout's keys repeat rows (a query's rows are keys of the query and of both its responses).
Given the gather (`kv_gather`), the kernels read those rows in place through the index, where an
index_select per layer would copy K and V, and the backward sums each row's copies with one more
kernel (`_gather_grad_kernel`, fp32, fixed order), where index_select's backward would zero two
buffers and index_add into them: six torch kernels a layer, and atomics.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, dot_precision, next_power_of_2, require_runnable



@triton.jit
def _visible(rows, cols, q_len, k_len, offset, window, HAS_WINDOW: tl.constexpr):
    ok = (rows < q_len)[:, None] & (cols < k_len)[None, :] & (cols[None, :] <= rows[:, None] + offset)
    if HAS_WINDOW:
        ok = ok & (cols[None, :] > rows[:, None] + offset - window)
    return ok


@triton.jit
def _segment(cu_q, cu_k, seg):
    q_start = tl.load(cu_q + seg)
    q_len = tl.load(cu_q + seg + 1) - q_start
    k_start = tl.load(cu_k + seg)
    k_len = tl.load(cu_k + seg + 1) - k_start
    return q_start, q_len, k_start, k_len, k_len - q_len


@triton.jit
def _key_range(first_row, last_row, offset, k_len, window, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks that rows first_row..last_row can see: [lo, hi), lo aligned to BLOCK_N."""
    hi = tl.minimum(k_len, last_row + offset + 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_row + offset - window + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _online_softmax_step(s, m, l, acc, v, PRECISION: tl.constexpr):
    """Fold one block of masked scores s [M, N] and its values v [N, D] into the running row max m,
    sum l and unnormalised output acc; a row that has seen no visible key keeps m = -inf and adds 0.
    Shared with kernels/decode_attention.py."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _row_stats(LSE, Delta, h, num_q_rows, q_start, rows, q_len):
    """The forward's logsumexp and rowsum(dO * O) of query rows q_start + rows of head h."""
    at = h.to(tl.int64) * num_q_rows + q_start + rows
    row_ok = rows < q_len
    return tl.load(LSE + at, mask=row_ok, other=0.0), tl.load(Delta + at, mask=row_ok, other=0.0)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, q_len, k_len, offset, window, scale,
                       HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities P [M, N] and score gradients dS = P * (dO V^T - delta) * scale."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    visible = _visible(rows, cols, q_len, k_len, offset, window, HAS_WINDOW)
    p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None]) * scale


@triton.jit
def _load_rows(ptr, start, rows, stride_n, head, stride_h, ds, row_limit, head_dim, UPCAST: tl.constexpr):
    mask = (rows < row_limit)[:, None] & (ds < head_dim)[None, :]
    t = tl.load(ptr + (start + rows).to(tl.int64)[:, None] * stride_n + head * stride_h + ds[None, :],
                mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_keys(K, V, KV_INDEX, k_start, cols, stride_kn, stride_kh, stride_vn, stride_vh, kh, ds, k_len, head_dim,
               UPCAST: tl.constexpr, GATHER: tl.constexpr):
    """Key / value rows k_start + cols of the segment's key list: rows of K, V themselves, or with GATHER
    the rows KV_INDEX[k_start + cols] (the gather a tree layout asks for, done by the loads)."""
    row_ok = cols < k_len
    if GATHER:
        src = tl.load(KV_INDEX + k_start + cols, mask=row_ok, other=0).to(tl.int64)
    else:
        src = (k_start + cols).to(tl.int64)
    mask = row_ok[:, None] & (ds < head_dim)[None, :]
    k = tl.load(K + src[:, None] * stride_kn + kh * stride_kh + ds[None, :], mask=mask, other=0.0)
    v = tl.load(V + src[:, None] * stride_vn + kh * stride_vh + ds[None, :], mask=mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v


@triton.jit
def _gather_grad_kernel(dKg, dVg, ORDER, OFFSETS, dK, dV, num_rows, row_elems,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """dK[r] = sum of dKg[g] over the gathered rows g that copied row r (ORDER[OFFSETS[r]:OFFSETS[r+1]],
    in kv_index order), the same for dV: the gather's backward in fp32, in a fixed order (an index_add
    would sum duplicates with atomics, in the dtype, in any order), every row written (zeros if none)."""
    cols = tl.arange(0, BLOCK)
    ok = cols < row_elems
    for i in range(ROWS):
        r = tl.program_id(0) * ROWS + i
        if r < num_rows:
            acc_k = tl.zeros((BLOCK,), tl.float32)
            acc_v = tl.zeros((BLOCK,), tl.float32)
            for j in range(tl.load(OFFSETS + r), tl.load(OFFSETS + r + 1)):
                g = tl.load(ORDER + j).to(tl.int64)
                acc_k += tl.load(dKg + g * row_elems + cols, mask=ok, other=0.0).to(tl.float32)
                acc_v += tl.load(dVg + g * row_elems + cols, mask=ok, other=0.0).to(tl.float32)
            out = r.to(tl.int64) * row_elems + cols
            tl.store(dK + out, acc_k.to(dK.dtype.element_ty), mask=ok)
            tl.store(dV + out, acc_v.to(dV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_delta_kernel(O, dO, Delta, stride_on, stride_oh, stride_dn, stride_dh, num_rows, head_dim,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Delta[h, i] = sum_d O[i, h, d] * dO[i, h, d] in fp32: the backward's preprocess, one pass over
    both (torch's mul-sum-transpose made three fp32 [N, H, D] temporaries and five launches)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    ds = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (ds < head_dim)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(O + r64 * stride_on + h * stride_oh + ds[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dO + r64 * stride_dn + h * stride_dh + ds[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + h.to(tl.int64) * num_rows + rows, tl.sum(o * do, axis=1), mask=rows < num_rows)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, cu_q, cu_k, KV_INDEX, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn,
                stride_vh, stride_on, stride_oh, num_q_rows, groups, head_dim, scale, window,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr):
    m_block = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    q_start, q_len, k_start, k_len, offset = _segment(cu_q, cu_k, seg)
    if m_block * BLOCK_M < q_len:
        kh = h // groups
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        ds = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, q_start, rows, stride_qn, h, stride_qh, ds, q_len, head_dim, UPCAST)
        lo, hi = _key_range(m_block * BLOCK_M, m_block * BLOCK_M + BLOCK_M - 1, offset, k_len, window,
                            HAS_WINDOW, BLOCK_N)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k, v = _load_keys(K, V, KV_INDEX, k_start, cols, stride_kn, stride_kh, stride_vn, stride_vh, kh, ds, k_len,
                             head_dim, UPCAST, GATHER)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(_visible(rows, cols, q_len, k_len, offset, window, HAS_WINDOW), s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, PRECISION)
        row_ok = rows < q_len
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = O + (q_start + rows).to(tl.int64)[:, None] * stride_on + h * stride_oh + ds[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (ds < head_dim)[None, :])
        tl.store(LSE + h.to(tl.int64) * num_q_rows + q_start + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dO, LSE, Delta, dK, dV, cu_q, cu_k, KV_INDEX, stride_qn, stride_qh, stride_kn,
                     stride_kh, stride_vn, stride_vh, stride_don, stride_doh, stride_dkn, stride_dkh, stride_dvn,
                     stride_dvh, num_q_rows, groups, head_dim, scale, window,
                     HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr):
    n_block = tl.program_id(0)
    seg = tl.program_id(1)
    kh = tl.program_id(2)
    q_start, q_len, k_start, k_len, offset = _segment(cu_q, cu_k, seg)
    if n_block * BLOCK_N < k_len:
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ds = tl.arange(0, BLOCK_D)
        k, v = _load_keys(K, V, KV_INDEX, k_start, cols, stride_kn, stride_kh, stride_vn, stride_vh, kh, ds, k_len,
                         head_dim, UPCAST, GATHER)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        # queries i that see key j: j <= i + offset (and i + offset - W < j)
        q_lo = tl.maximum(n_block * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        q_hi = q_len
        if HAS_WINDOW:
            q_hi = tl.minimum(q_len, n_block * BLOCK_N + BLOCK_N - 1 - offset + window)
        for g in range(0, groups):
            h = kh * groups + g
            for start in range(q_lo, q_hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q = _load_rows(Q, q_start, rows, stride_qn, h, stride_qh, ds, q_len, head_dim, UPCAST)
                do = _load_rows(dO, q_start, rows, stride_don, h, stride_doh, ds, q_len, head_dim, UPCAST)
                lse, delta = _row_stats(LSE, Delta, h, num_q_rows, q_start, rows, q_len)
                p, dsc = _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, q_len, k_len, offset, window,
                                            scale, HAS_WINDOW, PRECISION)
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot(tl.trans(dsc).to(q.dtype), q, input_precision=PRECISION)
        mask = (cols < k_len)[:, None] & (ds < head_dim)[None, :]
        rows64 = (k_start + cols).to(tl.int64)[:, None]
        tl.store(dK + rows64 * stride_dkn + kh * stride_dkh + ds[None, :], dk.to(dK.dtype.element_ty), mask=mask)
        tl.store(dV + rows64 * stride_dvn + kh * stride_dvh + ds[None, :], dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, dO, LSE, Delta, dQ, cu_q, cu_k, KV_INDEX, stride_qn, stride_qh, stride_kn,
                   stride_kh, stride_vn, stride_vh, stride_don, stride_doh, stride_dqn, stride_dqh,
                   num_q_rows, groups, head_dim, scale, window,
                   HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr):
    m_block = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    q_start, q_len, k_start, k_len, offset = _segment(cu_q, cu_k, seg)
    if m_block * BLOCK_M < q_len:
        kh = h // groups
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        ds = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, q_start, rows, stride_qn, h, stride_qh, ds, q_len, head_dim, UPCAST)
        do = _load_rows(dO, q_start, rows, stride_don, h, stride_doh, ds, q_len, head_dim, UPCAST)
        lse, delta = _row_stats(LSE, Delta, h, num_q_rows, q_start, rows, q_len)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, hi = _key_range(m_block * BLOCK_M, m_block * BLOCK_M + BLOCK_M - 1, offset, k_len, window,
                            HAS_WINDOW, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k, v = _load_keys(K, V, KV_INDEX, k_start, cols, stride_kn, stride_kh, stride_vn, stride_vh, kh, ds, k_len,
                             head_dim, UPCAST, GATHER)
            _, dsc = _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, q_len, k_len, offset, window,
                                        scale, HAS_WINDOW, PRECISION)
            dq += tl.dot(dsc.to(k.dtype), k, input_precision=PRECISION)
        mask = row_ok[:, None] & (ds < head_dim)[None, :]
        tl.store(dQ + (q_start + rows).to(tl.int64)[:, None] * stride_dqn + h * stride_dqh + ds[None, :],
                 dq.to(dQ.dtype.element_ty), mask=mask)


DELTA_ROWS = 64      # rows per program of the backward's preprocess


def _config(q: Tensor) -> dict:
    common = dict(PRECISION=dot_precision(q.dtype), UPCAST=INTERPRETED and q.dtype == torch.bfloat16)
    if q.device.type != "cuda" or INTERPRETED:
        block_d = max(16, next_power_of_2(q.shape[-1]))
        return dict(common, BLOCK_D=block_d, BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    return dict(common, **gpu_tile_config(q.dtype, q.shape[-1]))


def gpu_tile_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Compiled tiles: 64 x 64 for half inputs up to head_dim 128, half that for fp32 or wider heads,
    unpipelined for both (shared memory); tests/compile_kernels.py checks they fit on sm_80 and sm_90."""
    block_d = max(16, next_power_of_2(head_dim))
    if dtype == torch.float32 and block_d > 128:
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_d > 128:
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def _window_arg(sliding_window: int | None) -> dict:
    return dict(window=int(sliding_window or 0), HAS_WINDOW=sliding_window is not None)


class KVGather(NamedTuple):
    """Keys gathered by row index (a tree layout's kv_index: segment s's keys are the rows
    index[cu_k[s]:cu_k[s+1]] of k / v, and index has exactly cu_k[-1] entries), with its inverse for
    the backward: order, index's positions sorted by row (stably), and offsets [Nk + 1], so that row
    r's copies are order[offsets[r]:offsets[r + 1]]. Built once per batch by `kv_gather`."""
    index: Tensor
    order: Tensor
    offsets: Tensor


def kv_gather(kv_index: Tensor, num_rows: int) -> KVGather:
    """The KVGather of kv_index over num_rows key rows: a few kernels, no host sync; built once per
    packed batch (ple_fast.attention) and read by every layer."""
    index = kv_index.to(torch.int32)
    order = torch.sort(index, stable=True).indices
    offsets = torch.searchsorted(index[order], torch.arange(num_rows + 1, dtype=torch.int32, device=index.device))
    return KVGather(index, order.to(torch.int32), offsets.to(torch.int32))


def _gather_args(gather: KVGather | None, cu_k: Tensor) -> dict:
    return dict(KV_INDEX=cu_k if gather is None else gather.index, GATHER=gather is not None)


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                   scale: float, sliding_window: int | None, gather: KVGather | None = None) -> tuple[Tensor, Tensor]:
    """(out [N, H, D], lse [H, N] fp32): the forward launch, shared by the autograd Function and the
    torch.library op of compiled regions (`varlen_op`). With gather, the keys are k / v rows by index."""
    num_rows, heads, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(heads, num_rows, dtype=torch.float32, device=q.device)
    segments = cu_q.numel() - 1
    cfg = _config(q)
    if num_rows and segments:
        grid = (cdiv(max(max_q, 1), cfg["BLOCK_M"]), segments, heads)
        _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, stride_qn=q.stride(0), stride_qh=q.stride(1),
                          stride_kn=k.stride(0), stride_kh=k.stride(1), stride_vn=v.stride(0), stride_vh=v.stride(1),
                          stride_on=out.stride(0), stride_oh=out.stride(1), num_q_rows=num_rows, groups=groups,
                          head_dim=dim, scale=float(scale), **_gather_args(gather, cu_k),
                          **_window_arg(sliding_window), **cfg)
    return out, lse


def varlen_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                    cu_k: Tensor, max_q: int, max_k: int, scale: float,
                    sliding_window: int | None, gather: KVGather | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): the backward launches, given the forward's out and lse. With gather, dK / dV are
    computed per gathered row (each written once: index covers every segment's keys) and summed back
    onto k / v's rows by `_gather_grad_kernel`."""
    grad_out = grad_out.contiguous()
    num_rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    dq = torch.empty_like(q)
    if gather is None:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    else:
        dk, dv = (torch.empty(gather.index.numel(), kv_heads, dim, dtype=t.dtype, device=t.device) for t in (k, v))
    segments = cu_q.numel() - 1
    cfg = _config(q)
    window = _window_arg(sliding_window)
    if num_rows and segments:
        delta = torch.empty(heads, num_rows, dtype=torch.float32, device=q.device)      # [H, N]
        _bwd_delta_kernel[(cdiv(num_rows, DELTA_ROWS), heads)](
            out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), num_rows,
            dim, BLOCK_M=DELTA_ROWS, BLOCK_D=cfg["BLOCK_D"])
        common = dict(cu_q=cu_q, cu_k=cu_k, stride_qn=q.stride(0), stride_qh=q.stride(1), stride_kn=k.stride(0),
                      stride_kh=k.stride(1), stride_vn=v.stride(0), stride_vh=v.stride(1),
                      stride_don=grad_out.stride(0), stride_doh=grad_out.stride(1), num_q_rows=num_rows,
                      groups=groups, head_dim=dim, scale=float(scale), **_gather_args(gather, cu_k), **window, **cfg)
        grid = (cdiv(max(max_k, 1), cfg["BLOCK_N"]), segments, kv_heads)
        _bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, dk, dv, stride_dkn=dk.stride(0),
                               stride_dkh=dk.stride(1), stride_dvn=dv.stride(0), stride_dvh=dv.stride(1), **common)
        grid = (cdiv(max(max_q, 1), cfg["BLOCK_M"]), segments, heads)
        _bwd_dq_kernel[grid](q, k, v, grad_out, lse, delta, dq, stride_dqn=dq.stride(0), stride_dqh=dq.stride(1),
                             **common)
    else:
        dq.zero_()
    if gather is not None:
        dk, dv = _sum_gathered(dk, dv, gather, k)
    return dq, dk, dv


GATHER_ROWS_INTERPRETED = 16     # rows per program of `_gather_grad_kernel` under the interpreter


def _sum_gathered(dk_rows: Tensor, dv_rows: Tensor, gather: KVGather, k: Tensor) -> tuple[Tensor, Tensor]:
    """dK, dV [Nk, Hkv, D] (contiguous, in k's and v's dtypes, as the gathered rows') from the gathered
    rows' gradients."""
    dk, dv = (torch.empty(k.shape, dtype=rows.dtype, device=rows.device) for rows in (dk_rows, dv_rows))
    rows, row_elems = k.shape[0], k.shape[1] * k.shape[2]
    per_program = GATHER_ROWS_INTERPRETED if INTERPRETED else 1
    if rows:
        _gather_grad_kernel[(cdiv(rows, per_program),)](
            dk_rows, dv_rows, gather.order, gather.offsets, dk, dv, rows, row_elems, ROWS=per_program,
            BLOCK=next_power_of_2(row_elems), num_warps=4 if row_elems <= 2048 else 8)
    return dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window, gather):
        out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window, gather)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale, ctx.sliding_window, ctx.gather = max_q, max_k, scale, sliding_window, gather
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale,
                                     ctx.sliding_window, ctx.gather)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                  cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, cu_q, cu_k) as the launches take them: shapes checked, unit-stride head dims, int32
    offsets."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
                         "[Nq, H, D], [Nk, Hkv, D] with H a multiple of Hkv")
    require_runnable(q.device, "varlen_attention", "use another attention backend")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)


# ---- the same launches as torch.library ops, for torch.compile'd regions --------------------------
# Dynamo then sees one opaque op with its own backward instead of tracing the Triton launcher (on CPU
# it would trace the interpreter itself). Used while torch.compile traces; eager calls skip the
# op's dispatch (~50-90 us a call on the CPU).

def _op_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                scale: float, sliding_window: Optional[int] = None) -> tuple[Tensor, Tensor]:
    return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window)


def _op_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                 cu_k: Tensor, max_q: int, max_k: int, scale: float,
                 sliding_window: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    return varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, sliding_window)


varlen_op = torch.library.custom_op("ple_fast::varlen_attention", _op_forward, mutates_args=())
_varlen_backward_op = torch.library.custom_op("ple_fast::varlen_attention_backward", _op_backward, mutates_args=())


@varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window=None):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@_varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, sliding_window=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, sliding_window)


def _op_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_backward_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None


varlen_op.register_autograd(_op_grad, setup_context=_op_setup_context)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     sliding_window: int | None = None, gather: KVGather | None = None) -> Tensor:
    """q [Nq, H, D], k / v [Nk, Hkv, D] (H a multiple of Hkv), int32 cu_seqlens with k_len >= q_len
    per segment -> [Nq, H, D]; differentiable in q, k, v. flash_attn_varlen_func's causal,
    bottom-right semantics; sliding_window W = its window_size (W - 1, 0).

    gather (`kv_gather`): the keys are rows gather.index of k / v, the same as passing
    k.index_select(0, gather.index) (and v's) without the copies, and with their backward summed in
    fp32 in a fixed order instead of index_add's atomics. While torch.compile traces, the call is
    the op `varlen_op` (same kernels and backward), a gather an index_select in front of it."""
    if torch.compiler.is_compiling():
        if gather is not None:
            k, v = k.index_select(0, gather.index), v.index_select(0, gather.index)
        out, _ = varlen_op(*varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k), int(max_seqlen_q),
                           int(max_seqlen_k), float(scale), sliding_window)
        return out
    return _VarlenAttention.apply(*varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k), int(max_seqlen_q),
                                  int(max_seqlen_k), scale, sliding_window, gather)
