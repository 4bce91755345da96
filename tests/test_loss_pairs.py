"""ple_fast.loss_pairs: ple_loss(impl="pairs") (chunks of whole pairs, the loss gradient formed
in the forward) against the full-logits reference, fp64 wherever the inputs allow it."""

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ple_fast.loss as loss_mod
import ple_fast.loss_pairs as pairs_mod
from problems import make_problem, run_loss, tied_weight_grads
from ple_fast.loss import IMPLS, ple_loss, sequence_logprobs
from ple_fast.loss_pairs import pairs_ple_loss

# ----------------------------------------------------------------------------------------
# helpers


def rel_err(a, b):
    """Relative error; NaN anywhere gives NaN, which fails every `< tol`."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def run_pairs(problem, grad_hidden=True, grad_weight=True, chunk_rows=None, scale=None, **kwargs):
    """pairs_ple_loss + backward of the loss (times `scale`) on fresh leaves."""
    hidden = problem["hidden"].detach().clone().requires_grad_(grad_hidden)
    weight = problem["weight"].detach().clone().requires_grad_(grad_weight)
    out = pairs_ple_loss(hidden, weight, problem["labels"], problem["seq_index"], problem["rewards"],
                         kwargs.pop("tau", 0.2), chunk_rows=chunk_rows, **kwargs)
    if grad_hidden or grad_weight:
        (out.loss if scale is None else scale * out.loss).backward()
    return out, hidden.grad, weight.grad


def check(got, want, tol=1e-10, loss_tol=None):
    """got, want: (PLELossOutput, dX, dW)."""
    out, dx, dw = got
    ref, ref_dx, ref_dw = want
    for t in (out.loss, out.seq_logps, dx, dw):
        if t is not None:
            assert torch.isfinite(t).all(), f"non-finite values in {t}"
    assert out.loss.dim() == 0 and out.seq_logps.shape == ref.seq_logps.shape
    assert torch.equal(out.seq_tokens, ref.seq_tokens)
    assert torch.equal(out.ranked, ref.ranked)
    assert torch.equal(out.valid, ref.valid)
    assert out.num_dropped.item() == ref.num_dropped.item() and out.num_dropped.dtype == torch.int64
    assert not out.ranked.requires_grad and not out.valid.requires_grad
    loss_tol = tol if loss_tol is None else loss_tol
    assert abs(out.loss.item() - ref.loss.item()) <= loss_tol * max(1.0, abs(ref.loss.item()))
    assert rel_err(out.seq_logps.detach(), ref.seq_logps.detach()) < loss_tol
    assert (dx is None) == (ref_dx is None) and (dw is None) == (ref_dw is None)
    if dx is not None:
        assert dx.dtype == ref_dx.dtype or tol > 1e-8
        assert rel_err(dx, ref_dx) < tol
    if dw is not None:
        assert rel_err(dw, ref_dw) < tol


def f64(problem):
    return dict(problem, hidden=problem["hidden"].double(), weight=problem["weight"].double())


def layout(pairs, query_rows=3, gap=True):
    """seq_index of a packed layout, pairs kept together: per pair an unscored query, then the
    original's rows, [an unscored row], the principled response's rows, [an unscored row]."""
    seq = []
    for k, (a, b) in enumerate(pairs):
        seq += [-1] * query_rows + [2 * k] * a + [-1] * gap + [2 * k + 1] * b + [-1] * gap
    return torch.tensor(seq)


def problem_with(seq_index, hidden_size=8, vocab=97, seed=0, dtype=torch.float64):
    num_pairs = int(seq_index.max().item()) // 2 + 1 if (seq_index >= 0).any() else 1
    p = make_problem(seed, len(seq_index), hidden_size, vocab, num_pairs, dtype=dtype, masked_frac=0.0)
    p["seq_index"] = seq_index.clone()
    p["labels"] = torch.where(seq_index >= 0, p["labels"], -100)
    return p


# ----------------------------------------------------------------------------------------
# against the reference


def test_registered():
    assert "pairs" in IMPLS


@pytest.mark.parametrize("shape", [(37, 16, 97, 3), (64, 8, 1003, 4), (1, 4, 5, 1), (50, 6, 13, 9)])
@pytest.mark.parametrize("chunk_rows", [None, 5, 1])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (4.0, 1.0), (3.0, 1.3)])
def test_random_shapes_fp64(shape, chunk_rows, softcap, temperature):
    num_rows, hidden_size, vocab, num_pairs = shape
    p = make_problem(sum(shape), num_rows, hidden_size, vocab, num_pairs, dtype=torch.float64)
    kw = dict(softcap=softcap, temperature=temperature)
    got = run_pairs(p, chunk_rows=chunk_rows, **kw)
    assert got[0].loss.dtype == torch.float64 and got[0].seq_logps.dtype == torch.float64
    check(got, run_loss(p, "reference", **kw))


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
@pytest.mark.parametrize("weighting", ["softmax", "tanh"])
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("rank_sft_coef,beta", [(1.0, 1.0), (0.0, 2.5), (0.3, 0.5)])
def test_gate_options(rank_loss, weighting, length_normalize, rank_sft_coef, beta):
    p = make_problem(3, 60, 8, 97, 8, dtype=torch.float64)
    kw = dict(rank_loss=rank_loss, weighting=weighting, length_normalize=length_normalize,
              rank_sft_coef=rank_sft_coef, beta=beta, tau=0.1)
    ref = run_loss(p, "reference", **dict(kw))
    assert 0 < int(ref[0].ranked.sum()) < 8  # both branches
    check(run_pairs(p, chunk_rows=7, **dict(kw)), ref)
    check(run_pairs(p, chunk_rows=7, **dict(kw, tau=torch.tensor(0.1, dtype=torch.float64))), ref)


def test_ple_loss_dispatches_to_pairs(monkeypatch):
    calls = []
    real = pairs_mod.pairs_ple_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pairs_mod, "pairs_ple_loss", spy)
    p = make_problem(4, 30, 8, 97, 3, dtype=torch.float64)
    got = run_loss(p, "pairs", weighting="tanh", softcap=2.0, temperature=0.9)
    assert len(calls) == 1 and calls[0]["weighting"] == "tanh" and calls[0]["softcap"] == 2.0
    check(got, run_loss(p, "reference", weighting="tanh", softcap=2.0, temperature=0.9))


def test_default_chunk_rows_follow_chunk_bytes(monkeypatch):
    p = make_problem(5, 40, 8, 97, 6, dtype=torch.float64)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 6 * 97 * 8)  # 6 fp64 rows
    counter = MatmulCounter()
    with counter:
        got = run_loss(p, "pairs")
    _, _, chunks = pairs_mod._plan(p["seq_index"], 6, 6)
    assert len(chunks) > 3 and len(counter.calls) == 3 * len(chunks)
    check(got, run_loss(p, "reference"))


# ----------------------------------------------------------------------------------------
# layouts and edge cases


def test_one_token_and_empty_responses():
    # pairs: (1 token, 0 tokens), (5 tokens, 0 tokens), (0 tokens, 1 token), (0, 0)
    seq_index = torch.tensor([-1, 0, -1, 2, 2, 2, 2, 2, -1, 5, -1])
    p = problem_with(seq_index)
    p["rewards"] = torch.tensor([[0.0, 1.0], [0.3, 0.1], [-1.0, 2.0], [0.5, 0.5]])
    for rank_loss in ("hinge", "logistic"):
        for chunk_rows in (None, 1, 2):
            got = run_pairs(p, chunk_rows=chunk_rows, rank_loss=rank_loss)
            check(got, run_loss(p, "reference", rank_loss=rank_loss))
            out, dx, _ = got
            assert out.seq_tokens.tolist() == [1, 0, 5, 0, 0, 1, 0, 0]
            assert out.seq_logps[[1, 3, 4, 6, 7]].eq(0).all()
            assert dx[seq_index < 0].eq(0).all()  # unscored rows get no gradient


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
def test_all_tokens_masked(rank_loss):
    p = make_problem(6, 12, 8, 97, 2, masked_frac=1.0, dtype=torch.float64)
    got = run_pairs(p, rank_loss=rank_loss)
    out, dx, dw = got
    assert out.seq_logps.eq(0).all() and dx.eq(0).all() and dw.eq(0).all()
    assert out.loss.requires_grad
    check(got, run_loss(p, "reference", rank_loss=rank_loss))


def test_empty_batch():
    p = make_problem(7, 6, 4, 11, 1, masked_frac=1.0, dtype=torch.float64)
    p["rewards"] = torch.zeros(0, 2)
    out, dx, dw = run_pairs(p)
    assert out.loss.item() == 0.0 and out.seq_logps.shape == (0,) and out.ranked.shape == (0,)
    assert dx.eq(0).all() and dw.eq(0).all()


@pytest.mark.parametrize("vocab", [1, 2, 5, 97, 1009])
def test_vocab_sizes(vocab):
    p = make_problem(8, 29, 6, vocab, 3, dtype=torch.float64)
    for softcap in (None, 3.0):
        check(run_pairs(p, chunk_rows=4, softcap=softcap), run_loss(p, "reference", softcap=softcap))


def test_grouped_layout_slices_and_shuffled_layout_gathers():
    pairs = [(4, 6), (1, 3), (7, 2), (5, 5), (2, 1)]
    seq_grouped = layout(pairs, query_rows=0, gap=False)  # scored rows only, pairs in order
    seq_packed = layout(pairs)  # unscored query and end rows between them
    for seq_index in (seq_grouped, seq_packed):
        p = problem_with(seq_index, seed=9)
        ref = run_loss(p, "reference")
        for chunk_rows in (1, 8, 16, 1000):
            order, num_scored, chunks = pairs_mod._plan(p["seq_index"], len(pairs), chunk_rows)
            assert num_scored == int((seq_index >= 0).sum())
            if seq_index is seq_grouped:
                assert all(rows is not None for *_, rows in chunks)  # contiguous runs: sliced
            got = run_pairs(p, chunk_rows=chunk_rows)
            check(got, ref)
        # the same rows shuffled: pairs no longer contiguous, gathered into pair order
        perm = torch.randperm(len(seq_index), generator=torch.Generator().manual_seed(1))
        q = dict(p, hidden=p["hidden"][perm], labels=p["labels"][perm], seq_index=p["seq_index"][perm])
        _, _, chunks = pairs_mod._plan(q["seq_index"], len(pairs), 8)
        assert any(rows is None for *_, rows in chunks)
        out, dx, dw = run_pairs(q, chunk_rows=8)
        check((out, dx, dw), run_loss(q, "reference"))
        check((out, dx, dw), (ref[0], ref[1][perm], ref[2]))


def test_pairs_in_reverse_row_order():
    """Pairs grouped but stored last pair first: not in pair order, so they are gathered."""
    pairs = [(3, 2), (2, 4), (5, 1)]
    seq = layout(pairs)
    blocks = torch.tensor_split(seq, [11, 20])  # the three pairs' row blocks (3+a+1+b+1 rows)
    assert [b[b >= 0].div(2, rounding_mode="floor").unique().tolist() for b in blocks] == [[0], [1], [2]]
    seq_rev = torch.cat(blocks[::-1])
    p = problem_with(seq_rev, seed=10)
    _, _, chunks = pairs_mod._plan(p["seq_index"], 3, 6)
    assert all(rows is None for *_, rows in chunks)
    check(run_pairs(p, chunk_rows=6), run_loss(p, "reference"))


def test_pair_larger_than_chunk_rows_and_many_tiny_chunks():
    pairs = [(20, 15), (1, 1), (0, 0), (2, 0), (9, 30), (0, 1)]
    p = problem_with(layout(pairs), seed=11, vocab=61)
    ref = run_loss(p, "reference", softcap=5.0)
    for chunk_rows in (1, 3, 10, 36):
        _, _, chunks = pairs_mod._plan(p["seq_index"], len(pairs), chunk_rows)
        assert [c[0] for c in chunks] == sorted(c[0] for c in chunks) and chunks[0][0] == 0
        assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(chunks, chunks[1:]))  # pairs tile [0, P)
        assert chunks[-1][1] == len(pairs) and chunks[-1][3] == 79
        for pair_lo, pair_hi, pos_lo, pos_hi, _ in chunks:
            with_rows = [k for k in range(pair_lo, pair_hi) if sum(pairs[k])]
            assert pos_hi - pos_lo == sum(sum(pairs[k]) for k in with_rows)
            assert pos_hi - pos_lo <= chunk_rows or len(with_rows) == 1  # a big pair gets a chunk of its own
        check(run_pairs(p, chunk_rows=chunk_rows, softcap=5.0), ref)
    _, _, chunks = pairs_mod._plan(p["seq_index"], len(pairs), 1)
    assert len(chunks) == 5  # every pair with rows alone; the empty pair rides along


def test_labels_of_unscored_rows_are_never_read():
    p = make_problem(12, 30, 8, 97, 2, dtype=torch.float64)
    results = []
    for junk in (-100, 10**9, -(10**9)):
        q = dict(p, labels=torch.where(p["seq_index"] >= 0, p["labels"], junk))
        out, dx, dw = run_pairs(q, chunk_rows=4)
        results.append((out.loss, out.seq_logps, dx, dw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# rewards, frozen and tied weights, dtypes


def test_non_finite_rewards_are_dropped():
    p = make_problem(13, 50, 8, 97, 5, dtype=torch.float64)
    p["rewards"][1, 0] = float("nan")
    p["rewards"][3, 1] = float("inf")
    p["rewards"][4] = float("-inf")
    for chunk_rows in (None, 3):
        out, dx, dw = run_pairs(p, chunk_rows=chunk_rows)
        check((out, dx, dw), run_loss(p, "reference"))
        assert out.valid.tolist() == [True, False, True, False, False] and out.num_dropped.item() == 3
        dropped_rows = torch.isin(p["seq_index"], torch.tensor([2, 3, 6, 7, 8, 9]))
        assert dx[dropped_rows].eq(0).all()


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
def test_all_pairs_dropped(rank_loss):
    p = make_problem(14, 30, 8, 97, 3, dtype=torch.float64)
    p["rewards"][:, 0] = float("nan")
    out, dx, dw = run_pairs(p, chunk_rows=4, rank_loss=rank_loss)
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.num_dropped.item() == 3
    assert dx.eq(0).all() and dw.eq(0).all()


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs(frozen):
    p = make_problem(15, 33, 8, 97, 3, dtype=torch.float64)
    kw = dict(grad_hidden=frozen != "hidden", grad_weight=frozen != "weight")
    got = run_pairs(p, chunk_rows=5, **kw)
    assert (got[2] is None) == (frozen == "weight") and (got[1] is None) == (frozen == "hidden")
    check(got, run_loss(p, "reference", **kw))


def test_frozen_weight_does_no_dw_gemm():
    p = make_problem(16, 33, 8, 97, 3, dtype=torch.float64)
    counter = MatmulCounter()
    with counter:
        run_pairs(p, grad_weight=False, chunk_rows=5)
    _, _, chunks = pairs_mod._plan(p["seq_index"], 3, 5)
    assert len(counter.calls) == 2 * len(chunks)


@pytest.mark.parametrize("through", ["mlp", "direct"])
def test_tied_embedding_weight(through):
    """The same weight leaf makes hidden (input embedding) and is the lm_head."""
    grads = tied_weight_grads(("reference", "pairs"), seed=17, num_pairs=3, dtype=torch.float64, through=through)
    assert torch.isfinite(grads["pairs"]).all()
    assert rel_err(grads["pairs"], grads["reference"]) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_low_precision_against_fp64_reference(dtype, tol, softcap):
    p = make_problem(18, 48, 16, 1003, 3, dtype=dtype)
    want = run_loss(f64(p), "reference", softcap=softcap)
    out, dx, dw = got = run_pairs(p, chunk_rows=10, softcap=softcap)
    assert out.seq_logps.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert dx.dtype == dtype and dw.dtype == dtype
    check(got, want, tol=tol, loss_tol=1e-5)  # logits accumulate in fp32
    # no worse than the torch path at the same precision
    _, tdx, tdw = run_loss(p, "torch", softcap=softcap)
    assert rel_err(dx, want[1]) <= 1.5 * rel_err(tdx, want[1]) + 1e-6
    assert rel_err(dw, want[2]) <= 1.5 * rel_err(tdw, want[2]) + 1e-6


def test_mixed_dtypes_bf16_hidden_fp32_weight():
    p = make_problem(19, 40, 8, 97, 2)
    p["hidden"] = p["hidden"].bfloat16()
    want = run_loss(f64(p), "reference")
    out, dx, dw = got = run_pairs(p, chunk_rows=7)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    check(got, want, tol=1e-2, loss_tol=1e-5)
    assert rel_err(dw, want[2]) < 1e-5


# ----------------------------------------------------------------------------------------
# autograd: scaled loss, gradients through seq_logps, no_grad, gradcheck


def test_scaled_loss_gradient():
    p = make_problem(20, 30, 8, 97, 3, dtype=torch.float64)
    check(run_pairs(p, chunk_rows=4, scale=0.37), _ref_scaled(p, 0.37))


def _ref_scaled(p, scale):
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"].clone().requires_grad_(True)
    out = ple_loss(hidden, weight, p["labels"], p["seq_index"], p["rewards"], 0.2, impl="reference")
    (scale * out.loss).backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("use_loss", [True, False])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradient_through_seq_logps(use_loss, softcap):
    """A gradient reaching seq_logps (alone, or with the loss's) is added by the recompute path."""
    p = make_problem(21, 40, 8, 97, 4, dtype=torch.float64)
    coef = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for impl in ("reference", "pairs"):
        hidden = p["hidden"].clone().requires_grad_(True)
        weight = p["weight"].clone().requires_grad_(True)
        out = ple_loss(hidden, weight, p["labels"], p["seq_index"], p["rewards"], 0.2, impl=impl,
                       softcap=softcap, temperature=0.8)
        total = (coef * out.seq_logps).sum() + (out.loss if use_loss else 0.0)
        total.backward()
        grads[impl] = (hidden.grad, weight.grad)
    for got, want in zip(grads["pairs"], grads["reference"]):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-12


def test_gradcheck_loss_and_seq_logps():
    p = make_problem(22, 11, 3, 7, 2, dtype=torch.float64)

    def fn(h, w):
        out = pairs_ple_loss(h, w, p["labels"], p["seq_index"], p["rewards"], 0.2, rank_loss="logistic",
                             softcap=2.0, temperature=0.9, chunk_rows=3)
        return out.loss, out.seq_logps

    h = p["hidden"].clone().requires_grad_(True)
    w = p["weight"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_no_grad_is_a_plain_forward():
    p = make_problem(23, 40, 8, 97, 4, dtype=torch.float64)
    ref = run_loss(p, "reference", grad_hidden=False, grad_weight=False)
    counter = MatmulCounter()
    with torch.no_grad(), counter:
        out = pairs_ple_loss(p["hidden"].requires_grad_(True), p["weight"], p["labels"], p["seq_index"],
                             p["rewards"], 0.2, chunk_rows=6)
    _, _, chunks = pairs_mod._plan(p["seq_index"], 4, 6)
    assert len(counter.calls) == len(chunks)  # z only: no gradient work
    assert not out.loss.requires_grad
    check((out, None, None), (ref[0], None, None))


def test_sequence_logprobs_pairs_runs_the_torch_path():
    p = make_problem(24, 23, 8, 97, 2, dtype=torch.float64)
    args = (p["hidden"], p["weight"], p["labels"], p["seq_index"], 4)
    torch.testing.assert_close(sequence_logprobs(*args, impl="pairs"), sequence_logprobs(*args, impl="torch"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [(dict(chunk_rows=0), "chunk_rows"), (dict(chunk_rows=2.5), "chunk_rows"),
                                       (dict(tau=float("nan")), "tau"), (dict(beta=-1.0), "beta"),
                                       (dict(softcap=-2.0), "softcap")])
def test_bad_arguments(bad, match):
    p = make_problem(25, 10, 4, 11, 2)
    kw = dict(dict(tau=0.2), **bad)
    tau = kw.pop("tau")
    with pytest.raises(ValueError, match=match):
        pairs_ple_loss(p["hidden"], p["weight"], p["labels"], p["seq_index"], p["rewards"], tau, **kw)


# ----------------------------------------------------------------------------------------
# FLOP accounting: 3 GEMMs per chunk (6NHV) against the recompute design's 4 (8NHV)

_GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear")


class MatmulCounter(TorchDispatchMode):
    """Records (op, m, k, n) of every matrix multiply dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _GEMMS:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.calls.append((name, a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))

    def flops(self):
        return sum(2 * m * k * n for _, m, k, n in self.calls)


def test_three_gemms_per_chunk_against_four(monkeypatch):
    hidden_size, vocab, num_pairs = 8, 97, 6
    pairs = [(5, 4), (3, 6), (7, 2), (4, 4), (6, 1), (2, 5)]
    p = problem_with(layout(pairs), hidden_size=hidden_size, vocab=vocab, seed=26)
    num_rows, num_scored = len(p["seq_index"]), int((p["seq_index"] >= 0).sum())
    chunk_rows = 10
    _, _, chunks = pairs_mod._plan(p["seq_index"], num_pairs, chunk_rows)
    counter = MatmulCounter()
    with counter:
        run_pairs(p, chunk_rows=chunk_rows)
    assert len(counter.calls) == 3 * len(chunks)
    for (_, _, lo, hi, _), calls in zip(chunks, zip(*[iter(counter.calls)] * 3)):
        rows = hi - lo
        assert sorted(c[1:] for c in calls) == sorted([(rows, hidden_size, vocab),  # z = X W^T
                                                       (rows, vocab, hidden_size),  # dX = dz W
                                                       (vocab, rows, hidden_size)])  # dW += dz^T X
    assert counter.flops() == 6 * num_scored * hidden_size * vocab

    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk_rows * vocab * 8)  # same chunk size for torch
    torch_counter = MatmulCounter()
    with torch_counter:
        run_loss(p, "torch")
    torch_chunks = math.ceil(num_rows / chunk_rows)
    assert len(torch_counter.calls) == 4 * torch_chunks
    assert torch_counter.flops() == 8 * num_rows * hidden_size * vocab


def test_seq_logps_gradient_costs_the_recompute_gemms():
    p = make_problem(27, 30, 8, 97, 3, dtype=torch.float64)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"].clone().requires_grad_(True)
    counter = MatmulCounter()
    with counter:
        out = pairs_ple_loss(hidden, weight, p["labels"], p["seq_index"], p["rewards"], 0.2, chunk_rows=100)
        (out.loss + out.seq_logps.sum()).backward()
    assert len(counter.calls) == 3 + 3  # one chunk: 3 in the forward, z/dX/dW recomputed for seq_logps


# ----------------------------------------------------------------------------------------
# CUDA: realistic bf16 shapes and the one host sync (the GPU suite runs these)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_bf16_matches_reference(softcap):
    g = torch.Generator(device="cuda").manual_seed(0)
    num_pairs, vocab, hidden_size = 4, 32003, 256
    seq_index = layout([(100, 120), (1, 90), (64, 0), (150, 77)], query_rows=40).cuda()
    num_rows = len(seq_index)
    labels = torch.where(seq_index >= 0, torch.randint(0, vocab, (num_rows,), device="cuda", generator=g), -100)
    hidden = torch.randn(num_rows, hidden_size, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 2 / hidden_size**0.5).bfloat16()
    rewards = torch.randn(num_pairs, 2, device="cuda", generator=g)
    problem = dict(hidden=hidden, weight=weight, labels=labels, seq_index=seq_index, rewards=rewards)
    want = run_loss(f64(problem), "reference", softcap=softcap)
    for chunk_rows in (None, 100):
        got = run_pairs(problem, chunk_rows=chunk_rows, softcap=softcap, scale=0.37)
        got = (got[0], got[1] / 0.37, got[2] / 0.37)
        check(got, want, tol=2e-2, loss_tol=1e-4)
        _, tdx, tdw = run_loss(problem, "torch", softcap=softcap)
        assert rel_err(got[1], want[1]) <= 1.5 * rel_err(tdx, want[1]) + 1e-4
        assert rel_err(got[2], want[2]) <= 1.5 * rel_err(tdw, want[2]) + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_one_host_sync():
    p = make_problem(28, 300, 64, 5003, 4, dtype=torch.bfloat16, device="cuda")
    hidden = p["hidden"].requires_grad_(True)
    weight = p["weight"].requires_grad_(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = pairs_ple_loss(hidden, weight, p["labels"], p["seq_index"], p["rewards"], 0.2, chunk_rows=64)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
