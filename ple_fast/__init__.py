"""ple_fast: a fast training engine for PLE (Progressively Label Enhancement) alignment.

The public ops (`ple_loss`, `sequence_logprobs`, `PLELossOutput`, `dual_forward`) are importable from
here. They load with their modules on first use, so that `python -m ple_fast.train --help` answers
without importing torch; the rest lives in its own module (train, trainer, rollout, reward, ...).
"""
import importlib

_PUBLIC = {"PLELossOutput": "ple_fast.loss", "ple_loss": "ple_fast.loss", "sequence_logprobs": "ple_fast.loss",
           "dual_forward": "ple_fast.forward"}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ple_fast' has no attribute {name!r}")
