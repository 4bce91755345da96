"""The torch.library ops of compiled regions (ple_fast/ops.py): registration checked by
torch.library.opcheck (schema, mutation, fake tensors, autograd, AOT dispatch with dynamic shapes),
and each op gives what the eager function it wraps gives. CPU: the kernels run interpreted."""
import pytest
import torch

from ple_fast import ops
from ple_fast.kernels.varlen_attention import varlen_attention

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
    torch.library.opcheck(ops._varlen_op, args)
    out, lse = ops._varlen_op(*args)
    grad = randn(*out.shape, seed=3)
    got = torch.autograd.grad(out, (q, k_long, v_long), grad)
    want_out = varlen_attention(q, k_long, v_long, cu_q, cu_k, 6, 8, 0.25)
    want = torch.autograd.grad(want_out, (q, k_long, v_long), grad)
    assert torch.equal(out, want_out) and lse.shape == (HEADS, N)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_decode_ops_mutate_the_cache_as_declared():
    keys, values = randn(2, 3, KV_HEADS, 32, DIM, seed=4), randn(2, 3, KV_HEADS, 32, DIM, seed=5)
    query = randn(3, HEADS, 1, DIM, seed=6)
    positions = torch.tensor([5, 0, 20], device=DEVICE)
    new_keys, new_values = randn(3, KV_HEADS, 1, DIM, seed=7), randn(3, KV_HEADS, 1, DIM, seed=8)
    attend = (query, keys, values, 1, 0, positions, 32, 0.25, None, new_keys, new_values)
    torch.library.opcheck(ops._attend_op, attend)
    slots = torch.tensor([[3, 40], [70, 100]], device=DEVICE)
    torch.library.opcheck(ops._write_op, (keys, values, 0, slots, randn(2, 2, DIM, seed=9), randn(2, 2, DIM, seed=10)))
    before = keys.clone()
    ops._attend_op(*attend)
    rows = torch.arange(3, device=DEVICE)
    assert torch.equal(keys[1, rows, :, positions], new_keys[:, :, 0])
    changed = (keys != before).any(dim=-1)
    assert int(changed.sum()) <= 3 * KV_HEADS and not changed[0].any()   # only layer 1's written slots


def test_race_sample_op():
    logits = randn(3, 50, seed=11)
    seed, step = torch.tensor([3], device=DEVICE), torch.tensor([1], device=DEVICE)
    torch.library.opcheck(ops._sample_op, (logits, seed, step, 1.0, None))
    assert torch.equal(ops._sample_op(logits, seed, step, 1.0, None), ops.race_sample(logits, seed, step, 1.0))
