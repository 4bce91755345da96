"""Dual prefix-tree packing: a pair (query, original, principled) costs one forward of the query.

Pair k becomes three segments of packed rows (docs/method.md, csrc/dual_layout.h):
  3k    root      q[:-1]        positions 0 .. Lq-2       (empty for a 1-token query)
  3k+1  branch A  [q[-1]] + o   positions Lq-1 ..         parent 3k, scores sequence 2k
  3k+2  branch B  [q[-1]] + p   positions Lq-1 ..         parent 3k, scores sequence 2k+1
Each row sees its ancestors' rows and, causally, its own segment, so one varlen causal attention
(bottom-right aligned) over keys gathered by kv_index is exact for the tree. `pack_dual` runs the
C++/CUDA op torch.ops.ple_fast.dual_layout; `pack_dual_reference` is the plain-Python oracle.

Rollout prefill packs the other tree of docs/method.md: the principle once, as a root, with each
principle-guided prompt a child placed after it and each plain prompt a root of its own
(`pack_prefill`, op torch.ops.ple_fast.prefill_layout; oracle `pack_prefill_reference`).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ple_fast._ext import extension_available, has_kernel

IGNORE_LABEL = -100
SEGMENTS_PER_PAIR = 3

TokenIds = Union[Sequence[int], torch.Tensor]


@dataclass
class PackedBatch:
    """P pairs packed into N rows and S = 3P segments, with the varlen attention metadata."""

    input_ids: torch.Tensor     # [N] int64
    position_ids: torch.Tensor  # [N] int64, position along the row's own root-to-leaf path
    labels: torch.Tensor        # [N] int64, the token row n predicts, or -100
    seq_index: torch.Tensor     # [N] int64, 2k / 2k+1 for rows scoring pair k's original / principled, else -1
    segment_ids: torch.Tensor   # [N] int64, 3k root, 3k+1 branch A, 3k+2 branch B
    seg_start: torch.Tensor     # [S] int32, first row of each segment
    seg_len: torch.Tensor       # [S] int32
    seg_parent: torch.Tensor    # [S] int32, -1 for roots
    cu_seqlens_q: torch.Tensor  # [S+1] int32, query rows of segment s: cu_seqlens_q[s] .. cu_seqlens_q[s+1]
    cu_seqlens_k: torch.Tensor  # [S+1] int32, keys of segment s: kv_index[cu_seqlens_k[s] : cu_seqlens_k[s+1]]
    kv_index: torch.Tensor      # [K] int64, rows to gather as keys: per segment its ancestors' rows, then its own
    max_seqlen_q: int
    max_seqlen_k: int
    num_pairs: int              # pairs for pack_dual; 0 for pack_sequences (no pairs, one sequence per root)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The batch on `device`; non_blocking: CPU tensors bound for a GPU go through pinned memory, so
        the move does not wait for the GPU (`to_device`)."""
        move = to_device if non_blocking else (lambda t, d: t.to(d))
        moved = {
            f.name: move(getattr(self, f.name), device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def dense_mask(self) -> torch.Tensor:
        """[N, N] bool, True where row i may attend to row j: the SDPA reference mask.

        j is visible from i when both are in one segment and j <= i, or j's segment is an ancestor
        of i's. Costs N^2 memory: for tests and small batches only.
        """
        seg = self.segment_ids
        num_segments = self.seg_parent.numel()
        parent = self.seg_parent.long()
        ancestor = torch.zeros(num_segments, num_segments, dtype=torch.bool, device=seg.device)
        segments = torch.arange(num_segments, device=seg.device)
        current = parent.clone()
        for _ in range(num_segments + 1):
            live = current >= 0
            if not bool(live.any()):
                break
            ancestor[segments[live], current[live]] = True
            current = torch.where(live, parent[current.clamp(min=0)], current)
        else:
            raise ValueError("PackedBatch.seg_parent has a cycle")
        rows = torch.arange(seg.numel(), device=seg.device)
        same_segment_causal = (seg[:, None] == seg[None, :]) & (rows[None, :] <= rows[:, None])
        return same_segment_causal | ancestor[seg[:, None], seg[None, :]]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """tensor on `device`; a CPU tensor bound for a GPU goes through pinned memory, without a sync.

    Why: copying pageable memory to the GPU waits for the stream's queued work to finish (torch's
    blocking copy syncs the stream), so a copy made after a forward is queued stalls the host until
    the GPU has run it, and the backward's launches then trickle out behind an idle GPU. The pinned
    block is not reused before the copy has run (torch's caching host allocator records it)."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _check_pairs(queries: Sequence[TokenIds], originals: Sequence[TokenIds],
                 principled: Sequence[TokenIds]) -> None:
    if not (len(queries) == len(originals) == len(principled)):
        raise ValueError(
            f"pack_dual: got {len(queries)} queries, {len(originals)} originals and "
            f"{len(principled)} principled responses; need exactly one of each per pair")
    for k, query in enumerate(queries):
        if len(query) == 0:
            raise ValueError(f"pack_dual: pair {k} has an empty query; every query needs at least "
                             "one token (its last token starts both responses)")


def _flatten(seqs: Sequence[TokenIds], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated int64 ids and per-sequence lengths, on the sequences' device (CPU for lists)."""
    lens = [len(s) for s in seqs]
    if seqs and all(isinstance(s, torch.Tensor) for s in seqs):
        for k, s in enumerate(seqs):
            if s.dim() != 1 or s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
                raise ValueError(f"pack_dual: {what}[{k}] must be a 1-D integer tensor, "
                                 f"got shape {tuple(s.shape)} dtype {s.dtype}")
        ids = torch.cat([s.long() for s in seqs])
        negative = ids.numel() and bool((ids < 0).any())
    else:
        flat = list(itertools.chain.from_iterable(
            s.tolist() if isinstance(s, torch.Tensor) else s for s in seqs))
        ids = torch.as_tensor(flat) if flat else torch.empty(0, dtype=torch.long)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"pack_dual: {what} must hold integer token ids, got {ids.dtype}")
        ids = ids.long()
        negative = bool(flat) and min(flat) < 0           # on the list: no tensor op to dispatch
    lengths = torch.tensor(lens, dtype=torch.long, device=ids.device)
    if negative:
        first = int((ids < 0).nonzero()[0, 0])
        pair = int(torch.searchsorted(lengths.cumsum(0), first, right=True))
        raise ValueError(f"pack_dual: {what}[{pair}] holds a negative token id; token ids must be "
                         f">= 0 ({IGNORE_LABEL} marks rows without a label)")
    return ids, lengths


def pack_dual(queries: Sequence[TokenIds], originals: Sequence[TokenIds],
              principled: Sequence[TokenIds], device: torch.device | str | None = None) -> PackedBatch:
    """Pack P pairs with the C++/CUDA op; runs on `device` (default: where the token tensors are).

    Token lists can be Python int lists or 1-D integer tensors. On a CUDA device the layout is built
    by the CUDA kernel when ple_fast._C has it, else on the CPU and copied over. Without a loadable
    _C (a failed build) it warns once and runs `pack_dual_reference`.
    """
    _check_pairs(queries, originals, principled)
    if not extension_available("pack_dual"):
        return pack_dual_reference(queries, originals, principled, device=device)
    query_ids, query_lens = _flatten(queries, "queries")
    orig_ids, orig_lens = _flatten(originals, "originals")
    prin_ids, prin_lens = _flatten(principled, "principled")
    inputs = (query_ids, query_lens, orig_ids, orig_lens, prin_ids, prin_lens)
    return _run_layout_op("dual_layout", inputs, device, num_pairs=len(queries))


def _run_layout_op(op: str, inputs: tuple, device, num_pairs: int) -> PackedBatch:
    """torch.ops.ple_fast.<op> on `device` (default: the first input's) when _C has its CUDA
    kernel there, else on the CPU with the result copied over."""
    target = torch.device(device) if device is not None else inputs[0].device
    on_gpu = target.type == "cuda" and has_kernel(op, "CUDA")
    run_on = target if on_gpu else torch.device("cpu")
    out = getattr(torch.ops.ple_fast, op)(*(t.to(run_on) for t in inputs))
    batch = PackedBatch(*out, num_pairs=num_pairs)
    return batch if run_on == target else batch.to(target)


def pack_dual_reference(queries: Sequence[TokenIds], originals: Sequence[TokenIds],
                        principled: Sequence[TokenIds],
                        device: torch.device | str | None = None) -> PackedBatch:
    """Plain-Python pack_dual, built segment by segment; the oracle for the C++/CUDA op."""
    _check_pairs(queries, originals, principled)

    def as_list(seq: TokenIds, what: str, k: int) -> list[int]:
        tokens = [int(t) for t in (seq.tolist() if isinstance(seq, torch.Tensor) else seq)]
        if any(t < 0 for t in tokens):
            raise ValueError(f"pack_dual: {what}[{k}] holds a negative token id")
        return tokens

    input_ids, position_ids, labels, seq_index, segment_ids = [], [], [], [], []
    segments = []  # (start row, length, parent segment)

    def add_segment(tokens, first_position, targets, scored_seq, parent):
        segment = len(segments)
        segments.append((len(input_ids), len(tokens), parent))
        for i, (token, target) in enumerate(zip(tokens, targets)):
            input_ids.append(token)
            position_ids.append(first_position + i)
            labels.append(target)
            seq_index.append(scored_seq if target != IGNORE_LABEL else -1)
            segment_ids.append(segment)
        return segment

    for k, (q, o, p) in enumerate(zip(queries, originals, principled)):
        q, o, p = as_list(q, "queries", k), as_list(o, "originals", k), as_list(p, "principled", k)
        root = add_segment(q[:-1], 0, q[1:], -1, -1)
        add_segment([q[-1]] + o, len(q) - 1, o + [IGNORE_LABEL], 2 * k, root)
        add_segment([q[-1]] + p, len(q) - 1, p + [IGNORE_LABEL], 2 * k + 1, root)

    kv_index, cu_seqlens_q, cu_seqlens_k = [], [0], [0]
    for s, (start, length, parent) in enumerate(segments):
        ancestors = []
        while parent >= 0:
            ancestors.insert(0, parent)
            parent = segments[parent][2]
        for a in ancestors + [s]:
            a_start, a_len, _ = segments[a]
            kv_index.extend(range(a_start, a_start + a_len))
        cu_seqlens_q.append(start + length)
        cu_seqlens_k.append(len(kv_index))

    def diffs(cu):
        return [b - a for a, b in zip(cu, cu[1:])]

    def long(values):
        return torch.tensor(values, dtype=torch.long)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32)

    batch = PackedBatch(
        input_ids=long(input_ids),
        position_ids=long(position_ids),
        labels=long(labels),
        seq_index=long(seq_index),
        segment_ids=long(segment_ids),
        seg_start=int32([s[0] for s in segments]),
        seg_len=int32([s[1] for s in segments]),
        seg_parent=int32([s[2] for s in segments]),
        cu_seqlens_q=int32(cu_seqlens_q),
        cu_seqlens_k=int32(cu_seqlens_k),
        kv_index=long(kv_index),
        max_seqlen_q=max(diffs(cu_seqlens_q), default=0),
        max_seqlen_k=max(diffs(cu_seqlens_k), default=0),
        num_pairs=len(queries),
    )
    return batch if device is None else batch.to(device)


