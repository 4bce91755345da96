"""The policy as the algorithms and the evaluation use it: its model, and how it generates and scores.

A Policy binds the model to its Plan (how forwards and rollouts run), its RolloutEngine (owned here
for the run, so its buffers and CUDA graphs are reused between calls), the tokenizer's special ids
and the principle. Algorithms and the evaluation call these methods; none of them chooses a backend.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ple_fast.engine import RolloutEngine
from ple_fast.forward import ResponseRows, dual_response_rows, response_logprobs
from ple_fast.plan import Plan
from ple_fast.rollout import DualRollout, generate, generate_dual, generate_pairs
from ple_fast.workload import Query


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class Policy:
    def __init__(self, model: nn.Module, plan: Plan, *, pad_token_id: int, eos_token_id: int | Sequence[int] | None,
                 bos_token_id: int | None = None, principle: Sequence[int] = (), device: torch.device | None = None):
        self.model, self.plan = model, plan
        self.pad_id, self.eos_id, self.bos_id = pad_token_id, eos_token_id, bos_token_id
        self.principle = list(principle)
        self.device = device if device is not None else next(model.parameters()).device
        self.engine = RolloutEngine(model, plan.engine) if plan.rollout_backend == "fast" else None

    def autocast(self):
        """The plan's autocast around a forward (none without one)."""
        if self.plan.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.plan.autocast)

    def _sampling_kwargs(self, sampling: Sampling, seed: int) -> dict:
        return dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    top_k=sampling.top_k, eos_token_id=self.eos_id, pad_token_id=self.pad_id, seed=seed,
                    backend=self.plan.rollout_backend, engine=self.engine)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        """y ~ pi(.|prompt) for each prompt, seeded."""
        with self.autocast():
            return generate(self.model, prompts, **self._sampling_kwargs(sampling, seed))

    def generate_dual(self, queries: Sequence[Query], sampling: Sampling, seed: int) -> DualRollout:
        """y ~ pi(.|x) and y_p ~ pi(.|p + x) for each query x, p the principle, seeded; where the queries carry
        their whole principle-guided prompts (a chat template places the principle), those."""
        with self.autocast():
            if queries and all(q.principled_ids is not None for q in queries):
                return generate_pairs(self.model, [q.ids for q in queries], [q.principled_ids for q in queries],
                                      **self._sampling_kwargs(sampling, seed))
            return generate_dual(self.model, [q.ids for q in queries], self.principle, bos_token_id=self.bos_id,
                                 **self._sampling_kwargs(sampling, seed))

    def dual_rows(self, queries, originals, principled) -> ResponseRows:
        """The scored rows of both responses of each query (`forward.dual_response_rows`), under autocast
        when the caller opened it."""
        return dual_response_rows(self.model, self.plan.forward, queries, originals, principled,
                                  pad_token_id=self.pad_id)

    def logprobs(self, prompts, responses) -> torch.Tensor:
        """[len(prompts)] summed log-probs of each response given its prompt."""
        return response_logprobs(self.model, self.plan.forward, prompts, responses, pad_token_id=self.pad_id)
