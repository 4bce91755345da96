"""Random packed PLE batches shared by the loss and kernel tests."""
import math

import torch


def make_problem(seed, num_rows, hidden_size, vocab, num_pairs, dtype=torch.float32, masked_frac=0.25,
                 device="cpu"):
    """Random packed batch: some rows unscored (seq_index -1, label -100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=g, dtype=torch.float64)
    weight = 2.0 * torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) / math.sqrt(hidden_size)
    seq_index = torch.randint(0, 2 * num_pairs, (num_rows,), generator=g)
    labels = torch.randint(0, vocab, (num_rows,), generator=g)
    unscored = torch.rand(num_rows, generator=g) < masked_frac
    seq_index[unscored] = -1
    labels[unscored] = -100
    rewards = torch.randn(num_pairs, 2, generator=g, dtype=torch.float64)
    return dict(hidden=hidden.to(device, dtype), weight=weight.to(device, dtype), labels=labels.to(device),
                seq_index=seq_index.to(device), rewards=rewards.float().to(device))
