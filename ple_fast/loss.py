"""Sequence log-probs from final hidden states, and the gated PLE loss on top of them.

Three implementations of `sequence_logprobs`, one contract:
  reference  full [N, V] logits under autograd: slow, obviously correct, the test oracle
  torch      custom autograd.Function over row chunks: logits recomputed in backward, never
             held for all rows at once
  triton     the fused kernels of ple_fast.kernels.logprob
`gated_loss` turns the [2P] sequence log-probs into the PLE loss and is shared by all.
Nothing on the compute path of these three syncs with the host or has a data-dependent shape,
so it can be captured in CUDA graphs and compiled with torch.compile(fullgraph=True).

A fourth, `ple_loss(impl="whole_pairs")`, does the loss's 6NHV of useful work instead of 8NHV: a pair's
loss depends only on its own two sequence log-probs, so over chunks of whole pairs the loss gradient
is known inside the chunk. Per chunk: logits by one GEMM, the row passes of
ple_fast.kernels.logit_rows (logsumexp, then the logit gradient in place), the gate on the chunk's
pairs, and two GEMMs for dX and an fp32 dW. The gradients are made in the forward and handed back by
the backward. Its chunk bounds come from `pair_rows` (host lengths; the trainer passes them) or one
read of seq_index. Experimental: not yet timed on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ple_fast.kernels.logit_rows import logit_grad_, row_stats
from ple_fast.kernels.logprob import fused_sequence_logprobs

IMPLS = ("auto", "triton", "torch", "reference", "whole_pairs")
RANK_LOSSES = ("hinge", "logistic")
WEIGHTINGS = ("softmax", "tanh")

# Size in bytes of one [rows, V] logits buffer of the torch path; read at call time, so it
# can be changed at runtime. Forward and backward hold about three such buffers at once.
CHUNK_BYTES = 256 * 2**20

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PLELossOutput:
    loss: Tensor  # 0-dim, fp32 (fp64 for fp64 inputs)
    seq_logps: Tensor  # [2P] summed token log-probs, differentiable
    seq_tokens: Tensor  # [2P] int64 token counts
    ranked: Tensor  # [P] bool: pair took the ranking branch
    valid: Tensor  # [P] bool: both rewards finite (others are dropped from the mean)
    num_dropped: Tensor  # 0-dim int64, kept on device (no host sync)


# ----------------------------------------------------------------------------------------
# argument checks


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_logprob_args(hidden, weight, labels, seq_index, num_seqs, softcap, temperature):
    """Validate shapes/dtypes/devices; return (labels, seq_index) as int64 and normalised scalars."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D [N, H] tensor, got {_describe(hidden)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be fp16/bf16/fp32/fp64, got {hidden.dtype}")
    num_rows, hidden_size = hidden.shape
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight must be a 2-D [V, H] tensor with H = hidden.shape[1] = {hidden_size}, "
            f"got {_describe(weight)}"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be fp16/bf16/fp32/fp64, got {weight.dtype}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    for name, t in (("labels", labels), ("seq_index", seq_index)):
        if not isinstance(t, Tensor) or t.shape != (num_rows,):
            raise ValueError(
                f"{name} must be a 1-D tensor of length N = hidden.shape[0] = {num_rows}, "
                f"got {_describe(t)}"
            )
        if not _is_integer_dtype(t.dtype):
            raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("seq_index", seq_index)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not isinstance(num_seqs, int) or isinstance(num_seqs, bool) or num_seqs < 0:
        raise ValueError(f"num_seqs must be a non-negative int, got {num_seqs!r}")
    if softcap is not None and not _is_number(softcap):
        raise ValueError(f"softcap must be None or a number, got {softcap!r}")
    if softcap and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be positive and finite (None or 0 disables it), got {softcap!r}")
    if not _is_number(temperature) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    softcap = float(softcap) if softcap else None
    return labels.long(), seq_index.long(), softcap, float(temperature)


def _check_index_ranges(labels: Tensor, seq_index: Tensor, num_seqs: int, vocab_size: int) -> None:
    """Catch out-of-range indices with a readable error. CPU only: on CUDA this would cost a
    host sync (an out-of-range index there fails as a device-side assert instead)."""
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (seq_index < -1) | (seq_index >= num_seqs)
    if bad.any():
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_index[{n}] = {int(seq_index[n])} is outside [-1, num_seqs={num_seqs})")
    bad = (seq_index >= 0) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        n = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{n}] = {int(labels[n])} is outside [0, V={vocab_size}) on a scored row "
            f"(seq_index[{n}] = {int(seq_index[n])}); unscored rows need seq_index = -1"
        )


