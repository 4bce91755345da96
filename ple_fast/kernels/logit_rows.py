"""Row passes over a materialised logits chunk: per-row logsumexp and target logit, then the logit
gradient written in place. The two halves of a 6NHV loss (ple_fast.loss, impl="whole_pairs"), where
cuBLAS makes the [R, V] logits of a chunk of whole pairs and consumes their gradient:

    row_stats(z, labels)          lse[r] = logsumexp_v f(z[r, v]),  target[r] = f(z[r, labels[r]])
    logit_grad_(z, labels, lse)   z[r, v] <- (onehot(labels[r]) - exp(f(z[r, v]) - lse[r])) * f'(z[r, v])
    f(z) = softcap * tanh(z / softcap) / temperature   (softcap optional), in fp32 whatever z's dtype

Each pass reads the chunk once (the second writes it once), so a chunk costs two passes over R x V
elements beside its three GEMMs. The gradient is left unscaled by the upstream d loss / d logp of its
row: the caller scales the GEMM outputs, so half-precision dz never underflows. Each op has a torch
reference beside it (`*_reference`), the tests' oracle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, require_runnable, round_to, tanh


def _block(vocab: int, interpreted: bool) -> int:
    return 64 if interpreted else min(4096, max(1024, 1 << (vocab - 1).bit_length()))


@triton.jit
def _soft(z, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * inv_temp


@triton.jit
def _row_stats_kernel(z_ptr, labels_ptr, lse_ptr, target_ptr, V, stride, softcap, inv_temp,
                      HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _soft(z, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
        new_m = tl.maximum(m, z)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)      # no -inf - -inf: lanes still empty stay 0
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = new_m
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - top), axis=0)
    tl.store(lse_ptr + row, top + tl.log(total))
    label = tl.load(labels_ptr + row)
    target = tl.load(base + label).to(tl.float32)
    tl.store(target_ptr + row, _soft(target, softcap, inv_temp, HAS_SOFTCAP))


@triton.jit
def _logit_grad_kernel(z_ptr, labels_ptr, lse_ptr, V, stride, softcap, inv_temp,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    ptrs = z_ptr + row * stride + cols
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        f = softcap * t * inv_temp
        slope = (1.0 - t * t) * inv_temp
    else:
        f = z * inv_temp
        slope = inv_temp
    dz = (tl.where(cols == label, 1.0, 0.0) - tl.exp(f - lse)) * slope
    tl.store(ptrs, round_to(dz, z_ptr.dtype.element_ty), mask=mask)


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [R, V] tensor with contiguous rows, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if labels.shape != (logits.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{logits.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    require_runnable(logits.device, "logit_rows", "use the *_reference functions")


def row_stats(logits: Tensor, labels: Tensor, softcap: float | None = None,
              temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(lse, target), fp32 [R]: the logsumexp of row r's f(logits) and f of its label's logit."""
    _check(logits, labels)
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    if rows:
        _row_stats_kernel[(rows,)](logits, labels, lse, target, vocab, logits.stride(0), float(softcap or 1.0),
                                   1.0 / temperature, HAS_SOFTCAP=softcap is not None,
                                   BLOCK_V=_block(vocab, INTERPRETED), num_warps=8)
    return lse, target


def logit_grad_(logits: Tensor, labels: Tensor, lse: Tensor, softcap: float | None = None,
                temperature: float = 1.0) -> Tensor:
    """logits <- d logp(label) / d logits, row by row, in place (and returned)."""
    _check(logits, labels)
    rows, vocab = logits.shape
    if rows:
        block = _block(vocab, INTERPRETED)
        _logit_grad_kernel[(rows, cdiv(vocab, block))](logits, labels, lse, vocab, logits.stride(0),
                                                         float(softcap or 1.0), 1.0 / temperature,
                                                         HAS_SOFTCAP=softcap is not None, BLOCK_V=block,
                                                         num_warps=8)
    return logits


def _soft_reference(z: Tensor, softcap: float | None, temperature: float) -> Tensor:
    z = z.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def row_stats_reference(logits, labels, softcap=None, temperature=1.0) -> tuple[Tensor, Tensor]:
    f = _soft_reference(logits, softcap, temperature)
    return torch.logsumexp(f, dim=1), f.gather(1, labels[:, None]).squeeze(1)


def logit_grad_reference(logits, labels, lse, softcap=None, temperature=1.0) -> Tensor:
    """fp64 (onehot - softmax(f(z))) * f'(z), from the given lse."""
    z = logits.double()
    f = _soft_reference(logits, softcap, temperature)
    slope = (1 - torch.tanh(z / softcap) ** 2) / temperature if softcap is not None else 1.0 / temperature
    onehot = torch.zeros_like(f).scatter_(1, labels[:, None], 1.0)
    return (onehot - torch.exp(f - lse.double()[:, None])) * slope
