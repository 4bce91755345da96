"""ple_fast.kernels.logit_rows against its fp64 references, and ple_loss(impl="whole_pairs") against the
full-logits reference: random batches and the edge cases (empty and one-token responses, a vocabulary
not a multiple of the block, every pair in one branch, NaN rewards, unscored rows anywhere)."""
import pytest
import torch

import ple_fast.loss as loss_mod
from ple_fast.loss import ple_loss
from ple_fast.kernels.logit_rows import (logit_grad_, logit_grad_reference, row_stats, row_stats_reference)
from problems import make_problem, run_loss


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (3.0, 1.0), (5.0, 1.3)])
def test_row_passes_match_fp64(dtype, tol, softcap, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 203, generator=g)).to(dtype)        # 203: not a multiple of the block
    labels = torch.randint(0, 203, (7,), generator=g)
    lse, target = row_stats(logits, labels, softcap, temperature)
    ref_lse, ref_target = row_stats_reference(logits, labels, softcap, temperature)
    assert lse.dtype == target.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double(), ref_target, rtol=1e-6, atol=1e-5)
    original = logits.clone()
    grad = logit_grad_(logits, labels, lse, softcap, temperature)
    assert grad.data_ptr() == logits.data_ptr() and grad.dtype == dtype     # in place
    assert rel_err(grad, logit_grad_reference(original, labels, ref_lse, softcap, temperature)) < tol


