"""PLE and the baselines it is compared with: how each rolls out, what it scores, and what loss it takes.

Every algorithm spends the same sample budget, two generated responses per query (docs/method.md):

  ple      y ~ pi(.|x) and y_p ~ pi(.|p + x), both scored against x; the pair ranks y_p over y where
           s_p - s > tau, otherwise both are learnt with reward-derived weights
  raft     n samples of pi(.|x); SFT on the best-scored one
  distill  y and y_p as for PLE; SFT on y_p whatever the rewards (context distillation)
  sft      the warm-up alone: no alignment updates

The trainer (ple_fast.trainer) runs the step that calls these in order (sample, score, loss over
micro-batches, update, tau decay) and owns the phases, optimizer, checkpoints and logs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ple_fast.config import PLEConfig, RolloutConfig
from ple_fast.layout import to_device
from ple_fast.loss import ple_loss
from ple_fast.policy import Policy, Sampling
from ple_fast.reward import RewardFunction
from ple_fast.workload import Query


@dataclass
class Samples:
    """One step's responses: `first` / `second` per query (PLE: y / y_p; RAFT: its first two samples)."""
    first: list[list[int]]
    second: list[list[int]]
    drawn: list[list[int]] | None = None     # RAFT: every sample, query-major


@dataclass
class Step:
    """What a step's loss reads, on the host unless named device_."""
    queries: list[list[int]]
    samples: Samples
    rewards: torch.Tensor          # [B, k] after normalisation
    valid: torch.Tensor            # [B] bool: the query takes part in the loss
    valid_flags: list[bool]        # the same, read once before any forward is queued
    device_rewards: torch.Tensor   # rewards on the model's device, moved before any forward is queued


