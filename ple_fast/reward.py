"""Reward functions r(x, y) and reward normalisers.

Every reward takes the ORIGINAL queries and the decoded responses (texts) and returns a
float tensor [B]. Three kinds: a local HF sequence-classification folder, a Python callable
named `module:function`, and the embedded task's built-in reward.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import torch


def join_text(query: str, response: str) -> str:
    """Query and response as one dialogue, e.g. '...Assistant:' + ' ' + 'Sure...'."""
    if query and response and not query[-1].isspace() and not response[0].isspace():
        return f"{query} {response}"
    return query + response


class RewardFunction:
    name = "reward"

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class BuiltinReward(RewardFunction):
    """The embedded task's rule-based reward (ple_fast.task.builtin_reward)."""
    name = "builtin"

    def __call__(self, queries, responses):
        from ple_fast.task import builtin_reward
        return torch.tensor([builtin_reward(q, r) for q, r in zip(queries, responses)],
                            dtype=torch.float32)


class CallableReward(RewardFunction):
    """`module:function` where function(queries: list[str], responses: list[str]) -> list[float]."""

    def __init__(self, spec: str):
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"reward.path {spec!r}: a Python reward is named 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward.path {spec!r}: cannot import module {module_name!r}: {err}") from err
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ValueError(f"reward.path {spec!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ValueError(f"reward.path {spec!r} is not callable")
        self.fn: Callable = fn
        self.name = spec

    def __call__(self, queries, responses):
        scores = self.fn(list(queries), list(responses))
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
        if scores.numel() != len(queries):
            raise ValueError(f"reward {self.name} returned {scores.numel()} scores for {len(queries)} responses")
        return scores


class HFReward(RewardFunction):
    """A local AutoModelForSequenceClassification folder with one output (Bradley-Terry RM)."""

    def __init__(self, path: str, *, device="cpu", dtype=torch.float32, batch_size: int = 16,
                 max_length: int = 1024):
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from ple_fast.models import _check_model_dir, load_tokenizer

        folder = _check_model_dir(path, "reward model")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"reward model {str(folder)!r} has num_labels={config.num_labels}; "
                             "a reward model needs exactly one output")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True).to(device).eval()
        except ValueError as err:
            raise ValueError(f"{str(folder)!r} is not a sequence-classification model "
                             f"(model_type={config.model_type!r}): {err}") from err
        self.tokenizer = load_tokenizer(folder)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"   # a long dialogue loses its start, never the response
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.name = str(folder)

    @torch.no_grad()
    def __call__(self, queries, responses):
        scores = []
        for start in range(0, len(queries), self.batch_size):
            texts = [join_text(q, r) for q, r in zip(queries[start:start + self.batch_size],
                                            responses[start:start + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def build_reward(kind: str, path: str | None, *, device="cpu", dtype=torch.float32,
                 batch_size: int = 16) -> RewardFunction:
    if kind == "builtin":
        return BuiltinReward()
    if kind == "python":
        if not path:
            raise ValueError("reward.kind=python needs reward.path='module:function'")
        return CallableReward(path)
    if kind == "hf":
        if not path:
            raise ValueError("reward.kind=hf needs reward.path=<local reward-model folder>")
        return HFReward(path, device=device, dtype=dtype, batch_size=batch_size)
    raise ValueError(f"reward.kind {kind!r}: choose builtin, python or hf")


class RewardNormalizer:
    """Rewards before the gate: none | batch_zscore | running_zscore (Welford over all seen)."""

    def __init__(self, mode: str = "none", eps: float = 1e-6):
        if mode not in ("none", "batch_zscore", "running_zscore"):
            raise ValueError(f"reward.normalize {mode!r}: choose none, batch_zscore or running_zscore")
        self.mode, self.eps = mode, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return rewards
        finite = rewards[torch.isfinite(rewards)].double()
        if self.mode == "batch_zscore":
            if finite.numel() < 2:
                return rewards - (finite.mean().float() if finite.numel() else 0.0)
            return (rewards - finite.mean().float()) / (finite.std().float() + self.eps)
        for value in finite.tolist():          # running: update, then normalise with the new stats
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0
        return (rewards - self.mean) / (std + self.eps)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