def test_empty_rows_and_bad_arguments():
    lse, target = row_stats(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert lse.shape == target.shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        row_stats(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous rows"):
        row_stats(torch.zeros(5, 2).T, torch.zeros(2, dtype=torch.long))


def compare(problem, chunk_rows, monkeypatch, tol=1e-5, **kwargs):
    monkeypatch.setattr(loss_mod, "WHOLE_PAIR_ROWS", chunk_rows)
    ref, ref_dx, ref_dw = run_loss(problem, "reference", **kwargs)
    out, dx, dw = run_loss(problem, "whole_pairs", **kwargs)
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.seq_logps.double(), ref.seq_logps.detach().double(), rtol=tol, atol=tol)
    assert out.seq_tokens.tolist() == ref.seq_tokens.tolist()
    assert out.ranked.tolist() == ref.ranked.tolist() and out.valid.tolist() == ref.valid.tolist()
    assert int(out.num_dropped) == int(ref.num_dropped)
    assert rel_err(dx, ref_dx) < tol and rel_err(dw, ref_dw) < tol
    assert dx.dtype == problem["hidden"].dtype and dw.dtype == problem["weight"].dtype
    return out, dx, dw


@pytest.mark.parametrize("shape", [(37, 16, 97, 3), (64, 8, 203, 6), (1, 4, 5, 1)])
@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
@pytest.mark.parametrize("options", [dict(), dict(rank_loss="logistic", weighting="tanh", length_normalize=False),
                                     dict(softcap=4.0, temperature=0.8, rank_sft_coef=0.5)])
def test_whole_pairs_matches_reference(shape, chunk_rows, options, monkeypatch):
    """Rows of a pair scattered among others and unscored rows: chunks of every size give the same."""
    rows, hidden, vocab, pairs = shape
    compare(make_problem(rows * 31 + pairs, rows, hidden, vocab, pairs), chunk_rows, monkeypatch, **options)


def test_whole_pairs_empty_and_one_token_responses(monkeypatch):
    seq_index = torch.tensor([-1, 0, -1, 2, 2, 2, 2, 2, -1, 5, -1])
    p = make_problem(1, len(seq_index), 8, 97, 3)
    p["seq_index"] = seq_index
    p["labels"] = torch.where(seq_index >= 0, p["labels"].clamp(min=0), -100)
    out, dx, _ = compare(p, 2, monkeypatch)
    assert dx[seq_index < 0].eq(0).all()


@pytest.mark.parametrize("tau", [-1e9, 1e9])
def test_whole_pairs_every_pair_in_one_branch(tau, monkeypatch):
    out, _, _ = compare(make_problem(5, 40, 8, 61, 4), 9, monkeypatch, tau=tau)
    assert out.ranked.all() if tau < 0 else not out.ranked.any()


def test_whole_pairs_nan_rewards(monkeypatch):
    p = make_problem(6, 40, 8, 61, 4)
    p["rewards"][1, 0] = float("nan")
    out, dx, dw = compare(p, 9, monkeypatch)
    assert int(out.num_dropped) == 1 and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    p["rewards"][:] = float("nan")                     # all dropped: zero loss, zero gradients, never NaN
    out, dx, dw = run_loss(p, "whole_pairs")
    assert out.loss.item() == 0 and dx.eq(0).all() and dw.eq(0).all()


def test_whole_pairs_half_precision_and_frozen_inputs(monkeypatch):
    p = make_problem(7, 48, 16, 101, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(loss_mod, "WHOLE_PAIR_ROWS", 10)
    ref, ref_dx, ref_dw = run_loss({k: v.double() if v.is_floating_point() and k != "rewards" else v
                                    for k, v in p.items()}, "reference")
    out, dx, dw = run_loss(p, "whole_pairs")
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2 * max(1.0, abs(ref.loss.item()))
    assert rel_err(dx, ref_dx) < 2e-2 and rel_err(dw, ref_dw) < 2e-2
    _, dx_only, dw_none = run_loss(p, "whole_pairs", grad_weight=False)
    assert dw_none is None and torch.equal(dx_only, dx)
    _, dx_none, dw_only = run_loss(p, "whole_pairs", grad_hidden=False)
    assert dx_none is None and torch.equal(dw_only, dw)


def test_whole_pairs_fp64_goes_to_the_torch_path():
    p = make_problem(8, 20, 4, 11, 2, dtype=torch.float64)
    out, _, _ = run_loss(p, "whole_pairs")
    ref, _, _ = run_loss(p, "reference")
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.seq_logps.requires_grad          # the torch path's differentiable log-probs


def test_whole_pairs_backward_scales_and_runs_once():
    p = make_problem(9, 30, 8, 61, 3)
    h = p["hidden"].clone().requires_grad_(True)
    w = p["weight"].clone().requires_grad_(True)
    ref = ple_loss(h, w, p["labels"], p["seq_index"], p["rewards"], 0.2, impl="reference").loss
    ref_dx, ref_dw = torch.autograd.grad(3.0 * ref, [h, w])
    out = ple_loss(h, w, p["labels"], p["seq_index"], p["rewards"], 0.2, impl="whole_pairs").loss
    dx, dw = torch.autograd.grad(3.0 * out, [h, w], retain_graph=True)
    assert rel_err(dx, ref_dx) < 1e-5 and rel_err(dw, ref_dw) < 1e-5
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(out, [h, w])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 3e-3)])
def test_whole_pairs_on_cuda_half_precision(dtype, tol, monkeypatch):
    """The compiled row passes, half GEMMs and the fp32 dW accumulation against fp64, over several chunks."""
    monkeypatch.setattr(loss_mod, "WHOLE_PAIR_ROWS", 64)
    p = make_problem(10, 400, 64, 1003, 6, dtype=dtype, device="cuda")
    fp64 = {k: v.double() if v.is_floating_point() and k != "rewards" else v for k, v in p.items()}
    ref, ref_dx, ref_dw = run_loss(fp64, "reference")
    out, dx, dw = run_loss(p, "whole_pairs")
    assert abs(out.loss.item() - ref.loss.item()) < tol * max(1.0, abs(ref.loss.item()))
    assert rel_err(dx, ref_dx) < tol and rel_err(dw, ref_dw) < tol
    assert out.ranked.tolist() == ref.ranked.tolist()


def test_whole_pairs_pair_rows_from_the_host(monkeypatch):
    """Rows per pair given by the caller give the same result as read from seq_index; wrong ones are refused."""
    monkeypatch.setattr(loss_mod, "WHOLE_PAIR_ROWS", 9)
    p = make_problem(11, 40, 8, 61, 4)
    counts = torch.bincount(p["seq_index"][p["seq_index"] >= 0], minlength=8).view(4, 2).sum(dim=1).tolist()
    read, dx, dw = run_loss(p, "whole_pairs")
    given, dx2, dw2 = run_loss(p, "whole_pairs", pair_rows=counts)
    assert torch.equal(read.loss, given.loss) and torch.equal(dx, dx2) and torch.equal(dw, dw2)
    with pytest.raises(ValueError, match="pair_rows"):
        run_loss(p, "whole_pairs", pair_rows=counts[:3])
