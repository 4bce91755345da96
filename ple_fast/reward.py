"""Reward functions r(x, y) and reward normalisers.

Every reward takes the ORIGINAL queries and the decoded responses (texts) and returns a
float tensor [B]. Three kinds: a local HF sequence-classification folder, a Python callable
named `module:function`, and the embedded task's built-in reward.
"""
from __future__ import annotations

import importlib
import math
import sys
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from ple_fast.attention import BACKENDS, resolve_backend
from ple_fast.config import InputError
from ple_fast.forward import dual_forward
from ple_fast.layout import SEGMENTS_PER_PAIR, pack_dual, pack_sequences
from ple_fast.models import check_model_dir, decoder_of, load_tokenizer
from ple_fast.task import builtin_reward


class RewardError(InputError):
    """The reward gave nothing to learn from (every pair NaN or inf, batch after batch)."""


def join_text(query: str, response: str) -> str:
    """Query and response as one dialogue, e.g. '...Assistant:' + ' ' + 'Sure...'."""
    if query and response and not query[-1].isspace() and not response[0].isspace():
        return f"{query} {response}"
    return query + response


def _check_pairs(queries: Sequence, first: Sequence, second: Sequence) -> None:
    if not len(queries) == len(first) == len(second):
        raise ValueError(f"score_pairs: got {len(queries)} queries, {len(first)} first and "
                         f"{len(second)} second responses; need one of each per pair")


