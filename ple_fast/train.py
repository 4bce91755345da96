"""`python -m ple_fast.train`: SFT warm-up, then PLE (or a baseline), then a before/after table.

With no arguments it trains the embedded default (a built-in task and a tiny Llama built from
scratch) on the CPU. Pointed at a model folder, data and a reward model it is the real thing:

    python -m ple_fast.train model.path=/models/qwen2-0.5b data.sft_path=hh.jsonl.gz \\
        reward.kind=hf reward.path=/models/rm --out runs/hh
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from ple_fast.checkpoint import CheckpointError, find_checkpoint
from ple_fast.config import Config, ConfigError, build_config, help_epilog, save_yaml, to_dict
from ple_fast.data import DataError
from ple_fast.distributed import full_state_dict, init_distributed, shard_model, whole_model
from ple_fast.evaluate import format_table
from ple_fast.models import check_model_dir, save_policy
from ple_fast.plots import plot_run
from ple_fast.reward import build_reward
from ple_fast.runtime import MetricsLog, pick_device, seed_everything
from ple_fast.trainer import StopRequested, Trainer
from ple_fast.workload import embedded_workload, file_workload


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m ple_fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PLE alignment: SFT warm-up, dual generation, reward scoring, threshold-gated loss.",
        epilog=help_epilog(Config, "ple.iterations=3 rollout.temperature=0.7"))
    parser.add_argument("--config", help="YAML config file; key=value overrides apply on top")
    parser.add_argument("--algo", choices=["ple", "raft", "distill", "sft"], help="same as ple.algo=...")
    parser.add_argument("--out", help="run folder (same as run.out_dir=...)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the newest checkpoint in the run folder (auto) or from PATH")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.algo:
        overrides.append(f"ple.algo={args.algo}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    return args.config, overrides


def check_paths(cfg: Config) -> None:
    """Missing files fail here, before any model is loaded or step is taken."""
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path, "model.path: policy model")
    if cfg.reward.kind == "hf" and cfg.reward.path:
        check_model_dir(cfg.reward.path, "reward.path: reward model")
    for key in ("sft_path", "query_path", "eval_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"data.{key}: file {value!r} does not exist")


_PROCESS_GROUP_DESTROYED = [False]


def _leave_without_finalizing() -> None:
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


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        yaml_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = build_config(yaml_path, overrides)
        initialized = lambda: torch.distributed.is_available() and torch.distributed.is_initialized()  # noqa: E731
        try:
            result = run(cfg)
            if initialized():      # leave together: a rank tearing gloo down while its peer still
                torch.distributed.barrier()     # talks can abort ("terminate called ...") under load
            return result
        finally:
            if initialized():
                torch.distributed.destroy_process_group()
                _PROCESS_GROUP_DESTROYED[0] = True
    except (ConfigError, FileNotFoundError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def check_distributed(cfg: Config, world_size: int) -> None:
    """What a torchrun launch needs that a single process does not."""
    for key, value in (("sft.batch_size", cfg.sft.batch_size), ("ple.batch_size", cfg.ple.batch_size)):
        if value % world_size:
            raise ConfigError(f"{key}={value} must be a multiple of the {world_size} processes")


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
        lc = cfg.lora
        targets = "all-linear" if lc.target_modules == "all-linear" else \
            [name.strip() for name in lc.target_modules.split(",") if name.strip()]
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"[lora] r={lc.r} alpha={lc.alpha} on {lc.target_modules}: {trainable:,} of {total:,} "
              f"parameters train")
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


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    dist = init_distributed()
    if dist.enabled:
        check_distributed(cfg, dist.world_size)
        if cfg.run.device == "auto" and torch.cuda.is_available():
            cfg.run.device = f"cuda:{dist.local_rank}"
    device = pick_device(cfg.run.device)
    if cfg.model.path is not None and cfg.reward.kind == "builtin":
        raise ConfigError("reward.kind=builtin scores the embedded task only; with model.path set, "
                          "use reward.kind=hf (reward-model folder) or reward.kind=python (module:function)")
    check_paths(cfg)
    out_dir = Path(cfg.run.out_dir)
    checkpoint = None
    if cfg.run.resume:
        try:
            checkpoint = find_checkpoint(out_dir, cfg.run.resume)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"run.resume={cfg.run.resume!r}: {err}") from None
        if checkpoint is None:
            print(f"[run] --resume auto: no checkpoint in {out_dir}, starting fresh")
        elif (out_dir / "config.yaml").is_file() and dist.is_main:
            for line in config_differences(out_dir / "config.yaml", cfg):
                print(f"[run] warning: resuming with a changed config: {line}")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if checkpoint is None and dist.is_main:
        metrics_path.unlink(missing_ok=True)
    if dist.is_main:
        save_yaml(cfg, out_dir / "config.yaml")
    seed_everything(cfg.run.seed)

    try:
        reward_fn = build_reward(cfg.reward.kind, cfg.reward.path, device=device, batch_size=cfg.reward.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.path is None:
        model, tokenizer, work = embedded_workload(cfg, device)
    else:
        model, tokenizer, work = file_workload(cfg, device)
    model = prepare_model(model, cfg)
    if dist.enabled:
        model = shard_model(model)
    if dist.is_main:
        log = MetricsLog(metrics_path, tensorboard_dir=out_dir / "tensorboard" if cfg.run.tensorboard else None,
                         wandb_project=cfg.run.wandb_project, config=to_dict(cfg))
    else:
        log = MetricsLog(None, echo=lambda line: None)
    trainer = Trainer(cfg, model, tokenizer, work, reward_fn, log, run_dir=out_dir, device=device, dist=dist)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"[run] {cfg.ple.algo} on {device}" + (f" x {dist.world_size} processes (FSDP2)" if dist.enabled else "")
        + f"; {len(work.sft)} SFT examples, {len(work.queries)} queries, "
          f"{len(work.eval_set.texts)} held-out; run folder {out_dir}")
    say(f"[run] plan: {trainer.plan.describe()}")
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
        say(f"[run] resumed from {checkpoint} (phase {trainer.state.phase}, global step "
              f"{trainer.state.global_step})")
    try:
        state = trainer.fit()
    except StopRequested as stop:
        log.close()
        if dist.is_main:
            print(f"\n[run] stopped by signal {stop.signum}; checkpoint written to {stop.checkpoint}. "
                  f"Continue with: python -m ple_fast.train ... --out {out_dir} --resume auto", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    log.close()

    model_dir = save_final_model(trainer.model, tokenizer, out_dir, dist)
    before, after = state.before["metrics"], state.after["metrics"]
    if not dist.is_main:
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


if __name__ == "__main__":
    main()
    if _PROCESS_GROUP_DESTROYED[0]:
        _leave_without_finalizing()
