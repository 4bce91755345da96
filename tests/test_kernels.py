"""ple_fast.kernels.logprob: the fused Triton path against the full-logits reference.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is
set below, before anything imports triton), so shapes stay small. With CUDA the same tests run
the compiled kernels (the whole module is `gpu`-marked, so the GPU suite runs it), and
test_gpu_bf16_matches_reference checks realistic shapes at bf16.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ple_fast.kernels.logprob as logprob  # noqa: E402
from ple_fast.loss import ple_loss, sequence_logprobs  # noqa: E402
import problems  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every test here runs in bench/gpu_suite.sh (pytest -m gpu): on a GPU they check the compiled kernels.
pytestmark = pytest.mark.gpu

# ----------------------------------------------------------------------------------------
# helpers


def make_problem(*args, **kwargs):
    return problems.make_problem(*args, device=DEVICE, **kwargs)


run_loss = problems.run_loss


def run_logprobs(problem, impl, grad_seq, **kwargs):
    """sequence_logprobs with an arbitrary upstream gradient; returns (logps, dX, dW)."""
    hidden = problem["hidden"].detach().clone().requires_grad_(True)
    weight = problem["weight"].detach().clone().requires_grad_(True)
    logps = sequence_logprobs(hidden, weight, problem["labels"], problem["seq_index"], len(grad_seq),
                              impl=impl, **kwargs)
    (logps * grad_seq).sum().backward()
    return logps, hidden.grad, weight.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw, rtol=1e-4, atol=1e-5):
    assert out.seq_logps.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.seq_logps).all()
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=rtol, atol=10 * atol)
    torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=atol)
    assert torch.equal(out.ranked, ref.ranked)
    assert torch.equal(out.seq_tokens, ref.seq_tokens)
    torch.testing.assert_close(dx, ref_dx, rtol=rtol, atol=atol)
    torch.testing.assert_close(dw, ref_dw, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# fp32 against the reference: random shapes, gate options, softcap, temperature


@pytest.mark.parametrize("shape", [
    (37, 24, 97, 3),    # H not a multiple of BLOCK_K, V not a multiple of BLOCK_V
    (64, 32, 300, 4),   # several row and vocab tiles
    (16, 16, 64, 2),    # exact multiples of every block
    (1, 8, 5, 1),       # one row, V smaller than a block
])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (3.0, 1.3)])
def test_matches_reference(shape, softcap, temperature):
    num_rows, hidden_size, vocab, num_pairs = shape
    problem = make_problem(sum(shape), num_rows, hidden_size, vocab, num_pairs)
    kw = dict(softcap=softcap, temperature=temperature)
    ref, ref_dx, ref_dw = run_loss(problem, "reference", **kw)
    out, dx, dw = run_loss(problem, "triton", **kw)
    assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw)


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
@pytest.mark.parametrize("weighting", ["softmax", "tanh"])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_gate_options(rank_loss, weighting, length_normalize):
    problem = make_problem(5, 48, 16, 70, 6)
    # tau 0 with varied rewards: both branches occur
    kw = dict(rank_loss=rank_loss, weighting=weighting, length_normalize=length_normalize, tau=0.0)
    ref, ref_dx, ref_dw = run_loss(problem, "reference", **kw)
    assert 0 < int(ref.ranked.sum()) < len(ref.ranked)
    out, dx, dw = run_loss(problem, "triton", **kw)
    assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw)


@pytest.mark.parametrize("seed", [0, 1])
def test_arbitrary_upstream_gradient(seed):
    problem = make_problem(10 + seed, 40, 24, 130, 3)
    grad_seq = torch.randn(6, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    kw = dict(softcap=5.0 if seed else None, temperature=1.0)
    ref, ref_dx, ref_dw = run_logprobs(problem, "reference", grad_seq, **kw)
    got, dx, dw = run_logprobs(problem, "triton", grad_seq, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks, extra", [(3, 1), (2, 0)])  # V not / V a multiple of BLOCK_V
def test_backward_in_several_vocab_chunks(blocks, extra, monkeypatch):
    block_v = logprob.tile_config(DEVICE, torch.float32)["BLOCK_V"]  # 256 on a GPU, less interpreted
    vocab = blocks * block_v + extra
    problem = make_problem(20, 30, 16, vocab, 2)
    monkeypatch.setattr(logprob, "DZ_CHUNK_BYTES", 30 * block_v * 4)  # one vocab block per chunk
    assert logprob._dz_chunk_cols(30, vocab, 4, block_v) == block_v < vocab
    ref, ref_dx, ref_dw = run_loss(problem, "reference", softcap=4.0)
    out, dx, dw = run_loss(problem, "triton", softcap=4.0)
    assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw)


# ----------------------------------------------------------------------------------------
# edge cases


def test_one_token_and_empty_sequences():
    # pairs: (1 token, 0 tokens), (5 tokens, 0 tokens), (0 tokens, 1 token)
    seq_index = torch.tensor([-1, 0, -1, 2, 2, 2, 2, 2, -1, 5, -1], device=DEVICE)
    p = make_problem(1, len(seq_index), 8, 97, 3)
    p["seq_index"] = seq_index
    p["labels"] = torch.where(seq_index >= 0, p["labels"].clamp(min=0), -100)
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(p, "triton")
    assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw)
    assert out.seq_tokens.tolist() == [1, 0, 5, 0, 0, 1]
    assert out.seq_logps[[1, 3, 4]].eq(0).all() and out.seq_logps[[0, 2, 5]].lt(0).all()
    assert dx[seq_index < 0].eq(0).all()  # unscored rows get no gradient


@pytest.mark.parametrize("rank_loss", ["hinge", "logistic"])
def test_all_rows_unscored(rank_loss):
    p = make_problem(2, 12, 8, 97, 2, masked_frac=1.0)
    assert p["seq_index"].eq(-1).all()
    out, dx, dw = run_loss(p, "triton", rank_loss=rank_loss)
    assert torch.isfinite(out.loss) and out.seq_logps.eq(0).all()
    assert dx.eq(0).all() and dw.eq(0).all()


def test_labels_of_unscored_rows_are_never_read():
    p = make_problem(3, 30, 8, 97, 2)
    unscored = p["seq_index"] < 0
    assert unscored.any()
    baseline = run_loss(p, "triton")
    for junk in (-100, -1, 97, 10**12):
        q = dict(p, labels=torch.where(unscored, junk, p["labels"]))
        out, dx, dw = run_loss(q, "triton")
        assert torch.equal(out.seq_logps, baseline[0].seq_logps)
        assert torch.equal(dx, baseline[1]) and torch.equal(dw, baseline[2])


def test_frozen_weight_and_frozen_hidden():
    p = make_problem(4, 25, 16, 60, 2)
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(p, "triton", grad_weight=False)
    assert dw is None
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    out, dx, dw = run_loss(p, "triton", grad_hidden=False)
    assert dx is None
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)
    out = ple_loss(p["hidden"], p["weight"], p["labels"], p["seq_index"], p["rewards"], 0.2, impl="triton")
    assert not out.loss.requires_grad  # nothing to differentiate: no graph, no backward


def test_tied_embedding_gets_both_gradients():
    """weight used as input embedding and as lm_head: its grad is the sum of both uses."""
    p = make_problem(6, 20, 16, 50, 2)
    tokens = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = {}
    for impl in ("reference", "triton"):
        weight = p["weight"].detach().clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, weight) + p["hidden"])
        out = ple_loss(hidden, weight, p["labels"], p["seq_index"], p["rewards"], 0.2, impl=impl)
        out.loss.backward()
        grads[impl] = weight.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-5)


def test_non_contiguous_hidden_and_weight():
    p = make_problem(7, 24, 16, 40, 2)
    q = dict(p, hidden=p["hidden"].T.contiguous().T, weight=torch.stack([p["weight"], -p["weight"]], 2)[:, :, 0])
    assert not q["hidden"].is_contiguous() and not q["weight"].is_contiguous()
    torch.testing.assert_close(q["weight"], p["weight"])
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(q, "triton")
    assert_same_loss(out, ref, dx, ref_dx, dw, ref_dw)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_half_precision_inputs(dtype, tol, softcap):
    """Half inputs, fp32 accumulation: log-probs match the fp32 reference on the same
    (rounded) inputs; grads within the rounding of dz and of the half-precision result."""
    p = make_problem(8, 48, 32, 150, 3, dtype=dtype)
    ref, ref_dx, ref_dw = run_loss(p, "reference", softcap=softcap)
    out, dx, dw = run_loss(p, "triton", softcap=softcap)
    assert dx.dtype == dtype and dw.dtype == dtype and out.seq_logps.dtype == torch.float32
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.ranked, ref.ranked)
    assert rel_err(dx, ref_dx) < tol and rel_err(dw, ref_dw) < tol


def test_mixed_dtypes_promote():
    p = make_problem(9, 30, 16, 80, 2)
    q = dict(p, weight=p["weight"].bfloat16())
    ref, ref_dx, ref_dw = run_loss(q, "reference")
    out, dx, dw = run_loss(q, "triton")
    assert dx.dtype == torch.float32 and dw.dtype == torch.bfloat16
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    assert rel_err(dw, ref_dw) < 1e-2


def test_fp64_goes_through_the_torch_path():
    p = make_problem(11, 20, 8, 30, 2, dtype=torch.float64)
    ref, ref_dx, ref_dw = run_loss(p, "reference")
    out, dx, dw = run_loss(p, "triton")
    assert out.seq_logps.dtype == torch.float64
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-10, atol=1e-12)


def test_bad_input_is_reported():
    """sequence_logprobs(impl="triton") checks the arguments before the kernel (which does not); the
    kernel itself refuses fp64, which that entry point routes to the torch path."""
    p = make_problem(12, 10, 8, 30, 1)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(p["hidden"], p["weight"], p["labels"][:5], p["seq_index"], 2, impl="triton")
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs(p["hidden"], p["weight"][:, :4], p["labels"], p["seq_index"], 2, impl="triton")
    with pytest.raises(ValueError, match="fp64"):
        logprob.fused_sequence_logprobs(p["hidden"].double(), p["weight"], p["labels"], p["seq_index"], 2)


# ----------------------------------------------------------------------------------------
# the kernels one by one, and the no-host-sync property


def test_logsumexp_and_target_kernel():
    p = make_problem(13, 33, 24, 100, 1)
    labels = torch.randint(0, 100, (33,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    lse, target = logprob.logsumexp_and_target(p["hidden"], p["weight"], labels, 2.0, 0.5)
    z = 2.0 * torch.tanh(p["hidden"].double() @ p["weight"].double().T / 2.0) / 0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double(), z.gather(1, labels[:, None])[:, 0], rtol=1e-6, atol=1e-5)


def test_dlogits_chunk_kernel():
    p = make_problem(14, 21, 16, 90, 1)
    labels = torch.randint(0, 90, (21,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x, w = p["hidden"], p["weight"]
    lse, _ = logprob.logsumexp_and_target(x, w, labels, None, 1.5)
    out = torch.full((21, 64), float("nan"), device=DEVICE)
    dz = logprob.dlogits_chunk(x, w, labels, lse, 64, out, None, 1.5)  # columns 64..89
    assert dz.shape == (21, 26)
    z = (x.double() @ w.double().T) / 1.5
    want = (torch.nn.functional.one_hot(labels, 90).double() - torch.softmax(z, 1)) / 1.5
    torch.testing.assert_close(dz.double(), want[:, 64:], rtol=1e-5, atol=1e-6)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward_and_backward():
    """No .item()/nonzero on the compute path (the CPU-only index check is outside it)."""
    p = make_problem(15, 20, 16, 50, 2)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"].clone().requires_grad_(True)
    safe_labels = torch.where(p["seq_index"] >= 0, p["labels"], 0)
    slots = torch.where(p["seq_index"] >= 0, p["seq_index"], 4)
    with _OpRecorder() as rec:
        logps = logprob._FusedSequenceLogprobs.apply(hidden, weight, safe_labels, slots, 4, None, 1.0)
        logps.sum().backward()
    assert rec.ops and not [op for op in rec.ops if "_local_scalar_dense" in op or "nonzero" in op]


# ----------------------------------------------------------------------------------------
# compiled kernels on a GPU, realistic-ish shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels)")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_bf16_matches_reference(softcap):
    num_rows, hidden_size, vocab, num_pairs = 2048, 1024, 50257, 8
    p = make_problem(16, num_rows, hidden_size, vocab, num_pairs, dtype=torch.bfloat16, masked_frac=0.3)
    ref, ref_dx, ref_dw = run_loss(p, "reference", softcap=softcap)
    out, dx, dw = run_loss(p, "triton", softcap=softcap)
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, rtol=1e-3, atol=1e-1)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=1e-3)
    assert torch.equal(out.ranked, ref.ranked)
    assert rel_err(dx, ref_dx) < 1e-2 and rel_err(dw, ref_dw) < 1e-2
