"""Rollouts: the original and the principle-guided response to each query.

This module's `backend="hf"` path runs Hugging Face `generate` on one left-padded batch
holding both prompt kinds; it is the reference that faster engines are checked against.
`backend="fast"` runs a RolloutEngine (static KV cache, on-device sampling, CUDA graphs), whose
packed prefill computes the principle once per call and shares its K/V with every principle-guided
prompt. The caller passes its engine (the trainer owns one for its run, and the engine keeps its
buffers and graphs between calls); without one, a call builds a fresh engine with the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ple_fast.distributed import unsharded_for_inference
from ple_fast.engine import RolloutEngine, cut_at_eos

BACKENDS = ("hf", "fast")


@dataclass
class DualRollout:
    originals: list[list[int]]     # response to queries[k] (ends with EOS unless cut by max_new_tokens)
    principled: list[list[int]]    # response to principle + queries[k]


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(e) for e in eos_token_id} if isinstance(eos_token_id, (list, tuple)) else {int(eos_token_id)}


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id: int | None = None,
             seed: int = 0, batch_size: int | None = None, backend: str = "hf",
             engine: RolloutEngine | None = None) -> list[list[int]]:
    """Responses to token-id prompts with HF generate (or the fast engine); seeded, each cut after its first EOS."""
    _check_backend(backend)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    eos_ids = _eos_set(model, eos_token_id)
    pad_token_id = _pad_id(model, pad_token_id, eos_ids)
    if backend == "fast":       # before the empty check: under torchrun every rank must gather weights
        return _generate_fast(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, eos_ids=eos_ids, pad_token_id=pad_token_id, seed=seed,
                              batch_size=batch_size, engine=engine)
    if not prompts:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad_token_id,
                  eos_token_id=sorted(eos_ids) if eos_ids else None)
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    batch_size = batch_size or len(prompts)
    responses: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                input_ids[row, width - len(prompt):] = torch.as_tensor(prompt)
                attention_mask[row, width - len(prompt):] = 1
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                kwargs["synced_gpus"] = True   # FSDP: every rank runs the same number of forwards
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 **kwargs)
            for row in out[:, width:].tolist():
                responses.append(cut_at_eos(row, eos_ids))
    model.train(was_training)
    return responses


def _pad_id(model, pad_token_id: int | None, eos_ids: set[int]) -> int:
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = min(eos_ids) if eos_ids else 0
    return pad_token_id


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"rollout backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _generate_fast(model, prompts, *, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_token_id, seed,
                   batch_size=None, prefix=(), prefixed=None, engine=None) -> list[list[int]]:
    batch_size = batch_size or max(1, len(prompts))
    responses: list[list[int]] = []
    with unsharded_for_inference(model):     # FSDP2 (torchrun): full weights for the whole rollout
        engine = RolloutEngine(model) if engine is None else engine
        for start in range(0, len(prompts), batch_size):
            responses += engine.generate(
                prompts[start:start + batch_size], max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, eos_token_ids=sorted(eos_ids), pad_token_id=pad_token_id,
                seed=seed + start, prefix=prefix,
                prefixed=None if prefixed is None else prefixed[start:start + batch_size])
    return responses


def principled_query(query: Sequence[int], principle: Sequence[int], bos_token_id: int | None) -> list[int]:
    """The query's tokens as they follow the principle: a BOS that both begin with appears once."""
    query = list(query)
    if bos_token_id is not None and len(query) > 1 and principle[:1] == [bos_token_id] \
            and query[0] == bos_token_id:
        return query[1:]
    return query


def generate_dual(model, queries: Sequence[Sequence[int]], principle: Sequence[int], *,
                  max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  eos_token_id=None, pad_token_id: int | None = None, seed: int = 0,
                  backend: str = "hf", bos_token_id: int | None = None,
                  engine: RolloutEngine | None = None) -> DualRollout:
    """y ~ pi(.|x) and y_p ~ pi(.|p + x) for each query, in one batch (the fast backend: by `engine`).

    With `bos_token_id`, a query that starts with it loses that token after a principle that
    starts with it too, so the principle-guided prompt reads BOS principle query."""
    _check_backend(backend)
    principle = list(principle)
    after_principle = [principled_query(q, principle, bos_token_id) for q in queries]
    if backend == "fast":
        if any(len(q) == 0 for q in queries):
            raise ValueError("generate_dual: every query needs at least one token")
        eos_ids = _eos_set(model, eos_token_id)
        pad_token_id = _pad_id(model, pad_token_id, eos_ids)
        prompts = [list(q) for q in queries] + after_principle
        out = _generate_fast(model, prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids,
                             pad_token_id=pad_token_id, seed=seed, prefix=list(principle),
                             prefixed=[False] * len(queries) + [True] * len(queries), engine=engine)
        return DualRollout(out[:len(queries)], out[len(queries):])
    prompts = [list(q) for q in queries] + [principle + q for q in after_principle]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
    return DualRollout(out[:len(queries)], out[len(queries):])


def generate_pairs(model, originals: Sequence[Sequence[int]], principled: Sequence[Sequence[int]], *,
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   eos_token_id=None, pad_token_id: int | None = None, seed: int = 0, backend: str = "hf",
                   engine: RolloutEngine | None = None) -> DualRollout:
    """y ~ pi(.|x) for each original prompt x and y_p ~ pi(.|principled[k]) for its principle-guided prompt,
    given whole (a chat template puts the principle inside the conversation: ple_fast.chat). The fast
    engine prefills the longest prefix the principle-guided prompts share once."""
    _check_backend(backend)
    if len(originals) != len(principled) or any(len(p) == 0 for p in [*originals, *principled]):
        raise ValueError("generate_pairs: one non-empty principle-guided prompt per non-empty original")
    if backend == "hf" or not principled:
        out = generate(model, [*originals, *principled], max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                       backend=backend, engine=engine)
        return DualRollout(out[:len(originals)], out[len(originals):])
    shared = min(len(p) for p in principled) - 1                      # every prompt keeps a token of its own
    for prompt in principled[1:]:
        shared = next((i for i in range(shared) if prompt[i] != principled[0][i]), shared)
    eos_ids = _eos_set(model, eos_token_id)
    out = _generate_fast(model, [list(q) for q in originals] + [list(p[shared:]) for p in principled],
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         eos_ids=eos_ids, pad_token_id=_pad_id(model, pad_token_id, eos_ids), seed=seed,
                         prefix=list(principled[0][:shared]),
                         prefixed=[False] * len(originals) + [True] * len(principled), engine=engine)
    return DualRollout(out[:len(originals)], out[len(originals):])