class RewardFunction:
    name = "reward"

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_pairs(self, queries: Sequence[str], first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
        """[B, 2] float32: r(queries[k], first[k]) and r(queries[k], second[k]), both against the same query.

        The trainer scores PLE pairs through this, so a reward that can share work between a pair's
        two responses (HFReward: one forward of the query) overrides it; the default is two calls.
        """
        _check_pairs(queries, first, second)
        return torch.stack([self(queries, first).float(), self(queries, second).float()], dim=1)


class BuiltinReward(RewardFunction):
    """The embedded task's rule-based reward (ple_fast.task.builtin_reward)."""
    name = "builtin"

    def __call__(self, queries, responses):
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


def _packing_unsupported(err: Exception) -> bool:
    """Errors that mean "this model/backend cannot run packed", not a bug: tree attention's refusals
    (softcap, sinks, dropout: NotImplementedError) and a failed torch.compile."""
    if isinstance(err, NotImplementedError):
        return True
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(err, dynamo.TorchDynamoException)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class HFReward(RewardFunction):
    """A local AutoModelForSequenceClassification folder with one output (Bradley-Terry RM).

    `__call__` is the right-padded reference: one padded forward per `batch_size` texts.
    `score_pairs` scores a pair's two responses packed and padding-free: the tokens both texts share
    (the query) run once through the trunk with tree attention (ple_fast.forward.dual_forward), and
    the `score` head reads each sequence's pooled row. Models without a one-output `score` Linear, or
    whose attention tree attention refuses, are scored by the padded path instead.
    """

    DEFAULT_PACKED_TOKENS = 16384
    DEFAULT_PACKED_TOKENS_SDPA = 512    # sdpa attends densely over [heads, N, N]: small chunks are faster (CPU)

    def __init__(self, path: str, *, device="cpu", dtype=torch.float32, batch_size: int = 16,
                 max_length: int = 1024, attention: str = "auto", max_packed_tokens: int | None = None):
        if attention not in BACKENDS:
            raise ValueError(f"reward attention backend {attention!r}: choose one of {BACKENDS}")
        if max_packed_tokens is not None and max_packed_tokens < 1:
            raise ValueError(f"max_packed_tokens must be >= 1, got {max_packed_tokens}")
        folder = check_model_dir(path, "reward model")
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

        # Packed scoring needs the trunk and a head we can apply to chosen rows; decided once here.
        head = getattr(self.model, "score", None)
        self._head = head if isinstance(head, nn.Linear) and head.out_features == 1 else None
        try:
            decoder_of(self.model)
            has_trunk = True
        except TypeError:
            has_trunk = False
        self.packed = self._head is not None and has_trunk
        self.attention = attention
        if max_packed_tokens is None:
            param = next(self.model.parameters())
            sdpa = resolve_backend(attention, param.device) == "sdpa"
            max_packed_tokens = self.DEFAULT_PACKED_TOKENS_SDPA if sdpa else self.DEFAULT_PACKED_TOKENS
        self.max_packed_tokens = max_packed_tokens

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

    @torch.no_grad()
    def score_pairs(self, queries, first, second):
        """[B, 2] float32, the numbers `__call__` gives (to fp rounding), each query computed once.

        Both texts are tokenised exactly as the padded path does (join_text, truncation, special
        tokens), and the shared root is their longest common token prefix, so a BPE merge across
        the query/response boundary, an empty response or one response a prefix of the other are
        all exact. Pairs sharing no token (left truncation cut them differently) are packed as two
        independent sequences. Pooling follows HF's padded rule: the head reads the rightmost token
        whose id is not pad_token_id (the first token if all are). So when a text's own tokens end
        in the pad id (e.g. pad = eos and the text ends in eos), both paths read the token before
        it, not the literal last token; a model class with a different pooling rule than HF's
        sequence classifiers would differ from its padded scores here.
        """
        _check_pairs(queries, first, second)
        if not self.packed:
            return super().score_pairs(queries, first, second)
        ids_a = self._encode([join_text(q, r) for q, r in zip(queries, first)])
        ids_b = self._encode([join_text(q, r) for q, r in zip(queries, second)])
        scores = torch.empty(len(queries), 2, dtype=torch.float32)
        shared, separate, padded = {}, [], []           # shared: pair -> its common token prefix
        for k, (a, b) in enumerate(zip(ids_a, ids_b)):
            lcp = common_prefix(a, b)
            if not a or not b:
                padded.append(k)          # nothing to pack: leave an empty text to the reference
            elif lcp == 0:
                separate.append(k)
            else:
                shared[k] = lcp
        try:
            self._score_shared(shared, ids_a, ids_b, scores)
            self._score_separate(separate, ids_a, ids_b, scores)
        except Exception as err:
            if not _packing_unsupported(err):
                raise
            warnings.warn(f"reward model {self.name}: packed scoring unsupported "
                          f"({type(err).__name__}: {str(err)[:300]}); using the padded path from now on")
            self.packed = False
            return super().score_pairs(queries, first, second)
        if padded:
            scores[padded] = super().score_pairs(*([xs[k] for k in padded] for xs in (queries, first, second)))
        return scores

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the padded path builds them, before padding."""
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def _pool_index(self, ids: Sequence[int]) -> int:
        """Index of the token HF's padded forward pools: the rightmost non-pad one, else 0."""
        pad = self.model.config.get_text_config().pad_token_id
        if pad is None:
            return len(ids) - 1
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] != pad:
                return i
        return 0

    def _chunks(self, items: list[int], cost) -> list[list[int]]:
        """Consecutive groups of at most max_packed_tokens rows; an item over budget goes alone."""
        chunks, current, used = [], [], 0
        for k in items:
            c = cost(k)
            if current and used + c > self.max_packed_tokens:
                chunks.append(current)
                current, used = [], 0
            current.append(k)
            used += c
        if current:
            chunks.append(current)
        return chunks

    def _head_at(self, batch, rows: list[int]) -> torch.Tensor:
        hidden = dual_forward(self.model, batch, backend=self.attention)
        picked = hidden[torch.as_tensor(rows, device=hidden.device)]
        return self._head(picked)[:, 0].float().cpu()

    def _score_shared(self, lcps: dict[int, int], ids_a, ids_b, scores) -> None:
        """pack_dual: root = q[:-1], branch 3j+1 / 3j+2 = [q[-1]] + rest of a / b (layout.py).
        `lcps` maps each pair to the length of its texts' common token prefix (>= 1)."""
        cost = lambda k: len(ids_a[k]) + len(ids_b[k]) - lcps[k] + 1  # noqa: E731  (rows of the pair)
        for chunk in self._chunks(list(lcps), cost):
            batch = pack_dual([ids_a[k][:lcps[k]] for k in chunk], [ids_a[k][lcps[k]:] for k in chunk],
                              [ids_b[k][lcps[k]:] for k in chunk], device=self.device)
            seg_start = batch.seg_start.tolist()
            rows = []
            for j, k in enumerate(chunk):
                root = SEGMENTS_PER_PAIR * j
                for side, ids in enumerate((ids_a[k], ids_b[k])):
                    i = self._pool_index(ids)     # token i of the sequence: root row, else branch row
                    in_root = i < lcps[k] - 1
                    rows.append(seg_start[root] + i if in_root else
                                seg_start[root + 1 + side] + i - (lcps[k] - 1))
            scores[chunk] = self._head_at(batch, rows).view(len(chunk), 2)

    def _score_separate(self, pairs, ids_a, ids_b, scores) -> None:
        """pack_sequences: each whole text its own root segment, nothing shared."""
        for chunk in self._chunks(pairs, lambda k: len(ids_a[k]) + len(ids_b[k])):
            seqs = [ids for k in chunk for ids in (ids_a[k], ids_b[k])]
            batch = pack_sequences(seqs, [[] for _ in seqs], device=self.device)
            seg_start = batch.seg_start.tolist()
            rows = [seg_start[s] + self._pool_index(ids) for s, ids in enumerate(seqs)]
            scores[chunk] = self._head_at(batch, rows).view(len(chunk), 2)


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
