"""The training run: SFT warm-up, evaluation, alignment (PLE or a baseline), evaluation again.

A run is a sequence of phases (sft -> eval_before -> align -> eval_after -> done) whose whole
position lives in TrainerState. Every random draw is derived from (seed, step), so a run resumed
from a checkpoint replays exactly what an uninterrupted run would have done. What an alignment step
samples, scores and optimises is the algorithm's (ple_fast.algorithms); the trainer owns the
phases, the optimizer and schedule, the micro-batches, checkpoints, signals and logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ple_fast.algorithms import Samples, Step, make_algorithm
from ple_fast.checkpoint import TRAINER_STATE, load_checkpoint, save_checkpoint
from ple_fast.config import Config, resolve_defaults
from ple_fast.data import adds_bos
from ple_fast.distributed import (Dist, clip_grad_norm, load_distributed_checkpoint, reshard,
                                  save_distributed_checkpoint, sync_replicated_grads)
from ple_fast.evaluate import degenerate, evaluate, format_line, kl_from_sft
from ple_fast.plan import Plan, build_plan
from ple_fast.policy import Policy, Sampling
from ple_fast.reward import RewardError, RewardFunction, RewardNormalizer
from ple_fast.runtime import MetricsLog, Progress
from ple_fast.workload import Query, Workload

PHASES = ("sft", "eval_before", "align", "eval_after", "done")
SAMPLES_PER_ITERATION = 32
KL_PROBE = 64                # SFT-start held-out samples the iteration line's KL is read on


@dataclass
class TrainerState:
    """Where a run is; JSON-serialisable so that it travels inside a checkpoint."""
    tau: float
    phase: str = "sft"
    sft_step: int = 0
    align_step: int = 0
    iteration: int = 0
    batch_in_iteration: int = 0
    nonfinite_streak: int = 0
    empty_streak: int = 0                            # batches in a row without a pair of finite rewards
    skipped_steps: int = 0
    normalizer: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)       # accumulators of the iteration in progress
    history: list = field(default_factory=list)      # one record per finished iteration
    before: dict | None = None                       # SFT-model evaluation: metrics, rewards
    after: dict | None = None
    metrics_lines: int = 0

    @property
    def global_step(self) -> int:
        return self.sft_step + self.align_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint has been written."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by signal {signum}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


@contextlib.contextmanager
def catch_stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""
    received: list[int] = []
    previous = {}

    def handler(signum, frame):
        received.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:          # not the main thread: leave signals alone
        previous = {}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up times constant / cosine / linear decay over the whole run."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        progress = min(step / max(total_steps, 1), 1.0)
        if schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return warm * (1.0 - progress)
        return warm
    return factor


def _chunks(items: list, parts: int) -> list[list]:
    """Split into at most `parts` contiguous, nearly equal, non-empty chunks."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Trainer:
    """Runs the phases of one run and owns its state, optimizer and checkpoints."""

    def __init__(self, cfg: Config, model, tokenizer, workload: Workload, reward_fn: RewardFunction,
                 log: MetricsLog, *, run_dir: Path | None = None, device=None, dist: Dist | None = None,
                 plan: Plan | None = None):
        self.cfg, self.model, self.tokenizer, self.work = cfg, model, tokenizer, workload
        self.dist = dist if dist is not None else Dist()
        self.reward_fn, self.log, self.run_dir = reward_fn, log, run_dir
        self.device = device if device is not None else next(model.parameters()).device
        self.state = TrainerState(tau=cfg.ple.tau0)
        self.normalizer = RewardNormalizer(cfg.reward.normalize)
        self.optimizer = self.scheduler = None
        self.optimizer_phase: str | None = None        # the phase self.optimizer belongs to
        self.stop_signals: list[int] = []
        resolve_defaults(cfg, cfg.ple.iterations * self.batches_per_iteration())   # no-op where run.py did it
        self.plan = build_plan(cfg, model, self.device) if plan is None else plan
        self.algorithm = make_algorithm(cfg.ple, cfg.rollout)
        self.policy = Policy(model, self.plan, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=[tokenizer.eos_token_id, *workload.stop_ids] if workload.stop_ids
                             else tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id if adds_bos(tokenizer) else None,  # one BOS in p + x
                             principle=workload.principle_ids, device=self.device)

    # ------------------------------------------------------------------ plumbing
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reshard(self) -> None:
        """After no_grad forwards (generate, evaluation) FSDP2 may leave layers unsharded, and
        then model.parameters() are the unsharded copies: re-shard before building an
        optimizer or taking a training step."""
        if self.dist.enabled:
            reshard(self.model)

    def build_optimizer(self, phase: str):
        self.reshard()
        if phase == "sft":
            lr, warmup, total, schedule = (self.cfg.sft.lr, self.cfg.sft.warmup_steps, self.cfg.sft.steps,
                                           self.cfg.sft.schedule)
        else:
            lr, warmup, schedule = self.cfg.ple.lr, self.cfg.ple.warmup_steps, self.cfg.ple.schedule
            total = self.cfg.ple.iterations * self.batches_per_iteration()
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, schedule))
        return optimizer, scheduler

    def batches_per_iteration(self) -> int:
        return math.ceil(len(self.work.queries) / self.cfg.ple.batch_size)

    def optimizer_for(self, phase: str):
        """The phase's optimizer: the one restored from a checkpoint of this phase, else a new one."""
        if self.optimizer_phase != phase:
            self.optimizer, self.scheduler = self.build_optimizer(phase)
            self.optimizer_phase = phase
        return self.optimizer, self.scheduler

    def resume_from(self, checkpoint: Path) -> None:
        """Restore weights, the saved phase's optimizer and scheduler, and the trainer state."""
        phase = json.loads((checkpoint / TRAINER_STATE).read_text()).get("phase")
        if phase in ("sft", "align"):
            self.optimizer_for(phase)
        parts = dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if self.dist.enabled:
            self.reshard()
            state = load_distributed_checkpoint(checkpoint, **parts)
        else:
            state = load_checkpoint(checkpoint, **parts)
        self.state = TrainerState.from_dict(state)
        if self.state.phase in ("sft", "eval_before"):
            self.state.tau = self.cfg.ple.tau0      # alignment has not begun: its threshold is this config's
        if self.state.normalizer:
            self.normalizer.load_state_dict(self.state.normalizer)
        self.log.truncate(self.state.metrics_lines)

    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        if self.optimizer is None:      # a run without updates still saves an optimizer state
            self.optimizer_for("align")
        self.state.normalizer = self.normalizer.state_dict()
        self.state.metrics_lines = self.log.lines
        parts = dict(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                     trainer_state=self.state.to_dict(), keep_last=self.cfg.run.keep_last)
        if self.dist.enabled:
            self.reshard()
            return save_distributed_checkpoint(self.dist, self.run_dir, self.state.global_step, **parts)
        return save_checkpoint(self.run_dir, self.state.global_step, **parts)

    def after_step(self) -> None:
        """Periodic checkpoint, and the clean stop that SIGINT/SIGTERM asked for."""
        every = self.cfg.run.save_every
        stop = bool(self.stop_signals)
        if self.dist.enabled:            # ranks see a signal at different moments: agree first
            stop = self.dist.sum(float(stop)) > 0
        if stop:
            path = self.save()
            raise StopRequested(self.stop_signals[0] if self.stop_signals else signal.SIGTERM, path)
        if every > 0 and self.state.global_step % every == 0:
            self.save()

    def apply_update(self, loss_value: float | None) -> bool:
        """Clip and step, or skip a non-finite step (and stop after too many in a row)."""
        optimizer, scheduler = self.optimizer, self.scheduler
        if loss_value is None:
            optimizer.zero_grad(set_to_none=True)
            return False
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_streak += 1
            self.state.skipped_steps += 1
            self.log.write({"phase": "warning", "global_step": self.state.global_step,
                            "nonfinite_loss": str(loss_value), "streak": self.state.nonfinite_streak},
                           f"[warn] non-finite loss ({loss_value}) at step {self.state.global_step}: step skipped")
            if self.state.nonfinite_streak >= self.cfg.ple.max_nonfinite_steps:
                raise RuntimeError(f"{self.state.nonfinite_streak} non-finite losses in a row (last at global step "
                                   f"{self.state.global_step}); stopping. Lower the learning rate, check the "
                                   f"reward for inf/NaN, or raise ple.max_nonfinite_steps.")
            return False
        self.state.nonfinite_streak = 0
        if self.dist.enabled:
            sync_replicated_grads(self.model, self.dist.world_size)
            clip_grad_norm(self.trainable_parameters(), self.cfg.ple.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.ple.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def progress(self, total: int, desc: str, initial: int = 0) -> Progress:
        return Progress(total, desc, initial, enabled=self.cfg.run.progress and self.dist.is_main)

    def decode(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs]

    # ------------------------------------------------------------------ phases
    def fit(self) -> TrainerState:
        with catch_stop_signals() as received:
            self.stop_signals = received
            if self.state.phase == "sft":
                self.run_sft()
                self.state.phase = "eval_before"
                if self.state.sft_step > 0:
                    self.save()            # the warm-up's end: alignment (this run's, or a sweep's) starts here
            if self.state.phase == "eval_before":
                result = self.evaluate(baseline=None)
                result["metrics"].update(margin_vs_sft=0.0, win_rate_vs_sft=0.5)
                self.state.before = result
                self.log.write({"phase": "eval", "when": "sft", "global_step": self.state.global_step,
                                **result["metrics"]},
                               f"[eval] SFT start: {format_line(result['metrics'], self.work.extra_rows)}")
                self.state.phase = "align"
            if self.state.phase == "align":
                self.run_alignment()
                self.state.phase = "eval_after"
            if self.state.phase == "eval_after":
                result = self.evaluate(baseline=self.state.before)
                self.state.after = result
                self.log.write({"phase": "eval", "when": "final", "global_step": self.state.global_step,
                                **result["metrics"]},
                               f"[eval] after {self.cfg.ple.algo}: {format_line(result['metrics'], self.work.extra_rows)}")
                self.state.phase = "done"
                self.save()
        return self.state

    def evaluate(self, baseline: dict | None) -> dict:
        ec = self.cfg.eval
        with self.policy.autocast():
            result = evaluate(self.policy, self.tokenizer, self.work.eval_set, self.reward_fn, samples=ec.samples,
                              sampling=Sampling(ec.max_new_tokens, ec.temperature), batch_size=ec.batch_size,
                              seed=self.cfg.run.seed + 7, baseline=baseline, task_metrics=self.work.task_metrics,
                              progress=self.cfg.run.progress and self.dist.is_main, dist=self.dist)
        self.reshard()
        if baseline is not None:
            self.warn_about_drift(result.metrics, "the held-out evaluation")
        return {"metrics": result.metrics, "rewards": result.rewards.tolist(), "responses": result.responses,
                "samples": result.samples, "logps": result.logps}

    def kl_probe(self) -> float:
        """KL(SFT || policy) on the first KL_PROBE of the SFT start's held-out samples: a per-iteration
        reading at the cost of one small forward (evaluate.kl_from_sft)."""
        samples, ids = self.cfg.eval.samples, self.work.eval_set.ids
        with torch.no_grad(), self.policy.autocast():
            kl = kl_from_sft(self.policy, self.state.before, lambda i: ids[i // samples], self.cfg.eval.batch_size,
                             self.dist, limit=KL_PROBE)
        self.reshard()
        return kl

    def warn_about_drift(self, metrics: dict, where: str) -> None:
        """A response length or KL from the SFT start past eval.warn_length_change / eval.warn_kl: say so,
        and what usually causes it."""
        ec, start = self.cfg.eval, (self.state.before or {}).get("metrics", {})
        length, length0 = metrics.get("mean_response_tokens"), start.get("mean_response_tokens")
        if length is not None and length0 and abs(length / length0 - 1) > ec.warn_length_change:
            self.log.write({"phase": "warning", "global_step": self.state.global_step, "drift": "length",
                            "mean_response_tokens": length, "sft_start": length0},
                           f"[warn] {where}: mean response length {length0:.1f} -> {length:.1f} tokens "
                           f"({length / length0 - 1:+.0%} from the SFT start): the reward may favour "
                           f"{'short' if length < length0 else 'long'} answers (reward hacking), or the learning "
                           f"rate (ple.lr={self.cfg.ple.lr:g}) is too high")
        kl = metrics.get("kl_vs_sft")
        if kl is not None and kl > ec.warn_kl:
            self.log.write({"phase": "warning", "global_step": self.state.global_step, "drift": "kl", "kl_vs_sft": kl},
                           f"[warn] {where}: KL(SFT || policy) {kl:.2f} nats per response (eval.warn_kl="
                           f"{ec.warn_kl:g}): the policy is moving far from the SFT start; check for reward hacking, "
                           f"or lower the learning rate (ple.lr={self.cfg.ple.lr:g})")

    def run_sft(self) -> None:
        """Warm-up: token-averaged NLL of responses sampled (with replacement) from the SFT set."""
        sc, examples = self.cfg.sft, self.work.sft
        if sc.steps <= 0 or not examples or self.state.sft_step >= sc.steps:
            return
        _, scheduler = self.optimizer_for("sft")
        self.model.train()
        bar = self.progress(sc.steps, "sft", self.state.sft_step)
        start, tokens = time.perf_counter(), 0
        while self.state.sft_step < sc.steps:
            step = self.state.sft_step
            rng = random.Random(self.cfg.run.seed * 1_000_003 + step)
            batch = [examples[rng.randrange(len(examples))] for _ in range(sc.batch_size)]
            n_tokens = sum(len(b[1]) for b in batch)                 # the loss averages over response tokens
            local, _ = self.dist.shard(batch)      # sft.batch_size is a multiple of the world size
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)   # read once, as in alignment
            for micro in _chunks(local, sc.grad_accum):
                with self.policy.autocast():
                    logps = self.policy.logprobs([b[0] for b in micro], [b[1] for b in micro])
                loss = -logps.sum() / max(n_tokens, 1) * self.dist.world_size
                loss.backward()
                loss_sum += loss.detach()
            loss_value = self.dist.sum(loss_sum.item()) / self.dist.world_size
            self.apply_update(loss_value)
            self.state.sft_step += 1
            tokens += sum(len(b[0]) + len(b[1]) for b in batch)     # the rate counts every token forwarded
            rate = tokens / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step % 50 == 0 or step == sc.steps - 1:
                self.log.write({"phase": "sft", "step": step, "global_step": self.state.global_step,
                                "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate},
                               f"[sft] step {step:4d}/{sc.steps}  loss {loss_value:.4f}  "
                               f"{rate:,.0f} tok/s (prompts + responses)")
            self.after_step()
        bar.close()

    def run_alignment(self) -> None:
        """The algorithm for cfg.ple.iterations passes over the queries; tau decays per iteration or step."""
        pc, queries = self.cfg.ple, self.work.queries
        if not self.algorithm.aligns or pc.iterations <= 0 or not queries:
            return
        self.optimizer_for("align")
        per_iteration = self.batches_per_iteration()
        while self.state.iteration < pc.iterations:
            iteration = self.state.iteration
            order = list(range(len(queries)))
            random.Random(self.cfg.run.seed * 7_919 + iteration).shuffle(order)
            if self.state.batch_in_iteration == 0 or not self.state.totals:
                self.state.totals = self.fresh_totals()
            samples: list[dict] = []
            bar = self.progress(per_iteration, f"{pc.algo} iter {iteration + 1}/{pc.iterations}",
                                self.state.batch_in_iteration)
            while self.state.batch_in_iteration < per_iteration:
                lo = self.state.batch_in_iteration * pc.batch_size
                self.alignment_step([queries[i] for i in order[lo:lo + pc.batch_size]], samples)
                self.state.batch_in_iteration += 1
                self.state.align_step += 1
                if pc.decay == "step":
                    self.state.tau *= pc.alpha
                t = self.state.totals
                bar.set_postfix(generated_tok_s=f"{t['tokens'] / max(t['gen_seconds'], 1e-9):,.0f}",
                                score_s=f"{t['score_seconds']:.1f}",
                                update_response_tok_s=f"{t['tokens'] / max(t['update_seconds'], 1e-9):,.0f}")
                bar.update(1)
                self.after_step()
            bar.close()
            if pc.decay == "iteration":
                self.state.tau *= pc.alpha
            self.finish_iteration(samples)

    def fresh_totals(self) -> dict:
        """The accumulators of an iteration about to start (alignment_step adds to them)."""
        return {"pairs": 0, "ranked": 0, "delta": 0.0, "s": 0.0, "s_p": 0.0, "loss": 0.0, "dropped": 0, "steps": 0,
                "tokens": 0, "seconds": 0.0, "tau": self.state.tau, "gen_seconds": 0.0, "score_seconds": 0.0,
                "update_seconds": 0.0}

    def alignment_step(self, batch: list[Query], samples: list[dict]) -> None:
        """One update: sample (PLE: y and y_p), score against the original query, loss, update."""
        algo, t = self.algorithm, self.state.totals
        batch, real = self.dist.shard(batch)
        q_ids, q_texts = [q.ids for q in batch], [q.text for q in batch]
        tick = time.perf_counter()
        drawn = algo.sample(self.policy, batch, seed=self.cfg.run.seed * 1_000_003 + self.state.align_step)
        self.reshard()
        t["gen_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        with torch.no_grad():
            raw = algo.score(self.reward_fn, q_texts, drawn, self.decode)
            raw[~torch.tensor(real, dtype=torch.bool)] = float("nan")     # padding of this rank's shard
            rewards = self.normalizer(raw.flatten()).view_as(raw)
        t["score_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        self.model.train()
        loss_value = self.alignment_loss(q_ids, drawn, rewards, real)
        if self.apply_update(loss_value):
            t["loss"] += loss_value
            t["steps"] += 1
        t["update_seconds"] += time.perf_counter() - tick
        self.record_step(batch, drawn, raw, rewards, real, samples)
        self.check_rewards(loss_value is None, raw)

    def check_rewards(self, empty: bool, raw: torch.Tensor) -> None:
        """Stop, naming the reward and what it returned, after ple.max_empty_batches batches in a row
        (default: one iteration's) without a single pair of finite rewards: nothing would be learnt."""
        self.state.empty_streak = self.state.empty_streak + 1 if empty else 0
        limit = self.cfg.ple.max_empty_batches or self.batches_per_iteration()
        if self.state.empty_streak >= limit:
            shown = ", ".join(f"{v:g}" for v in raw.flatten()[:6].tolist())
            raise RewardError(f"{self.state.empty_streak} batches in a row had no pair with finite rewards: the reward "
                              f"{self.reward_fn.name} returned e.g. [{shown}]; check it (reward.kind, reward.path), "
                              f"or raise ple.max_empty_batches")

    def alignment_loss(self, q_ids: list[list[int]], drawn: Samples, rewards: torch.Tensor,
                       real: list[bool]) -> float | None:
        """Backward of the batch loss over grad_accum micro-batches; returns its value (None: no pair).

        The batch loss is the mean over every rank's valid queries, so each micro-batch adds its
        share divided by the global count (times the world size: FSDP averages grads)."""
        valid = self.algorithm.valid(rewards, real)
        self.state.totals["dropped"] += sum(real) - int(valid.sum())
        global_valid = self.dist.sum(float(valid.sum()))
        if global_valid == 0:
            return None
        scale = self.dist.world_size / global_valid
        step = Step(q_ids, drawn, rewards, valid, valid.tolist(), rewards.to(self.device))
        # summed on the device and read once, after the last backward: a read per micro-batch (or a
        # copy to the GPU after its forward) would stall the host until the GPU caught up, every time
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        ranked = torch.zeros((), dtype=torch.int64, device=self.device)
        for micro in _chunks(list(range(len(q_ids))), self.cfg.ple.grad_accum):
            with self.policy.autocast():
                loss, micro_ranked = self.algorithm.loss(self.policy, step, micro, scale, self.state.tau)
            if micro_ranked is not None:
                ranked += micro_ranked
            loss.backward()
            total += loss.detach()
        total, ranked = torch.stack([total, ranked.double()]).tolist()
        self.state.totals["ranked"] += int(ranked)
        return self.dist.sum(total) / self.dist.world_size

    def record_step(self, batch: list[Query], drawn: Samples, raw: torch.Tensor, rewards: torch.Tensor,
                    real: list[bool], samples: list[dict]) -> None:
        """The step's share of the iteration's totals, and the first responses of the iteration."""
        t = self.state.totals
        finite = torch.isfinite(raw).all(dim=1)
        t["pairs"] += sum(real)
        for key, value in self.algorithm.totals(raw, rewards, finite).items():
            t[key] = t.get(key, 0.0) + value
        t["tokens"] += sum(len(r) + len(r2) for r, r2, keep in zip(drawn.first, drawn.second, real) if keep)
        special = set(self.tokenizer.all_special_ids)
        firsts = [r for r, keep in zip(drawn.first, real) if keep]      # y: what the unprincipled policy says
        t["first_tokens"] = t.get("first_tokens", 0) + sum(map(len, firsts))
        t["first_degenerate"] = t.get("first_degenerate", 0) + sum(degenerate(r, special) for r in firsts)
        if len(samples) < SAMPLES_PER_ITERATION:
            firsts, seconds = self.decode(drawn.first), self.decode(drawn.second)
            for k in range(min(len(batch), SAMPLES_PER_ITERATION - len(samples))):
                samples.append({"step": self.state.align_step, "query": batch[k].text, "original": firsts[k],
                                self.algorithm.second_key: seconds[k],
                                "reward": raw[k, 0].item(), "reward_2": raw[k, -1].item()})

    def finish_iteration(self, samples: list[dict]) -> None:
        pc, t = self.cfg.ple, self.dist.sum_dict(self.state.totals)
        if self.dist.enabled:
            t["tau"] = self.state.totals["tau"]
            for key in ("gen_seconds", "score_seconds", "update_seconds"):   # wall time, not summed
                t[key] = t[key] / self.dist.world_size
        iteration = self.state.iteration
        scored = max(t["pairs"] - t["dropped"], 1)
        ranks = self.algorithm.ranks
        record = {"phase": "align", "algo": pc.algo, "iteration": iteration + 1, "step": self.state.align_step,
                  "global_step": self.state.global_step, "tau": t["tau"],
                  "ranked_share": t["ranked"] / scored if ranks else None,
                  **self.algorithm.report(t, scored), "loss": t["loss"] / max(t["steps"], 1),
                  "dropped_pairs": t["dropped"], "skipped_steps": self.state.skipped_steps,
                  "generated_tokens_per_s": t["tokens"] / max(t["gen_seconds"], 1e-9),
                  "update_tokens_per_s": t["tokens"] / max(t["update_seconds"], 1e-9),
                  "scoring_seconds": t["score_seconds"]}
        queries = max(t["pairs"], 1)
        record.update(mean_response_tokens=t.get("first_tokens", 0) / queries,
                      degenerate_share=t.get("first_degenerate", 0) / queries,
                      kl_vs_sft=self.kl_probe() if "samples" in (self.state.before or {}) else None)
        self.state.history.append(record)
        dropped = f"  dropped {t['dropped']} of {t['pairs']} ({t['dropped'] / max(t['pairs'], 1):.0%})"
        start = (self.state.before or {}).get("metrics", {}).get("mean_response_tokens")
        drift = (f"  len {record['mean_response_tokens']:.1f}"
                 + (f" ({record['mean_response_tokens'] - start:+.1f} from SFT)" if start is not None else "")
                 + f"  degenerate {record['degenerate_share']:.0%}"
                 + (f"  KL {record['kl_vs_sft']:.3f}" if record["kl_vs_sft"] is not None else ""))
        self.log.write(record, f"[{pc.algo}] iter {iteration + 1}/{pc.iterations}  {self.algorithm.line(record)}  "
                               f"loss {record['loss']:.4f}" + drift + (dropped if t["dropped"] else ""))
        self.warn_about_drift(record, f"iteration {iteration + 1}")
        every = self.cfg.run.sample_every
        if self.run_dir is not None and self.dist.is_main and every > 0 and (iteration + 1) % every == 0 \
                and samples:
            folder = self.run_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"iter-{iteration + 1:04d}.jsonl", "w") as fh:
                for sample in samples:
                    fh.write(json.dumps(sample) + "\n")
        self.state.iteration += 1
        self.state.batch_in_iteration = 0
        self.state.totals = {}
