"""The packed prefill: every prompt of a rollout, padding-free, the shared prefix (the principle) once.

One packed sequence holds the prefix as a root, each principle-guided prompt as its child and each
plain prompt as a root of its own (ple_fast.layout.pack_prefill), under tree attention. Each layer
writes the packed K/V into the cache rows (the prefix's into every row that follows it), so the
decode steps find every row's prompt in slots 0.. of its cache row.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ple_fast.attention import tree_attention_metadata
from ple_fast.engine.attention import PASS_KWARG, PackedPass
from ple_fast.engine.cache import StaticKVCache
from ple_fast.fused_layers import fused_decoder_layers
from ple_fast.layout import pack_prefill
from ple_fast.models import decoder_of


def chunks(prompts: list[list[int]], budget: int) -> list[tuple[int, int]]:
    """(lo, hi) ranges of consecutive prompts of at most `budget` tokens each (a longer prompt alone)."""
    ranges, lo = [], 0
    while lo < len(prompts):
        hi, tokens = lo + 1, len(prompts[lo])
        while hi < len(prompts) and tokens + len(prompts[hi]) <= budget:
            tokens += len(prompts[hi])
            hi += 1
        ranges.append((lo, hi))
        lo = hi
    return ranges


def prefill(model: nn.Module, cache: StaticKVCache, prompts: list[list[int]], prefixed: list[bool],
            prefix: list[int], *, attention: str, max_tokens: int, fused_layers: bool) -> torch.Tensor:
    """Hidden states [B, H] at each prompt's last token (after the prefix where prefixed), the cache
    filled. Chunks of about `max_tokens` tokens; a chunk with followers carries the prefix once (so a
    long batch recomputes the prefix once per chunk, not once per prompt)."""
    hidden = []
    for lo, hi in chunks(prompts, max_tokens):
        chunk_prefix = prefix if any(prefixed[lo:hi]) else []
        hidden.append(_prefill_chunk(model, cache, lo, prompts[lo:hi], prefixed[lo:hi], chunk_prefix,
                                     attention, fused_layers))
    return torch.cat(hidden)


def _prefill_chunk(model: nn.Module, cache: StaticKVCache, first_row: int, prompts: list[list[int]],
                   prefixed: list[bool], prefix: list[int], attention: str, fused_layers: bool) -> torch.Tensor:
    device = cache.keys.device
    batch = pack_prefill(prefix, prompts, prefixed, device=device)
    prefix_len, num_tokens = len(prefix), batch.num_tokens
    has_prefix = 1 if prefix_len else 0
    # Prompt tokens fill their own row's slots; prefix tokens those of every row that follows it.
    sources = [torch.arange(prefix_len, num_tokens, device=device)]
    rows = [batch.segment_ids[prefix_len:] - has_prefix + first_row]
    positions = [batch.position_ids[prefix_len:]]
    followers = [first_row + b for b, flag in enumerate(prefixed) if flag]
    if prefix_len and followers:
        prefix_rows = torch.arange(prefix_len, device=device)
        sources.append(prefix_rows.repeat(len(followers)))
        rows.append(torch.tensor(followers, device=device).repeat_interleave(prefix_len))
        positions.append(prefix_rows.repeat(len(followers)))
    sources, slots = torch.cat(sources), cache.flat_slots(torch.cat(rows), torch.cat(positions))
    packed = PackedPass(cache, tree_attention_metadata(batch, attention), sources, slots)
    # the fused layers serve the prefill too: their kernels replace the eager glue's passes over
    # every prompt token (fp32 copies in each RMSNorm), the attention stays the packed pass's
    with fused_decoder_layers(model) if fused_layers else contextlib.nullcontext():
        hidden = decoder_of(model)(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                                   use_cache=False, **{PASS_KWARG: packed})[0][0]
    last_rows = batch.cu_seqlens_q[has_prefix + 1:].long() - 1
    return hidden.index_select(0, last_rows)