def _check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_gate_options(rank_loss, weighting, rank_sft_coef, length_normalize, beta) -> None:
    if rank_loss not in RANK_LOSSES:
        raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {rank_loss!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not _is_number(rank_sft_coef) or not (math.isfinite(rank_sft_coef) and rank_sft_coef >= 0):
        raise ValueError(f"rank_sft_coef must be a finite number >= 0, got {rank_sft_coef!r}")
    if not isinstance(length_normalize, bool):
        raise ValueError(f"length_normalize must be a bool, got {length_normalize!r}")
    if not _is_number(beta) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


def _check_rewards(rewards) -> int:
    if not isinstance(rewards, Tensor) or rewards.dim() != 2 or rewards.shape[1] != 2:
        raise ValueError(f"rewards must be a [P, 2] tensor (original, principle-guided), got {_describe(rewards)}")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must have a floating dtype, got {rewards.dtype}")
    return rewards.shape[0]


def _threshold(tau, like: Tensor):
    """tau as something comparable with `like`, detached (the gate is not differentiable)."""
    if isinstance(tau, Tensor):
        if tau.dim() != 0 or tau.dtype == torch.bool or tau.is_complex():
            raise ValueError(f"tau must be a float or a 0-dim real tensor, got {_describe(tau)}")
        return tau.detach().to(device=like.device, dtype=like.dtype)
    if not _is_number(tau) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite float or a 0-dim tensor, got {tau!r}")
    return float(tau)


# ----------------------------------------------------------------------------------------
# shared pieces


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _matmul_dtype(hidden: Tensor, weight: Tensor, acc: torch.dtype) -> torch.dtype:
    """GEMM input dtype of the torch path. On CUDA a half-precision pair stays half (tensor
    cores, fp32 output through out_dtype); elsewhere inputs are upcast to `acc` so the
    logits are never rounded to half precision."""
    common = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.is_cuda and common in _HALF_DTYPES:
        return common
    return acc


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b with an `acc`-dtype result (a and b share one dtype)."""
    if a.dtype == acc:
        return a @ b
    return torch.mm(a, b, out_dtype=acc)


def _seq_slots(seq_index: Tensor, num_seqs: int) -> Tensor:
    """Row -> accumulation slot. Unscored rows go to an extra slot `num_seqs` that is sliced
    away, so no masking (and no data-dependent shape) is needed."""
    return torch.where(seq_index >= 0, seq_index, num_seqs)


def _sum_by_sequence(values: Tensor, slots: Tensor, num_seqs: int) -> Tensor:
    return values.new_zeros(num_seqs + 1).index_add(0, slots, values)[:num_seqs]


def sequence_token_counts(seq_index: Tensor, num_seqs: int) -> Tensor:
    """[num_seqs] int64 number of scored rows per sequence."""
    slots = _seq_slots(seq_index.long(), num_seqs)
    counts = torch.zeros(num_seqs + 1, dtype=torch.int64, device=seq_index.device)
    return counts.index_add_(0, slots, torch.ones_like(slots))[:num_seqs]


def rows_per_chunk(vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows of the torch path's logits chunk so that rows * V * itemsize <= CHUNK_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // (vocab_size * itemsize))


# ----------------------------------------------------------------------------------------
# reference: full logits, plain autograd


def _reference_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature):
    acc = _accumulation_dtype(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(acc) @ weight.to(acc).T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
    safe_labels = torch.where(seq_index >= 0, labels, 0)
    token_logps = logp.gather(1, safe_labels[:, None]).squeeze(1)
    return _sum_by_sequence(token_logps, _seq_slots(seq_index, num_seqs), num_seqs)


# ----------------------------------------------------------------------------------------
# torch: chunked over rows, logits recomputed in backward


class _ChunkedSequenceLogprobs(torch.autograd.Function):
    """Saves hidden, weight, labels, slots and the per-row logsumexp; never the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, safe_labels, slots, num_seqs, softcap, temperature, chunk_rows):
        acc = _accumulation_dtype(hidden.dtype, weight.dtype)
        mm_dtype = _matmul_dtype(hidden, weight, acc)
        w = weight.to(mm_dtype)
        num_rows = hidden.shape[0]
        lse = torch.empty(num_rows, dtype=acc, device=hidden.device)
        token_logps = torch.empty(num_rows, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, num_rows, chunk_rows):
                rows = slice(start, min(start + chunk_rows, num_rows))
                z = _mm(hidden[rows].to(mm_dtype), w.T, acc)  # fresh buffer: in-place is safe
                if softcap is not None:
                    z.div_(softcap).tanh_().mul_(softcap)
                if temperature != 1.0:
                    z.div_(temperature)
                lse[rows] = torch.logsumexp(z, dim=1)
                token_logps[rows] = z.gather(1, safe_labels[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, safe_labels, slots, lse)
        ctx.softcap, ctx.temperature, ctx.chunk_rows = softcap, temperature, chunk_rows
        return _sum_by_sequence(token_logps, slots, num_seqs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_seq):
        hidden, weight, safe_labels, slots, lse = ctx.saved_tensors
        d_hidden, d_weight = _chunked_logprob_grads(
            hidden, weight, safe_labels, slots, lse, grad_seq, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.softcap, ctx.temperature, ctx.chunk_rows,
        )
        return d_hidden, d_weight, None, None, None, None, None, None


def _chunked_logprob_grads(hidden, weight, safe_labels, slots, lse, grad_seq, need_dx, need_dw, softcap,
                           temperature, chunk_rows):
    """(dX, dW) of sum(grad_seq * seq_logps) with the logits recomputed chunk by chunk from the
    forward's per-row logsumexp `lse`: the backward of the torch path.
    dX has hidden's dtype, dW weight's dtype (fp32 accumulation); None where not needed."""
    acc = lse.dtype
    mm_dtype = _matmul_dtype(hidden, weight, acc)
    w = weight.to(mm_dtype)
    # d seq / d token logp is 1 per scored row; the extra slot holds 0 for unscored rows.
    grad_slots = torch.cat([grad_seq.to(acc), grad_seq.new_zeros(1, dtype=acc)])
    grad_rows = grad_slots[slots] / temperature  # 1/T: chain rule of z / T
    d_hidden = torch.empty_like(hidden) if need_dx else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    num_rows = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, num_rows if (need_dx or need_dw) else 0, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            x = hidden[rows].to(mm_dtype)
            g = grad_rows[rows, None]
            z = _mm(x, w.T, acc)
            # dz = g * (onehot(label) - softmax(z)) [* (1 - tanh^2) under softcap]
            if softcap is not None:
                t = z.div_(softcap).tanh_()
                dz = torch.exp(t * (softcap / temperature) - lse[rows, None]).mul_(g).neg_()
                dz.scatter_add_(1, safe_labels[rows, None], g)
                dz.mul_(t.square_().neg_().add_(1.0))
            else:
                if temperature != 1.0:
                    z.div_(temperature)
                dz = z.sub_(lse[rows, None]).exp_().mul_(g).neg_()
                dz.scatter_add_(1, safe_labels[rows, None], g)
            dz = dz.to(mm_dtype)
            if need_dx:
                d_hidden[rows] = _mm(dz, w, acc)
            if need_dw:
                if mm_dtype == acc:
                    d_weight.addmm_(dz.T, x)
                else:
                    d_weight.add_(torch.mm(dz.T, x, out_dtype=acc))
    if need_dw:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight


def _torch_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature, chunk_rows=None):
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(weight.shape[0], _accumulation_dtype(hidden.dtype, weight.dtype))
    safe_labels = torch.where(seq_index >= 0, labels, 0)
    slots = _seq_slots(seq_index, num_seqs)
    return _ChunkedSequenceLogprobs.apply(
        hidden, weight, safe_labels, slots, num_seqs, softcap, temperature, chunk_rows
    )


