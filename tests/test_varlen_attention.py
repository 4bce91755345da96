"""The varlen Triton attention (ple_fast/kernels/varlen_attention.py) against an fp64 loop over segments, and as
the `triton` tree-attention backend against the dense mask. CPU: TRITON_INTERPRET=1; `-m gpu` compiles."""
import random

import pytest
import torch

from ple_fast import attention
from ple_fast.attention import tree_attention, tree_attention_metadata
from ple_fast.kernels.varlen_attention import kv_gather, varlen_attention
from ple_fast.layout import pack_dual, pack_prefill

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def reference(q, k, v, q_lens, k_lens, scale, window):
    """Segment by segment in fp64: query i sees key j <= i + (k_len - q_len) (and > that - window)."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    groups = q.shape[1] // k.shape[1]
    qa = ka = 0
    for q_len, k_len in zip(q_lens, k_lens):
        if q_len:
            qs = q[qa:qa + q_len].double().transpose(0, 1)
            ks = k[ka:ka + k_len].double().repeat_interleave(groups, 1).transpose(0, 1)
            vs = v[ka:ka + k_len].double().repeat_interleave(groups, 1).transpose(0, 1)
            i = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
            j = torch.arange(k_len, device=q.device)[None, :]
            seen = j <= i
            if window is not None:
                seen = seen & (j > i - window)
            scores = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
            out[qa:qa + q_len] = (scores.softmax(-1) @ vs).transpose(0, 1)
        qa, ka = qa + q_len, ka + k_len
    return out


def rel_err(a, b) -> float:
    """Max error relative to the reference's largest entry, floored at 1 (inputs are unit normal): a
    window of 1 makes dQ exactly 0, which low precision reproduces only up to rounding."""
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


# (query lengths, extra ancestor keys per segment, heads, kv heads, head dim, window, dtype):
# empty and 1-row segments, segments longer than a block, GQA 1/2/4/3, head dims 16/24/64/80
CASES = [
    ([5, 1, 17, 0, 33], [0, 3, 20, 4, 2], 4, 2, 24, None, torch.float32),
    ([5, 1, 17, 0, 33], [0, 3, 20, 4, 2], 4, 2, 24, 5, torch.float32),
    ([40, 1, 1], [0, 39, 39], 8, 2, 64, None, torch.bfloat16),
    ([12, 30], [7, 0], 6, 2, 80, 9, torch.float16),
    ([1], [0], 2, 2, 16, None, torch.float32),
    ([20, 21], [16, 3], 3, 1, 16, 1, torch.bfloat16),
]


@pytest.mark.parametrize("q_lens,extra,heads,kv_heads,dim,window,dtype", CASES)
def test_forward_and_gradients_match_the_fp64_reference(q_lens, extra, heads, kv_heads, dim, window, dtype):
    k_lens = [a + b for a, b in zip(q_lens, extra)]
    g = torch.Generator().manual_seed(sum(q_lens) + dim)

    def rand(n, h):
        return torch.randn(n, h, dim, generator=g).to(dtype).to(DEVICE).requires_grad_()

    q, k, v = rand(sum(q_lens), heads), rand(sum(k_lens), kv_heads), rand(sum(k_lens), kv_heads)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    scale = dim ** -0.5
    out = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale, window)
    grad_out = torch.randn(out.shape, generator=g).to(dtype).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out = reference(*leaves, q_lens, k_lens, scale, window)
    want = torch.autograd.grad(want_out, leaves, grad_out.double())
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, want_out) < TOLERANCE[dtype]
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.float32, 4), (torch.bfloat16, None)])
def test_gathered_keys_equal_gathering_first(dtype, window):
    """gather=kv_gather(index): the same attention as k.index_select(0, index) and v's passed in, with
    gradients summed back onto k / v (fp64 reference: gather, then the segment loop). The index repeats
    rows up to 4 times, leaves rows out (their gradient is exactly 0), and has a 1-key segment."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, rows = 4, 2, 16, 23
    q_lens, k_lens = [6, 1, 9, 3], [6, 1, 14, 20]
    index = torch.cat([torch.randint(0, rows - 3, (n,), generator=g) for n in k_lens])   # rows 20..22: unseen
    index[:4] = 5                                                                          # one row 4+ times
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype).to(DEVICE).requires_grad_()
    k, v = (torch.randn(rows, kv_heads, dim, generator=g).to(dtype).to(DEVICE).requires_grad_() for _ in "kv")
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
                  for n in (q_lens, k_lens))
    index = index.to(DEVICE)
    plan = kv_gather(index, rows)
    assert plan.offsets.tolist() == [int((index < r).sum()) for r in range(rows + 1)]
    assert torch.equal(index[plan.order.long()], index.sort(stable=True).values)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.3, window, gather=plan)
    first = varlen_attention(q, k.index_select(0, index), v.index_select(0, index), cu_q, cu_k, max(q_lens),
                             max(k_lens), 0.3, window)
    assert torch.equal(out, first)                          # the same loads, from other addresses
    grad_out = torch.randn(out.shape, generator=g).to(dtype).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out = reference(leaves[0], leaves[1][index], leaves[2][index], q_lens, k_lens, 0.3, window)
    want = torch.autograd.grad(want_out, leaves, grad_out.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and rel_err(a, b) < TOLERANCE[dtype], name
    assert not got[1][20:].any() and not got[2][20:].any()
    again = torch.autograd.grad(varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.3, window,
                                                 gather=plan), (k, v), grad_out)
    assert torch.equal(again[0], got[1]) and torch.equal(again[1], got[2])     # a fixed summation order


