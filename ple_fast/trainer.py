"""The training loops: SFT warm-up, then PLE (or a baseline) over rollouts of the policy.

PLE, as ../DESIGN.md section 1 defines it: per batch of queries, generate the original and the
principle-guided response, score both against the ORIGINAL query, and update with the
threshold-gated loss; tau decays by alpha per iteration (or per step). The baselines share the
loop and the sample budget (two generated responses per query):
  sft      warm-up only, no alignment updates
  raft     two samples without the principle, SFT on the higher-reward one
  distill  always SFT on the principle-guided response (context distillation)

A run is a sequence of phases (sft -> eval_before -> align -> eval_after -> done) whose whole
position lives in TrainerState. Every random draw is derived from (seed, step), so a run resumed
from a checkpoint replays exactly what an uninterrupted run would have done.
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

from ple_fast.config import Config
from ple_fast.distributed import Dist
from ple_fast.forward import packed_dual_response_rows, packed_response_rows, padded_response_rows
from ple_fast.layout import to_device
from ple_fast.loss import ple_loss, sequence_logprobs
from ple_fast.reward import RewardFunction, RewardNormalizer
from ple_fast.rollout import generate, generate_dual

PHASES = ("sft", "eval_before", "align", "eval_after", "done")
SAMPLES_PER_ITERATION = 32


class MetricsLog:
    """metrics.jsonl (always), plus TensorBoard / W&B when asked for; echoes a short line."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] = print, *, tensorboard_dir=None,
                 wandb_project: str | None = None, config: dict | None = None):
        self.path, self.echo = path, echo
        self.lines = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                self.lines = len(path.read_text().splitlines())
        self.tensorboard = self.wandb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("run.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(str(tensorboard_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(path.parent) if path else None)

    def truncate(self, lines: int) -> None:
        """Drop records written after a checkpoint, so a resumed run does not log them twice."""
        if self.path is not None and self.path.exists():
            kept = self.path.read_text().splitlines()[:lines]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.lines = lines

    def write(self, record: dict, line: str | None = None) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.lines += 1
        step = record.get("global_step", record.get("step", 0))
        scalars = {f"{record.get('phase', 'run')}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "global_step")}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if line:
            self.echo(line)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


@dataclass
class Query:
    text: str
    ids: list[int]


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


def response_logprobs(model, prompts, responses, *, impl: str, pad_token_id: int,
                      attention: str | None = "auto", compile: bool = False, fused: bool = False) -> torch.Tensor:
    """Summed log-probs of each response given its prompt: packed and padding-free when
    `attention` names a backend (decoder layers torch.compile'd with `compile`, fused with `fused`),
    padded HF forwards when it is None."""
    if attention is None:
        rows = padded_response_rows(model, prompts, responses, pad_token_id=pad_token_id)
    else:
        rows = packed_response_rows(model, prompts, responses, backend=attention, compile=compile, fused=fused)
    return sequence_logprobs(rows.hidden, rows.weight, rows.labels, rows.seq_index, rows.num_seqs,
                             impl=impl, softcap=rows.softcap)


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

    def __init__(self, cfg: Config, model, tokenizer, workload, reward_fn: RewardFunction, log: MetricsLog,
                 *, run_dir: Path | None = None, device=None, dist: Dist | None = None):
        self.cfg, self.model, self.tokenizer, self.work = cfg, model, tokenizer, workload
        self.dist = dist if dist is not None else Dist()
        self.reward_fn, self.log, self.run_dir = reward_fn, log, run_dir
        self.device = device if device is not None else next(model.parameters()).device
        self.state = TrainerState(tau=cfg.ple.tau0)
        self.normalizer = RewardNormalizer(cfg.reward.normalize)
        self.optimizer = self.scheduler = None
        self.optimizer_phase: str | None = None        # the phase self.optimizer belongs to
        self.stop_signals: list[int] = []
        from ple_fast.data import adds_bos
        self.bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None   # one BOS in p + x
        # The packed tree attention is swapped in per forward, so HF's re-run of attention under
        # gradient checkpointing would see the stock mask: checkpointed runs use padded forwards.
        self.attention = cfg.ple.attention if cfg.ple.packed and not cfg.run.gradient_checkpointing else None
        self.compile_layers = cfg.ple.compile and self.attention is not None   # packed forwards only
        self.fused_layers = self._use_fused_layers(cfg, model)                    # packed forwards only
        if cfg.ple.packed and cfg.run.gradient_checkpointing:
            print("[run] gradient checkpointing: responses are scored with padded forwards (ple.packed ignored)")
        engine_options = {"compile_decode": True} if cfg.rollout.compile_decode else {}
        if cfg.rollout.layer_impl != "auto":
            engine_options["fused_layers"] = cfg.rollout.layer_impl == "fused"
        if cfg.rollout.merged_projections:
            engine_options["merged_projections"] = True
        if cfg.rollout.backend == "fast" and engine_options:
            from ple_fast.engine import engine_for
            try:
                engine_for(model, **engine_options)  # cached: every later rollout and evaluation uses it
            except ValueError as err:
                raise ValueError(f"rollout.layer_impl={cfg.rollout.layer_impl}, rollout.compile_decode="
                                 f"{str(cfg.rollout.compile_decode).lower()}, rollout.merged_projections="
                                 f"{str(cfg.rollout.merged_projections).lower()}: {err}") from err
        precision = cfg.run.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def _use_fused_layers(self, cfg, model) -> bool:
        """ple.layer_impl: fused layers (ple_fast.fused_layers) in the packed forwards; auto = on CUDA,
        for the families they cover, unless ple.compile compiles the stock layers instead."""
        from ple_fast.engine import unwrap_causal_lm
        from ple_fast.fused_layers import unsupported_reason
        from ple_fast.kernels.logprob import INTERPRETED

        impl = cfg.ple.layer_impl
        if impl == "stock" or self.attention is None:
            return False
        reason = unsupported_reason(unwrap_causal_lm(model))
        if impl == "auto":
            return self.device.type == "cuda" and reason is None and not self.compile_layers
        problem = ("ple.compile=true compiles the stock layers instead; choose one" if self.compile_layers else
                   reason or ("the Triton kernels need CUDA, or TRITON_INTERPRET=1 on a CPU (slow)"
                              if self.device.type != "cuda" and not INTERPRETED else None))
        if problem:
            raise ValueError(f"ple.layer_impl=fused: {problem}")
        return True

    # ------------------------------------------------------------------ plumbing
    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reshard(self) -> None:
        """After no_grad forwards (generate, evaluation) FSDP2 may leave layers unsharded, and
        then model.parameters() are the unsharded copies: re-shard before building an
        optimizer or taking a training step."""
        if self.dist.enabled:
            from ple_fast.distributed import reshard
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

    def resume_from(self, checkpoint: Path) -> None:
        """Restore weights, the saved phase's optimizer and scheduler, and the trainer state."""
        from ple_fast.checkpoint import TRAINER_STATE

        phase = json.loads((checkpoint / TRAINER_STATE).read_text()).get("phase")
        if phase in ("sft", "align"):
            self.optimizer_for(phase)
        self.state = TrainerState.from_dict(self._load(checkpoint))
        if self.state.normalizer:
            self.normalizer.load_state_dict(self.state.normalizer)
        self.log.truncate(self.state.metrics_lines)

    def _load(self, checkpoint: Path) -> dict:
        optimizer, scheduler = self.optimizer, self.scheduler
        if self.dist.enabled:
            from ple_fast.distributed import load_distributed_checkpoint
            self.reshard()
            return load_distributed_checkpoint(checkpoint, model=self.model, optimizer=optimizer, scheduler=scheduler)
        from ple_fast.checkpoint import load_checkpoint
        return load_checkpoint(checkpoint, model=self.model, optimizer=optimizer, scheduler=scheduler)

    def optimizer_for(self, phase: str):
        """The phase's optimizer: the one restored from a checkpoint of this phase, else a new one."""
        if self.optimizer_phase != phase:
            self.optimizer, self.scheduler = self.build_optimizer(phase)
            self.optimizer_phase = phase
        return self.optimizer, self.scheduler

    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        from ple_fast.checkpoint import save_checkpoint

        if self.optimizer is None:      # a run without updates still saves an optimizer state
            self.optimizer_for("align")
        optimizer, scheduler = self.optimizer, self.scheduler
        self.state.normalizer = self.normalizer.state_dict()
        self.state.metrics_lines = self.log.lines
        if self.dist.enabled:
            from ple_fast.distributed import save_distributed_checkpoint
            self.reshard()
            return save_distributed_checkpoint(self.dist, self.run_dir, self.state.global_step, model=self.model,
                                               tokenizer=self.tokenizer, optimizer=optimizer, scheduler=scheduler,
                                               trainer_state=self.state.to_dict(), keep_last=self.cfg.run.keep_last)
        return save_checkpoint(self.run_dir, self.state.global_step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=optimizer, scheduler=scheduler, trainer_state=self.state.to_dict(),
                               keep_last=self.cfg.run.keep_last)

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
            from ple_fast.distributed import clip_grad_norm, sync_replicated_grads
            sync_replicated_grads(self.model, self.dist.world_size)
            clip_grad_norm(self.trainable_parameters(), self.cfg.ple.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.ple.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def progress(self, total: int, desc: str, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False,
                    disable=not self.cfg.run.progress or not self.dist.is_main,
                    dynamic_ncols=True, unit="step")

    # ------------------------------------------------------------------ phases
    def fit(self) -> TrainerState:
        with catch_stop_signals() as received:
            self.stop_signals = received
            if self.state.phase == "sft":
                self.run_sft()
                self.state.phase = "eval_before"
            if self.state.phase == "eval_before":
                result = self.evaluate(baseline=None)
                result["metrics"].update(margin_vs_sft=0.0, win_rate_vs_sft=0.5)
                self.state.before = result
                self.log.write({"phase": "eval", "when": "sft", "global_step": self.state.global_step,
                                **result["metrics"]})
                self.state.phase = "align"
            if self.state.phase == "align":
                self.run_alignment()
                self.state.phase = "eval_after"
            if self.state.phase == "eval_after":
                result = self.evaluate(baseline=self.state.before)
                self.state.after = result
                self.log.write({"phase": "eval", "when": "final", "global_step": self.state.global_step,
                                **result["metrics"]})
                self.state.phase = "done"
                self.save()
        return self.state

    def evaluate(self, baseline: dict | None) -> dict:
        from ple_fast.evaluate import evaluate

        ec = self.cfg.eval
        base = None
        if baseline is not None:
            base = torch.tensor(baseline["rewards"], dtype=torch.float32)
        with self.autocast():
            result = evaluate(self.model, self.tokenizer, self.work.eval_set, self.reward_fn, samples=ec.samples,
                              temperature=ec.temperature, max_new_tokens=ec.max_new_tokens,
                              batch_size=ec.batch_size, seed=self.cfg.run.seed + 7, loss_impl=self.cfg.ple.loss_impl,
                              baseline_rewards=base, task_metrics=self.work.task_metrics,
                              progress=self.cfg.run.progress and self.dist.is_main,
                              backend=self.cfg.rollout.backend, attention=self.attention, dist=self.dist)
        self.reshard()
        return {"metrics": result.metrics, "rewards": result.rewards.tolist(), "responses": result.responses}

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
            n_tokens = sum(len(b[1]) for b in batch)
            local, _ = self.dist.shard(batch)      # sft.batch_size is a multiple of the world size
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)   # read once, as in alignment_loss
            for micro in _chunks(local, sc.grad_accum):
                with self.autocast():
                    logps = response_logprobs(self.model, [b[0] for b in micro], [b[1] for b in micro],
                                              impl=self.cfg.ple.loss_impl, pad_token_id=self.pad_id,
                                              attention=self.attention, compile=self.compile_layers,
                                              fused=self.fused_layers)
                loss = -logps.sum() / max(n_tokens, 1) * self.dist.world_size
                loss.backward()
                loss_sum += loss.detach()
            loss_value = self.dist.sum(loss_sum.item()) / self.dist.world_size
            self.apply_update(loss_value)
            self.state.sft_step += 1
            tokens += n_tokens
            rate = tokens / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}")
            if step % 50 == 0 or step == sc.steps - 1:
                self.log.write({"phase": "sft", "step": step, "global_step": self.state.global_step,
                                "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate},
                               f"[sft] step {step:4d}/{sc.steps}  loss {loss_value:.4f}  {rate:,.0f} tok/s")
            self.after_step()
        bar.close()

    def run_alignment(self) -> None:
        """PLE or a baseline for cfg.ple.iterations passes over the queries."""
        pc, queries = self.cfg.ple, self.work.queries
        if pc.algo == "sft" or pc.iterations <= 0 or not queries:
            return
        self.optimizer_for("align")
        per_iteration = self.batches_per_iteration()
        while self.state.iteration < pc.iterations:
            iteration = self.state.iteration
            order = list(range(len(queries)))
            random.Random(self.cfg.run.seed * 7_919 + iteration).shuffle(order)
            if self.state.batch_in_iteration == 0 or not self.state.totals:
                self.state.totals = {"pairs": 0, "ranked": 0, "delta": 0.0, "s": 0.0, "s_p": 0.0, "loss": 0.0,
                                     "dropped": 0, "steps": 0, "tokens": 0, "seconds": 0.0, "tau": self.state.tau,
                                     "gen_seconds": 0.0, "score_seconds": 0.0, "update_seconds": 0.0}
            samples: list[dict] = []
            bar = self.progress(per_iteration, f"{pc.algo} iter {iteration + 1}/{pc.iterations}",
                                self.state.batch_in_iteration)
            while self.state.batch_in_iteration < per_iteration:
                lo = self.state.batch_in_iteration * pc.batch_size
                batch = [queries[i] for i in order[lo:lo + pc.batch_size]]
                self.alignment_step(batch, samples)
                self.state.batch_in_iteration += 1
                self.state.align_step += 1
                if pc.decay == "step":
                    self.state.tau *= pc.alpha
                t = self.state.totals
                bar.update(1)
                bar.set_postfix(gen_tok_s=f"{t['tokens'] / max(t['gen_seconds'], 1e-9):,.0f}",
                                score_s=f"{t['score_seconds']:.1f}",
                                upd_tok_s=f"{t['tokens'] / max(t['update_seconds'], 1e-9):,.0f}")
                self.after_step()
            bar.close()
            self.finish_iteration(samples)

    def finish_iteration(self, samples: list[dict]) -> None:
        pc, t = self.cfg.ple, self.dist.sum_dict(self.state.totals)
        if self.dist.enabled:
            t["tau"] = self.state.totals["tau"]
            for key in ("gen_seconds", "score_seconds", "update_seconds"):   # wall time, not summed
                t[key] = t[key] / self.dist.world_size
        iteration = self.state.iteration
        if pc.decay == "iteration":
            self.state.tau *= pc.alpha
        scored = max(t["pairs"] - t["dropped"], 1)
        record = {"phase": "align", "algo": pc.algo, "iteration": iteration + 1, "step": self.state.align_step,
                  "global_step": self.state.global_step, "tau": t["tau"],
                  "ranked_share": t["ranked"] / scored if pc.algo == "ple" else None,
                  "mean_delta": t["delta"] / scored, "mean_reward": t["s"] / scored,
                  "mean_reward_principled": t["s_p"] / scored, "loss": t["loss"] / max(t["steps"], 1),
                  "dropped_pairs": t["dropped"], "skipped_steps": self.state.skipped_steps,
                  "generated_tokens_per_s": t["tokens"] / max(t["gen_seconds"], 1e-9),
                  "update_tokens_per_s": t["tokens"] / max(t["update_seconds"], 1e-9),
                  "scoring_seconds": t["score_seconds"]}
        self.state.history.append(record)
        second = "r(2nd sample)" if pc.algo == "raft" else "r(y_p)"
        ranked = f"ranked {record['ranked_share']:.2f}  " if pc.algo == "ple" else ""
        self.log.write(record, f"[{pc.algo}] iter {iteration + 1}/{pc.iterations}  tau {t['tau']:.3f}  {ranked}"
                               f"delta {record['mean_delta']:+.3f}  r(y) {record['mean_reward']:+.3f}  "
                               f"{second} {record['mean_reward_principled']:+.3f}  loss {record['loss']:.4f}"
                               + (f"  dropped {t['dropped']}" if t["dropped"] else ""))
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

    def decode(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs]

    def alignment_step(self, batch: list[Query], samples: list[dict]) -> None:
        pc, rc, t = self.cfg.ple, self.cfg.rollout, self.state.totals
        batch, real = self.dist.shard(batch)
        q_ids, q_texts = [q.ids for q in batch], [q.text for q in batch]
        gen = dict(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                   eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
                   seed=self.cfg.run.seed * 1_000_003 + self.state.align_step)
        tick = time.perf_counter()
        with self.autocast():
            if pc.algo == "raft":
                # n samples per query without the principle (budget: n >= 2, like PLE's two)
                drawn = generate(self.model, [q for q in q_ids for _ in range(pc.raft_samples)],
                                 backend=rc.backend, **gen)
                first, second = drawn[0::pc.raft_samples], drawn[1::pc.raft_samples]
            else:
                roll = generate_dual(self.model, q_ids, self.work.principle_ids, backend=rc.backend,
                                     bos_token_id=self.bos_id, **gen)
                first, second, drawn = roll.originals, roll.principled, None
        self.reshard()
        t["gen_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        with torch.no_grad():
            if drawn is None:
                raw = self.reward_fn.score_pairs(q_texts, self.decode(first), self.decode(second))
            else:
                texts = [q for q in q_texts for _ in range(pc.raft_samples)]
                raw = self.reward_fn(texts, self.decode(drawn)).view(len(batch), pc.raft_samples)
            raw[~torch.tensor(real, dtype=torch.bool)] = float("nan")     # padding of this rank's shard
            rewards = self.normalizer(raw.flatten()).view_as(raw)
        t["score_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        self.model.train()
        loss_value = self.alignment_loss(q_ids, first, second, drawn, rewards, real)
        if self.apply_update(loss_value):
            t["loss"] += loss_value
            t["steps"] += 1
        t["update_seconds"] += time.perf_counter() - tick
        finite = torch.isfinite(raw).all(dim=1)
        t["pairs"] += sum(real)
        t["delta"] += float((rewards[:, -1] - rewards[:, 0])[finite].sum()) if pc.algo != "raft" else \
            float((raw[:, 1] - raw[:, 0])[finite].sum())
        t["s"] += float(raw[finite, 0].sum())
        t["s_p"] += float(raw[finite, -1].sum())
        t["tokens"] += sum(len(r) + len(r2) for r, r2, keep in zip(first, second, real) if keep)
        if len(samples) < SAMPLES_PER_ITERATION:
            firsts, seconds = self.decode(first), self.decode(second)
            for k in range(min(len(batch), SAMPLES_PER_ITERATION - len(samples))):
                samples.append({"step": self.state.align_step, "query": q_texts[k], "original": firsts[k],
                                "principled" if pc.algo != "raft" else "second_sample": seconds[k],
                                "reward": raw[k, 0].item(), "reward_2": raw[k, -1].item()})

    def alignment_loss(self, q_ids, first, second, drawn, rewards, real) -> float | None:
        """Backward of the batch loss over grad_accum micro-batches; returns its value (None: no pair).

        The batch loss is the mean over every rank's valid pairs, so each micro-batch adds its
        pairs' losses divided by the global count (times the world size: FSDP averages grads)."""
        pc, t = self.cfg.ple, self.state.totals
        if pc.algo == "ple":
            valid = torch.isfinite(rewards).all(dim=1)
        elif pc.algo == "raft":
            valid = torch.isfinite(rewards).any(dim=1)      # the best finite sample is still a target
        else:
            valid = torch.tensor(real, dtype=torch.bool)     # distillation does not use the rewards
        t["dropped"] += sum(real) - int(valid.sum())
        global_valid = self.dist.sum(float(valid.sum()))
        if global_valid == 0:
            return None
        scale = self.dist.world_size / global_valid
        # summed on the device and read once, after the last backward: a read per micro-batch (or a
        # copy to the GPU after its forward) would stall the host until the GPU caught up, every time
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        ranked = torch.zeros((), dtype=torch.int64, device=self.device)
        device_rewards, valid = rewards.to(self.device), valid.cpu()
        valid_flags = valid.tolist()
        if pc.algo == "raft":      # each query's best sample: the target of its SFT loss
            scores = torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, -math.inf))
            best = scores.argmax(dim=1).tolist()
        for micro in _chunks(list(range(len(q_ids))), pc.grad_accum):
            n_valid = sum(valid_flags[k] for k in micro)
            with self.autocast():
                if pc.algo == "ple":
                    if self.attention is not None:     # each query computed once for both responses
                        rows = packed_dual_response_rows(self.model, [q_ids[k] for k in micro],
                                                         [first[k] for k in micro], [second[k] for k in micro],
                                                         backend=self.attention, compile=self.compile_layers,
                                                         fused=self.fused_layers)
                    else:
                        prompts = [q_ids[k] for k in micro for _ in range(2)]
                        responses = [r for k in micro for r in (first[k], second[k])]
                        rows = padded_response_rows(self.model, prompts, responses, pad_token_id=self.pad_id)
                    out = ple_loss(rows.hidden, rows.weight, rows.labels, rows.seq_index,
                                   device_rewards[micro], self.state.tau, rank_loss=pc.rank_loss,
                                   weighting=pc.weighting, rank_sft_coef=pc.rank_sft_coef,
                                   length_normalize=pc.length_normalize, beta=pc.beta, impl=pc.loss_impl,
                                   softcap=rows.softcap)
                    loss = out.loss * (n_valid * scale)      # micro mean -> share of the global mean
                    ranked += (out.ranked & out.valid).sum()
                else:
                    if pc.algo == "raft":
                        targets = [drawn[k * pc.raft_samples + best[k]] for k in micro]
                    else:
                        targets = [second[k] for k in micro]
                    # moved before the forward is queued (a copy after it would wait for the GPU)
                    counts = to_device(torch.tensor([max(len(r), 1) for r in targets]), self.device)
                    weights = to_device(valid[micro], self.device)
                    logps = response_logprobs(self.model, [q_ids[k] for k in micro], targets,
                                              impl=pc.loss_impl, pad_token_id=self.pad_id,
                                              attention=self.attention, compile=self.compile_layers,
                                              fused=self.fused_layers)
                    per_seq = logps / counts if pc.length_normalize else logps
                    loss = -(per_seq * weights.to(per_seq.dtype)).sum() * scale
            loss.backward()
            total += loss.detach()
        total, ranked = torch.stack([total, ranked.double()]).tolist()
        t["ranked"] += int(ranked)
        return self.dist.sum(total) / self.dist.world_size