def chunked_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, *, softcap=None,
                              temperature=1.0, chunk_rows=None) -> Tensor:
    """The torch path with an explicit chunk size (rows per logits chunk); None picks it
    from CHUNK_BYTES."""
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    labels, seq_index, softcap, temperature = _check_logprob_args(
        hidden, weight, labels, seq_index, num_seqs, softcap, temperature
    )
    _check_index_ranges(labels, seq_index, num_seqs, weight.shape[0])
    return _torch_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature, chunk_rows)


def _resolve_impl(impl: str, hidden: Tensor, weight: Tensor) -> str:
    """auto: triton on CUDA (measured fastest: docs/performance.md), torch elsewhere. fp64 is not a
    tensor-core dtype: the triton impl hands it to the torch path (same contract, fp64 accumulation)."""
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl in ("triton", "whole_pairs") and torch.float64 in (hidden.dtype, weight.dtype):
        return "torch"
    return impl


# ----------------------------------------------------------------------------------------
# public API


def sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, *, impl="auto", softcap=None,
                      temperature=1.0) -> Tensor:
    """[num_seqs] summed token log-probs, differentiable wrt hidden and weight.

    Row n predicts labels[n] from logits hidden[n] @ weight.T (softcapped, then divided by
    temperature) and adds to sequence seq_index[n]; rows with seq_index -1 are ignored, and
    their labels are never read. fp32 result (fp64 when an input is fp64).
    """
    _check_impl(impl)
    labels, seq_index, softcap, temperature = _check_logprob_args(
        hidden, weight, labels, seq_index, num_seqs, softcap, temperature
    )
    _check_index_ranges(labels, seq_index, num_seqs, weight.shape[0])
    impl = _resolve_impl(impl, hidden, weight)
    if impl == "reference":
        return _reference_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature)
    if impl in ("triton", "whole_pairs"):         # log-probs alone: the fused kernels (whole_pairs is a loss)
        return fused_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature)
    return _torch_sequence_logprobs(hidden, weight, labels, seq_index, num_seqs, softcap, temperature)