def pack_sequences(prompts: Sequence[TokenIds], responses: Sequence[TokenIds],
                   device: torch.device | str | None = None) -> PackedBatch:
    """Independent sequences prompt_i + response_i back to back, each a root segment of its own.

    The padding-free layout when nothing is shared (SFT, or the duplicated-query baseline of the
    dual benchmark): sequence i scores response_i, rows predict the next token of their sequence.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack_sequences: got {len(prompts)} prompts but {len(responses)} responses")
    input_ids, position_ids, labels, seq_index, segment_ids, seg_len = [], [], [], [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        response = [int(t) for t in (response.tolist() if isinstance(response, torch.Tensor) else response)]
        if not prompt:
            raise ValueError(f"pack_sequences: sequence {i} has an empty prompt; a response needs a prompt "
                             "token to follow")
        tokens = prompt + response
        if any(t < 0 for t in tokens):
            raise ValueError(f"pack_sequences: sequence {i} holds a negative token id")
        input_ids += tokens
        position_ids += range(len(tokens))
        labels += tokens[1:] + [IGNORE_LABEL]
        seq_index += [-1] * (len(prompt) - 1) + [i] * len(response) + [-1]
        segment_ids += [i] * len(tokens)
        seg_len.append(len(tokens))
    lengths = torch.tensor(seg_len, dtype=torch.int32)
    cu_seqlens = torch.zeros(len(seg_len) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    batch = PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        position_ids=torch.tensor(position_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        seq_index=torch.tensor(seq_index, dtype=torch.long),
        segment_ids=torch.tensor(segment_ids, dtype=torch.long),
        seg_start=cu_seqlens[:-1].clone(),
        seg_len=lengths,
        seg_parent=torch.full((len(seg_len),), -1, dtype=torch.int32),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens.clone(),
        kv_index=torch.arange(len(input_ids), dtype=torch.long),
        max_seqlen_q=max(seg_len, default=0),
        max_seqlen_k=max(seg_len, default=0),
        num_pairs=0,
    )
    return batch if device is None else batch.to(device)


def _prefill_inputs(prefix: TokenIds, prompts: Sequence[TokenIds], prefixed: Sequence[bool]):
    if len(prefixed) != len(prompts):
        raise ValueError(f"pack_prefill: {len(prefixed)} prefixed flags for {len(prompts)} prompts")
    for b, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"pack_prefill: prompt {b} is empty; every prompt needs at least one token")
    prefix_ids, _ = _flatten([prefix], "prefix")
    prompt_ids, prompt_lens = _flatten(prompts, "prompts")
    flags = torch.tensor([bool(f) for f in prefixed], dtype=torch.bool, device=prompt_lens.device)
    return prefix_ids.to(prompt_ids.device), prompt_ids, prompt_lens, flags


def pack_prefill(prefix: TokenIds, prompts: Sequence[TokenIds], prefixed: Sequence[bool],
                 device: torch.device | str | None = None) -> PackedBatch:
    """The rollout-prefill forest, built by the C++/CUDA op on `device` (default: the tokens' device).

    Segment 0 is the prefix (absent when it is empty); prompt b is segment b (+1 with a prefix),
    a child of the prefix where prefixed[b], else a root. seq_index marks each prompt's last row
    with b: the row whose logits give prompt b's first new token. labels are the next token along
    the row's path (-100 at a segment's end), for callers that score prompts. Without a loadable
    _C it warns once and runs `pack_prefill_reference`.
    """
    if not extension_available("pack_prefill"):
        return pack_prefill_reference(prefix, prompts, prefixed, device=device)
    return _run_layout_op("prefill_layout", _prefill_inputs(prefix, prompts, prefixed), device, num_pairs=0)


def pack_prefill_reference(prefix: TokenIds, prompts: Sequence[TokenIds], prefixed: Sequence[bool],
                           device: torch.device | str | None = None) -> PackedBatch:
    """Plain-Python pack_prefill, segment by segment: the oracle for the C++/CUDA op."""
    _prefill_inputs(prefix, prompts, prefixed)             # same validation and messages
    prefix = [int(t) for t in (prefix.tolist() if isinstance(prefix, torch.Tensor) else prefix)]
    segments = []                                          # (tokens, first position, parent, scored)
    if prefix:
        segments.append((prefix, 0, -1, -1))
    for b, (prompt, follows) in enumerate(zip(prompts, prefixed)):
        tokens = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if any(t < 0 for t in tokens):
            raise ValueError(f"pack_prefill: prompt {b} holds a negative token id")
        under_prefix = bool(follows) and bool(prefix)
        segments.append((tokens, len(prefix) if under_prefix else 0, 0 if under_prefix else -1, b))

    fields = {name: [] for name in ("input_ids", "position_ids", "labels", "seq_index", "segment_ids")}
    starts, kv_index, cu_q, cu_k = [], [], [0], [0]
    for s, (tokens, first, parent, scored) in enumerate(segments):
        start = len(fields["input_ids"])
        starts.append(start)
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            fields["input_ids"].append(token)
            fields["position_ids"].append(first + i)
            fields["labels"].append(IGNORE_LABEL if last else tokens[i + 1])
            fields["seq_index"].append(scored if last and scored >= 0 else -1)
            fields["segment_ids"].append(s)
        if parent >= 0:
            kv_index.extend(range(starts[parent], starts[parent] + len(segments[parent][0])))
        kv_index.extend(range(start, start + len(tokens)))
        cu_q.append(start + len(tokens))
        cu_k.append(len(kv_index))
    batch = PackedBatch(
        **{name: torch.tensor(values, dtype=torch.long) for name, values in fields.items()},
        seg_start=torch.tensor(starts, dtype=torch.int32),
        seg_len=torch.tensor([len(t) for t, *_ in segments], dtype=torch.int32),
        seg_parent=torch.tensor([p for _, _, p, _ in segments], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        kv_index=torch.tensor(kv_index, dtype=torch.long),
        max_seqlen_q=max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0),
        max_seqlen_k=max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0),
        num_pairs=0,
    )
    return batch if device is None else batch.to(device)
