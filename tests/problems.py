"""Random packed PLE batches shared by the loss and kernel tests."""
import math

import torch

from ple_fast.loss import ple_loss


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


def run_loss(problem, impl, grad_hidden=True, grad_weight=True, **kwargs):
    """ple_loss + backward on fresh leaves; returns the output and the two grads."""
    hidden = problem["hidden"].detach().clone().requires_grad_(grad_hidden)
    weight = problem["weight"].detach().clone().requires_grad_(grad_weight)
    out = ple_loss(hidden, weight, problem["labels"], problem["seq_index"], problem["rewards"],
                   kwargs.pop("tau", 0.2), impl=impl, **kwargs)
    if grad_hidden or grad_weight:
        out.loss.backward()
    return out, hidden.grad, weight.grad


def tied_weight_grads(impls, seed, num_pairs, dtype, through="mlp"):
    """d loss / d weight per impl when ONE weight leaf is both the input embedding (hidden comes from
    it, through a tanh mix or directly) and the lm_head: the tied-embedding case."""
    g = torch.Generator().manual_seed(seed)
    vocab, hidden_size, num_rows = 61, 8, 24
    weight0 = torch.randn(vocab, hidden_size, generator=g, dtype=dtype)
    mix = torch.randn(hidden_size, hidden_size, generator=g, dtype=dtype) / math.sqrt(hidden_size)
    input_ids = torch.randint(0, vocab, (num_rows,), generator=g)
    labels = torch.randint(0, vocab, (num_rows,), generator=g)
    seq_index = torch.arange(num_rows) % (2 * num_pairs)
    rewards = torch.randn(num_pairs, 2, generator=g)
    grads = {}
    for impl in impls:
        weight = weight0.clone().requires_grad_(True)
        hidden = torch.tanh(weight[input_ids] @ mix) if through == "mlp" else weight[input_ids]
        ple_loss(hidden, weight, labels, seq_index, rewards, 0.2, impl=impl).loss.backward()
        grads[impl] = weight.grad
    return grads
