"""The training loops: SFT warm-up, then PLE (or a baseline) over rollouts of the policy.

PLE, as ../DESIGN.md section 1 defines it: per batch of queries, generate the original and the
principle-guided response, score both against the ORIGINAL query, and update with the
threshold-gated loss; tau decays by alpha per iteration (or per step). The baselines share the
loop and the sample budget (two generated responses per query):
  sft      warm-up only, no alignment updates
  raft     two samples without the principle, SFT on the higher-reward one
  distill  always SFT on the principle-guided response (context distillation)
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ple_fast.config import Config
from ple_fast.forward import padded_response_rows
from ple_fast.loss import ple_loss, sequence_logprobs
from ple_fast.reward import RewardFunction, RewardNormalizer
from ple_fast.rollout import generate, generate_dual


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and echoes a short line."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] = print):
        self.path, self.echo = path, echo
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict, line: str | None = None) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if line:
            self.echo(line)


@dataclass
class Query:
    text: str
    ids: list[int]


@dataclass
class AlignmentState:
    tau: float
    step: int = 0
    iteration: int = 0
    history: list[dict] = field(default_factory=list)


def mean_logprob_loss(seq_logps: torch.Tensor, seq_tokens: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """-mean_i l(y_i): the SFT objective on whole sequences, as PLE's l(y) defines it."""
    if length_normalize:
        return -(seq_logps / seq_tokens.clamp(min=1)).mean()
    return -seq_logps.mean()


def _seq_tokens(responses: Sequence[Sequence[int]], device) -> torch.Tensor:
    return torch.tensor([len(r) for r in responses], dtype=torch.long, device=device)


def response_logprobs(model, prompts, responses, *, impl: str, pad_token_id: int) -> torch.Tensor:
    rows = padded_response_rows(model, prompts, responses, pad_token_id=pad_token_id)
    return sequence_logprobs(rows.hidden, rows.weight, rows.labels, rows.seq_index, rows.num_seqs,
                             impl=impl, softcap=rows.softcap)


def run_sft(model, examples: Sequence[tuple[list[int], list[int]]], cfg: Config, log: MetricsLog,
            *, pad_token_id: int) -> None:
    """Warm-up: token-averaged NLL of the responses, sampled with replacement from the SFT set."""
    steps = cfg.sft.steps
    if steps <= 0 or not examples:
        return
    rng = random.Random(cfg.run.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    start, tokens = time.perf_counter(), 0
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.sft.batch_size)]
        prompts, responses = [b[0] for b in batch], [b[1] for b in batch]
        logps = response_logprobs(model, prompts, responses, impl=cfg.ple.loss_impl, pad_token_id=pad_token_id)
        n_tokens = sum(len(r) for r in responses)
        loss = -logps.sum() / max(n_tokens, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.ple.grad_clip)
        optimizer.step()
        schedule.step()
        tokens += n_tokens
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            log.write({"phase": "sft", "step": step, "loss": loss.item(), "tokens_per_s": tokens / elapsed},
                      f"[sft] step {step:4d}/{steps}  loss {loss.item():.4f}  {tokens / elapsed:,.0f} tok/s")


