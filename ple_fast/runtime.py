"""What both commands share at run time: the device, the seeds, progress output and the metrics log.

On a terminal, progress is a bar per phase and lines print above it; anywhere else (a file, a pipe,
a scheduler's log) there are no bars and no carriage returns: a plain line now and then, and one
line per record. MetricsLog writes metrics.jsonl (always) and, when asked, TensorBoard and Weights &
Biases (both optional installs, imported only then).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ple_fast.config import ConfigError

PLAIN_EVERY_S = 30.0     # without a terminal: at most one progress line per phase this often


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_files(section, keys: tuple[str, ...], prefix: str) -> None:
    """Each of the section's keys that names a file names one that exists."""
    for key in keys:
        value = getattr(section, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{prefix}.{key}: file {value!r} does not exist")


def say(line: str) -> None:
    """A line on stdout that does not break a progress bar on the terminal."""
    tqdm.write(line, file=sys.stdout)


class Progress:
    """A phase's progress: a tqdm bar on a terminal; elsewhere a plain line at most every PLAIN_EVERY_S
    seconds (`enabled` False: nothing)."""

    def __init__(self, total: int, desc: str, initial: int = 0, *, enabled: bool = True, unit: str = "step"):
        self.total, self.desc, self.n = total, desc, initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit=unit) \
            if enabled and sys.stderr.isatty() else None
        self.plain = enabled and self.bar is None
        self.postfix: dict = {}
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and time.monotonic() - self.last >= PLAIN_EVERY_S and self.n < self.total:
            self.last = time.monotonic()
            extra = "  ".join(f"{k} {v}" for k, v in self.postfix.items())
            say(f"  {self.desc} {self.n}/{self.total}" + (f"  {extra}" if extra else ""))

    def set_postfix(self, **values) -> None:
        """Figures shown beside the bar (off a terminal: in the next plain line)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """metrics.jsonl (always), plus TensorBoard / W&B when asked for; echoes a short line."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] = say, *, tensorboard_dir=None,
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
