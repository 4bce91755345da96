"""`python -m ple_fast.reward_train`: train a Bradley-Terry reward model for PLE to score with.

The model reads `reward.join_text(prompt, response)` through the tokenizer exactly as
`reward.HFReward` will at scoring time, ends in a one-output head (the score of the last
non-pad token), and minimises -log sigmoid(r(chosen) - r(rejected)). The run folder gets an
HF sequence-classification folder (`model/`, what `reward.kind=hf reward.path=...` loads),
metrics.jsonl, config.yaml (the resolved config) and summary.json.

This module parses the command line and the config only; the run (ple_fast.reward_run) and torch load
after that, so `--help` and config errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ple_fast.config import InputError, RewardTrainConfig, build_config, help_epilog

EXAMPLES = """Examples:
  python -m ple_fast.reward_train                            # the embedded task, a tiny Llama, seconds on a CPU
  python -m ple_fast.reward_train model.path=/models/qwen2-0.5b \\
      data.path=/data/hh-rlhf/harmless-base/train.jsonl.gz --out runs/rm    # a new score head on a causal LM
  python -m ple_fast.train --config hh_rlhf reward.path=runs/rm/model ...     # then align with it"""


def build_rm_config(yaml_path: str | None = None, overrides: Sequence[str] = ()) -> RewardTrainConfig:
    """Defaults, then the YAML file, then key=value overrides; every key, value and rule checked."""
    return build_config(yaml_path, overrides, base=RewardTrainConfig())


def parse_args(argv) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m ple_fast.reward_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a Bradley-Terry reward model (HF sequence classifier) on preference pairs.",
        epilog=help_epilog(RewardTrainConfig, "data.path=hh.jsonl.gz train.lr=1e-5") + "\n\n" + EXAMPLES)
    parser.add_argument("--config", help="YAML config file; key=value overrides apply on top")
    parser.add_argument("--out", help="run folder (same as run.out_dir=...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)     # key=value before and after the options
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    return args.config, overrides


def main(argv=None) -> dict:
    """Parse, check and run; bad input of any kind is one line on stderr and exit status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        cfg = build_rm_config(*parse_args(sys.argv[1:] if argv is None else argv))
        from ple_fast.reward_run import run          # torch and the run: only once the command line is good
        return run(cfg)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
