"""`python -m ple_fast.train`: SFT warm-up, then PLE (or a baseline), then a before/after table.

With no arguments it trains the embedded default (a built-in task and a tiny Llama built from
scratch) on the CPU. Pointed at a model folder, data and a reward model it is the real thing:

    python -m ple_fast.train model.path=/models/qwen2-0.5b data.sft_path=hh.jsonl.gz \\
        reward.kind=hf reward.path=/models/rm --out runs/hh

This module parses the command line and the config only; the run (ple_fast.run) and torch load after
that, so `--help` and config errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from ple_fast.config import Config, InputError, build_config, help_epilog

EXAMPLES = """Examples:
  python -m ple_fast.train                                   # the embedded default on a CPU, about a minute
  python -m ple_fast.train --algo raft --out runs/raft        # a baseline under the same sample budget
  python -m ple_fast.train --config hh_rlhf model.path=/models/policy reward.path=/models/rm \\
      data.sft_path=/data/hh.jsonl.gz --out runs/hh              # a real model, reward model and HH-RLHF"""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m ple_fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PLE alignment: SFT warm-up, dual generation, reward scoring, threshold-gated loss.",
        epilog=help_epilog(Config, "ple.iterations=3 rollout.temperature=0.7") + "\n\n" + EXAMPLES)
    parser.add_argument("--config", help="YAML config file, or a shipped config's name; key=value overrides "
                                         "apply on top")
    parser.add_argument("--algo", choices=["ple", "raft", "distill", "sft"], help="same as ple.algo=...")
    parser.add_argument("--out", help="run folder (same as run.out_dir=...)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the newest checkpoint in the run folder (auto) or from PATH")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)     # key=value before and after the options
    overrides = list(args.overrides)
    if args.algo:
        overrides.append(f"ple.algo={args.algo}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    return args.config, overrides


def main(argv=None, *, script: bool = False) -> dict:
    """Parse, check and run; bad input of any kind is one line on stderr and exit status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        yaml_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = build_config(yaml_path, overrides)
        from ple_fast.run import run_command        # torch and the run: only once the command line is good
        return run_command(cfg, script=script)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(script=True)