def gated_loss(seq_logps, seq_tokens, rewards, tau, *, rank_loss, weighting, rank_sft_coef,
               length_normalize, beta):
    """Pair-level PLE loss on [2P] sequence log-probs -> (loss, ranked, valid, num_dropped).

    Pair k is sequences (2k, 2k+1) with rewards[k] = (s, s_p). It ranks iff s_p - s > tau;
    otherwise it takes the reward-weighted branch. Pairs with a non-finite reward are
    dropped from the mean; with none left the loss is a graph-connected 0.
    """
    _check_gate_options(rank_loss, weighting, rank_sft_coef, length_normalize, beta)
    num_pairs = _check_rewards(rewards)
    for name, t in (("seq_logps", seq_logps), ("seq_tokens", seq_tokens)):
        if not isinstance(t, Tensor) or t.shape != (2 * num_pairs,):
            raise ValueError(
                f"{name} must be a 1-D tensor of length 2P = {2 * num_pairs} "
                f"(P = rewards.shape[0]), got {_describe(t)}"
            )
        if t.device != rewards.device:
            raise ValueError(f"{name} is on {t.device} but rewards is on {rewards.device}")
    if not seq_logps.dtype.is_floating_point:
        raise ValueError(f"seq_logps must have a floating dtype, got {seq_logps.dtype}")

    logps = seq_logps.reshape(num_pairs, 2)
    if length_normalize:
        logps = logps / seq_tokens.reshape(num_pairs, 2).clamp(min=1).to(logps.dtype)
    l_orig, l_prin = logps.unbind(1)

    scores = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    valid = torch.isfinite(scores).all(dim=1)
    scores = torch.where(valid[:, None], scores, 0.0)  # keep dropped pairs NaN-free
    s, s_p = scores.unbind(1)
    ranked = valid & (s_p - s > _threshold(tau, scores))

    if rank_loss == "hinge":
        rank_term = torch.relu(l_orig - l_prin)
    else:
        rank_term = -F.logsigmoid(beta * (l_prin - l_orig))
    ranking = rank_term - rank_sft_coef * l_prin

    if weighting == "softmax":
        weights = torch.softmax(scores, dim=1)
    else:
        w_orig = torch.tanh((s - s_p) / 2)
        weights = torch.stack([w_orig, -w_orig], dim=1)
    weighted = -(weights.to(logps.dtype) * logps).sum(dim=1)

    per_pair = torch.where(valid, torch.where(ranked, ranking, weighted), 0.0)
    num_valid = valid.sum()
    loss = per_pair.sum() / num_valid.clamp(min=1).to(per_pair.dtype)
    return loss, ranked, valid, num_pairs - num_valid


