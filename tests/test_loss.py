"""ple_fast.loss: the chunked torch path against the full-logits reference, and gated_loss
against a per-pair loop written straight from the formulas in DESIGN.md."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ple_fast.loss as loss_mod
from problems import make_problem, run_loss, tied_weight_grads
from ple_fast.loss import (
    PLELossOutput,
    chunked_sequence_logprobs,
    gated_loss,
    ple_loss,
    rows_per_chunk,
    sequence_logprobs,
    sequence_token_counts,
)

# ----------------------------------------------------------------------------------------
# helpers


def assert_finite(*tensors):
    for t in tensors:
        if t is not None:
            assert torch.isfinite(t).all(), f"non-finite values in {t}"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ----------------------------------------------------------------------------------------
# torch path vs reference


@pytest.mark.parametrize("shape", [(37, 16, 97, 3), (64, 8, 1003, 4), (1, 4, 5, 1)])
@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (4.0, 1.0), (3.0, 1.3)])
def test_torch_matches_reference(shape, chunk_rows, softcap, temperature, monkeypatch):
    num_rows, hidden_size, vocab, num_pairs = shape
    problem = make_problem(sum(shape), num_rows, hidden_size, vocab, num_pairs)
    if chunk_rows is not None:  # force several chunks through the public entry point
        monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk_rows * vocab * 4)
        assert rows_per_chunk(vocab) == chunk_rows
    kw = dict(softcap=softcap, temperature=temperature)
    ref, ref_dx, ref_dw = run_loss(problem, "reference", **kw)
    out, dx, dw = run_loss(problem, "torch", **kw)
    assert_finite(out.loss, out.seq_logps, dx, dw)
    assert out.seq_logps.dtype == torch.float32 and out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.ranked, ref.ranked)
    assert torch.equal(out.seq_tokens, ref.seq_tokens)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)


def test_reference_matches_hand_computed_logprobs():
    """The oracle itself, against log_softmax of explicit per-sequence logits."""
    p = make_problem(0, 20, 6, 13, 2, dtype=torch.float64)
    got = sequence_logprobs(p["hidden"], p["weight"], p["labels"], p["seq_index"], 4, impl="reference",
                            softcap=2.5, temperature=0.9)
    want = torch.zeros(4, dtype=torch.float64)
    for n in range(20):
        s = int(p["seq_index"][n])
        if s >= 0:
            z = p["weight"] @ p["hidden"][n]
            z = 2.5 * torch.tanh(z / 2.5) / 0.9
            want[s] += z[p["labels"][n]] - torch.logsumexp(z, 0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_one_token_and_empty_sequences():
    # pairs: (1 token, 0 tokens), (5 tokens, 0 tokens), (0 tokens, 1 token)
    seq_index = torch.tensor([-1, 0, -1, 2, 2, 2, 2, 2, -1, 5, -1])
    p = make_problem(1, len(seq_index), 8, 97, 3)
    p["seq_index"] = seq_index
    p["labels"] = torch.where(seq_index >= 0, p["labels"].clamp(min=0), -100)
    for impl in ("reference", "torch"):
        out, dx, dw = run_loss(p, impl)
        assert_finite(out.loss, out.seq_logps, dx, dw)
        assert out.seq_tokens.tolist() == [1, 0, 5, 0, 0, 1]
        assert out.seq_logps[[1, 3, 4]].eq(0).all()
        assert out.seq_logps[[0, 2, 5]].lt(0).all()
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(p, "torch")
    torch.testing.assert_close(out.seq_logps, ref.seq_logps)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(dw, ref_dw)
    assert dx[seq_index < 0].eq(0).all()  # unscored rows get no gradient


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
def test_all_rows_unscored(rank_loss):
    p = make_problem(2, 12, 8, 97, 2, masked_frac=1.0)
    assert p["seq_index"].eq(-1).all() and p["labels"].eq(-100).all()
    for impl in ("reference", "torch"):
        out, dx, dw = run_loss(p, impl, rank_loss=rank_loss)
        assert_finite(out.loss, dx, dw)
        assert out.seq_logps.eq(0).all() and out.seq_tokens.eq(0).all()
        assert dx.eq(0).all() and dw.eq(0).all()


def test_labels_of_unscored_rows_are_never_read():
    p = make_problem(3, 30, 8, 97, 2)
    for impl in ("reference", "torch"):
        results = []
        for junk in (-100, 10**9, -(10**9)):
            q = dict(p, labels=torch.where(p["seq_index"] >= 0, p["labels"], junk))
            out, dx, dw = run_loss(q, impl)
            results.append((out.loss, out.seq_logps, dx, dw))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs(frozen):
    p = make_problem(4, 33, 8, 97, 3)
    kw = dict(grad_hidden=frozen != "hidden", grad_weight=frozen != "weight")
    ref, ref_dx, ref_dw = run_loss(p, "reference", **kw)
    out, dx, dw = run_loss(p, "torch", **kw)
    if frozen == "weight":
        assert dw is None
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    else:
        assert dx is None
        torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)


def test_tied_embedding_weight():
    """The same weight feeds the input embedding and the lm_head."""
    grads = tied_weight_grads(("reference", "torch"), seed=5, num_pairs=2, dtype=torch.float32)
    assert_finite(grads["torch"])
    torch.testing.assert_close(grads["torch"], grads["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_half_precision_against_fp64_reference(dtype, tol, softcap):
    p = make_problem(6, 48, 16, 1003, 3, dtype=dtype)
    p64 = dict(p, hidden=p["hidden"].double(), weight=p["weight"].double())
    ref, ref_dx, ref_dw = run_loss(p64, "reference", softcap=softcap)
    for impl in ("torch", "reference"):
        out, dx, dw = run_loss(p, impl, softcap=softcap)
        assert out.seq_logps.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == dtype
        assert_finite(out.loss, out.seq_logps, dx, dw)
        assert rel_err(out.seq_logps, ref.seq_logps) < 1e-5  # logits accumulate in fp32
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
        assert torch.equal(out.ranked, ref.ranked)
        assert rel_err(dx, ref_dx) < tol
        assert rel_err(dw, ref_dw) < tol


def test_mixed_dtypes_bf16_hidden_fp32_weight():
    p = make_problem(7, 40, 8, 97, 2)
    p["hidden"] = p["hidden"].bfloat16()
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(p, "torch")
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-5, atol=1e-4)
    assert rel_err(dx, ref_dx) < 1e-2
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)


class MaxTensorSize(TorchDispatchMode):
    """Largest tensor (in elements) produced by any op while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_torch_path_never_holds_full_logits(monkeypatch):
    num_rows, hidden_size, vocab = 40, 8, 97  # H < N, so dW (V*H) is smaller than N*V
    p = make_problem(8, num_rows, hidden_size, vocab, 3)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 6 * vocab * 4)
    sizes = {}
    for impl in ("reference", "torch"):
        meter = MaxTensorSize()
        with meter:
            run_loss(p, impl, softcap=3.0)
        sizes[impl] = meter.max_numel
    assert sizes["reference"] >= num_rows * vocab  # the meter sees the logits
    assert sizes["torch"] <= max(6 * vocab, vocab * hidden_size, num_rows * hidden_size)


