"""What both commands share at run time: the device, the seeds, and the metrics log.

MetricsLog writes metrics.jsonl (always) and, when asked, TensorBoard and Weights & Biases (both
optional installs, imported only then), and echoes a short line per record.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ple_fast.config import ConfigError


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
