"""The varlen attention as a torch.library op for compiled regions (`varlen_op` in
ple_fast/kernels/varlen_attention.py): registration checked by torch.library.opcheck (schema,
mutation, fake tensors, autograd, AOT dispatch with dynamic shapes), and the op gives what the
eager function gives. CPU: the kernels run interpreted."""
import pytest
import torch

from ple_fast.kernels.varlen_attention import kv_gather, varlen_attention, varlen_op

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, HEADS, KV_HEADS, DIM = 10, 4, 2, 16


def randn(*shape, seed, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return t.requires_grad_(grad)


def test_varlen_attention_op_and_its_backward():
    q, k, v = (randn(N, h, DIM, seed=s, grad=True) for s, h in ((0, HEADS), (1, KV_HEADS), (2, KV_HEADS)))
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32, device=DEVICE)     # 2 ancestor keys per segment
    k_long, v_long = (torch.cat([t, t[:4]]).detach().requires_grad_() for t in (k, v))
    args = (q, k_long, v_long, cu_q, cu_k, 6, 8, 0.25, None)
    torch.library.opcheck(varlen_op, args)
    out, lse = varlen_op(*args)
    grad = randn(*out.shape, seed=3)
    got = torch.autograd.grad(out, (q, k_long, v_long), grad)
    want_out = varlen_attention(q, k_long, v_long, cu_q, cu_k, 6, 8, 0.25)
    want = torch.autograd.grad(want_out, (q, k_long, v_long), grad)
    assert torch.equal(out, want_out) and lse.shape == (HEADS, N)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gathered", [False, True])
def test_compiled_varlen_attention_runs_the_op(gathered):
    """Under torch.compile (AOT autograd), varlen_attention is the op in one graph (a gather an index_select
    in front of it), not a trace of the Triton launcher, and gives the eager function's output and
    gradients (the gather's backward sums in another order than index_select's: allclose, not equal)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v = (randn(N, h, DIM, seed=s, grad=True) for s, h in ((0, HEADS), (1, KV_HEADS), (2, KV_HEADS)))
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32, device=DEVICE)
    index = torch.cat([torch.arange(6), torch.arange(4), torch.arange(4, 8)]).to(DEVICE)  # 14 keys from k's 10 rows
    gather = kv_gather(index, N) if gathered else None

    def attend(q, k, v):
        if not gathered:
            k, v = k.index_select(0, index), v.index_select(0, index)
        return varlen_attention(q, k, v, cu_q, cu_k, 6, 8, 0.25, None, gather)

    counter = CompileCounterWithBackend("aot_eager")      # AOT autograd over the op's fake and backward
    torch._dynamo.reset()
    out = torch.compile(attend, backend=counter, fullgraph=True)(q, k, v)
    assert counter.frame_count == 1 and "ple_fast.varlen_attention" in counter.graphs[0].code
    grad = randn(*out.shape, seed=3)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_out = attend(q, k, v)
    want = torch.autograd.grad(want_out, (q, k, v), grad)
    assert torch.equal(out, want_out)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
