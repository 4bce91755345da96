"""A training run from a checked config: every input checked, then the run folder written, then the trainer.

The order is the contract: the config's keys against the task, paths, the policy folder, the reward,
the data files and the plan are all checked (and loaded) before the run folder is touched, so a
failed start leaves an existing folder byte for byte as it was. Only a run that really starts (or
resumes) writes config.yaml and resets (or truncates) metrics.jsonl. `python -m ple_fast.train` is
the command line in front of this module.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ple_fast.checkpoint import find_checkpoint
from ple_fast.config import Config, ConfigError, build_config, model_kind, resolve_defaults, save_yaml, to_dict
from ple_fast.distributed import Dist, full_state_dict, init_distributed, shard_model, whole_model
from ple_fast.evaluate import format_table
from ple_fast.models import check_model_dir, save_policy
from ple_fast.plan import build_plan
from ple_fast.plots import plot_run
from ple_fast.reward import build_reward
from ple_fast.runtime import MetricsLog, check_files, pick_device, say, seed_everything
from ple_fast.trainer import StopRequested, Trainer, lr_lambda
from ple_fast.workload import embedded_workload, file_workload

def check_paths(cfg: Config) -> None:
    """Missing files fail here, before any model is loaded or step is taken."""
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path, "model.path: policy model")
    if cfg.reward.kind == "hf" and cfg.reward.path:
        check_model_dir(cfg.reward.path, "reward.path: reward model")
    check_files(cfg.data, ("sft_path", "query_path", "eval_path"), "data")


def check_distributed(cfg: Config, world_size: int) -> None:
    """What a torchrun launch needs that a single process does not."""
    for key, value in (("sft.batch_size", cfg.sft.batch_size), ("ple.batch_size", cfg.ple.batch_size)):
        if value % world_size:
            raise ConfigError(f"{key}={value} must be a multiple of the {world_size} processes")


def schedule_warnings(cfg: Config, align_steps: int) -> list[str]:
    """A warm-up longer than its phase never reaches the peak learning rate: say how far it gets."""
    out = []
    for key, warmup, total, schedule in (("sft", cfg.sft.warmup_steps, cfg.sft.steps, cfg.sft.schedule),
                                          ("ple", cfg.ple.warmup_steps, align_steps, cfg.ple.schedule)):
        if 0 < total < warmup:
            peak = max(lr_lambda(warmup, total, schedule)(step) for step in range(total))
            out.append(f"{key}.warmup_steps={warmup} is longer than the phase's {total} steps: the learning rate "
                       f"peaks at {peak:.0%} of {key}.lr")
    return out


def prepare_model(model, cfg: Config):
    """LoRA (PEFT) and gradient checkpointing, as configured."""
    if cfg.run.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("lora.enabled=true needs PEFT: pip install 'ple_fast[lora]'") from None
        # PEFT reads the deprecated is_gradient_checkpointing of transformers 5 on every forward
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        lc = cfg.lora
        targets = "all-linear" if lc.target_modules == "all-linear" else \
            [name.strip() for name in lc.target_modules.split(",") if name.strip()]
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        say(f"[lora] r={lc.r} alpha={lc.alpha} on {lc.target_modules}: {trainable:,} of {total:,} parameters train")
    return model


def save_final_model(model, tokenizer, out_dir: Path, dist=None) -> Path:
    """An HF folder AutoModelForCausalLM loads; a LoRA run also keeps its adapter."""
    if dist is not None and dist.enabled:          # gather the FSDP shards; rank 0 writes
        state = full_state_dict(model)
        if dist.is_main:
            save_final_model(whole_model(model, state), tokenizer, out_dir)
        dist.barrier()
        return out_dir / "model"
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(str(out_dir / "adapter"))
        model = model.merge_and_unload()
    return save_policy(model, tokenizer, out_dir / "model")


def config_differences(old_path: Path, cfg: Config) -> list[str]:
    try:
        old = to_dict(build_config(str(old_path)))
    except ConfigError:
        return ["(the saved config.yaml no longer parses)"]
    new = to_dict(cfg)
    diffs = []
    for section, values in new.items():
        if isinstance(values, dict):
            diffs += [f"{section}.{k}: {old[section][k]!r} -> {v!r}" for k, v in values.items()
                      if old[section][k] != v and f"{section}.{k}" != "run.resume"]
        elif old[section] != values:
            diffs.append(f"{section}: {old[section]!r} -> {values!r}")
    return diffs


def run(cfg: Config, dist: Dist) -> dict:
    started = time.perf_counter()
    hf_logging.disable_progress_bar()      # transformers' load / save bars: the run reports its own progress
    main = dist.is_main
    note = say if main else (lambda line: None)
    if dist.enabled:
        check_distributed(cfg, dist.world_size)
        if cfg.run.device == "auto" and torch.cuda.is_available():
            cfg.run.device = f"cuda:{dist.local_rank}"
    device = pick_device(cfg.run.device)
    check_paths(cfg)                       # the policy folder before the reward's rules: the order a user fixes them
    if cfg.model.path is not None and cfg.reward.kind == "builtin":
        raise ConfigError("reward.kind=builtin scores the embedded task only; with model.path set, "
                          "use reward.kind=hf (reward-model folder) or reward.kind=python (module:function)")
    out_dir = Path(cfg.run.out_dir)
    checkpoint = None
    if cfg.run.resume:
        try:
            checkpoint = find_checkpoint(out_dir, cfg.run.resume)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"run.resume={cfg.run.resume!r}: {err}") from None
    seed_everything(cfg.run.seed)
    try:
        reward_fn = build_reward(cfg.reward.kind, cfg.reward.path, device=device, batch_size=cfg.reward.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model, tokenizer, work = (embedded_workload if cfg.model.path is None else file_workload)(cfg, device)
    model = prepare_model(model, cfg)
    if dist.enabled:
        model = shard_model(model)
    plan = build_plan(cfg, model, device)
    align_steps = cfg.ple.iterations * math.ceil(len(work.queries) / cfg.ple.batch_size)
    filled = resolve_defaults(cfg, align_steps)

    # every input is checked: from here on the run folder is written
    if cfg.run.resume and checkpoint is None:
        note(f"[run] --resume auto: no checkpoint in {out_dir}, starting fresh")
    elif checkpoint is not None and (out_dir / "config.yaml").is_file():
        for line in config_differences(out_dir / "config.yaml", cfg):
            note(f"[run] warning: resuming with a changed config: {line}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_yaml(cfg, out_dir / "config.yaml")
        log = MetricsLog(out_dir / "metrics.jsonl", tensorboard_dir=out_dir / "tensorboard" if cfg.run.tensorboard
                         else None, wandb_project=cfg.run.wandb_project, config=to_dict(cfg))
        if checkpoint is None:
            log.truncate(0)                # a fresh run's records only
    else:
        log = MetricsLog(None, echo=lambda line: None)
    trainer = Trainer(cfg, model, tokenizer, work, reward_fn, log, run_dir=out_dir, device=device, dist=dist,
                      plan=plan)
    note(f"[run] {cfg.ple.algo} on {device}" + (f" x {dist.world_size} processes (FSDP2)" if dist.enabled else "")
         + f"; {len(work.sft)} SFT examples, {len(work.queries)} queries, {len(work.eval_set.texts)} held-out; "
           f"run folder {out_dir}")
    note(f"[run] plan: {plan.describe()}")
    if filled:
        kind = {"embedded": "the embedded model", "full": "a pretrained model, full fine-tuning",
                "lora": "a pretrained model with LoRA"}[model_kind(cfg)]
        note(f"[run] defaults for {kind}: " + ", ".join(f"{key}={value:g}" for key, value in filled.items()))
    for line in schedule_warnings(cfg, align_steps):
        note(f"[warn] {line}")
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
        note(f"[run] resumed from {checkpoint} (phase {trainer.state.phase}, global step {trainer.state.global_step})")
    try:
        state = trainer.fit()
    except StopRequested as stop:
        log.close()
        if main:
            print(f"\n[run] stopped by signal {stop.signum}; checkpoint written to {stop.checkpoint}. "
                  f"Continue with: python -m ple_fast.train ... --out {out_dir} --resume auto", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    log.close()

    model_dir = save_final_model(trainer.model, tokenizer, out_dir, dist)
    before, after = state.before["metrics"], state.after["metrics"]
    if not main:
        return {"algo": cfg.ple.algo, "before": before, "after": after, "iterations": state.history}
    table = format_table(before, after, cfg.ple.algo, work.extra_rows)
    (out_dir / "results.md").write_text(table + "\n")
    summary = {"algo": cfg.ple.algo, "before": before, "after": after, "iterations": state.history,
               "final_tau": state.tau, "skipped_steps": state.skipped_steps,
               "seconds": time.perf_counter() - started, "model_dir": str(model_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "samples.jsonl", "w") as fh:
        for text, b, a in zip([t for t in work.eval_set.texts for _ in range(cfg.eval.samples)],
                              state.before["responses"], state.after["responses"]):
            fh.write(json.dumps({"query": text, "sft": b, "final": a}) + "\n")
    if cfg.run.plots:
        plot_run(out_dir)
    print(f"\nHeld-out evaluation ({len(work.eval_set.texts)} queries x {cfg.eval.samples} samples, "
          f"responses generated WITHOUT the principle):\n{table}")
    print(f"\n[run] done in {summary['seconds']:.0f} s; model saved to {model_dir}")
    return summary


def leave_without_finalizing() -> None:
    """End a torchrun rank after its process group is torn down, skipping the interpreter's finalization.

    Gloo's C++ worker threads can outlive destroy_process_group holding tensors, and releasing them
    while the interpreter shuts down takes the GIL and aborts the process (pytorch/pytorch#179291). CI
    saw it once: a two-process CPU run finished, saved its model, and then rank 1 died of SIGABRT,
    so torchrun failed a run that had succeeded. Everything the run writes is closed by now (files
    are written atomically, metrics logs closed), so only the standard streams need a flush."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_command(cfg: Config, *, script: bool = False) -> dict:
    """`run` in this process, or in each torchrun rank, which leave together. script: the process ends
    here after a torchrun run (see leave_without_finalizing)."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    dist = init_distributed()
    initialized = lambda: torch.distributed.is_available() and torch.distributed.is_initialized()  # noqa: E731
    destroyed = False
    try:
        result = run(cfg, dist)
        if initialized():      # leave together: a rank tearing gloo down while its peer still
            torch.distributed.barrier()     # talks can abort ("terminate called ...") under load
    finally:
        if initialized():
            torch.distributed.destroy_process_group()
            destroyed = True
    if script and destroyed:
        leave_without_finalizing()
    return result
