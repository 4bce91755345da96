"""A decode step's bookkeeping in one kernel: pick, record, check EOS, advance.

After the head and the sampler, the engine's step records the token of every row: a finished row
gets the pad id, the token goes to column `step` of the output and becomes the next step's input,
a row that produced an EOS id is finished, and the step counter and positions advance. In torch
that is ~8 kernels (where, index_copy_, eq, any, logical_or_, copy_, two add_), plus the argmax,
gather and cast that pick each row's winner among the race sampler's splits: each a few
microseconds for a few hundred integers, ~5% of a 1B model's decode step in a CUDA graph.

One program does it all, so the step counter it reads and the one it writes cannot race: rows go
in blocks of BLOCK. `record_step_reference` is the torch sequence it replaces (and the CPU path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import next_power_of_2, require_runnable


_NO_TOKEN = tl.constexpr(2147483647)     # an int32 column above any vocabulary


@triton.jit
def _record_kernel(next_ptr, score_ptr, col_ptr, tokens_ptr, positions_ptr, done_ptr, out_ptr, step_ptr, pad_ptr,
                   eos_ptr, batch, num_splits, num_eos, stride_out,
                   RACE: tl.constexpr, ADVANCE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    step = tl.load(step_ptr)
    pad = tl.load(pad_ptr)
    es = tl.arange(0, BLOCK_E)
    eos = tl.load(eos_ptr + es, mask=es < num_eos, other=0)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, batch, BLOCK):
        rows = start + lanes
        ok = rows < batch
        if RACE:    # each row's best (score, column) per split: the top score's lowest column
            ss = tl.arange(0, BLOCK_S)
            tile = ok[:, None] & (ss < num_splits)[None, :]
            at = rows.to(tl.int64)[:, None] * num_splits + ss[None, :]
            score = tl.load(score_ptr + at, mask=tile, other=float("-inf"))
            col = tl.load(col_ptr + at, mask=tile, other=_NO_TOKEN)
            top = tl.max(score, axis=1)
            token = tl.min(tl.where(score == top[:, None], col, _NO_TOKEN), axis=1).to(tl.int64)
        else:
            token = tl.load(next_ptr + rows, mask=ok, other=0)
        done = tl.load(done_ptr + rows, mask=ok, other=0) != 0
        token = tl.where(done, pad, token)
        is_eos = (token[:, None] == eos[None, :]) & (es < num_eos)[None, :]
        done = done | (tl.sum(is_eos.to(tl.int32), axis=1) > 0)
        tl.store(out_ptr + rows.to(tl.int64) * stride_out + step, token, mask=ok)
        tl.store(done_ptr + rows, done.to(tl.uint8), mask=ok)
        tl.store(tokens_ptr + rows, token, mask=ok)
        if ADVANCE:
            tl.store(positions_ptr + rows, tl.load(positions_ptr + rows, mask=ok) + 1, mask=ok)
    tl.store(step_ptr, step + 1)


def _check(tokens: Tensor, positions: Tensor, done: Tensor, out: Tensor, step: Tensor, pad: Tensor,
           eos: Tensor) -> None:
    batch = tokens.shape[0]
    expected = (("tokens", tokens, torch.int64, (batch,)), ("positions", positions, torch.int64, (batch,)),
                ("done", done, torch.bool, (batch,)), ("step", step, torch.int64, (1,)),
                ("pad", pad, torch.int64, ()), ("eos", eos, torch.int64, (eos.numel(),)))
    for name, t, dtype, shape in expected:
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != tokens.device or not t.is_contiguous():
            raise ValueError(f"record_step: {name} must be a contiguous {dtype} tensor of shape {shape} on "
                             f"{tokens.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if out.dtype != torch.int64 or out.dim() != 2 or out.shape[0] != batch or out.stride(1) != 1:
        raise ValueError(f"record_step: out must be int64 [{batch}, steps] with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)}")
    require_runnable(tokens.device, "record_step", "use record_step_reference")


def record_step(tokens: Tensor, positions: Tensor, done: Tensor, out: Tensor, step: Tensor, pad: Tensor,
                eos: Tensor, *, sampled: Tensor | None = None, candidates: tuple[Tensor, Tensor] | None = None,
                advance: bool = False) -> None:
    """In place: token[b] = pad if done[b] else the row's pick; out[b, step] = tokens[b] = token[b];
    done[b] |= token[b] in eos; step += 1; positions += 1 if advance.

    The pick is sampled[b] ([B] int64), or from the race sampler's candidates (best score [B, S]
    fp32, its column [B, S] int32: the top score, the lowest column on a tie, as
    ple_fast.kernels.sampling.race_sample picks). step [1], pad [] and eos [E] are int64 device
    tensors, read on the device (graph-safe)."""
    _check(tokens, positions, done, out, step, pad, eos)
    if (sampled is None) == (candidates is None):
        raise ValueError("record_step: give either sampled tokens or race candidates")
    batch = tokens.shape[0]
    if candidates is not None:
        score, col = candidates
        if score.shape != col.shape or score.dim() != 2 or score.shape[0] != batch or \
                score.dtype != torch.float32 or col.dtype != torch.int32:
            raise ValueError(f"record_step: candidates must be fp32 and int32 [{batch}, splits], got "
                             f"{score.dtype} {tuple(score.shape)} and {col.dtype} {tuple(col.shape)}")
        score, col, splits = score.contiguous(), col.contiguous(), score.shape[1]
        sampled = tokens                                # unused (RACE=True)
    else:
        if sampled.shape != (batch,) or sampled.dtype != torch.int64:
            raise ValueError(f"record_step: sampled must be int64 [{batch}], "
                             f"got {sampled.dtype} {tuple(sampled.shape)}")
        score, col, splits = tokens, tokens, 1          # unused (RACE=False)
    if batch == 0:
        step.add_(1)
        return
    # an empty eos tensor may have no storage to point at; num_eos = 0 masks every read
    eos_arg = eos if eos.numel() else step
    _record_kernel[(1,)](
        sampled.contiguous(), score, col, tokens, positions, done.view(torch.uint8), out, step, pad, eos_arg,
        batch, splits, eos.numel(), out.stride(0),
        RACE=candidates is not None, ADVANCE=advance, BLOCK=max(16, min(256, next_power_of_2(batch))),
        BLOCK_S=max(2, next_power_of_2(splits)), BLOCK_E=max(2, next_power_of_2(eos.numel())),
        num_warps=8,
    )


def record_step_reference(tokens: Tensor, positions: Tensor, done: Tensor, out: Tensor, step: Tensor, pad: Tensor,
                          eos: Tensor, *, sampled: Tensor | None = None,
                          candidates: tuple[Tensor, Tensor] | None = None, advance: bool = False) -> None:
    """The same in torch ops (the engine's path where Triton does not run, and the test oracle)."""
    if candidates is not None:
        score, col = candidates
        sampled = col.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1).long()
    token = torch.where(done, pad, sampled)
    out.index_copy_(1, step, token.unsqueeze(1))
    done.logical_or_((token.unsqueeze(1) == eos.unsqueeze(0)).any(dim=1))
    tokens.copy_(token)
    step.add_(1)
    if advance:
        positions.add_(1)
