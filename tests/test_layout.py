"""pack_dual (C++/CUDA op) against pack_dual_reference, plus checks of the layout's meaning that do
not trust either implementation: paths reconstruct query + response, the masks and the varlen
metadata agree, and attention over the packed tree equals separate forwards."""
import dataclasses
import random

import pytest
import torch

import ple_fast._ext as ext_module
from ple_fast._ext import built_with_cuda, extension_available, has_kernel, load_extension
from ple_fast.layout import (IGNORE_LABEL, PackedBatch, pack_dual, pack_dual_reference, pack_prefill,
                             pack_prefill_reference)

INT32_FIELDS = {"seg_start", "seg_len", "seg_parent", "cu_seqlens_q", "cu_seqlens_k"}


def random_pairs(rng: random.Random, num_pairs: int, max_query: int = 8, max_response: int = 6,
                 vocab: int = 50):
    def tokens(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def query_len():  # 1-token queries are the edge case of the root segment: make them common
        return 1 if rng.random() < 0.25 else rng.randint(1, max_query)

    def response_len():  # so are empty and 1-token responses
        return rng.choice([0, 1, rng.randint(0, max_response)])

    queries = [tokens(query_len()) for _ in range(num_pairs)]
    originals = [tokens(response_len()) for _ in range(num_pairs)]
    principled = [tokens(response_len()) for _ in range(num_pairs)]
    return queries, originals, principled


def assert_same_batch(actual: PackedBatch, expected: PackedBatch):
    for field in dataclasses.fields(PackedBatch):
        a, e = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(e, torch.Tensor):
            want = torch.int32 if field.name in INT32_FIELDS else torch.int64
            assert a.dtype == want and e.dtype == want, (field.name, a.dtype, e.dtype)
            assert a.device == e.device, field.name
            assert torch.equal(a.cpu(), e.cpu()), (field.name, a.tolist(), e.tolist())
        else:
            assert a == e, (field.name, a, e)


# ---- the extension -------------------------------------------------------------------------------

def test_extension_loads_and_registers_the_op():
    ext = load_extension()
    assert ext.__name__ == "ple_fast._C"
    assert hasattr(torch.ops.ple_fast, "dual_layout")
    assert has_kernel("dual_layout", "CPU") and has_kernel("prefill_layout", "CPU")
    assert built_with_cuda() == has_kernel("dual_layout", "CUDA")
    if torch.version.cuda is None:
        assert not built_with_cuda()
    assert extension_available("test")


def test_without_the_extension_the_packers_warn_and_fall_back_to_the_reference(monkeypatch):
    """A failed _C build must not stop training or rollouts: both packers announce the slower
    Python path once and return exactly what the reference builds."""
    def broken_load():
        raise ImportError("ple_fast._C is not built (simulated)")

    rng = random.Random(7)
    queries, originals, principled = random_pairs(rng, 5)
    monkeypatch.setattr(ext_module, "load_extension", broken_load)
    extension_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pack_dual: using the plain-Python fallback.*simulated"):
            batch = pack_dual(queries, originals, principled)
        assert_same_batch(batch, pack_dual_reference(queries, originals, principled))
        with pytest.warns(RuntimeWarning, match="pack_prefill: using the plain-Python fallback"):
            prefill = pack_prefill([1, 2], queries, [True, False, True, True, False])
        assert_same_batch(prefill, pack_prefill_reference([1, 2], queries, [True, False, True, True, False]))
    finally:
        extension_available.cache_clear()


# ---- op == reference -----------------------------------------------------------------------------

def test_matches_reference_on_random_batches():
    rng = random.Random(1234)
    for trial in range(300):
        num_pairs = rng.choice([1, 1, 2, 3, 5, 8])
        pairs = random_pairs(rng, num_pairs)
        assert_same_batch(pack_dual(*pairs), pack_dual_reference(*pairs))


def test_matches_reference_on_a_large_batch():
    # Enough pairs for at::parallel_for to split the work across threads (two of them even where the
    # test session runs one per pytest-xdist worker).
    pairs = random_pairs(random.Random(7), 300, max_query=40, max_response=30, vocab=32000)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        assert_same_batch(pack_dual(*pairs), pack_dual_reference(*pairs))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pairs", [
    ([[5]], [[]], [[]]),                          # 1-token query, both responses empty
    ([[5]], [[6]], [[7]]),                        # 1-token everything
    ([[1, 2]], [[3]], [[]]),                      # 1-token root
    ([[1, 2, 3, 4]], [[]], [[9, 8, 7, 6, 5]]),
    ([[0], [0, 0]], [[0, 0], []], [[], [0]]),    # token id 0 everywhere
    ([[3, 1], [4]], [[1, 5, 9], [2]], [[6], [5, 3, 5, 8]]),
])
def test_matches_reference_on_edge_cases(pairs):
    assert_same_batch(pack_dual(*pairs), pack_dual_reference(*pairs))


