"""Scoring: the policy's forward over responses, and their summed log-probs, as a ForwardPlan says.

The trainer never asks the model for logits: it takes the final hidden states of the rows that
predict response tokens and hands them, with the lm_head weight, to the fused log-prob / loss op
(ple_fast.loss), so the op sees exactly the scored tokens. A packed plan lays each query out once,
shared by its responses, under tree attention; a padded plan runs HF's own right-padded forward.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ple_fast.attention import METADATA_KWARG, tree_attention_metadata, use_tree_attention
from ple_fast.fused_layers import fused_decoder_layers
from ple_fast.layout import PackedBatch, pack_dual, pack_sequences, to_device
from ple_fast.loss import sequence_logprobs
from ple_fast.models import decoder_of, output_head

LAYOUTS = ("packed", "padded")
LAYERS = ("stock", "fused", "compiled")
LOSS_IMPLS = ("triton", "torch", "reference", "whole_pairs")


@dataclass(frozen=True)
class ForwardPlan:
    """How the policy scores responses; ple_fast.plan.forward_plan resolves one for a model and device.

    layout     "packed": each query once, shared by its responses, under tree attention (ple_fast.layout,
               ple_fast.attention); "padded": HF's own right-padded forward, one row per response
    attention  the tree-attention backend of the packed layout (None when padded)
    layers     "stock" (the model's own), "fused" (ple_fast.fused_layers) or "compiled" (the stock layers
               torch.compile'd); packed layout only unless "stock"
    loss_impl  sequence_logprobs / ple_loss implementation: "triton", "torch", "reference" or "whole_pairs"
               (a ple_loss implementation; its log-probs alone run "triton")
    """
    layout: str
    attention: str | None
    layers: str
    loss_impl: str

    def __post_init__(self):
        if self.layout not in LAYOUTS or self.layers not in LAYERS or self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"ForwardPlan: layout {self.layout!r}, layers {self.layers!r} or loss_impl "
                             f"{self.loss_impl!r} is not one of {LAYOUTS}, {LAYERS}, {LOSS_IMPLS}")
        if (self.layout == "packed") != (self.attention is not None) or self.attention == "auto":
            raise ValueError(f"ForwardPlan: a packed layout names a resolved attention backend, a padded one "
                             f"none (layout {self.layout!r}, attention {self.attention!r})")
        if self.layout == "padded" and self.layers != "stock":
            raise ValueError(f"ForwardPlan: layers {self.layers!r} run in packed forwards only")


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
    scored = (seq_index >= 0).flatten().nonzero().squeeze(1)      # on the host, as the tensors are built
    input_ids, attention_mask, labels, seq_index = (
        to_device(t, device) for t in (input_ids, attention_mask, labels.flatten()[scored], seq_index.flatten()[scored]))
    scored = to_device(scored, device)
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    weight, softcap = output_head(model)
    return ResponseRows(hidden.flatten(0, 1).index_select(0, scored), labels, seq_index, weight, softcap,
                        len(prompts))


_COMPILED_FORWARDS: dict[type, Callable] = {}


def _compiled_forward(layer_type: type) -> Callable:
    """One torch.compile of a decoder-layer class's forward, shared by every layer and model of the
    class: the module is an argument (its weights graph inputs), shapes are symbolic, so one graph
    serves every layer and every packed length."""
    if layer_type not in _COMPILED_FORWARDS:
        _COMPILED_FORWARDS[layer_type] = torch.compile(layer_type.forward, dynamic=True)
    return _COMPILED_FORWARDS[layer_type]


@contextlib.contextmanager
def compiled_layers(decoder: nn.Module) -> Iterator[None]:
    """Run the decoder's layers through their compiled forward for the block (layers="compiled",
    experimental: not yet timed on a GPU).

    Why: an eager layer launches ~40 small kernels forward and more backward (norms, rotary, SwiGLU,
    residuals, dtype casts); inductor fuses them, and the attention stays our Triton kernel as an
    opaque op (ple_fast.kernels.varlen_attention.varlen_op). The layers get their eager forward back
    on exit, so generation and evaluation are untouched (the backward needs nothing of it).
    """
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(decoder).__name__} has no `layers` list of decoder layers to compile")
    for layer in layers:
        layer.forward = functools.partial(_compiled_forward(type(layer)), layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward        # the instance attribute: the class's forward again


def dual_forward(model, batch: PackedBatch, backend: str = "auto", *, layers: str = "stock") -> torch.Tensor:
    """[N, H] final (normed) hidden states of a packed batch, one row per packed token.

    The model's own modeling code runs the N tokens as one sequence (batch dim 1) with the layout's
    position ids; only attention is replaced, by the tree attention of `backend` ("sdpa" |
    "segments" | "triton" | "flash" | "auto", see ple_fast.attention), and with layers="fused" the
    decoder layers by ple_fast.fused_layers (their glue in Triton kernels), with layers="compiled"
    by their torch.compile'd forward (`compiled_layers`).
    """
    if batch.num_tokens == 0:
        raise ValueError("dual_forward: the packed batch has no tokens")
    if layers not in LAYERS:
        raise ValueError(f"dual_forward: layers={layers!r}; choose one of {', '.join(LAYERS)}")
    decoder = decoder_of(model)
    param = next(model.parameters())
    if batch.input_ids.device != param.device:
        batch = batch.to(param.device)
    tree = tree_attention_metadata(batch, backend)
    swap = contextlib.nullcontext()
    if layers == "compiled":
        tree.prepare(getattr(model.config, "sliding_window", None))  # masks built eagerly, not traced per layer
        swap = compiled_layers(decoder)
    elif layers == "fused":
        swap = fused_decoder_layers(model)
    with use_tree_attention(decoder), swap:
        out = decoder(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False, **{METADATA_KWARG: tree})
    return out.last_hidden_state[0]


def packed_rows(model, batch: PackedBatch, num_seqs: int, plan: ForwardPlan) -> ResponseRows:
    """The scored rows (seq_index >= 0) of `dual_forward` over a packed batch of num_seqs sequences.

    Which rows are scored is read (one nonzero) before the forward is queued, and a batch built on the
    CPU moves over without a sync (`to_device`): a read of device data after the forward would hold
    the host until the GPU had run it, so the loss and backward would start from an empty queue."""
    device = next(model.parameters()).device
    scored = (batch.seq_index >= 0).nonzero().squeeze(1)      # one nonzero, where three boolean masks take three
    if batch.input_ids.device != device:
        batch, scored = batch.to(device, non_blocking=True), to_device(scored, device)
    hidden = dual_forward(model, batch, plan.attention, layers=plan.layers)
    weight, softcap = output_head(model)
    return ResponseRows(hidden.index_select(0, scored), batch.labels.index_select(0, scored),
                        batch.seq_index.index_select(0, scored), weight, softcap, num_seqs)


def dual_response_rows(model, plan: ForwardPlan, queries: Sequence[Sequence[int]],
                       originals: Sequence[Sequence[int]], principled: Sequence[Sequence[int]], *,
                       pad_token_id: int = 0) -> ResponseRows:
    """Sequence 2k scores originals[k], 2k+1 principled[k], both given queries[k]: packed, each query
    once for both; padded, the query repeated. Same rows, labels and seq_index either way."""
    if plan.layout == "padded":
        prompts = [q for q in queries for _ in (0, 1)]
        responses = [r for pair in zip(originals, principled) for r in pair]
        return padded_response_rows(model, prompts, responses, pad_token_id=pad_token_id)
    batch = pack_dual(queries, originals, principled)        # built where the token ids are (lists: the CPU)
    return packed_rows(model, batch, 2 * len(queries), plan)


def response_rows(model, plan: ForwardPlan, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  *, pad_token_id: int = 0) -> ResponseRows:
    """Sequence i scores responses[i] given prompts[i]: packed padding-free (nothing shared), or padded."""
    if plan.layout == "padded":
        return padded_response_rows(model, prompts, responses, pad_token_id=pad_token_id)
    return packed_rows(model, pack_sequences(prompts, responses), len(prompts), plan)


def response_logprobs(model, plan: ForwardPlan, prompts, responses, *, pad_token_id: int = 0) -> torch.Tensor:
    """[len(prompts)] summed log-probs of each response given its prompt."""
    rows = response_rows(model, plan, prompts, responses, pad_token_id=pad_token_id)
    return sequence_logprobs(rows.hidden, rows.weight, rows.labels, rows.seq_index, rows.num_seqs,
                             impl=plan.loss_impl, softcap=rows.softcap)
