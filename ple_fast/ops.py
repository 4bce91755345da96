"""Our Triton kernels and the KV-cache write as torch.library custom ops, for torch.compile'd regions.

Two compiled regions use them: the rollout engine's decode step (`RolloutEngine(compile_decode=True)`)
and the policy's decoder layers in training (`ple_fast.forward.compiled_layers`). Dynamo then treats
each as one opaque op instead of tracing the Triton launcher (on CPU it would trace the Triton
interpreter itself), and the varlen attention keeps its hand-written backward.

The decode step has a second reason: traced as plain torch, the KV-cache write (an index_copy_ into a
view of the cache) is functionalised into a write to a fresh copy of the layer's whole cache, every
layer of every step, and the cache slice that masked SDPA reads is materialised too: each multiplies
the step's memory traffic, the one thing a decode step should spend only on weights and K/V (the CPU
output code showed both; tests/test_rollout.py checks they are gone). As ops that mutate the whole
cache tensors in place, the write stays one scatter (SDPA path) or happens inside the decode
attention kernel itself (Triton path), and inductor passes the cache through untouched.

The public functions call the op only while torch.compile traces, and the plain function otherwise:
a custom op's dispatch costs ~50-90 us per call on the CPU, per layer of an eager step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _write(keys: Tensor, values: Tensor, layer: int, slots: Tensor, new_keys: Tensor, new_values: Tensor) -> None:
    dim = keys.shape[-1]
    flat = slots.reshape(-1)
    keys[layer].view(-1, dim).index_copy_(0, flat, new_keys.reshape(-1, dim).to(keys.dtype))
    values[layer].view(-1, dim).index_copy_(0, flat, new_values.reshape(-1, dim).to(values.dtype))


def _attend(query: Tensor, keys: Tensor, values: Tensor, layer: int, row_start: int, positions: Tensor,
            kv_length: int, scale: float, sliding_window: Optional[int], new_keys: Tensor, new_values: Tensor) -> Tensor:
    from ple_fast.kernels.decode_attention import decode_attention as launch

    rows = slice(row_start, row_start + query.shape[0])
    return launch(query, keys[layer, rows], values[layer, rows], positions, kv_length, scale, sliding_window,
                  new_keys=new_keys, new_values=new_values)


def _sample(logits: Tensor, seed: Tensor, step: Tensor, temperature: float, softcap: Optional[float] = None) -> Tensor:
    from ple_fast.kernels.sampling import race_sample as launch

    return launch(logits, seed, step, temperature, softcap)


_write_op = torch.library.custom_op("ple_fast::kv_cache_write", _write, mutates_args=("keys", "values"))
_attend_op = torch.library.custom_op("ple_fast::decode_attention", _attend, mutates_args=("keys", "values"))
_sample_op = torch.library.custom_op("ple_fast::race_sample", _sample, mutates_args=())


@_write_op.register_fake
def _(keys, values, layer, slots, new_keys, new_values) -> None:
    return None


@_attend_op.register_fake
def _(query, keys, values, layer, row_start, positions, kv_length, scale, sliding_window, new_keys, new_values):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


@_sample_op.register_fake
def _(logits, seed, step, temperature, softcap=None):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


def kv_cache_write(keys: Tensor, values: Tensor, layer: int, slots: Tensor, new_keys: Tensor,
                   new_values: Tensor) -> None:
    """keys/values: the whole cache [layers, batch, kv_heads, capacity, D]; new_keys/new_values [..., D]
    go to layer `layer`'s flat slots [...] (same leading shape; see StaticKVCache.flat_slots), in place."""
    (_write_op if torch.compiler.is_compiling() else _write)(keys, values, layer, slots, new_keys, new_values)


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, layer: int, row_start: int, positions: Tensor,
                     kv_length: int, scale: float, sliding_window: int | None, new_keys: Tensor,
                     new_values: Tensor) -> Tensor:
    """ple_fast.kernels.decode_attention.decode_attention over cache rows row_start.. of layer `layer`
    (keys/values: the whole cache, as for kv_cache_write), writing this step's new_keys / new_values
    into their slots first, in the same kernel: [B, Hq, 1, D]."""
    op = _attend_op if torch.compiler.is_compiling() else _attend
    return op(query, keys, values, layer, row_start, positions, kv_length, scale, sliding_window, new_keys, new_values)


def race_sample(logits: Tensor, seed: Tensor, step: Tensor, temperature: float,
                softcap: float | None = None) -> Tensor:
    """ple_fast.kernels.sampling.race_sample: [B] int64 tokens."""
    return (_sample_op if torch.compiler.is_compiling() else _sample)(logits, seed, step, temperature, softcap)


# ---- varlen attention (the `triton` tree-attention backend), differentiable ----------------------

def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                    scale: float, sliding_window: Optional[int] = None) -> tuple[Tensor, Tensor]:
    from ple_fast.kernels.varlen_attention import varlen_forward

    return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window)


def _varlen_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                     cu_k: Tensor, max_q: int, max_k: int, scale: float,
                     sliding_window: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    from ple_fast.kernels.varlen_attention import varlen_backward

    return varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, sliding_window)


_varlen_op = torch.library.custom_op("ple_fast::varlen_attention", _varlen_forward, mutates_args=())
_varlen_backward_op = torch.library.custom_op("ple_fast::varlen_attention_backward", _varlen_backward,
                                              mutates_args=())


@_varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window=None):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@_varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, sliding_window=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, sliding_window)


def _varlen_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_backward_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_op.register_autograd(_varlen_grad, setup_context=_varlen_setup_context)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     sliding_window: int | None = None, gather=None) -> Tensor:
    """ple_fast.kernels.varlen_attention.varlen_attention; the op (same kernels, same backward) while
    torch.compile traces, where a gather (KVGather) is an index_select of k and v in front of it."""
    from ple_fast.kernels.varlen_attention import varlen_attention as eager
    from ple_fast.kernels.varlen_attention import varlen_inputs

    if not torch.compiler.is_compiling():
        return eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, sliding_window,
                     gather)
    if gather is not None:
        k, v = k.index_select(0, gather.index), v.index_select(0, gather.index)
    out, _ = _varlen_op(*varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k), max_seqlen_q, max_seqlen_k,
                        float(scale), sliding_window)
    return out