def test_empty_batch_is_supported():
    for pack in (pack_dual, pack_dual_reference):
        batch = pack([], [], [])
        assert batch.num_tokens == 0 and batch.num_pairs == 0
        assert batch.cu_seqlens_q.tolist() == [0] and batch.cu_seqlens_k.tolist() == [0]
        assert batch.kv_index.numel() == 0 and batch.seg_start.numel() == 0
        assert batch.max_seqlen_q == 0 and batch.max_seqlen_k == 0
        assert batch.dense_mask().shape == (0, 0)
    assert_same_batch(pack_dual([], [], []), pack_dual_reference([], [], []))


def test_tensor_and_list_inputs_agree():
    queries, originals, principled = random_pairs(random.Random(3), 4)
    as_tensors = [[torch.tensor(s, dtype=torch.long) for s in group]
                  for group in (queries, originals, principled)]
    expected = pack_dual_reference(queries, originals, principled)
    assert_same_batch(pack_dual(*as_tensors), expected)
    assert_same_batch(pack_dual_reference(*as_tensors), expected)
    int32_queries = [torch.tensor(s, dtype=torch.int32) for s in queries]
    assert_same_batch(pack_dual(int32_queries, originals, principled), expected)


def test_op_accepts_non_contiguous_inputs():
    queries, originals, principled = [[1, 2, 3], [4, 5]], [[6], [7, 8]], [[], [9]]
    expected = pack_dual(queries, originals, principled)

    def strided(values):  # every other element of a twice-as-long tensor
        full = torch.zeros(2 * len(values), dtype=torch.long)
        full[::2] = torch.tensor(values, dtype=torch.long)
        return full[::2]

    out = torch.ops.ple_fast.dual_layout(
        strided([1, 2, 3, 4, 5]), strided([3, 2]), strided([6, 7, 8]), strided([1, 2]),
        strided([9]), strided([0, 1]))
    assert_same_batch(PackedBatch(*out, num_pairs=2), expected)


def test_to_moves_every_tensor_and_keeps_ints():
    batch = pack_dual(*random_pairs(random.Random(5), 3))
    moved = batch.to("cpu")
    assert_same_batch(moved, batch)
    meta = pack_dual([[1, 2]], [[3, 4]], [[5]], device="meta")
    assert all(getattr(meta, f.name).device.type == "meta"
               for f in dataclasses.fields(meta) if isinstance(getattr(meta, f.name), torch.Tensor))
    assert (meta.max_seqlen_q, meta.max_seqlen_k, meta.num_pairs) == (3, 4, 1)


# ---- meaning of the layout, checked without either implementation ----------------------------------

