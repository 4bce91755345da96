"""Fused temperature sampling: one read of the logits, random numbers made on chip.

For plain temperature sampling (no top-k / top-p) the exponential race of ple_fast.engine needs
no softmax at all:
    argmax_i  p_i / E_i  =  argmax_i  f(z_i) / T - log E_i,     E_i = -log U_i ~ Exp(1)
(p_i = softmax(f(z) / T)_i; the normaliser is common to every i). So one pass over the [B, V]
logits in their own dtype, with U_i drawn by Philox inside the kernel, replaces the torch path's
fp32 copy, softmax, noise tensor and masked division: at B = 256 and V = 128256 that path moves
about 2 GB per decode step against this kernel's 66 MB, next to a weight + K/V floor of ~5-6 GB.

U_i is a pure function of (seed, row, column, step): Philox-4x32 keyed by `seed`. One Philox call
gives four numbers, and all four are used: column c = 1024 g + 256 k + j (k < 4, j < 256) takes
output k of counter (256 g + j, row, step, 0). A call costs ten rounds of 32-bit multiplies; on an
H200 at B = 256, V = 128256 the kernel that kept one output of four took 0.19 ms of a 2.66 ms
decode step, and this one 0.135 ms (bench/results/2026-11-28-h200-session2). seed and step are
read from device tensors, so a captured CUDA graph draws fresh numbers at every replay as the
engine advances `step` on the device, and a run is reproducible from its seed. `race_uniforms`
writes the same U for tests.

Each program scans SPLIT columns of ROWS rows, GROUP columns at a time, and keeps the best
(score, column) per lane; a tiny torch reduction over the splits picks each row's winner (in the
engine's decode step, the step record kernel does that pick: ple_fast.kernels.step_record).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, require_runnable, tanh


LANES = 256                 # j: counters per Philox call of a [ROWS, LANES] tile
GROUP = 4 * LANES           # columns drawn by one call, four outputs per counter
INTERPRETED_TILE = dict(ROWS=16, SPLIT=GROUP)            # the interpreter pays per program, not per lane
GPU_TILE = dict(ROWS=1, SPLIT=8 * GROUP)                 # B * cdiv(V, 8192) programs: 4096 at B=256, V=128256
assert all(tile["SPLIT"] % GROUP == 0 for tile in (INTERPRETED_TILE, GPU_TILE)), "a split is whole column groups"


@triton.jit
def _uniforms(seed, step, rows, group, LANES: tl.constexpr):
    """The four [ROWS, LANES] U(0, 1) tiles of column group `group`: tile k holds columns
    group * 4 * LANES + k * LANES + j, from output k of Philox counter (group * LANES + j, row, step, 0)."""
    counters = group * LANES + tl.arange(0, LANES)
    zero = rows[:, None] * 0 + counters[None, :] * 0
    bits0, bits1, bits2, bits3 = tl.philox(seed, zero + counters[None, :], zero + rows[:, None], zero + step, zero)
    return (tl.uint_to_uniform_float(bits0), tl.uint_to_uniform_float(bits1), tl.uint_to_uniform_float(bits2),
            tl.uint_to_uniform_float(bits3))


@triton.jit
def _race_update(best_score, best_col, z, u, cols, ok, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """Fold one [ROWS, LANES] tile of logits z and uniforms u into the per-lane best (score, column)."""
    z = z.to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    # -log(E) with E = -log(U); U = 0 gives E = inf and a score of -inf: never chosen
    score = z * inv_temp - tl.log(-tl.log(u))
    score = tl.where(ok, score, float("-inf"))     # the softcap maps a masked -inf to -softcap
    better = score > best_score                    # strict: each lane sees its columns in increasing order,
    best_score = tl.where(better, score, best_score)   # so the first column wins a tie
    best_col = tl.where(better, cols, best_col)
    return best_score, best_col


@triton.jit
def _race_kernel(logits_ptr, seed_ptr, step_ptr, best_score_ptr, best_col_ptr, B, V, stride_row, num_splits,
                 inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr,
                 SPLIT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    seed = tl.load(seed_ptr)
    step = tl.load(step_ptr).to(tl.int32)
    row_ok = rows < B
    lanes = tl.arange(0, LANES)
    best_score = tl.full((ROWS, LANES), float("-inf"), tl.float32)
    best_col = tl.full((ROWS, LANES), 2147483647, tl.int32)
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    for start in range(0, SPLIT, 4 * LANES):
        group = (split * SPLIT + start) // (4 * LANES)
        u0, u1, u2, u3 = _uniforms(seed, step, rows, group, LANES)
        base = group * 4 * LANES + lanes
        for k in tl.static_range(4):
            cols = base + k * LANES
            ok = row_ok[:, None] & (cols < V)[None, :]
            z = tl.load(row_ptrs + cols[None, :], mask=ok, other=float("-inf"))
            u = u0 if k == 0 else (u1 if k == 1 else (u2 if k == 2 else u3))
            best_score, best_col = _race_update(best_score, best_col, z, u, cols[None, :], ok, inv_temp, softcap,
                                                HAS_SOFTCAP)
    top = tl.max(best_score, axis=1)
    col = tl.min(tl.where(best_score == top[:, None], best_col, 2147483647), axis=1)
    tl.store(best_score_ptr + rows * num_splits + split, top, mask=row_ok)
    tl.store(best_col_ptr + rows * num_splits + split, col, mask=row_ok)


@triton.jit
def _uniforms_kernel(out_ptr, seed_ptr, step_ptr, B, V, ROWS: tl.constexpr, LANES: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    u0, u1, u2, u3 = _uniforms(tl.load(seed_ptr), tl.load(step_ptr).to(tl.int32), rows, group, LANES)
    row_ptrs = out_ptr + rows.to(tl.int64)[:, None] * V
    base = group * 4 * LANES + tl.arange(0, LANES)
    for k in tl.static_range(4):
        cols = base + k * LANES
        ok = (rows < B)[:, None] & (cols < V)[None, :]
        u = u0 if k == 0 else (u1 if k == 1 else (u2 if k == 2 else u3))
        tl.store(row_ptrs + cols[None, :], u, mask=ok)


def _tile(device: torch.device) -> dict:
    return GPU_TILE if device.type == "cuda" and not INTERPRETED else INTERPRETED_TILE


def _check(logits: Tensor, seed: Tensor, step: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"race_sample: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    for name, t in (("seed", seed), ("step", step)):
        if t.dtype != torch.int64 or t.numel() != 1 or t.device != logits.device:
            raise ValueError(f"race_sample: {name} must be a one-element int64 tensor on {logits.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    require_runnable(logits.device, "race_sample", "sample with the torch path")


def race_candidates(logits: Tensor, seed: Tensor, step: Tensor, temperature: float,
                    softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Each row's best (score fp32, column int32) per split of SPLIT columns, [B, splits] each: the
    race before its last reduction, which race_sample does in torch and the engine's step record
    (ple_fast.kernels.step_record) inside its own kernel."""
    _check(logits, seed, step)
    if temperature <= 0:
        raise ValueError("race_sample: temperature must be > 0 (temperature 0 is greedy)")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    tile = _tile(logits.device)
    splits = max(1, cdiv(vocab, tile["SPLIT"]))
    best_score = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    best_col = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    if rows:
        _race_kernel[(cdiv(rows, tile["ROWS"]), splits)](
            logits, seed, step, best_score, best_col, rows, vocab, logits.stride(0), splits,
            1.0 / temperature, float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, LANES=LANES, **tile,
            num_warps=4,
        )
    return best_score, best_col


