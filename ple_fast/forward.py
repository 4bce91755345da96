"""Policy forward for scoring responses: hidden states of the rows that predict response tokens.

The trainer never asks the model for logits: it takes the final hidden states and hands them,
with the lm_head weight, to the fused log-prob / loss op. Only rows whose label is a response
token are kept, so the op sees exactly the scored tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ple_fast.attention import METADATA_KWARG, tree_attention_metadata, use_tree_attention
from ple_fast.layout import PackedBatch, pack_dual, pack_sequences
from ple_fast.models import decoder_of, output_head


@dataclass
class ResponseRows:
    hidden: torch.Tensor      # [T, H]: one row per scored response token
    labels: torch.Tensor      # [T] int64
    seq_index: torch.Tensor   # [T] int64, which sequence each row scores
    weight: torch.Tensor      # [V, H] lm_head weight
    softcap: float | None
    num_seqs: int


def padded_response_rows(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         *, pad_token_id: int = 0) -> ResponseRows:
    """Right-padded forward of prompt_i + response_i; sequence i is scored on response_i."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    seq_index = torch.full((len(prompts), width), -1, dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) == 0:
            raise ValueError(f"sequence {i}: empty prompt (a response needs a prompt token to follow)")
        tokens = list(prompt) + list(response)
        input_ids[i, :len(tokens)] = torch.as_tensor(tokens)
        attention_mask[i, :len(tokens)] = 1
        # row t predicts token t+1: rows len(prompt)-1 .. len(tokens)-2 predict the response
        if response:
            first = len(prompt) - 1
            labels[i, first:first + len(response)] = torch.as_tensor(list(response))
            seq_index[i, first:first + len(response)] = i
    keep = (seq_index >= 0).flatten().to(device)
    hidden = decoder_of(model)(input_ids=input_ids.to(device),
                               attention_mask=attention_mask.to(device)).last_hidden_state
    weight, softcap = output_head(model)
    return ResponseRows(hidden.flatten(0, 1)[keep], labels.flatten().to(device)[keep],
                        seq_index.flatten().to(device)[keep], weight, softcap, len(prompts))


def dual_forward(model, batch: PackedBatch, backend: str = "auto") -> torch.Tensor:
    """[N, H] final (normed) hidden states of a packed batch, one row per packed token.

    The model's own modeling code runs the N tokens as one sequence (batch dim 1) with the layout's
    position ids; only attention is replaced, by the tree attention of `backend`
    ("sdpa" | "segments" | "flex" | "flash" | "triton" | "auto", see ple_fast.attention).
    """
    if batch.num_tokens == 0:
        raise ValueError("dual_forward: the packed batch has no tokens")
    decoder = decoder_of(model)
    param = next(model.parameters())
    if batch.input_ids.device != param.device:
        batch = batch.to(param.device)
    tree = tree_attention_metadata(batch, backend, dtype=param.dtype)
    with use_tree_attention(decoder):
        out = decoder(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False, **{METADATA_KWARG: tree})
    return out.last_hidden_state[0]


def _scored_rows(model, batch: PackedBatch, num_seqs: int, backend: str) -> ResponseRows:
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = dual_forward(model, batch, backend)
    keep = batch.seq_index >= 0
    weight, softcap = output_head(model)
    return ResponseRows(hidden[keep], batch.labels[keep], batch.seq_index[keep], weight, softcap, num_seqs)


def packed_dual_response_rows(model, queries: Sequence[Sequence[int]], originals: Sequence[Sequence[int]],
                              principled: Sequence[Sequence[int]], *, backend: str = "auto") -> ResponseRows:
    """Each query once, shared by its two responses; sequence 2k scores originals[k], 2k+1 principled[k].

    Same sequences, row order, labels and seq_index as
    padded_response_rows(model, [q for q in queries for _ in (0, 1)], [o0, p0, o1, p1, ...]).
    """
    batch = pack_dual(queries, originals, principled, device=next(model.parameters()).device)
    return _scored_rows(model, batch, 2 * len(queries), backend)


def packed_response_rows(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         *, backend: str = "auto") -> ResponseRows:
    """Padding-free padded_response_rows: prompt_i + response_i back to back, nothing shared."""
    batch = pack_sequences(prompts, responses)
    return _scored_rows(model, batch, len(prompts), backend)
