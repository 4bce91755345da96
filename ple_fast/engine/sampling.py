"""Sampling in torch: the rollout engine's path for top-k / top-p (and on a CPU), and the oracles.

Plain temperature sampling on a GPU runs the fused race kernel instead (ple_fast.kernels.sampling).
Every path draws by an exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with
probability p_i, so the random numbers can be drawn apart from the pick (outside a CUDA graph).
"""
from __future__ import annotations

import torch


def candidate_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution over each row's candidates: (probs [B, C], ids [B, C] or None).

    Same order as HF's warpers: temperature, then top-k, then top-p on the renormalised top-k.
    ids is None when the candidates are the whole vocabulary (C = V, no sort needed).
    Filtered-out candidates get probability exactly 0.
    """
    if temperature <= 0:
        raise ValueError("candidate_probs: temperature must be > 0 (temperature 0 is greedy)")
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    ids = None
    if 0 < top_k < vocab:
        scaled, ids = scaled.topk(top_k, dim=-1)             # sorted, descending
    elif top_p < 1.0:
        scaled, ids = scaled.sort(dim=-1, descending=True)
    probs = scaled.softmax(dim=-1)
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs           # probs are sorted descending here
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


def reference_candidate_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                              top_p: float = 1.0) -> torch.Tensor:
    """The same distribution as a dense [B, V] fp64 table, built row by row: the test oracle."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for row, row_logits in enumerate(logits.double().cpu()):
        order = sorted(range(row_logits.numel()), key=lambda v: -float(row_logits[v]))
        if top_k > 0:
            order = order[:top_k]
        kept = torch.tensor([float(row_logits[v]) / temperature for v in order], dtype=torch.float64)
        p = torch.exp(kept - kept.max())
        p = p / p.sum()
        cut, mass = len(order), 0.0
        for i in range(len(order)):
            if mass >= top_p:
                cut = i
                break
            mass += float(p[i])
        p = p[:cut] / p[:cut].sum()
        out[row, order[:cut]] = p
    return out


def noise_width(vocab: int, top_k: int, top_p: float) -> int:
    """How many exponential draws one row needs per step: one per candidate."""
    return top_k if 0 < top_k < vocab else vocab


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token per row [B] int64; argmax at temperature 0, else an exponential race.

    argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i; `noise` holds the E_i
    ([B, noise_width]) so that the RNG draw can live outside a CUDA graph.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs, ids = candidate_probs(logits, temperature, top_k, top_p)
    score = (probs / noise).masked_fill(probs <= 0, -1.0)
    choice = score.argmax(dim=-1)
    if ids is None:
        return choice
    return ids.gather(1, choice.unsqueeze(1)).squeeze(1)
