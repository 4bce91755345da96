"""ple_loss(impl="pairs"): chunk by whole pairs, loss gradient formed in the forward.

The PLE loss is separable by pair (DESIGN.md §1): a pair's loss depends only on its own two
sequence log-probs. So once a chunk holds every scored row of its pairs, the forward can finish
those pairs' sequence log-probs, take the pair-loss gradient g = d loss / d seq_logp, and turn
the chunk's logits into d loss / d logits at once, while they are still in memory:

  per chunk of R rows (whole pairs), acc = fp32 (fp64 when an input is fp64):
    z   = X_c @ W^T              GEMM 1, 2RHV   [R, V] acc buffer (cuBLAS, fp32 accumulation)
    softcap / temperature, lse, token log-probs, the chunk's sequence log-probs
    g   = d loss / d seq_logp    autograd through loss.gated_loss on the chunk's [2p] tensor,
                                 rescaled from the chunk's valid-pair count to the batch's
    dz  = g/T * (onehot(label) - softmax(z)) [* (1 - tanh^2) under softcap], in place over z
    dX_c  = dz @ W               GEMM 2, 2RHV
    dW   += dz^T @ X_c           GEMM 3, 2RHV   (fp32 accumulator)
  3 GEMMs per chunk, 6NHV in all (N = scored rows: unscored rows are never computed), against
  8NHV of the recompute design (impl="torch" / "triton"), and O(R * V) memory.

The backward only scales the stored dX, dW by the incoming gradient of the loss. That is the
fast path. The op also returns seq_logps, differentiable as the DESIGN contract asks; if a
gradient reaches them too, that part is added exactly with the recompute path
(loss._chunked_logprob_grads, 2 more GEMMs per chunk), so every use stays correct but only the
loss-only backward is 6NHV.

Costs of the design, against the recompute design:
  * ONE host sync per call: the chunk boundaries (whole pairs, about `chunk_rows` rows) are
    planned on the host from per-pair row counts (one small .tolist()). Unlike impl="torch"
    and "triton", impl="pairs" therefore cannot sit inside a CUDA graph, and torch.compile
    breaks its graph there.
  * dX ([N, H], hidden's dtype) and dW ([V, H], weight's dtype; an fp32 [V, H] accumulator while
    the forward runs when weight is half precision) are held from the forward to the backward.
  * The forward does the gradient work whenever hidden or weight requires grad and grad mode is
    on; under torch.no_grad() it is a plain 2NHV forward.
Peak per chunk, R rows: one [R, V] acc buffer (z, then softmax, then dz in place), plus an
[R, V] copy of dz in the GEMM dtype when that is half precision (CUDA), plus one more [R, V] acc
buffer under softcap (tanh values and softmax both live); and [R, H] row gathers.

Rows need not be grouped by pair: scored rows are taken in pair order (a stable argsort by pair,
unscored rows dropped); a chunk whose rows are one contiguous run of `hidden` is sliced, any
other chunk is gathered with index_select and its dX scattered back.
`sequence_logprobs(impl="pairs")` has no loss to fold in and runs the torch path
(see ple_fast.loss.sequence_logprobs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ple_fast import loss as _loss
from ple_fast.loss import PLELossOutput, gated_loss, sequence_token_counts

# ----------------------------------------------------------------------------------------
# planning: pair order and chunk boundaries (the one host sync)


def _plan(seq_index: Tensor, num_pairs: int, chunk_rows: int):
    """(order, chunks): `order` [N] puts scored rows first, stably sorted by pair; each chunk is
    (pair_lo, pair_hi, pos_lo, pos_hi, rows) with its rows order[pos_lo:pos_hi], which are all
    the scored rows of pairs [pair_lo, pair_hi); `rows` is a slice of hidden when they are one
    contiguous run of rows, else None."""
    num_rows = seq_index.shape[0]
    device = seq_index.device
    scored = seq_index >= 0
    pair = torch.where(scored, torch.div(seq_index, 2, rounding_mode="floor"), num_pairs)
    order = torch.argsort(pair, stable=True)
    pair_sorted = pair[order]
    # scored rows already in pair order <=> the stable sort kept them in row order
    in_order = ((order[1:] > order[:-1]) | (pair_sorted[1:] == num_pairs)).all()
    row_ids = torch.arange(num_rows, device=device)
    counts = torch.zeros(num_pairs + 1, dtype=torch.int64, device=device).index_add_(
        0, pair, torch.ones_like(pair))
    first = torch.full((num_pairs + 1,), num_rows, dtype=torch.int64, device=device).scatter_reduce_(
        0, pair, row_ids, "amin")
    last = torch.full((num_pairs + 1,), -1, dtype=torch.int64, device=device).scatter_reduce_(
        0, pair, row_ids, "amax")
    host = torch.cat([counts[:num_pairs], first[:num_pairs], last[:num_pairs], in_order.long()[None]]).tolist()
    counts, first, last = (host[i * num_pairs:(i + 1) * num_pairs] for i in range(3))
    in_order = bool(host[-1])

    chunks = []

    def close(pair_lo, pair_hi, pos_lo, pos_hi):
        rows = None
        if in_order:
            lo = min(first[k] for k in range(pair_lo, pair_hi) if counts[k])
            hi = max(last[k] for k in range(pair_lo, pair_hi) if counts[k]) + 1
            if hi - lo == pos_hi - pos_lo:  # no unscored row inside the run
                rows = slice(lo, hi)
        chunks.append((pair_lo, pair_hi, pos_lo, pos_hi, rows))

    pair_lo, pos_lo, pos = 0, 0, 0
    for k, count in enumerate(counts):
        if pos > pos_lo and pos - pos_lo + count > chunk_rows:  # a big pair gets a chunk of its own
            close(pair_lo, k, pos_lo, pos)
            pair_lo, pos_lo = k, pos
        pos += count
    if pos > pos_lo:
        close(pair_lo, num_pairs, pos_lo, pos)
    return order, pos, chunks


# ----------------------------------------------------------------------------------------
# pair-loss gradient of one chunk


def _pair_grads(seq_c, tokens_c, rewards_c, tau, gate, num_valid):
    """d (batch loss) / d seq_c for the chunk's pairs: autograd through gated_loss on the chunk
    alone (the mean over the chunk's valid pairs), rescaled to the mean over the batch's."""
    with torch.enable_grad():
        leaf = seq_c.detach().requires_grad_(True)
        loss_c, _, valid_c, _ = gated_loss(leaf, tokens_c, rewards_c, tau, **gate)
        (grad,) = torch.autograd.grad(loss_c, leaf)
    scale = valid_c.sum().clamp(min=1).to(grad.dtype) / num_valid.clamp(min=1).to(grad.dtype)
    return grad * scale


def _scaled(stored: Tensor, grad: Tensor) -> Tensor:
    """stored * grad in stored's dtype, the product taken in fp32 (grad as a 1-element tensor
    joins the type promotion, so a half `stored` does not round grad to half first)."""
    out = torch.empty_like(stored)
    return torch.mul(stored, grad.reshape(1), out=out)


# ----------------------------------------------------------------------------------------
# the autograd.Function


class _PairsPLELoss(torch.autograd.Function):
    """Outputs (loss, seq_logps, ranked, valid, num_dropped); the last three carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, safe_labels, seq_index, rewards, tau, gate, softcap, temperature,
                chunk_rows, need_dx, need_dw):
        ctx.set_materialize_grads(False)
        num_pairs = rewards.shape[0]
        num_seqs = 2 * num_pairs
        acc = _loss._accumulation_dtype(hidden.dtype, weight.dtype)
        mm_dtype = _loss._matmul_dtype(hidden, weight, acc)
        device = hidden.device
        w = weight.to(mm_dtype)
        seq_tokens = sequence_token_counts(seq_index, num_seqs)
        num_valid = torch.isfinite(rewards.detach()).all(dim=1).sum()  # batch's valid pairs, on device
        need_grad = need_dx or need_dw

        order, num_scored, chunks = _plan(seq_index, num_pairs, chunk_rows)  # the host sync
        seq_logps = torch.zeros(num_seqs, dtype=acc, device=device)
        lse_sorted = torch.empty(num_scored, dtype=acc, device=device)  # per scored row, pair order
        d_hidden = torch.zeros_like(hidden) if need_dx else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_dw else None
        scale = None if softcap is None else softcap / temperature

        with torch.autocast(device.type, enabled=False):
            for pair_lo, pair_hi, pos_lo, pos_hi, rows in chunks:
                idx = order[pos_lo:pos_hi]
                if rows is not None:
                    x, lab, seq = hidden[rows], safe_labels[rows], seq_index[rows]
                else:
                    x, lab, seq = hidden.index_select(0, idx), safe_labels[idx], seq_index[idx]
                x = x.to(mm_dtype)
                lab = lab[:, None]
                local = seq - 2 * pair_lo  # slot in the chunk's [2p] sequences
                z = _loss._mm(x, w.T, acc)  # [R, V], fresh: everything below is in place

                if softcap is None:  # logits = z / T
                    if temperature != 1.0:
                        z.div_(temperature)
                    target = z.gather(1, lab).squeeze(1)
                    row_max = z.amax(dim=1)
                    e = z.sub_(row_max[:, None]).exp_()  # exp(logit - max), over z
                    tanh_t = None
                else:  # logits = softcap * tanh(z / softcap) / T = t * scale
                    tanh_t = z.div_(softcap).tanh_()
                    t_target = tanh_t.gather(1, lab).squeeze(1)
                    target = t_target * scale
                    row_max = tanh_t.amax(dim=1) * scale
                    e = torch.add(-row_max[:, None], tanh_t, alpha=scale).exp_()
                sum_e = e.sum(dim=1)
                lse = row_max + sum_e.log()
                token_logps = target - lse
                lse_sorted[pos_lo:pos_hi] = lse
                seq_c = torch.zeros(2 * (pair_hi - pair_lo), dtype=acc, device=device).index_add_(
                    0, local, token_logps)
                seq_logps[2 * pair_lo:2 * pair_hi] = seq_c
                if not need_grad:
                    z = e = tanh_t = None  # free the [R, V] buffers before the next chunk's GEMM
                    continue

                g = _pair_grads(seq_c, seq_tokens[2 * pair_lo:2 * pair_hi], rewards[pair_lo:pair_hi], tau,
                                gate, num_valid)
                g_rows = g[local] / temperature  # d loss / d token logp, times d logits / d (z / T)
                # dz = g_rows * (onehot(label) - softmax) [* (1 - t^2)]: -g_rows * softmax everywhere,
                # then the label's entry set to g_rows * (1 - p_label), with 1 - p = -expm1(logp)
                # accurate for confident tokens.
                label_val = g_rows * torch.expm1(token_logps).neg_()
                coef = (g_rows / sum_e).neg_()[:, None]
                if tanh_t is not None:
                    label_val = label_val * (1.0 - t_target * t_target)
                    e.mul_(coef)
                    tanh_t.square_()
                    coef = None
                dz = e if mm_dtype == acc else torch.empty(e.shape, dtype=mm_dtype, device=device)
                if tanh_t is not None:  # dz = e - e * t^2 (rounded to the GEMM dtype in the same pass)
                    torch.addcmul(e, e, tanh_t, value=-1.0, out=dz)
                elif dz is e:
                    e.mul_(coef)
                else:
                    torch.mul(e, coef, out=dz)  # scale and round to the GEMM dtype in one pass
                z = e = tanh_t = None  # only dz is left of this chunk's [R, V] buffers
                dz.scatter_(1, lab, label_val[:, None].to(dz.dtype))
                if need_dx:
                    dx = _loss._mm(dz, w, acc)
                    if rows is not None:
                        d_hidden[rows] = dx
                    else:
                        d_hidden.index_copy_(0, idx, dx.to(hidden.dtype))
                if need_dw:
                    _loss.accumulate_dw(d_weight, dz, x)
                dz = None

            loss, ranked, valid, num_dropped = gated_loss(seq_logps, seq_tokens, rewards, tau, **gate)
        if need_dw:
            d_weight = d_weight.to(weight.dtype)
        ctx.save_for_backward(hidden, weight, safe_labels, seq_index, order[:num_scored], lse_sorted,
                              d_hidden, d_weight)
        ctx.grad_flags = (need_dx, need_dw)
        ctx.softcap, ctx.temperature, ctx.chunk_rows, ctx.num_seqs = softcap, temperature, chunk_rows, num_seqs
        ctx.mark_non_differentiable(ranked, valid, num_dropped)
        return loss, seq_logps, ranked, valid, num_dropped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_seq, *_):
        hidden, weight, safe_labels, seq_index, order, lse_sorted, stored_dx, stored_dw = ctx.saved_tensors
        need_dx, need_dw = ctx.grad_flags
        need_dx = need_dx and ctx.needs_input_grad[0]
        need_dw = need_dw and ctx.needs_input_grad[1]
        d_hidden = d_weight = None
        if grad_loss is not None:  # the fast path: the gradient was formed in the forward
            d_hidden = _scaled(stored_dx, grad_loss) if need_dx else None
            d_weight = _scaled(stored_dw, grad_loss) if need_dw else None
        if grad_seq is not None and (need_dx or need_dw):
            # seq_logps feed something else too: add that part with the recompute path, over the
            # scored rows in pair order (lse from the forward).
            slots = seq_index[order]
            dx_s, dw_s = _loss._chunked_logprob_grads(
                hidden.index_select(0, order), weight, safe_labels[order], slots, lse_sorted, grad_seq,
                need_dx, need_dw, ctx.softcap, ctx.temperature, ctx.chunk_rows,
            )
            if need_dx:
                d_hidden = torch.zeros_like(hidden) if d_hidden is None else d_hidden
                d_hidden.index_add_(0, order, dx_s)
            if need_dw:
                d_weight = dw_s if d_weight is None else d_weight.add_(dw_s)
        return d_hidden, d_weight, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# public entry