def ple_loss(hidden, weight, labels, seq_index, rewards, tau, *, rank_loss="hinge", weighting="softmax",
             rank_sft_coef=1.0, length_normalize=True, beta=1.0, impl="auto", softcap=None,
             temperature=1.0, pair_rows=None) -> PLELossOutput:
    """Gated PLE loss of P pairs packed as 2P sequences (see sequence_logprobs, gated_loss).

    pair_rows: the scored rows of each pair (the lengths of its two responses), from the host where the
    caller has them; impl="whole_pairs" bounds its chunks with them instead of reading seq_index back."""
    _check_impl(impl)
    _check_gate_options(rank_loss, weighting, rank_sft_coef, length_normalize, beta)
    num_pairs = _check_rewards(rewards)
    if isinstance(hidden, Tensor) and rewards.device != hidden.device:
        raise ValueError(f"rewards is on {rewards.device} but hidden is on {hidden.device}")
    num_seqs = 2 * num_pairs
    if impl == "whole_pairs":
        labels, seq_index, softcap, temperature = _check_logprob_args(
            hidden, weight, labels, seq_index, num_seqs, softcap, temperature)
        _check_index_ranges(labels, seq_index, num_seqs, weight.shape[0])
        if _resolve_impl(impl, hidden, weight) == "whole_pairs":          # fp64 goes on to the torch path
            gate = dict(tau=tau, rank_loss=rank_loss, weighting=weighting, rank_sft_coef=rank_sft_coef,
                        length_normalize=length_normalize, beta=beta)
            return _whole_pairs_loss(hidden, weight, labels, seq_index, rewards, gate, softcap, temperature,
                                     pair_rows)
    seq_logps = sequence_logprobs(
        hidden, weight, labels, seq_index, num_seqs, impl=impl, softcap=softcap, temperature=temperature
    )
    seq_tokens = sequence_token_counts(seq_index, num_seqs)
    loss, ranked, valid, num_dropped = gated_loss(
        seq_logps, seq_tokens, rewards, tau, rank_loss=rank_loss, weighting=weighting,
        rank_sft_coef=rank_sft_coef, length_normalize=length_normalize, beta=beta,
    )
    return PLELossOutput(loss, seq_logps, seq_tokens, ranked, valid, num_dropped)


# ----------------------------------------------------------------------------------------
# whole_pairs: chunks of whole pairs, the loss gradient known inside each chunk (6NHV)

# Scored rows per chunk: [rows, V] logits of the GEMM dtype are the one large buffer (2048 rows of a
# 128k vocabulary in bf16: 512 MiB); a pair longer than this is a chunk of its own. Read at call time.
WHOLE_PAIR_ROWS = 2048


def _pair_chunks(rows_per_pair: list[int], chunk_rows: int) -> list[tuple[int, int, int, int]]:
    """(first pair, end pair, first row, end row) of consecutive pairs holding at most chunk_rows rows."""
    chunks, lo, row_lo, rows = [], 0, 0, 0
    for k, n in enumerate(rows_per_pair):
        if rows and rows + n > chunk_rows:
            chunks.append((lo, k, row_lo, row_lo + rows))
            lo, row_lo, rows = k, row_lo + rows, 0
        rows += n
    if rows or lo < len(rows_per_pair):
        chunks.append((lo, len(rows_per_pair), row_lo, row_lo + rows))
    return chunks


_FP32_INPUT_ADDMM: dict[str, bool] = {}     # device type -> whether addmm takes an fp32 input for half a, b


def _addmm_fp32_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out (fp32) += a @ b. Half a, b: one GEMM with beta = 1 into the fp32 `out` where this torch's addmm
    takes an fp32 input (out_dtype); else a half GEMM with an fp32 result, then an add (a [V, H] temporary)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b)
    kind = out.device.type
    if _FP32_INPUT_ADDMM.get(kind, True):
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            _FP32_INPUT_ADDMM[kind] = True
            return out
        except (NotImplementedError, RuntimeError, TypeError):
            _FP32_INPUT_ADDMM[kind] = False
    return out.add_(torch.mm(a, b, out_dtype=out.dtype))


def _whole_pairs_loss(hidden, weight, labels, seq_index, rewards, gate, softcap, temperature,
                      pair_rows) -> PLELossOutput:
    num_pairs = rewards.shape[0]
    if pair_rows is not None:
        pair_rows = [int(n) for n in pair_rows]
        if len(pair_rows) != num_pairs or min(pair_rows, default=0) < 0 or sum(pair_rows) > hidden.shape[0]:
            raise ValueError(f"pair_rows must give the scored rows of each of the {num_pairs} pairs, at most "
                             f"{hidden.shape[0]} in all; got {len(pair_rows)} values summing to {sum(pair_rows)}")
    loss, ranked, valid, dropped, seq_logps, seq_tokens = _WholePairsLoss.apply(
        hidden, weight, labels, seq_index, rewards, gate, softcap, temperature, WHOLE_PAIR_ROWS, pair_rows)
    return PLELossOutput(loss, seq_logps, seq_tokens, ranked, valid, dropped)