def test_chunk_rows_argument():
    p = make_problem(9, 23, 8, 97, 2)
    args = (p["hidden"], p["weight"], p["labels"], p["seq_index"], 4)
    want = sequence_logprobs(*args, impl="reference")
    for chunk_rows in (1, 7, 23, 100):
        torch.testing.assert_close(chunked_sequence_logprobs(*args, chunk_rows=chunk_rows), want)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_sequence_logprobs(*args, chunk_rows=0)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (2.0, 0.8)])
def test_gradcheck_torch_path(softcap, temperature):
    p = make_problem(10, 9, 3, 11, 2, dtype=torch.float64)
    hidden = p["hidden"].requires_grad_(True)
    weight = p["weight"].requires_grad_(True)

    def fn(h, w):
        return chunked_sequence_logprobs(h, w, p["labels"], p["seq_index"], 4, softcap=softcap,
                                         temperature=temperature, chunk_rows=4)

    assert fn(hidden, weight).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_compiles_fullgraph_without_host_sync():
    p = make_problem(11, 30, 8, 97, 3)
    hidden = p["hidden"].requires_grad_(True)

    def step(h, w, labels, seq_index, rewards):
        out = ple_loss(h, w, labels, seq_index, rewards, torch.tensor(0.2), impl="torch")
        return out.loss, out.num_dropped

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, dropped = compiled(hidden, p["weight"], p["labels"], p["seq_index"], p["rewards"])
    (dx,) = torch.autograd.grad(loss, hidden)
    want, _ = step(hidden, p["weight"], p["labels"], p["seq_index"], p["rewards"])
    (want_dx,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(dx, want_dx)
    assert dropped.item() == 0


# ----------------------------------------------------------------------------------------
# gated loss vs a per-pair loop of the formulas


def oracle_gated(seq_logps, seq_tokens, rewards, tau, rank_loss, weighting, coef, length_normalize, beta):
    losses, ranked, valid = [], [], []
    for k in range(rewards.shape[0]):
        s, s_p = float(rewards[k, 0]), float(rewards[k, 1])
        if not (math.isfinite(s) and math.isfinite(s_p)):
            ranked.append(False)
            valid.append(False)
            continue
        valid.append(True)
        l_y, l_yp = seq_logps[2 * k], seq_logps[2 * k + 1]
        if length_normalize:
            l_y = l_y / max(int(seq_tokens[2 * k]), 1)
            l_yp = l_yp / max(int(seq_tokens[2 * k + 1]), 1)
        if s_p - s > tau:
            ranked.append(True)
            if rank_loss == "hinge":
                rank = torch.clamp(l_y - l_yp, min=0.0)
            else:
                rank = -torch.log(torch.sigmoid(beta * (l_yp - l_y)))
            losses.append(rank + coef * (-l_yp))
        else:
            ranked.append(False)
            m = max(s, s_p)
            e, e_p = math.exp(s - m), math.exp(s_p - m)
            if weighting == "softmax":
                w, w_p = e / (e + e_p), e_p / (e + e_p)
            else:
                w = 2 * e / (e + e_p) - 1
                w_p = -w
            losses.append(-(w * l_y + w_p * l_yp))
    loss = sum(losses) / len(losses) if losses else torch.zeros((), dtype=seq_logps.dtype)
    return loss, ranked, valid


def gated_inputs(seed, num_pairs=12):
    g = torch.Generator().manual_seed(seed)
    seq_logps = -20 * torch.rand(2 * num_pairs, generator=g, dtype=torch.float64)
    seq_tokens = torch.randint(0, 9, (2 * num_pairs,), generator=g)
    rewards = torch.randn(num_pairs, 2, generator=g, dtype=torch.float64)
    rewards[0] = torch.tensor([0.25, 0.75])  # delta == tau exactly: weighted branch (strict >)
    rewards[1] = torch.tensor([0.0, 2.0])  # ranked, with the hinge active (l(y) > l(y_p)):
    seq_logps[2:4] = torch.tensor([-3.0, -9.0])
    seq_tokens[2:4] = 3
    rewards[2] = torch.tensor([1.5, 1.5])  # tie
    return seq_logps, seq_tokens, rewards


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
@pytest.mark.parametrize("weighting", ["softmax", "tanh"])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_gated_loss_matches_per_pair_oracle(rank_loss, weighting, length_normalize):
    seq_logps, seq_tokens, rewards = gated_inputs(12)
    opts = dict(rank_loss=rank_loss, weighting=weighting, rank_sft_coef=0.5,
                length_normalize=length_normalize, beta=2.0)
    x = seq_logps.clone().requires_grad_(True)
    loss, ranked, valid, dropped = gated_loss(x, seq_tokens, rewards, 0.5, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    y = seq_logps.clone().requires_grad_(True)
    want, want_ranked, want_valid = oracle_gated(y, seq_tokens, rewards, 0.5, rank_loss, weighting,
                                                 0.5, length_normalize, 2.0)
    (want_grad,) = torch.autograd.grad(want, y)
    assert ranked.tolist() == want_ranked and valid.tolist() == want_valid
    assert ranked[1] and not ranked[0] and not ranked[2]
    assert 0 < int(ranked.sum()) < len(ranked)  # both branches exercised
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert dropped.dtype == torch.int64 and dropped.dim() == 0 and dropped.item() == 0


def test_tau_tensor_and_strict_gate():
    seq_logps, seq_tokens, rewards = gated_inputs(13)
    opts = dict(rank_loss="hinge", weighting="softmax", rank_sft_coef=1.0, length_normalize=True, beta=1.0)
    a = gated_loss(seq_logps, seq_tokens, rewards, 0.5, **opts)
    tau = torch.tensor(0.5, requires_grad=True)
    b = gated_loss(seq_logps, seq_tokens, rewards, tau, **opts)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1]) and not a[1][0]
    c = gated_loss(seq_logps, seq_tokens, rewards, 0.4999, **opts)
    assert c[1][0]  # just below delta: ranks