def pair_paths(batch: PackedBatch, k: int):
    """Rows of pair k's two root-to-leaf paths (root rows, then branch A / branch B rows)."""
    seg = batch.segment_ids
    root, a, b = (torch.nonzero(seg == 3 * k + i).flatten().tolist() for i in range(3))
    return root + a, root + b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paths_reconstruct_query_plus_response(seed):
    queries, originals, principled = random_pairs(random.Random(seed), 6)
    batch = pack_dual(queries, originals, principled)
    for k, (q, o, p) in enumerate(zip(queries, originals, principled)):
        for path, response in zip(pair_paths(batch, k), (o, p)):
            sequence = q + response
            assert batch.input_ids[path].tolist() == sequence
            assert batch.position_ids[path].tolist() == list(range(len(sequence)))
            assert batch.labels[path].tolist() == sequence[1:] + [IGNORE_LABEL]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_by_seq_index_are_the_responses(seed):
    queries, originals, principled = random_pairs(random.Random(seed), 7)
    batch = pack_dual(queries, originals, principled)
    for k in range(len(queries)):
        assert batch.labels[batch.seq_index == 2 * k].tolist() == originals[k]
        assert batch.labels[batch.seq_index == 2 * k + 1].tolist() == principled[k]
    scored = batch.seq_index >= 0
    assert int(scored.sum()) == sum(map(len, originals)) + sum(map(len, principled))
    # The unscored rows that still have a label are exactly the root rows.
    assert int((batch.labels[~scored] != IGNORE_LABEL).sum()) == sum(len(q) - 1 for q in queries)


