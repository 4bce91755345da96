"""The rollout engine's attention core: the one thing it swaps into a stock HF model.

While the engine runs, `config._attn_implementation` names ENGINE_ATTENTION, and every layer's
attention calls `static_kv_attention` with the layer's fresh (rotated) q / k / v. It writes the new
K/V into the StaticKVCache and attends over the cache; the pass object (DecodePass or PackedPass)
travels as the `ple_pass` keyword argument, which HF hands unchanged to every attention call.
Nothing else of HF's cache API is used, so the same code runs on every transformers version we test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from ple_fast.attention import TreeAttention, tree_attention
from ple_fast.engine.cache import StaticKVCache
from ple_fast.kernels.decode_attention import decode_attention

ENGINE_ATTENTION = "ple_fast_static_kv"
PASS_KWARG = "ple_pass"


@dataclass
class DecodePass:
    """A decode step (or any padded forward) over cache rows."""
    cache: StaticKVCache
    rows: slice                 # cache rows of the batch rows
    positions: torch.Tensor     # [R, Q] position (= slot) of each query token
    slots: torch.Tensor | None  # [R, kv_heads, Q] flat cache slots of those tokens (StaticKVCache.row_slots)
    kv_length: int              # attend over slots 0..kv_length-1
    decode_kernel: bool = False  # one-token steps through kernels/decode_attention.py, not masked SDPA


@dataclass
class PackedPass:
    """A packed prefill: tree attention over the N packed tokens, and where their K/V go."""
    cache: StaticKVCache
    tree: TreeAttention
    sources: torch.Tensor       # [W] packed token whose K/V fill ...
    slots: torch.Tensor         # [W, kv_heads] ... these flat cache slots (a prefix token: one per follower)


_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def static_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, sliding_window: int | None = None,
                        ple_pass: DecodePass | PackedPass | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: cache the new K/V, attend over the cache.

    Grouped-query heads are folded into the query length ([B, Hkv, G*Q, D]) so that K/V are
    read once per KV head and never repeated; the mask is shared by the heads of a group.
    """
    if ple_pass is None:
        raise RuntimeError(f"{ENGINE_ATTENTION} attention was called outside the rollout engine")
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"rollout engine: attention with {name!r} "
                                      f"({type(module).__name__}) is not supported; use rollout.backend=hf")
    layer = module.layer_idx
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if isinstance(ple_pass, PackedPass):
        q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
        ple_pass.cache.write(layer, ple_pass.slots, k.index_select(0, ple_pass.sources),
                             v.index_select(0, ple_pass.sources))
        return tree_attention(ple_pass.tree, q, k, v, scale, sliding_window).unsqueeze(0), None
    cache, rows, length = ple_pass.cache, ple_pass.rows, ple_pass.kv_length
    if ple_pass.decode_kernel and query.shape[2] == 1:    # the kernel writes the new K/V itself
        cache.check(layer, key)
        rows = slice(rows.start, rows.start + query.shape[0])
        out = decode_attention(query, cache.keys[layer, rows], cache.values[layer, rows], ple_pass.positions[:, 0],
                               length, scale, sliding_window, new_keys=key, new_values=value)
        return out.transpose(1, 2), None
    cache.check(layer, key)
    cache.write(layer, ple_pass.slots, key, value)
    keys, values = cache.read(layer, rows, length)
    mask = attention_mask                                  # [R, 1, Q, L] bool, slot <= position
    if sliding_window is not None and sliding_window < length:
        slots = torch.arange(length, device=query.device)
        mask = mask & (slots > ple_pass.positions.unsqueeze(-1) - sliding_window).unsqueeze(1)
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // keys.shape[1]
    grouped = query.reshape(batch, keys.shape[1], groups * q_len, dim)
    if groups > 1 and q_len > 1:
        mask = mask.unsqueeze(2).expand(batch, 1, groups, q_len, length).reshape(batch, 1, groups * q_len, length)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.view(batch, q_heads, q_len, dim).transpose(1, 2), None


AttentionInterface.register(ENGINE_ATTENTION, static_kv_attention)