class Algorithm:
    name = ""
    aligns = True                  # False: the warm-up alone
    ranks = False                  # reports the share of pairs that took the ranking branch
    second_key = "principled"      # the second response's name in samples/*.jsonl

    def __init__(self, cfg: PLEConfig, rollout: RolloutConfig):
        self.cfg = cfg
        self.sampling = Sampling(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k)

    def sample(self, policy: Policy, queries: list[Query], seed: int) -> Samples:
        """y ~ pi(.|x) and y_p ~ pi(.|p + x) for each query."""
        roll = policy.generate_dual(queries, self.sampling, seed)
        return Samples(roll.originals, roll.principled)

    def score(self, reward: RewardFunction, texts: list[str], samples: Samples, decode) -> torch.Tensor:
        """[B, 2] rewards of y and y_p, both against the ORIGINAL query x."""
        return reward.score_pairs(texts, decode(samples.first), decode(samples.second))

    def valid(self, rewards: torch.Tensor, real: list[bool]) -> torch.Tensor:
        """[B] bool: which queries the loss uses (padding of a rank's shard has NaN rewards)."""
        return torch.isfinite(rewards).all(dim=1)

    def delta(self, raw: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """[B] the reward gap the iteration line reports."""
        return rewards[:, -1] - rewards[:, 0]

    def totals(self, raw: torch.Tensor, rewards: torch.Tensor, finite: torch.Tensor) -> dict[str, float]:
        """This step's sums for the iteration's record, over the queries whose rewards are all finite."""
        return {"delta": float(self.delta(raw, rewards)[finite].sum()), "s": float(raw[finite, 0].sum()),
                "s_p": float(raw[finite, -1].sum())}

    def report(self, totals: dict, scored: int) -> dict:
        """The iteration record's fields of this algorithm, from the summed totals."""
        return {"mean_delta": totals["delta"] / scored, "mean_reward": totals["s"] / scored,
                "mean_reward_principled": totals["s_p"] / scored}

    def line(self, record: dict) -> str:
        """The middle of the iteration line: the quantities this algorithm acts on."""
        return (f"delta {record['mean_delta']:+.3f}  r(y) {record['mean_reward']:+.3f}  "
                f"r(y_p) {record['mean_reward_principled']:+.3f}")

    def loss(self, policy: Policy, step: Step, micro: list[int], scale: float,
             tau: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(this micro-batch's share of the batch loss, ranked pairs or None). `scale` turns a sum over
        the micro-batch's valid queries into its share of the mean over the global batch."""
        raise NotImplementedError


class PLE(Algorithm):
    """The paper's method; the gate and both branches are `ple_fast.loss.ple_loss`."""
    name = "ple"
    ranks = True

    def line(self, record):
        return f"tau {record['tau']:.3f}  ranked {record['ranked_share']:.2f}  " + super().line(record)

    def loss(self, policy, step, micro, scale, tau):
        pc = self.cfg
        n_valid = sum(step.valid_flags[k] for k in micro)
        rows = policy.dual_rows([step.queries[k] for k in micro], [step.samples.first[k] for k in micro],
                                [step.samples.second[k] for k in micro])
        out = ple_loss(rows.hidden, rows.weight, rows.labels, rows.seq_index, step.device_rewards[micro], tau,
                       rank_loss=pc.rank_loss, weighting=pc.weighting, rank_sft_coef=pc.rank_sft_coef,
                       length_normalize=pc.length_normalize, beta=pc.beta, impl=policy.plan.forward.loss_impl,
                       softcap=rows.softcap, pair_rows=[len(step.samples.first[k]) + len(step.samples.second[k])
                                                        for k in micro])
        return out.loss * (n_valid * scale), (out.ranked & out.valid).sum()   # micro mean -> share of the batch's


class _SFTOnTarget(Algorithm):
    """SFT on one response per query (token-averaged with ple.length_normalize)."""

    def target(self, step: Step, k: int, best: int) -> list[int]:
        raise NotImplementedError

    def loss(self, policy, step, micro, scale, tau):
        best = torch.where(torch.isfinite(step.rewards), step.rewards, -torch.inf)[micro].argmax(dim=1).tolist()
        targets = [self.target(step, k, b) for k, b in zip(micro, best)]
        # moved before the forward is queued (a copy after it would wait for the GPU)
        counts = to_device(torch.tensor([max(len(r), 1) for r in targets]), policy.device)
        weights = to_device(step.valid[micro], policy.device)
        logps = policy.logprobs([step.queries[k] for k in micro], targets)
        per_seq = logps / counts if self.cfg.length_normalize else logps
        return -(per_seq * weights.to(per_seq.dtype)).sum() * scale, None


class RAFT(_SFTOnTarget):
    """Best-of-n without the principle (n = ple.raft_samples, 2 by default: PLE's budget)."""
    name = "raft"
    second_key = "second_sample"

    def sample(self, policy, queries, seed):
        n = self.cfg.raft_samples
        drawn = policy.generate([q.ids for q in queries for _ in range(n)], self.sampling, seed)
        return Samples(drawn[0::n], drawn[1::n], drawn)

    def score(self, reward, texts, samples, decode):
        """[B, n]: the samples two by two through `score_pairs`, the batched path PLE's pairs take (a
        reward model computes each query once per pair); an odd last sample alone."""
        n = self.cfg.raft_samples
        sample = [decode(samples.drawn[j::n]) for j in range(n)]
        columns = [reward.score_pairs(texts, sample[j], sample[j + 1]) for j in range(0, n - 1, 2)]
        if n % 2:
            columns.append(reward(texts, sample[-1]).float()[:, None])
        return torch.cat(columns, dim=1)

    def valid(self, rewards, real):
        return torch.isfinite(rewards).any(dim=1)       # the best finite sample is still a target

    def delta(self, raw, rewards):
        return raw[:, 1] - raw[:, 0]

    def totals(self, raw, rewards, finite):
        top2 = raw[finite].topk(2, dim=1).values if self.cfg.raft_samples > 1 else raw[finite].repeat(1, 2)
        return {**super().totals(raw, rewards, finite), "best": float(top2[:, 0].sum()),
                "second": float(top2[:, 1].sum()), "beat": float((top2[:, 0] > top2[:, 1]).sum())}

    def report(self, totals, scored):
        return {**super().report(totals, scored), "mean_reward_best": totals["best"] / scored,
                "mean_reward_second": totals["second"] / scored, "best_beat_share": totals["beat"] / scored}

    def line(self, record):
        return (f"best {record['mean_reward_best']:+.3f}  2nd {record['mean_reward_second']:+.3f}  "
                f"best beat the 2nd {record['best_beat_share']:.0%}")

    def target(self, step, k, best):
        return step.samples.drawn[k * self.cfg.raft_samples + best]


class Distill(_SFTOnTarget):
    """Context distillation: SFT on y_p, rewards only logged."""
    name = "distill"

    def valid(self, rewards, real):
        return torch.tensor(real, dtype=torch.bool)     # distillation does not use the rewards

    def target(self, step, k, best):
        return step.samples.second[k]


class SFTOnly(Algorithm):
    """The warm-up alone, evaluated like the others."""
    name = "sft"
    aligns = False


ALGORITHMS = {cls.name: cls for cls in (PLE, RAFT, Distill, SFTOnly)}


def make_algorithm(cfg: PLEConfig, rollout: RolloutConfig) -> Algorithm:
    return ALGORITHMS[cfg.algo](cfg, rollout)
