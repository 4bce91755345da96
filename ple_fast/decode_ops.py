"""The rollout engine's decode-step ops, registered with torch.library as opaque custom ops.

Why custom ops: under `RolloutEngine(compile_decode=True)` the whole decode step is traced by
torch.compile, and traced as plain torch the KV-cache write (an index_copy_ into a view of the
cache) is functionalised into a write to a fresh copy of the layer's whole cache, every layer of
every step, and the cache slice that masked SDPA reads is materialised too: each multiplies the
step's memory traffic, the one thing a decode step should spend only on weights and K/V (the CPU
output code showed both; tests/test_rollout.py checks they are gone). As custom ops the write stays
one in-place scatter, and the Triton launchers run as they are instead of being traced (on CPU
dynamo would trace the Triton interpreter itself).

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


def _attend(query: Tensor, keys: Tensor, values: Tensor, positions: Tensor, kv_length: int, scale: float,
            sliding_window: Optional[int] = None) -> Tensor:
    from ple_fast.kernels.decode_attention import decode_attention as launch

    return launch(query, keys, values, positions, kv_length, scale, sliding_window)


def _sample(logits: Tensor, seed: Tensor, step: Tensor, temperature: float, softcap: Optional[float] = None) -> Tensor:
    from ple_fast.kernels.sampling import race_sample as launch

    return launch(logits, seed, step, temperature, softcap)


_write_op = torch.library.custom_op("ple_fast::kv_cache_write", _write, mutates_args=("keys", "values"))
_attend_op = torch.library.custom_op("ple_fast::decode_attention", _attend, mutates_args=())
_sample_op = torch.library.custom_op("ple_fast::race_sample", _sample, mutates_args=())


@_write_op.register_fake
def _(keys, values, layer, slots, new_keys, new_values) -> None:
    return None


@_attend_op.register_fake
def _(query, keys, values, positions, kv_length, scale, sliding_window=None):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


@_sample_op.register_fake
def _(logits, seed, step, temperature, softcap=None):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


def kv_cache_write(keys: Tensor, values: Tensor, layer: int, slots: Tensor, new_keys: Tensor,
                   new_values: Tensor) -> None:
    """keys/values: the whole cache [layers, batch, kv_heads, capacity, D]; new_keys/new_values [..., D]
    go to layer `layer`'s flat slots [...] (same leading shape; see StaticKVCache.flat_slots), in place."""
    (_write_op if torch.compiler.is_compiling() else _write)(keys, values, layer, slots, new_keys, new_values)


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, positions: Tensor, kv_length: int,
                     scale: float, sliding_window: int | None = None) -> Tensor:
    """ple_fast.kernels.decode_attention.decode_attention: [B, Hq, 1, D] from cache views."""
    op = _attend_op if torch.compiler.is_compiling() else _attend
    return op(query, keys, values, positions, kv_length, scale, sliding_window)


def race_sample(logits: Tensor, seed: Tensor, step: Tensor, temperature: float,
                softcap: float | None = None) -> Tensor:
    """ple_fast.kernels.sampling.race_sample: [B] int64 tokens."""
    return (_sample_op if torch.compiler.is_compiling() else _sample)(logits, seed, step, temperature, softcap)