def test_query_tokens_appear_once():
    queries, originals, principled = random_pairs(random.Random(11), 9)
    batch = pack_dual(queries, originals, principled)
    # One repeated token per pair: the query's last token starts both branches.
    assert batch.num_tokens == sum(len(q) + len(o) + len(p) + 1
                                   for q, o, p in zip(queries, originals, principled))
    for k, q in enumerate(queries):
        pair_rows = (batch.segment_ids // 3) == k
        for position in range(len(q) - 1):
            assert int((pair_rows & (batch.position_ids == position)).sum()) == 1
        assert int((pair_rows & (batch.position_ids == len(q) - 1)).sum()) == 2


def test_segment_metadata_is_consistent():
    queries, originals, principled = random_pairs(random.Random(21), 8)
    batch = pack_dual(queries, originals, principled)
    num_segments = 3 * len(queries)
    counts = torch.bincount(batch.segment_ids, minlength=num_segments)
    assert batch.seg_len.tolist() == counts.tolist()
    assert batch.cu_seqlens_q.tolist() == [0] + counts.cumsum(0).tolist()
    assert batch.seg_start.tolist() == batch.cu_seqlens_q[:-1].tolist()
    assert batch.seg_parent.tolist() == [-1 if s % 3 == 0 else s - s % 3 for s in range(num_segments)]
    assert batch.max_seqlen_q == int(batch.cu_seqlens_q.diff().max())
    assert batch.max_seqlen_k == int(batch.cu_seqlens_k.diff().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_mask_is_the_ancestry(seed):
    queries, originals, principled = random_pairs(random.Random(seed), 5)
    batch = pack_dual(queries, originals, principled)
    expected = torch.zeros(batch.num_tokens, batch.num_tokens, dtype=torch.bool)
    for k in range(len(queries)):
        for path in pair_paths(batch, k):  # a row sees the earlier rows of its own path
            for i_pos, i in enumerate(path):
                expected[i, path[:i_pos + 1]] = True
    assert torch.equal(batch.dense_mask(), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_varlen_keys_with_bottom_right_causal_equal_dense_mask(seed):
    batch = pack_dual(*random_pairs(random.Random(seed), 6))
    mask = batch.dense_mask()
    cu_q, cu_k = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
    seen_rows = []
    for s in range(len(cu_q) - 1):
        rows = list(range(cu_q[s], cu_q[s + 1]))
        keys = batch.kv_index[cu_k[s]:cu_k[s + 1]].tolist()
        offset = len(keys) - len(rows)  # bottom-right alignment
        assert offset >= 0
        for i, row in enumerate(rows):
            visible = set(keys[:i + offset + 1])
            assert visible == set(torch.nonzero(mask[row]).flatten().tolist()), (s, row)
        seen_rows += rows
    assert seen_rows == list(range(batch.num_tokens))


def toy_attention_inputs(input_ids, position_ids, dim=8, vocab=64, max_pos=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    pos = torch.randn(max_pos, dim, generator=gen, dtype=torch.float64)
    wq, wk, wv = (torch.randn(dim, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    x = tok[input_ids] + pos[position_ids]
    return x @ wq, x @ wk, x @ wv


def attend(q, k, v, allowed):
    scores = (q @ k.T) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def test_tree_attention_equals_separate_forwards():
    queries, originals, principled = random_pairs(random.Random(99), 5, vocab=64)
    batch = pack_dual(queries, originals, principled)
    q, k, v = toy_attention_inputs(batch.input_ids, batch.position_ids)
    dense = attend(q, k, v, batch.dense_mask())

    # Varlen form: per segment, gather keys by kv_index, bottom-right causal mask.
    varlen = torch.empty_like(dense)
    cu_q, cu_k = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        rows = slice(cu_q[s], cu_q[s + 1])
        keys = batch.kv_index[cu_k[s]:cu_k[s + 1]]
        n_q, n_k = cu_q[s + 1] - cu_q[s], len(keys)
        if n_q == 0:
            continue
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        varlen[rows] = attend(q[rows], k[keys], v[keys], allowed)
    torch.testing.assert_close(varlen, dense, rtol=0, atol=1e-12)

    for pair, (query, o, p) in enumerate(zip(queries, originals, principled)):
        for path, response in zip(pair_paths(batch, pair), (o, p)):
            ids = torch.tensor(query + response)
            sq, sk, sv = toy_attention_inputs(ids, torch.arange(len(ids)))
            causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            torch.testing.assert_close(dense[path], attend(sq, sk, sv, causal), rtol=0, atol=1e-12)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [pack_dual, pack_dual_reference])
def test_python_errors_name_the_pair(pack):
    with pytest.raises(ValueError, match="2 queries, 1 originals and 2 principled"):
        pack([[1], [2]], [[3]], [[4], [5]])
    with pytest.raises(ValueError, match="pair 2 has an empty query"):
        pack([[1], [2], []], [[3], [4], [5]], [[6], [7], [8]])
    with pytest.raises(ValueError, match=r"originals\[1\].*negative"):
        pack([[1], [2]], [[3], [4, -5]], [[6], [7]])


def test_python_errors_on_non_integer_ids():
    with pytest.raises(ValueError, match="queries must hold integer token ids"):
        pack_dual([[1.5]], [[1]], [[2]])
    with pytest.raises(ValueError, match=r"principled\[0\] must be a 1-D integer tensor"):
        pack_dual([torch.tensor([1])], [torch.tensor([2])], [torch.tensor([[3]])])


def call_op(q_ids, q_lens, o_ids, o_lens, p_ids, p_lens, dtype=torch.long):
    def t(values):
        return values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return torch.ops.ple_fast.dual_layout(t(q_ids), t(q_lens), t(o_ids), t(o_lens), t(p_ids), t(p_lens))


@pytest.mark.parametrize("args, message", [
    (([1, 2], [2, 0], [3], [1, 0], [], [0, 0]), r"query_lens\[1\] = 0.*at least one token"),
    (([1, 2], [1, 3], [3], [1, 0], [], [0, 0]), r"query_lens\[1\] = 3 exceeds the 2 tokens of query_ids"),
    (([1, 2, 3], [1, 1], [3], [1, 0], [], [0, 0]), "query_lens sums to 2 but query_ids has 3"),
    (([1, 2], [1, 1], [3], [-1, 2], [], [0, 0]), r"orig_lens\[0\] = -1"),
    (([1, 2], [1, 1], [3], [1, 0], [4], [0, 0]), "prin_lens sums to 0 but prin_ids has 1"),
    (([1, 2], [1, 1], [3], [1, 0], [], [0]), "prin_lens has 1 entries but query_lens has 2"),
    (([1, 2], [1, 1], [3], [1], [], [0, 0]), "orig_lens has 1 entries but query_lens has 2"),
    (([1, 2], [1, 1], [-3], [1, 0], [], [0, 0]), r"orig_ids\[0\] = -3"),
    (([[1, 2]], [2], [], [0], [], [0]), "query_ids must be 1-D"),
])
def test_op_errors_name_the_argument(args, message):
    with pytest.raises(RuntimeError, match=message):
        call_op(*args)


def test_op_rejects_wrong_dtype():
    with pytest.raises(RuntimeError, match="query_lens must be int64"):
        call_op([1], torch.tensor([1], dtype=torch.int32), [], [0], [], [0])


def test_dense_mask_rejects_a_parent_cycle():
    batch = pack_dual([[1, 2]], [[3]], [[4]])
    broken = dataclasses.replace(batch, seg_parent=torch.tensor([1, 0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="cycle"):
        broken.dense_mask()


# ---- rollout prefill layout ------------------------------------------------------------------------

def random_prefill(rng: random.Random, num_prompts: int, max_prompt: int = 8, max_prefix: int = 6,
                   vocab: int = 50):
    prefix = [rng.randrange(vocab) for _ in range(rng.choice([0, 1, rng.randint(0, max_prefix)]))]
    prompts = [[rng.randrange(vocab) for _ in range(1 if rng.random() < 0.3 else rng.randint(1, max_prompt))]
               for _ in range(num_prompts)]
    prefixed = [rng.random() < 0.5 for _ in range(num_prompts)]
    return prefix, prompts, prefixed


def test_prefill_matches_reference_on_random_batches():
    rng = random.Random(77)
    for _ in range(300):
        case = random_prefill(rng, rng.randint(0, 9))
        assert_same_batch(pack_prefill(*case), pack_prefill_reference(*case))


@pytest.mark.parametrize("case", [
    ([], [], []),                                   # nothing at all
    ([4, 5], [], []),                               # a prefix and no prompt
    ([4, 5], [[1]], [True]),                        # one-token prompt under the prefix
    ([4, 5], [[1], [2, 3]], [False, False]),        # prefix present, nobody follows it
    ([], [[1, 2], [3]], [True, True]),              # flagged, but there is no prefix: roots
    ([7], [[1, 2, 3]] * 3, [True, False, True]),    # a one-token prefix, repeated prompts
])
def test_prefill_matches_reference_on_edge_cases(case):
    assert_same_batch(pack_prefill(*case), pack_prefill_reference(*case))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prefill_paths_are_the_prompts_as_generated(seed):
    """Each prompt's root-to-leaf path is (prefix +) prompt at positions 0.., and its last row is marked."""
    prefix, prompts, prefixed = random_prefill(random.Random(seed), 7)
    batch = pack_prefill(prefix, prompts, prefixed)
    mask = batch.dense_mask()
    last_rows = (batch.seq_index >= 0).nonzero().flatten()
    assert batch.seq_index[last_rows].tolist() == list(range(len(prompts)))
    for b, row in enumerate(last_rows.tolist()):
        path = mask[row].nonzero().flatten()
        expected = (prefix if prefixed[b] else []) + prompts[b]
        assert batch.input_ids[path].tolist() == expected
        assert batch.position_ids[path].tolist() == list(range(len(expected)))
    assert batch.num_tokens == (len(prefix) if prefix else 0) + sum(map(len, prompts))  # the prefix once


def test_prefill_varlen_keys_equal_dense_mask():
    batch = pack_prefill(*random_prefill(random.Random(8), 9, max_prefix=9))
    mask = batch.dense_mask()
    cu_q, cu_k = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        keys = batch.kv_index[cu_k[s]:cu_k[s + 1]].tolist()
        offset = len(keys) - (cu_q[s + 1] - cu_q[s])
        for i, row in enumerate(range(cu_q[s], cu_q[s + 1])):
            assert set(keys[:i + offset + 1]) == set(mask[row].nonzero().flatten().tolist())


@pytest.mark.parametrize("pack", [pack_prefill, pack_prefill_reference])
def test_prefill_errors(pack):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack([1], [[2], []], [True, True])
    with pytest.raises(ValueError, match="2 prefixed flags for 1 prompts"):
        pack([1], [[2]], [True, False])
    with pytest.raises(ValueError, match="negative token id"):
        pack([1], [[2, -3]], [True])


def test_prefill_op_errors_name_the_argument():
    op = torch.ops.ple_fast.prefill_layout
    ids = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="prompt_lens sums to 1 but prompt_ids has 2"):
        op(ids, ids, torch.tensor([1]), torch.tensor([True]))
    with pytest.raises(RuntimeError, match="prefixed must be bool"):
        op(ids, ids, torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="prefixed has 2 entries but prompt_lens has 1"):
        op(ids, ids, torch.tensor([2]), torch.tensor([True, False]))
    with pytest.raises(RuntimeError, match="prefix_ids.0. = -1"):
        op(torch.tensor([-1]), ids, torch.tensor([2]), torch.tensor([True]))


# ---- CUDA ----------------------------------------------------------------------------------------

def cuda_op(test):
    """Runs in bench/gpu_suite.sh (marker gpu); skipped without a GPU and a CUDA build of _C."""
    ready = torch.cuda.is_available() and has_kernel("dual_layout", "CUDA")
    return pytest.mark.gpu(pytest.mark.skipif(not ready, reason="needs a GPU and ple_fast._C built with CUDA")(test))


@cuda_op
def test_cuda_op_matches_reference():
    rng = random.Random(4321)
    for num_pairs in [0, 1, 1, 2, 3, 7, 64, 300]:
        pairs = random_pairs(rng, num_pairs, max_query=300 if num_pairs == 1 else 12,
                             max_response=600 if num_pairs == 1 else 10, vocab=32000)
        batch = pack_dual(*pairs, device="cuda")
        assert batch.input_ids.is_cuda and batch.kv_index.is_cuda
        assert_same_batch(batch, pack_dual_reference(*pairs, device="cuda"))
    on_device = [[torch.tensor(s, dtype=torch.long, device="cuda") for s in group] for group in pairs]
    assert_same_batch(pack_dual(*on_device), pack_dual_reference(*pairs, device="cuda"))


@cuda_op
def test_cuda_op_errors():
    def cuda_call(*args):
        tensors = [torch.tensor(a, dtype=torch.long, device="cuda") for a in args]
        return torch.ops.ple_fast.dual_layout(*tensors)

    with pytest.raises(RuntimeError, match="query_lens has an entry of 0"):
        cuda_call([1, 2], [2, 0], [3], [1, 0], [], [0, 0])
    with pytest.raises(RuntimeError, match="query_lens sums to 2 but query_ids has 3"):
        cuda_call([1, 2, 3], [1, 1], [3], [1, 0], [], [0, 0])
    with pytest.raises(RuntimeError, match="orig_lens has a negative entry"):
        cuda_call([1, 2], [1, 1], [3], [-1, 2], [], [0, 0])
    with pytest.raises(RuntimeError, match="token ids are negative"):
        cuda_call([1, 2], [1, 1], [-3], [1, 0], [], [0, 0])
    with pytest.raises(RuntimeError, match="on cpu but query_ids is on cuda"):
        torch.ops.ple_fast.dual_layout(
            torch.tensor([1], device="cuda"), torch.tensor([1]), torch.tensor([], dtype=torch.long),
            torch.tensor([0]), torch.tensor([], dtype=torch.long), torch.tensor([0]))


@cuda_op
def test_cuda_prefill_op_matches_reference():
    rng = random.Random(99)
    for num_prompts in [0, 1, 2, 5, 64, 300]:
        case = random_prefill(rng, num_prompts, max_prompt=400 if num_prompts == 1 else 12, vocab=32000)
        batch = pack_prefill(*case, device="cuda")
        assert batch.input_ids.is_cuda
        assert_same_batch(batch, pack_prefill_reference(*case, device="cuda"))
    assert_same_batch(pack_prefill([5, 6], [], [], device="cuda"), pack_prefill_reference([5, 6], [], [], device="cuda"))
    op = torch.ops.ple_fast.prefill_layout
    ids = torch.tensor([1, 2], device="cuda")
    with pytest.raises(RuntimeError, match="prompt_lens has an entry of 0"):
        op(ids, ids, torch.tensor([2, 0], device="cuda"), torch.tensor([True, True], device="cuda"))
    with pytest.raises(RuntimeError, match="token ids are negative"):
        op(ids, torch.tensor([1, -2], device="cuda"), torch.tensor([2], device="cuda"),
           torch.tensor([True], device="cuda"))