def test_rewards_get_no_gradient():
    p = make_problem(14, 20, 8, 97, 3)
    p["rewards"] = p["rewards"].clone().requires_grad_(True)
    out, _, _ = run_loss(p, "torch", weighting="tanh")
    assert p["rewards"].grad is None


def test_non_finite_rewards_are_dropped():
    p = make_problem(15, 50, 8, 97, 5)
    p["rewards"][1, 0] = float("nan")
    p["rewards"][3, 1] = float("inf")
    p["rewards"][4] = float("-inf")
    for impl in ("reference", "torch"):
        out, dx, dw = run_loss(p, impl)
        assert_finite(out.loss, out.seq_logps, dx, dw)
        assert out.valid.tolist() == [True, False, True, False, False]
        assert out.num_dropped.item() == 3 and out.num_dropped.dtype == torch.int64
        assert not out.ranked[[1, 3, 4]].any()
        want, _, _ = oracle_gated(out.seq_logps.detach(), out.seq_tokens, p["rewards"], 0.2, "hinge",
                                  "softmax", 1.0, True, 1.0)
        torch.testing.assert_close(out.loss.detach(), want.float())
        # dropped pairs contribute no gradient: rows of their sequences get zero dx
        dropped_rows = torch.isin(p["seq_index"], torch.tensor([2, 3, 6, 7, 8, 9]))
        assert dx[dropped_rows].eq(0).all()


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
def test_all_pairs_dropped_gives_zero_loss_and_zero_grads(rank_loss):
    p = make_problem(16, 30, 8, 97, 3)
    p["rewards"][:, 0] = float("nan")
    for impl in ("reference", "torch"):
        out, dx, dw = run_loss(p, impl, rank_loss=rank_loss)
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        assert out.num_dropped.item() == 3 and not out.valid.any()
        assert_finite(dx, dw)
        assert dx.eq(0).all() and dw.eq(0).all()


