"""Held-out evaluation of the unprincipled policy, against the SFT starting point.

Measures, on held-out queries: the mean reward of responses generated WITHOUT the principle,
the reward margin and win rate over the SFT model's responses (same queries, same sampling
seeds), and the perplexity of held-out reference responses. A task may add its own rates
(the embedded task reports refusals of harmful and helpfulness on benign requests).

Drift, which a reward can reward: the mean response length, the share of degenerate responses
(empty, or ending in a loop), the share of distinct responses, and KL(SFT || policy) per response,
estimated on the SFT model's own held-out samples, whose SFT log-probs are taken once at the SFT
start: mean over them of log pi_SFT(y|x) - log pi(y|x). (That direction needs no copy of the SFT
model; KL(policy || SFT) would score the policy's samples under it.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ple_fast.distributed import Dist
from ple_fast.policy import Policy, Sampling
from ple_fast.runtime import Progress
from ple_fast.workload import EvalSet


LOOP_PERIODS = range(1, 9)     # a response ending in a cycle of 1-8 tokens, three times over, is degenerate


@dataclass
class EvalResult:
    metrics: dict
    rewards: torch.Tensor         # [queries * samples] per-response rewards (for margins later)
    responses: list[str]
    samples: list[list[int]]      # their token ids: sample i answers query i // samples
    logps: list[float]            # log pi(sample | query) under the evaluated policy


def degenerate(tokens: Sequence[int], special: set[int]) -> bool:
    """Empty (special tokens only), or ending in a loop: a cycle of at most 8 tokens three times over."""
    body = [t for t in tokens if t not in special]
    return not body or any(len(body) >= 3 * p and body[-3 * p:] == body[-p:] * 3 for p in LOOP_PERIODS)


def drift_metrics(samples: Sequence[Sequence[int]], texts: Sequence[str], special: set[int]) -> dict:
    """Length, degenerate share and distinct share of a set of responses (token ids and their texts)."""
    count = max(len(samples), 1)
    return {"mean_response_tokens": sum(map(len, samples)) / count,
            "degenerate_share": sum(degenerate(t, special) for t in samples) / count,
            "distinct_share": len(set(texts)) / count}


def sample_logprobs(policy: Policy, prompts: Sequence[Sequence[int]], samples: Sequence[Sequence[int]],
                    batch_size: int) -> list[float]:
    """log pi(sample | prompt) of each sample under the policy, in batches."""
    out: list[float] = []
    for lo in range(0, len(prompts), batch_size):
        out += policy.logprobs(prompts[lo:lo + batch_size], samples[lo:lo + batch_size]).double().cpu().tolist()
    return out


def kl_from_sft(policy: Policy, reference: dict, prompts_of: Callable[[int], Sequence[int]], batch_size: int,
                dist: Dist, limit: int | None = None) -> float:
    """KL(SFT || policy) per response: the mean of log pi_SFT - log pi over the SFT start's samples
    (reference["samples"] / ["logps"], the first `limit`), split across ranks."""
    samples, ref = reference["samples"][:limit], reference["logps"][:limit]
    indices, real = dist.shard(list(range(len(samples))))
    now = sample_logprobs(policy, [prompts_of(i) for i in indices], [samples[i] for i in indices], batch_size)
    gap = sum(ref[i] - value for i, value, keep in zip(indices, now, real) if keep)
    return dist.sum(gap) / max(len(samples), 1)


@torch.no_grad()
def evaluate(policy: Policy, tokenizer, eval_set: EvalSet, reward_fn, *, samples: int, sampling: Sampling,
             batch_size: int, seed: int, baseline: dict | None = None,
             task_metrics: Callable[[Sequence[str], Sequence[str]], dict] | None = None,
             progress: bool = False, dist: Dist | None = None) -> EvalResult:
    """Generate `samples` responses per held-out query (seeded per batch, so two models are
    compared on the same draws), score them, and compare with the SFT start's result `baseline`
    (its rewards, samples and log-probs; None: this is the SFT start)."""
    dist = dist if dist is not None else Dist()
    model = policy.model
    was_training = model.training
    model.eval()
    all_texts = [t for t in eval_set.texts for _ in range(samples)]
    indices, real = dist.shard(list(range(len(all_texts))))    # each rank generates and scores its share
    prompts = [eval_set.ids[i // samples] for i in indices]
    texts = [all_texts[i] for i in indices]
    token_lists: list[list[int]] = []
    start = time.perf_counter()
    bar = Progress(len(prompts), "eval", enabled=progress, unit="resp")
    for index, lo in enumerate(range(0, len(prompts), batch_size)):
        token_lists += policy.generate(prompts[lo:lo + batch_size], sampling, seed=seed + index)
        bar.set_postfix(generated_tok_s=f"{sum(map(len, token_lists)) / (time.perf_counter() - start):,.0f}")
        bar.update(len(prompts[lo:lo + batch_size]))
    bar.close()
    responses = [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]
    rewards = reward_fn(texts, responses).float() if texts else torch.zeros(0)
    logps = dist.gather(sample_logprobs(policy, prompts, token_lists, batch_size), real)
    token_lists = dist.gather(token_lists, real)
    responses = dist.gather(responses, real)
    rewards = torch.tensor(dist.gather(rewards.tolist(), real), dtype=torch.float32)
    texts = all_texts
    finite = torch.isfinite(rewards)
    metrics = {"mean_reward": rewards[finite].mean().item() if finite.any() else float("nan"),
               "nonfinite_rewards": int((~finite).sum()),
               "nonfinite_share": (~finite).float().mean().item() if len(rewards) else 0.0,
               "mean_response_tokens": sum(len(t) for t in token_lists) / max(len(token_lists), 1)}
    metrics.update(drift_metrics(token_lists, responses, set(tokenizer.all_special_ids)))
    if baseline is None:
        metrics["kl_vs_sft"] = 0.0
    else:
        baseline_rewards = torch.tensor(baseline["rewards"], dtype=torch.float32)
        both = finite & torch.isfinite(baseline_rewards)
        diff = rewards[both] - baseline_rewards[both]
        metrics["margin_vs_sft"] = diff.mean().item() if both.any() else float("nan")
        metrics["win_rate_vs_sft"] = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item() \
            if both.any() else float("nan")
        metrics["kl_vs_sft"] = kl_from_sft(policy, baseline, lambda i: eval_set.ids[i // samples], batch_size, dist)
    metrics["perplexity"] = reference_perplexity(policy, eval_set, batch_size=batch_size, dist=dist)
    if task_metrics is not None:
        metrics.update(task_metrics(texts, responses))
    model.train(was_training)
    return EvalResult(metrics, rewards, responses, token_lists, logps)


def reference_perplexity(policy: Policy, eval_set: EvalSet, *, batch_size: int, dist: Dist | None = None) -> float:
    """exp(token-averaged NLL) of the reference responses given the query (no principle)."""
    dist = dist if dist is not None else Dist()
    pairs = [(q, r) for q, r in zip(eval_set.ids, eval_set.references) if r]
    if not pairs:
        return float("nan")
    pairs, real = dist.shard(pairs)
    nll, tokens = 0.0, 0
    for lo in range(0, len(pairs), batch_size):
        chunk, keep = pairs[lo:lo + batch_size], torch.tensor(real[lo:lo + batch_size], dtype=torch.float64)
        logps = policy.logprobs([c[0] for c in chunk], [c[1] for c in chunk])
        nll -= (logps.double().cpu() * keep).sum().item()
        tokens += sum(len(c[1]) for c, k in zip(chunk, real[lo:lo + batch_size]) if k)
    return math.exp(dist.sum(nll) / dist.sum(tokens))


ROWS = [("mean_reward", "mean reward (no principle)", "{:+.3f}"),
        ("margin_vs_sft", "reward margin over SFT", "{:+.3f}"),
        ("win_rate_vs_sft", "win rate over SFT", "{:.1%}"),
        ("perplexity", "perplexity of held-out refs", "{:.3f}"),
        ("mean_response_tokens", "mean response length (tokens)", "{:.1f}"),
        ("degenerate_share", "degenerate responses (empty, loops)", "{:.1%}"),
        ("distinct_share", "distinct responses", "{:.1%}"),
        ("kl_vs_sft", "KL(SFT || policy) per response", "{:.3f}")]


def _show(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _nonfinite(metrics: dict) -> str:
    return f"{metrics.get('nonfinite_rewards', 0)} ({metrics.get('nonfinite_share', 0.0):.1%})"


def format_line(metrics: dict, extra_rows: Sequence[tuple[str, str, str]] = ()) -> str:
    """One evaluation's numbers on one line, labelled as in the table."""
    parts = [f"{label} {_show(metrics[key], fmt)}" for key, label, fmt in list(ROWS) + list(extra_rows)
             if key in metrics]
    if metrics.get("nonfinite_rewards"):
        parts.append(f"non-finite rewards {_nonfinite(metrics)}")
    return " | ".join(parts)


def format_table(before: dict, after: dict, algo: str, extra_rows: Sequence[tuple[str, str, str]] = ()) -> str:
    """A before/after table; rows absent from both sides are left out, and non-finite rewards (left out of
    the means) get a row of their own where there were any."""
    rows = list(ROWS) + list(extra_rows)
    header = ("metric", "SFT start", f"after {algo}", "change")
    lines = []
    for key, label, fmt in rows:
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        change = "-" if b is None or a is None else ("{:+.3f}".format(a - b) if "%" not in fmt
                                                      else "{:+.1f} pts".format(100 * (a - b)))
        lines.append((label, _show(b, fmt), _show(a, fmt), change))
    if before.get("nonfinite_rewards") or after.get("nonfinite_rewards"):
        lines.append(("non-finite rewards (left out)", _nonfinite(before), _nonfinite(after), "-"))
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(4)]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * (sum(widths) + 6)
    return "\n".join([fmt_row(header), rule] + [fmt_row(r) for r in lines])
