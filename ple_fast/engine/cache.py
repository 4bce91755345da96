"""The rollout engine's static buffers: the KV cache, and the decode state a step reads and updates.

Cache layout: row b's token at position p lives in slot p, so position == slot for every row and
the attention mask is a pure function of the query positions (`slot <= position`). Prompts are
therefore right-aligned at slot 0 (no left padding), and a shared prefix (the principle) occupies
slots 0..Lp-1 of every row that uses it. Both buffers live as long as the batch size fits: CUDA
graphs read them by address.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """K and V slots [layers, batch, kv_heads, capacity, head_dim]; slot == position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        # zeros, not empty: masked slots still meet the P @ V product, and 0 * NaN is NaN
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.kv_heads, self.capacity, self.head_dim = batch, kv_heads, capacity, head_dim
        rows = torch.arange(batch, device=device).view(batch, 1)
        heads = torch.arange(kv_heads, device=device).view(1, kv_heads)
        self.head_base = (rows * kv_heads + heads) * capacity   # flat slot 0 of (row, head)

    def row_slots(self, rows: slice, positions: torch.Tensor) -> torch.Tensor:
        """[R, kv_heads, Q] flat slots of rows[r] at positions [R, Q] (computed once per step, not per layer)."""
        return self.head_base[rows].unsqueeze(-1) + positions.unsqueeze(1)

    def flat_slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[W, kv_heads] flat indices into one layer's K (or V) of (rows[w], head, positions[w])."""
        return self.head_base[rows] + positions.unsqueeze(1)

    def check(self, layer: int, keys: torch.Tensor) -> None:
        """A layer's fresh keys [R, kv_heads, Q, D] fit this cache (the model config's head counts)."""
        if keys.shape[1:2] != (self.kv_heads,) or keys.shape[-1] != self.head_dim:
            raise ValueError(f"StaticKVCache: layer {layer} produced keys of shape {tuple(keys.shape)}, "
                             f"expected [rows, {self.kv_heads}, q, {self.head_dim}] from the model config")

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys / values [..., D] go to layer `layer`'s flat slots [...] of the same leading shape
        (`row_slots`, `flat_slots`), in place."""
        dim = self.head_dim
        flat = slots.reshape(-1)
        self.keys[layer].view(-1, dim).index_copy_(0, flat, keys.reshape(-1, dim).to(self.keys.dtype))
        self.values[layer].view(-1, dim).index_copy_(0, flat, values.reshape(-1, dim).to(self.values.dtype))

    def read(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [R, kv_heads, length, D] of the first `length` slots."""
        return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]


class DecodeState:
    """The static buffers one decode step reads and updates in place (graph inputs and outputs)."""

    def __init__(self, batch: int, max_new: int, device: torch.device):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)    # fed at this step
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)          # output column
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)          # fused sampling's key
        self.out = torch.zeros(batch, max_new, dtype=torch.long, device=device)
        self.noise = torch.ones(batch, 1, device=device)     # swapped per sampling width, see use_noise
        self.noise_by_width = {1: self.noise}               # kept: captured graphs point at them

    def use_noise(self, width: int) -> None:
        if width not in self.noise_by_width:
            self.noise_by_width[width] = torch.ones(self.tokens.shape[0], width, device=self.tokens.device)
        self.noise = self.noise_by_width[width]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in vars(self).items() if isinstance(t, torch.Tensor)}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, t in saved.items():
            getattr(self, name).copy_(t)