def test_empty_batch():
    p = make_problem(17, 6, 4, 11, 1, masked_frac=1.0)
    p["rewards"] = torch.zeros(0, 2)
    for impl in ("reference", "torch"):
        out, dx, dw = run_loss(p, impl)
        assert out.loss.item() == 0.0 and out.seq_logps.shape == (0,) and out.ranked.shape == (0,)
        assert dx.eq(0).all() and dw.eq(0).all()


def test_output_container():
    p = make_problem(18, 20, 8, 97, 2)
    out, _, _ = run_loss(p, "torch")
    assert isinstance(out, PLELossOutput)
    assert out.seq_tokens.dtype == torch.int64 and out.seq_tokens.shape == (4,)
    assert out.ranked.dtype == torch.bool and out.valid.dtype == torch.bool and out.ranked.shape == (2,)
    assert out.seq_tokens.tolist() == sequence_token_counts(p["seq_index"], 4).tolist()
    assert out.seq_tokens.sum().item() == int((p["seq_index"] >= 0).sum())


# ----------------------------------------------------------------------------------------
# dispatch and validation


def test_triton_dispatch_and_auto_on_cpu(monkeypatch):
    """impl="triton" hands the checked arguments to the fused kernel; impl="auto" on CPU tensors runs torch."""
    calls = []

    def fake_kernel(hidden, weight, labels, seq_index, num_seqs, softcap, temperature):
        calls.append((num_seqs, softcap, temperature))
        return sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, impl="reference",
                                 softcap=softcap, temperature=temperature)

    monkeypatch.setattr(loss_mod, "fused_sequence_logprobs", fake_kernel)
    p = make_problem(20, 10, 4, 11, 1)
    args = (p["hidden"], p["weight"], p["labels"], p["seq_index"], 2)
    sequence_logprobs(*args, impl="triton", softcap=3, temperature=2)
    assert calls == [(2, 3.0, 2.0)]
    sequence_logprobs(*args, impl="auto")  # CPU tensors: auto means torch
    assert len(calls) == 1
    torch.testing.assert_close(sequence_logprobs(*args), sequence_logprobs(*args, impl="reference"))


