"""ple_fast: a fast training engine for PLE (Progressively Label Enhancement) alignment.

The public ops are re-exported here; the rest lives in its own module (train, trainer,
rollout, reward, data, layout, ...).
"""
from ple_fast.forward import dual_forward
from ple_fast.loss import PLELossOutput, ple_loss, sequence_logprobs

__all__ = ["PLELossOutput", "dual_forward", "ple_loss", "sequence_logprobs"]
__version__ = "0.1.0"
