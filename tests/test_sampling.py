"""The fused race sampler (ple_fast/kernels/sampling.py) against its fp64 oracle fed the kernel's own uniforms,
plus the statistics of the draws. CPU runs under TRITON_INTERPRET=1; the suite's `-m gpu` compiles."""
import math

import pytest
import torch

from ple_fast.kernels.sampling import race_sample, race_sample_reference, race_uniforms

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def keys(seed: int, step: int):
    return (torch.tensor([seed], dtype=torch.long, device=DEVICE),
            torch.tensor([step], dtype=torch.long, device=DEVICE))


def clear_winner(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, softcap) -> torch.Tensor:
    """Rows whose best fp64 race score leads the runner-up by more than fp32 rounding can flip."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    score = z / temperature - torch.log(-torch.log(uniforms.double()))
    if score.shape[1] < 2:
        return torch.ones(score.shape[0], dtype=torch.bool, device=score.device)
    top2 = score.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 1e-5 * (1 + top2[:, 0].abs())


# shapes: one column, fewer columns than a block, a partial row tile and a split ending mid-block,
# several splits (vocab not a multiple of the block or the split); each dtype with and without softcap
@pytest.mark.parametrize("rows,vocab,dtype,temperature,softcap", [
    (1, 1, torch.float32, 1.0, None),
    (3, 7, torch.bfloat16, 0.7, 30.0),
    (65, 300, torch.float16, 1.6, None),
    (65, 300, torch.bfloat16, 1.0, None),
    (4, 8193, torch.bfloat16, 0.7, 30.0),
    (2, 1000, torch.float32, 1.3, 15.0),
    (2, 1000, torch.float16, 1.0, 50.0),
])
def test_race_equals_the_fp64_oracle_on_the_same_uniforms(rows, vocab, dtype, temperature, softcap):
    g = torch.Generator().manual_seed(rows * 7919 + vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype).to(DEVICE)
    seed, step = keys(1234 + rows, vocab % 5)
    got = race_sample(logits, seed, step, temperature, softcap)
    uniforms = race_uniforms(rows, vocab, seed, step)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert bool(((uniforms >= 0) & (uniforms < 1)).all())
    want = race_sample_reference(logits.float(), uniforms, temperature, softcap)
    clear = clear_winner(logits.float(), uniforms, temperature, softcap)
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_strided_logits_and_masked_columns(softcap):
    """A row view with a stride (the head's output sliced); -inf logits are never drawn, except past
    a softcap, which maps them to a finite -softcap (as the torch path does); columns past V never."""
    full = torch.randn(300, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    full[:, 10:] = float("-inf")
    seed, step = keys(5, 0)
    got = race_sample(full[:, :40], seed, step, 1.0, softcap)
    assert bool((got < (10 if softcap is None else 40)).all())
    if softcap is not None:
        assert bool((got >= 10).any())
    assert torch.equal(got, race_sample(full[:, :40].contiguous(), seed, step, 1.0, softcap))


def test_uniforms_depend_on_seed_step_row_and_column_and_look_uniform():
    base = race_uniforms(64, 96, *keys(7, 3))
    assert torch.equal(base, race_uniforms(64, 96, *keys(7, 3)))
    for other in (race_uniforms(64, 96, *keys(8, 3)), race_uniforms(64, 96, *keys(7, 4))):
        assert (other != base).float().mean() > 0.99
    assert (base[0] != base[1]).float().mean() > 0.99          # rows are different streams
    assert base.unique().numel() > 0.99 * base.numel()          # and columns within a row
    flat = base.flatten().double().sort().values.cpu()
    ecdf = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    ks = float((ecdf - flat).abs().max())
    assert ks < 1.95 / math.sqrt(flat.numel()), ks               # Kolmogorov-Smirnov, p ~ 1e-3


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.6, 2.0)])
def test_draw_frequencies_follow_the_softmax(temperature, softcap):
    vocab, draws = 12, 6000
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5).to(DEVICE)
    tokens = race_sample(logits.expand(draws, vocab).contiguous(), *keys(99, 0), temperature, softcap)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    z = logits[0].double().cpu()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = torch.softmax(z / temperature, dim=0) * draws
    assert expected.min() >= 5
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = vocab - 1
    c = 2.0 / (9.0 * dof)
    assert stat < dof * (1.0 - c + 4.753 * math.sqrt(c)) ** 3, (stat, counts, expected)   # p = 1e-6


def test_errors_name_the_argument():
    logits = torch.zeros(2, 5, device=DEVICE)
    seed, step = keys(0, 0)
    with pytest.raises(ValueError, match="seed must be a one-element int64"):
        race_sample(logits, seed.int(), step, 1.0)
    with pytest.raises(ValueError, match="logits must be"):
        race_sample(logits[0], seed, step, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        race_sample(logits, seed, step, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_race_in_a_cuda_graph_draws_fresh_numbers_each_replay():
    logits = torch.randn(32, 5000, device="cuda", dtype=torch.bfloat16)
    seed, step = keys(11, 0)
    race_sample(logits, seed, step, 1.0)                     # compile outside the capture
    out = torch.zeros(32, dtype=torch.long, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(race_sample(logits, seed, step, 1.0))
        step.add_(1)
    seen = []
    for s in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(out.clone())
        assert torch.equal(out, race_sample(logits, seed, torch.tensor([s], device="cuda"), 1.0))
    assert not torch.equal(seen[0], seen[1])