def _decode(tokenizer, seqs: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


def run_alignment(model, tokenizer, queries: Sequence[Query], principle_ids: list[int],
                  reward_fn: RewardFunction, cfg: Config, log: MetricsLog) -> AlignmentState:
    """PLE or a baseline for cfg.ple.iterations passes over the queries."""
    pc, rc = cfg.ple, cfg.rollout
    state = AlignmentState(tau=pc.tau0)
    if pc.algo == "sft" or pc.iterations <= 0 or not queries:
        return state
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    normalizer = RewardNormalizer(cfg.reward.normalize)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=0.0)
    rng = random.Random(cfg.run.seed + 1)
    for iteration in range(pc.iterations):
        order = list(range(len(queries)))
        rng.shuffle(order)
        totals = {"pairs": 0, "ranked": 0, "delta": 0.0, "s": 0.0, "s_p": 0.0, "loss": 0.0,
                  "dropped": 0, "steps": 0, "tokens": 0}
        tau_at_start = state.tau
        start = time.perf_counter()
        for lo in range(0, len(order), pc.batch_size):
            batch = [queries[i] for i in order[lo:lo + pc.batch_size]]
            q_ids, q_texts = [q.ids for q in batch], [q.text for q in batch]
            seed = cfg.run.seed * 1_000_003 + state.step
            gen = dict(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                       top_k=rc.top_k, eos_token_id=eos_id, pad_token_id=pad_id, seed=seed)
            if pc.algo == "raft":
                # n samples per query without the principle (budget: n >= 2, same as PLE's two)
                samples = generate(model, [q for q in q_ids for _ in range(pc.raft_samples)], **gen)
                first = samples[0::pc.raft_samples]
                second = samples[1::pc.raft_samples]
            else:
                roll = generate_dual(model, q_ids, principle_ids, backend=rc.backend, **gen)
                first, second = roll.originals, roll.principled
                samples = None
            with torch.no_grad():
                if samples is None:
                    raw = torch.stack([reward_fn(q_texts, _decode(tokenizer, first)),
                                       reward_fn(q_texts, _decode(tokenizer, second))], dim=1)
                else:
                    texts = [t for t in q_texts for _ in range(pc.raft_samples)]
                    raw = reward_fn(texts, _decode(tokenizer, samples)).view(len(batch), pc.raft_samples)
                rewards = normalizer(raw.flatten()).view_as(raw)
            model.train()
            if pc.algo == "ple":
                prompts = [q for q in q_ids for _ in range(2)]
                responses = [r for pair in zip(first, second) for r in pair]
                rows = padded_response_rows(model, prompts, responses, pad_token_id=pad_id)
                out = ple_loss(rows.hidden, rows.weight, rows.labels, rows.seq_index, rewards.to(device),
                               state.tau, rank_loss=pc.rank_loss, weighting=pc.weighting,
                               rank_sft_coef=pc.rank_sft_coef, length_normalize=pc.length_normalize,
                               beta=pc.beta, impl=pc.loss_impl, softcap=rows.softcap)
                loss = out.loss
                valid = out.valid.cpu()
                totals["ranked"] += int(out.ranked.sum())
                totals["dropped"] += int(out.num_dropped)
                delta = (rewards[:, 1] - rewards[:, 0])[valid]
            else:
                if pc.algo == "raft":
                    finite = torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, -math.inf))
                    best = finite.argmax(dim=1).tolist()
                    valid = torch.isfinite(rewards).any(dim=1)
                    targets = [samples[k * pc.raft_samples + b] for k, b in enumerate(best)]
                    delta = (raw[:, 1] - raw[:, 0])[torch.isfinite(raw).all(dim=1)] if pc.raft_samples >= 2 \
                        else torch.zeros(0)
                else:  # distill
                    valid = torch.ones(len(batch), dtype=torch.bool)
                    targets = second
                    delta = (rewards[:, 1] - rewards[:, 0])[torch.isfinite(rewards).all(dim=1)]
                keep = [k for k in range(len(batch)) if valid[k]]
                totals["dropped"] += len(batch) - len(keep)
                if keep:
                    kept_targets = [targets[k] for k in keep]
                    logps = response_logprobs(model, [q_ids[k] for k in keep], kept_targets,
                                              impl=pc.loss_impl, pad_token_id=pad_id)
                    loss = mean_logprob_loss(logps, _seq_tokens(kept_targets, device), pc.length_normalize)
                else:
                    loss = None
            if loss is not None and torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
                optimizer.step()
                totals["loss"] += loss.item()
                totals["steps"] += 1
            finite_raw = raw[torch.isfinite(raw).all(dim=1)]
            totals["pairs"] += len(batch)
            totals["delta"] += float(delta.sum()) if delta.numel() else 0.0
            totals["s"] += float(finite_raw[:, 0].sum())
            totals["s_p"] += float(finite_raw[:, -1].sum())
            totals["tokens"] += sum(len(r) for r in first) + sum(len(r) for r in second)
            state.step += 1
            if pc.decay == "step":
                state.tau *= pc.alpha
        if pc.decay == "iteration":
            state.tau *= pc.alpha
        state.iteration = iteration + 1
        scored = max(totals["pairs"] - totals["dropped"], 1)
        record = {"phase": "align", "algo": pc.algo, "iteration": iteration + 1, "step": state.step,
                  "tau": tau_at_start, "ranked_share": totals["ranked"] / scored if pc.algo == "ple" else None,
                  "mean_delta": totals["delta"] / scored, "mean_reward": totals["s"] / scored,
                  "mean_reward_principled": totals["s_p"] / scored,
                  "loss": totals["loss"] / max(totals["steps"], 1), "dropped_pairs": totals["dropped"],
                  "generated_tokens_per_s": totals["tokens"] / (time.perf_counter() - start)}
        state.history.append(record)
        second_name = "r(2nd sample)" if pc.algo == "raft" else "r(y_p)"
        ranked = f"ranked {record['ranked_share']:.2f}  " if pc.algo == "ple" else ""
        log.write(record, f"[{pc.algo}] iter {iteration + 1}/{pc.iterations}  tau {tau_at_start:.3f}  {ranked}"
                          f"delta {record['mean_delta']:+.3f}  r(y) {record['mean_reward']:+.3f}  "
                          f"{second_name} {record['mean_reward_principled']:+.3f}  loss {record['loss']:.4f}"
                          + (f"  dropped {totals['dropped']}" if totals["dropped"] else ""))
    return state