def pairs_ple_loss(hidden, weight, labels, seq_index, rewards, tau, *, rank_loss="hinge", weighting="softmax",
                   rank_sft_coef=1.0, length_normalize=True, beta=1.0, softcap=None, temperature=1.0,
                   chunk_rows=None) -> PLELossOutput:
    """ple_loss(impl="pairs") with an explicit chunk size: `chunk_rows` is about the number of
    scored rows per chunk (chunks hold whole pairs; a pair larger than it gets a chunk of its
    own); None picks it from loss.CHUNK_BYTES like the torch path. Same outputs as
    ple_loss(impl="reference"); one host sync (see the module docstring)."""
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    _loss._check_gate_options(rank_loss, weighting, rank_sft_coef, length_normalize, beta)
    num_pairs = _loss._check_rewards(rewards)
    if isinstance(hidden, Tensor) and rewards.device != hidden.device:
        raise ValueError(f"rewards is on {rewards.device} but hidden is on {hidden.device}")
    num_seqs = 2 * num_pairs
    labels, seq_index, softcap, temperature = _loss._check_logprob_args(
        hidden, weight, labels, seq_index, num_seqs, softcap, temperature
    )
    _loss._check_index_ranges(labels, seq_index, num_seqs, weight.shape[0])
    _loss._threshold(tau, rewards.float())  # validate tau before any work
    if chunk_rows is None:
        chunk_rows = _loss.rows_per_chunk(weight.shape[0], _loss._accumulation_dtype(hidden.dtype, weight.dtype))
    gate = dict(rank_loss=rank_loss, weighting=weighting, rank_sft_coef=rank_sft_coef,
                length_normalize=length_normalize, beta=beta)
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    safe_labels = torch.where(seq_index >= 0, labels, 0)
    loss, seq_logps, ranked, valid, num_dropped = _PairsPLELoss.apply(
        hidden, weight, safe_labels, seq_index, rewards, tau, gate, softcap, temperature, chunk_rows,
        need_dx, need_dw,
    )
    seq_tokens = sequence_token_counts(seq_index, num_seqs)
    return PLELossOutput(loss, seq_logps, seq_tokens, ranked, valid, num_dropped)
