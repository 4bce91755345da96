"""The decode step's bookkeeping kernel (ple_fast/kernels/step_record.py) against the torch op sequence it
replaces, on random states. CPU runs under TRITON_INTERPRET=1; the suite's `-m gpu` compiles."""
import pytest
import torch

from ple_fast.kernels.sampling import _tile as sampling_tile, race_candidates, race_sample
from ple_fast.kernels.step_record import record_step, record_step_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_state(batch: int, steps: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    state = dict(tokens=torch.randint(vocab, (batch,), generator=g),
                 positions=torch.randint(100, (batch,), generator=g),
                 done=torch.rand(batch, generator=g) < 0.3,
                 out=torch.randint(vocab, (batch, steps), generator=g),
                 step=torch.randint(steps, (1,), generator=g))
    return {name: t.to(DEVICE) for name, t in state.items()}


def cloned(state: dict) -> dict:
    return {name: t.clone() for name, t in state.items()}


def assert_same(got: dict, want: dict) -> None:
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


# one row, a partial block, more rows than a block (256: the kernel loops), no row; no / one / several
# EOS ids, the pad id among them or not
@pytest.mark.parametrize("batch", [1, 5, 300, 0])
@pytest.mark.parametrize("eos_ids", [(), (3,), (0, 2, 5, 9, 11)])
@pytest.mark.parametrize("advance", [False, True])
def test_sampled_tokens_are_recorded_as_the_torch_ops_record_them(batch, eos_ids, advance):
    vocab = 12
    state = random_state(batch, 7, vocab, seed=batch * 31 + len(eos_ids) + advance)
    g = torch.Generator().manual_seed(batch)
    sampled = torch.randint(vocab, (batch,), generator=g).to(DEVICE)
    pad, eos = torch.tensor(0, device=DEVICE), torch.tensor(eos_ids, dtype=torch.long, device=DEVICE)
    want, got = cloned(state), cloned(state)
    record_step_reference(**want, pad=pad, eos=eos, sampled=sampled, advance=advance)
    record_step(**got, pad=pad, eos=eos, sampled=sampled, advance=advance)
    assert_same(got, want)
    if batch and eos_ids:       # the draw hit an EOS somewhere, or the test proves little
        assert bool((want["done"] & ~state["done"]).any()) or not bool(torch.isin(sampled, eos).any())


@pytest.mark.parametrize("batch,splits", [(1, 1), (7, 3), (300, 19), (4, 33)])
def test_race_candidates_pick_the_top_score_and_the_lowest_column_on_a_tie(batch, splits):
    g = torch.Generator().manual_seed(splits)
    score = torch.randn(batch, splits, generator=g)
    score[:, -1] = score[:, 0]                       # a tie between the first and the last split
    score[0, :] = float("-inf") if splits > 1 else score[0, :]     # a row whose splits saw no column
    col = (torch.arange(splits) * 100).expand(batch, splits) + torch.randint(100, (batch, splits), generator=g)
    candidates = (score.to(DEVICE), col.to(torch.int32).to(DEVICE))
    state = random_state(batch, 4, 5000, seed=batch)
    eos = torch.tensor([7], device=DEVICE)
    want, got = cloned(state), cloned(state)
    record_step_reference(**want, pad=torch.tensor(1, device=DEVICE), eos=eos, candidates=candidates, advance=True)
    record_step(**got, pad=torch.tensor(1, device=DEVICE), eos=eos, candidates=candidates, advance=True)
    assert_same(got, want)


def test_the_recorded_race_pick_equals_race_sample():
    g = torch.Generator().manual_seed(3)
    vocab = 2 * sampling_tile(torch.device(DEVICE))["SPLIT"] + 100     # three splits on either device
    logits = (torch.randn(6, vocab, generator=g) * 2).to(DEVICE)
    seed, step = torch.tensor([5], device=DEVICE), torch.tensor([2], device=DEVICE)
    candidates = race_candidates(logits, seed, step, 0.8)
    assert candidates[0].shape[1] == 3               # several splits to reduce
    state = random_state(6, 4, vocab, seed=9)
    state["done"].zero_()
    state["step"].fill_(2)
    record_step(**state, pad=torch.tensor(0, device=DEVICE), eos=torch.tensor([], dtype=torch.long, device=DEVICE),
                candidates=candidates)
    assert torch.equal(state["tokens"], race_sample(logits, seed, step, 0.8))
    assert int(state["step"]) == 3 and torch.equal(state["out"][:, 2], state["tokens"])


def test_errors_name_the_argument():
    state = random_state(3, 4, 10, seed=0)
    pad, eos = torch.tensor(0, device=DEVICE), torch.tensor([1], device=DEVICE)
    sampled = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="done must be"):
        record_step(**dict(state, done=state["done"].long()), pad=pad, eos=eos, sampled=sampled)
    with pytest.raises(ValueError, match="pad must be"):
        record_step(**state, pad=pad.view(1), eos=eos, sampled=sampled)
    with pytest.raises(ValueError, match="either sampled tokens or race candidates"):
        record_step(**state, pad=pad, eos=eos)
    with pytest.raises(ValueError, match="sampled must be int64"):
        record_step(**state, pad=pad, eos=eos, sampled=sampled.int())
    with pytest.raises(ValueError, match="candidates must be"):
        record_step(**state, pad=pad, eos=eos, candidates=(torch.zeros(3, 2, device=DEVICE),) * 2)