def race_sample(logits: Tensor, seed: Tensor, step: Tensor, temperature: float,
                softcap: float | None = None) -> Tensor:
    """[B] int64 tokens drawn from softmax(f(logits) / temperature), f the optional softcap; seed
    and step are one-element int64 device tensors (read on device: no host sync, graph-safe)."""
    best_score, best_col = race_candidates(logits, seed, step, temperature, softcap)
    winner = best_score.argmax(dim=1, keepdim=True)      # first split on a tie: the lowest column
    return best_col.gather(1, winner).squeeze(1).long()


def race_uniforms(rows: int, vocab: int, seed: Tensor, step: Tensor) -> Tensor:
    """[rows, vocab] fp32: the U(0, 1) that race_sample draws for (seed, step): the test oracle's input."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=seed.device)
    tile = _tile(seed.device)
    if rows and vocab:
        grid = (cdiv(rows, tile["ROWS"]), cdiv(vocab, GROUP))
        _uniforms_kernel[grid](out, seed, step, rows, vocab, ROWS=tile["ROWS"], LANES=LANES)
    return out


def race_sample_reference(logits: Tensor, uniforms: Tensor, temperature: float,
                          softcap: float | None = None) -> Tensor:
    """The same race in fp64 torch from given uniforms: argmax f(z)/T - log(-log U)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    score = z / temperature - torch.log(-torch.log(uniforms.double()))
    return score.argmax(dim=1)