def _bad_calls():
    p = make_problem(21, 10, 4, 11, 2)
    h, w, lab, si, r = p["hidden"], p["weight"], p["labels"], p["seq_index"], p["rewards"]
    lab_bad = lab.clone()
    lab_bad[si >= 0] = 11  # == V on a scored row
    si_bad = si.clone()
    si_bad[0] = 4  # == 2P
    return [
        ("impl", lambda: ple_loss(h, w, lab, si, r, 0.2, impl="cuda")),
        ("rank_loss", lambda: ple_loss(h, w, lab, si, r, 0.2, rank_loss="dpo")),
        ("weighting", lambda: ple_loss(h, w, lab, si, r, 0.2, weighting="linear")),
        ("beta", lambda: ple_loss(h, w, lab, si, r, 0.2, beta=0.0)),
        ("rank_sft_coef", lambda: ple_loss(h, w, lab, si, r, 0.2, rank_sft_coef=float("nan"))),
        ("length_normalize", lambda: ple_loss(h, w, lab, si, r, 0.2, length_normalize="yes")),
        ("rewards", lambda: ple_loss(h, w, lab, si, r[:, 0], 0.2)),
        ("rewards", lambda: ple_loss(h, w, lab, si, r.long(), 0.2)),
        ("tau", lambda: ple_loss(h, w, lab, si, r, torch.tensor([0.2]))),
        ("tau", lambda: ple_loss(h, w, lab, si, r, float("inf"))),
        ("hidden", lambda: ple_loss(h[0], w, lab, si, r, 0.2)),
        ("hidden", lambda: ple_loss(h.long(), w, lab, si, r, 0.2)),
        ("weight", lambda: ple_loss(h, w[:, :3], lab, si, r, 0.2)),
        ("labels", lambda: ple_loss(h, w, lab[:5], si, r, 0.2)),
        ("labels", lambda: ple_loss(h, w, lab.float(), si, r, 0.2)),
        ("seq_index", lambda: ple_loss(h, w, lab, si.float(), r, 0.2)),
        (r"labels\[\d+\] = 11", lambda: ple_loss(h, w, lab_bad, si, r, 0.2)),
        (r"seq_index\[0\] = 4", lambda: ple_loss(h, w, lab, si_bad, r, 0.2)),
        ("softcap", lambda: ple_loss(h, w, lab, si, r, 0.2, softcap=-1.0)),
        ("temperature", lambda: ple_loss(h, w, lab, si, r, 0.2, temperature=0.0)),
        ("num_seqs", lambda: sequence_logprobs(h, w, lab, si, -1)),
        ("seq_logps", lambda: gated_loss(torch.zeros(3), torch.zeros(4, dtype=torch.long), r, 0.2,
                                         rank_loss="hinge", weighting="softmax", rank_sft_coef=1.0,
                                         length_normalize=True, beta=1.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_naming_the_argument(case):
    match, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()