class _WholePairsLoss(torch.autograd.Function):
    """The PLE loss with its gradients made in the forward, chunk by chunk of whole pairs; the backward
    scales them by the upstream gradient. Outputs other than the loss carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, seq_index, rewards, gate, softcap, temperature, chunk_rows,
                pair_rows):
        acc = torch.float32
        num_pairs, device = rewards.shape[0], hidden.device
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mm_dtype = hidden.dtype if hidden.is_cuda and hidden.dtype in _HALF_DTYPES else acc   # autocast's choice
        seq_tokens = sequence_token_counts(seq_index, 2 * num_pairs)
        pair_of_row = torch.where(seq_index >= 0, seq_index // 2, num_pairs)
        order = torch.argsort(pair_of_row, stable=True)           # rows grouped by pair, unscored last
        if pair_rows is None:                                       # the chunk bounds: one host read
            pair_rows = seq_tokens.view(num_pairs, 2).sum(dim=1).tolist()
        scores = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
        valid = torch.isfinite(scores).all(dim=1)
        num_valid = valid.sum()
        seq_logps = torch.zeros(2 * num_pairs, dtype=acc, device=device)
        ranked = torch.zeros(num_pairs, dtype=torch.bool, device=device)
        loss = torch.zeros((), dtype=acc, device=device)
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if need_dx else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_dw else None
        with torch.autocast(device.type, enabled=False):
            w = weight.to(mm_dtype)
            for lo, hi, row_lo, row_hi in _pair_chunks(pair_rows, chunk_rows):
                rows = order[row_lo:row_hi]
                x = hidden.index_select(0, rows).to(mm_dtype)
                z = x @ w.T                                        # [R, V]: the chunk's one large buffer
                chunk_labels = labels.index_select(0, rows)
                lse, target = row_stats(z, chunk_labels, softcap, temperature)
                local = seq_index.index_select(0, rows) - 2 * lo
                chunk_logps = torch.zeros(2 * (hi - lo), dtype=acc, device=device).index_add_(0, local, target - lse)
                chunk_logps.requires_grad_(need_dx or need_dw)
                with torch.enable_grad():
                    part, chunk_ranked, chunk_valid, _ = gated_loss(chunk_logps, seq_tokens[2 * lo:2 * hi],
                                                                   rewards[lo:hi], **gate)
                    part = part * chunk_valid.sum().clamp(min=1) / num_valid.clamp(min=1)   # its share of the mean
                loss += part.detach()
                ranked[lo:hi] = chunk_ranked
                seq_logps[2 * lo:2 * hi] = chunk_logps.detach()
                if not (need_dx or need_dw) or row_hi == row_lo:
                    continue
                (g_seq,) = torch.autograd.grad(part, chunk_logps)
                g_row = g_seq.index_select(0, local)
                dz = logit_grad_(z, chunk_labels, lse, softcap, temperature)      # unscaled: no half underflow
                if need_dx:
                    d_hidden.index_copy_(0, rows, _mm(dz, w, acc).mul_(g_row[:, None]))
                if need_dw:
                    if mm_dtype == torch.float16:      # g (~1 / pair tokens) underflows fp16: normalise, rescale
                        scale = g_row.abs().max().clamp(min=torch.finfo(acc).tiny)
                        gx = (x.to(acc) * (g_row / scale)[:, None]).to(mm_dtype)
                        d_weight.add_(_mm(dz.T, gx, acc).mul_(scale))
                    else:
                        _addmm_fp32_(d_weight, dz.T, (x.to(acc) * g_row[:, None]).to(mm_dtype))
        ctx.save_for_backward(d_hidden.to(hidden.dtype) if need_dx else None,
                              d_weight.to(weight.dtype) if need_dw else None)
        outputs = (ranked, valid, num_pairs - num_valid, seq_logps, seq_tokens)
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):
        if getattr(ctx, "used", False):
            raise RuntimeError("ple_loss(impl='whole_pairs'): its gradients are scaled in place, so a second "
                               "backward through the same loss (retain_graph=True) is not supported")
        ctx.used = True
        d_hidden, d_weight = ctx.saved_tensors     # scaled in place: a [V, H] dW is not allocated twice
        return (None if d_hidden is None else d_hidden.mul_(grad_loss.to(d_hidden.dtype)),
                None if d_weight is None else d_weight.mul_(grad_loss.to(d_weight.dtype)),
                None, None, None, None, None, None, None, None)