@pytest.mark.parametrize("seed", range(6))
def test_triton_backend_equals_the_dense_mask(seed):
    """On dual and rollout-prefill forests (the layouts it runs in training and rollouts), with grads."""
    rng = random.Random(seed)
    if seed % 2:
        queries = [[rng.randrange(50) for _ in range(rng.choice([1, 1, rng.randint(1, 9)]))] for _ in range(4)]
        responses = [[rng.randrange(50) for _ in range(rng.choice([0, 1, rng.randint(0, 7)]))] for _ in range(8)]
        batch = pack_dual(queries, responses[:4], responses[4:], device=DEVICE)
    else:
        prefix = [rng.randrange(50) for _ in range(rng.choice([0, 1, 5]))]
        prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 6))]
        batch = pack_prefill(prefix, prompts, [rng.random() < 0.5 for _ in prompts], device=DEVICE)
    n = batch.num_tokens
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, 16, generator=gen).to(DEVICE).requires_grad_() for heads in (4, 2, 2))
    for window in (None, 3):
        dense = tree_attention(tree_attention_metadata(batch, "sdpa"), q.double(), k.double(), v.double(), 0.3,
                               window)
        got = tree_attention(tree_attention_metadata(batch, "triton"), q, k, v, 0.3, window)
        assert rel_err(got, dense) < 1e-5
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)),
                        torch.autograd.grad(dense.square().sum(), (q, k, v))):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "segments", "triton"])
def test_under_autocast_every_backend_attends_in_the_autocast_dtype(backend):
    """Under bf16 autocast a layer hands the attention fp32 q / k (the rotary promotes them) and a bf16 v:
    every backend computes on all three cast to bf16, as SDPA's autocast does, forward and backward, and
    returns bf16 (the triton backward once failed on the mixed dtypes)."""
    batch = pack_dual([[1, 2, 3, 4]], [[5, 6]], [[7]], device=DEVICE)
    tree = tree_attention_metadata(batch, backend)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(batch.num_tokens, h, 16, generator=gen).to(DEVICE).requires_grad_() for h in (4, 2))
    v = torch.randn(batch.num_tokens, 2, 16, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16):
        got = tree_attention(tree, q, k, v, 0.25)
    got.float().square().sum().backward()
    want = tree_attention(tree, q.detach().bfloat16(), k.detach().bfloat16(), v.detach(), 0.25)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in (q.grad, k.grad, v.grad))


def test_a_gpu_launch_failure_falls_back_to_segments_once(monkeypatch):
    batch = pack_dual([[1, 2, 3]], [[4, 5]], [[6]], device=DEVICE)
    tree = tree_attention_metadata(batch, "triton")
    q, k, v = (torch.randn(batch.num_tokens, h, 16, device=DEVICE) for h in (2, 1, 1))
    calls = []

    def out_of_resources(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated: out of shared memory")

    monkeypatch.setattr(attention, "varlen_attention", out_of_resources)    # the name the backend calls
    monkeypatch.setattr(attention, "_gpu_launch_failure", lambda err, device: True)
    monkeypatch.setattr(attention, "_triton_failed", [])
    with pytest.warns(RuntimeWarning, match="using the 'segments' backend from now on"):
        first = tree_attention(tree, q, k, v, 0.25)
    second = tree_attention(tree, q, k, v, 0.25)
    assert len(calls) == 1
    want = tree_attention(tree_attention_metadata(batch, "segments"), q, k, v, 0.25)
    assert torch.equal(first, want) and torch.equal(second, want)
    monkeypatch.setattr(attention, "_gpu_launch_failure", lambda err, device: False)
    monkeypatch.setattr(attention, "_triton_failed", [])
    with pytest.raises(RuntimeError, match="simulated"):        # a CPU (interpreter) error is a bug: raised
        tree_attention(tree, q, k, v, 0.25)
