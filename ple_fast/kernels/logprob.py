"""Fused per-sequence log-probs of the output projection: the [N, V] logits never exist.

    seq_logps[s] = sum_{n: seq_index[n] = s} log_softmax(f(hidden[n] @ weight.T))[labels[n]]
    f(z) = softcap * tanh(z / softcap) / temperature          (softcap optional)

Forward (2NHV FLOPs): one Triton GEMM over (row block, vocab block) tiles. Each tile's
epilogue reduces its logits to a per-row (max, sum exp) pair and, for the one tile that holds
the row's label, the target logit; a tiny torch reduction over the V/BLOCK_V partials gives the
per-row logsumexp. Only O(N * V / BLOCK_V) floats are written.

Backward (6NHV FLOPs): the vocabulary is walked in chunks of `cv` columns. For each chunk a
Triton GEMM recomputes the logits and writes the *unscaled* logit gradient
    dz = (onehot(label) - softmax) * f'(z)                     [N, cv], in the GEMM dtype
and two cuBLAS GEMMs consume it:
    dW[chunk] = dz.T @ (g * hidden)      one GEMM over all N rows: fp32 accumulation inside
    dX32     += dz @ weight[chunk]      fp32 accumulator [N, H] across chunks, scaled by g at the end
where g[n] = d loss / d seq_logps[seq_index[n]]. Chunking over V rather than rows is what keeps
dW exact: each dW row block is finished by one GEMM (no bf16 cross-chunk accumulation, the known
divergence of Liger's FLCE) and the only cross-chunk accumulator is dX32, N*H*4 bytes (256 MiB at
N=16k, H=4k) instead of a V*H*4 = 2 GiB dW accumulator. g is kept out of dz so that fp16 dz does
not underflow when g is small (1 / (pairs * tokens)); g is applied to hidden (normalised by
max|g|) for dW and to the rows of dX32.

Why a V-chunked recompute (8NHV) rather than 6NHV: the per-row upstream gradient depends on a whole
pair's log-probs through the gated loss, so a 6NHV design must chunk by whole pairs and hold an fp32
V x H dW accumulator, which it re-reads every chunk; this design keeps dW exact in fp32 within
~1 GiB at N=16k, H=4k, V=128k. docs/performance.md has the measured comparisons (Liger, Cut
Cross-Entropy, the naive path).

fp64 inputs are not a tensor-core dtype: ple_fast.loss routes them to its chunked torch path (same
contract, fp64 accumulation), which is what gradcheck-level tests use.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ple_fast.kernels._common import INTERPRETED, cdiv, dot_precision, require_runnable, tanh

# Bytes of one [N, cv] dz chunk in backward; read at call time so tests and benches can shrink it.
DZ_CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------
# tile configs


def tile_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tile shape and launch parameters. Hopper/Ampere: the 128x256x64, 8-warp, 3-stage shape
    of Triton's fastest bf16 GEMMs (fp32 halves BLOCK_K to keep shared memory in budget). The
    interpreter (CPU tensors) gets the smallest tl.dot shape so tests stay fast."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, GROUP_N=4, num_warps=1, num_stages=1)
    return gpu_tile_config(torch.cuda.get_device_capability(device)[0], dtype)


def gpu_tile_config(major: int, dtype: torch.dtype) -> dict:
    """The compiled kernels' tile for a GPU of compute capability `major` (tests compile it without a GPU)."""
    block_k = 32 if dtype == torch.float32 else 64
    if major >= 9:
        return dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=block_k, GROUP_N=8, num_warps=8, num_stages=3)
    if major >= 8:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=block_k, GROUP_N=8, num_warps=8, num_stages=3)
    return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=2)



# ----------------------------------------------------------------------------------------
# Triton kernels




@triton.jit
def _tile_index(N, V_TILES, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """Program id -> (row block, vocab block), GROUP_N row blocks at a time so that the
    programs running together share their hidden and weight panels in L2."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_N * V_TILES
    first_row_tile = (pid // in_group) * GROUP_N
    group_rows = tl.minimum(row_tiles - first_row_tile, GROUP_N)
    pid_n = first_row_tile + (pid % in_group) % group_rows
    pid_v = (pid % in_group) // group_rows
    return pid_n, pid_v


@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T. Out-of-range rows/columns are
    wrapped (modulo) instead of masked so the K loop has no M/N masks; callers mask them."""
    ks = tl.arange(0, BLOCK_K)
    safe_rows = (rows % N).to(tl.int64)
    safe_cols = (cols % V).to(tl.int64)
    x_ptrs = x_ptr + safe_rows[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + safe_cols[None, :] * stride_w + ks[:, None]  # [BLOCK_K, BLOCK_V] = weight.T tile
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(ks[None, :] + k0) < H, other=0.0)
            w = tl.load(w_ptrs, mask=(ks[:, None] + k0) < H, other=0.0)
        if DOT_UPCAST:  # exact: a product of two bf16 values is representable in fp32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _lse_partials_kernel(x_ptr, w_ptr, labels_ptr, part_max_ptr, part_sum_ptr, target_ptr,
                         N, V, H, stride_x, stride_w, V_TILES, softcap, inv_temp,
                         HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, EVEN_K: tl.constexpr,
                         PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One logits tile -> per-row (max, sum exp(z - max)) at [pid_v, row], and the target
    logit of the rows whose label falls in this tile."""
    pid_n, pid_v = _tile_index(N, V_TILES, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION, DOT_UPCAST)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    z = z * inv_temp
    z = tl.where(cols[None, :] < V, z, float("-inf"))
    row_max = tl.max(z, axis=1)
    row_sum = tl.sum(tl.exp(z - row_max[:, None]), axis=1)
    row_ok = rows < N
    tl.store(part_max_ptr + pid_v * N + rows, row_max, mask=row_ok)
    tl.store(part_sum_ptr + pid_v * N + rows, row_sum, mask=row_ok)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    hit = cols[None, :] == labels[:, None]
    target = tl.sum(tl.where(hit, z, 0.0), axis=1)
    in_tile = (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_ptr + rows, target, mask=row_ok & in_tile)


@triton.jit
def _dlogits_kernel(x_ptr, w_ptr, labels_ptr, lse_ptr, dz_ptr,
                    N, V, H, stride_x, stride_w, stride_dz, v_start, V_TILES, softcap, inv_temp,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, EVEN_K: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Recomputed logits tile -> dz = (onehot(label) - softmax) * f'(z), written at
    dz[row, col - v_start] for the vocabulary chunk [v_start, v_start + V_TILES * BLOCK_V)."""
    pid_n, pid_v = _tile_index(N, V_TILES, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + chunk_cols
    z = _logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION, DOT_UPCAST)
    row_ok = rows < N
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        logits = (softcap * inv_temp) * t
        scale = (1.0 - t * t) * inv_temp
    else:
        logits = z * inv_temp
        scale = inv_temp
    prob = tl.exp(logits - lse[:, None])
    onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
    dz = (onehot - prob) * scale
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + chunk_cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < V))


# ----------------------------------------------------------------------------------------
# host side


def _launch_args(x: Tensor, w: Tensor, softcap, temperature, cfg: dict) -> dict:
    return dict(
        softcap=float(softcap or 1.0), inv_temp=1.0 / temperature, HAS_SOFTCAP=softcap is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], GROUP_N=cfg["GROUP_N"],
        EVEN_K=x.shape[1] % cfg["BLOCK_K"] == 0, PRECISION=dot_precision(x.dtype),
        DOT_UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def logsumexp_and_target(x: Tensor, w: Tensor, labels: Tensor, softcap, temperature) -> tuple[Tensor, Tensor]:
    """Per-row fp32 logsumexp and target logit of f(x @ w.T) (x, w share a dtype, row-major;
    labels int64 in [0, V)). Forward pass of the fused op, exposed for tests and benches."""
    num_rows, hidden_size = x.shape
    vocab = w.shape[0]
    cfg = tile_config(x.device, x.dtype)
    v_tiles = cdiv(vocab, cfg["BLOCK_V"])
    part_max = torch.empty(v_tiles, num_rows, dtype=torch.float32, device=x.device)
    part_sum = torch.empty_like(part_max)
    target = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return target, target.clone()
    grid = (cdiv(num_rows, cfg["BLOCK_N"]) * v_tiles,)
    _lse_partials_kernel[grid](
        x, w, labels, part_max, part_sum, target, num_rows, vocab, hidden_size,
        x.stride(0), w.stride(0), v_tiles, **_launch_args(x, w, softcap, temperature, cfg),
    )
    row_max = part_max.amax(dim=0)
    lse = row_max + (part_sum * torch.exp(part_max - row_max)).sum(dim=0).log()
    return lse, target


def dlogits_chunk(x: Tensor, w: Tensor, labels: Tensor, lse: Tensor, v_start: int, out: Tensor,
                  softcap, temperature) -> Tensor:
    """Write dz for vocabulary columns [v_start, v_start + out.shape[1]) (clipped at V) into
    out[:, :width] and return that view. The unscaled logit gradient of the backward pass."""
    num_rows, hidden_size = x.shape
    vocab = w.shape[0]
    width = min(out.shape[1], vocab - v_start)
    cfg = tile_config(x.device, x.dtype)
    v_tiles = cdiv(width, cfg["BLOCK_V"])
    if num_rows > 0 and width > 0:
        grid = (cdiv(num_rows, cfg["BLOCK_N"]) * v_tiles,)
        _dlogits_kernel[grid](
            x, w, labels, lse, out, num_rows, vocab, hidden_size, x.stride(0), w.stride(0),
            out.stride(0), v_start, v_tiles, **_launch_args(x, w, softcap, temperature, cfg),
        )
    return out[:, :width]


def _mm_fp32(a: Tensor, b: Tensor, acc: Tensor | None = None) -> Tensor:
    """fp32 result of a @ b (+ acc). Half inputs on CUDA stay half (tensor cores, fp32
    accumulation through out_dtype); elsewhere they are upcast."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    a, b = a.float(), b.float()
    return a @ b if acc is None else torch.addmm(acc, a, b)


def _dz_chunk_cols(num_rows: int, vocab: int, itemsize: int, block_v: int) -> int:
    """Columns per dz chunk: a multiple of BLOCK_V within DZ_CHUNK_BYTES, at least one block."""
    cols = DZ_CHUNK_BYTES // max(1, num_rows * itemsize)
    cols = max(block_v, cols // block_v * block_v)
    return min(cols, cdiv(vocab, block_v) * block_v)


def _as_rowmajor(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


class _FusedSequenceLogprobs(torch.autograd.Function):
    """Saves hidden, weight, labels, slots and per-row logsumexp: O(N) beyond the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, safe_labels, slots, num_seqs, softcap, temperature):
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        x, w = _as_rowmajor(hidden, mm_dtype), _as_rowmajor(weight, mm_dtype)
        lse, target = logsumexp_and_target(x, w, safe_labels, softcap, temperature)
        token_logps = target - lse
        seq_logps = token_logps.new_zeros(num_seqs + 1).index_add_(0, slots, token_logps)[:num_seqs]
        ctx.save_for_backward(hidden, weight, safe_labels, slots, lse)
        ctx.softcap, ctx.temperature = softcap, temperature
        return seq_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_seq):
        hidden, weight, safe_labels, slots, lse = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return (None,) * 7
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        x, w = _as_rowmajor(hidden, mm_dtype), _as_rowmajor(weight, mm_dtype)
        num_rows, hidden_size = x.shape
        vocab = w.shape[0]
        # g[n] = d loss / d token_logp[n]; the extra slot (unscored rows) holds 0
        grad_slots = torch.cat([grad_seq.float(), grad_seq.new_zeros(1, dtype=torch.float32)])
        g = grad_slots[slots]

        cfg = tile_config(x.device, x.dtype)
        chunk = _dz_chunk_cols(num_rows, vocab, x.element_size(), cfg["BLOCK_V"])
        dz_buf = torch.empty(num_rows, chunk, dtype=mm_dtype, device=x.device)
        dx32 = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=x.device) if need_dx else None
        if need_dw:
            d_weight = torch.empty(vocab, hidden_size, dtype=weight.dtype, device=weight.device)
            g_scale = g.abs().amax().clamp(min=1e-30) if num_rows else g.new_ones(())
            gx = (x.float() * (g / g_scale)[:, None]).to(mm_dtype)  # normalised: no fp16 underflow
        for v_start in range(0, vocab, chunk):
            dz = dlogits_chunk(x, w, safe_labels, lse, v_start, dz_buf, ctx.softcap, ctx.temperature)
            v_end = v_start + dz.shape[1]
            if need_dw:
                d_weight[v_start:v_end] = _mm_fp32(dz.T, gx).mul_(g_scale)
            if need_dx:
                dx32 = _mm_fp32(dz, w[v_start:v_end], dx32)
        d_hidden = (dx32 * g[:, None]).to(hidden.dtype) if need_dx else None
        return d_hidden, (d_weight if need_dw else None), None, None, None, None, None


def fused_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, seq_index: Tensor, num_seqs: int,
                            softcap: float | None = None, temperature: float = 1.0) -> Tensor:
    """[num_seqs] fp32 summed token log-probs, differentiable wrt hidden and weight (dW is
    skipped when weight does not require grad). Rows with seq_index -1 are ignored and their
    labels never read.

    The kernel behind ple_fast.loss.sequence_logprobs(impl="triton"), which checks the arguments
    first: hidden [N, H] and weight [V, H] in fp16 / bf16 / fp32 (fp64 is not a tensor-core dtype:
    that entry point routes it to the torch path), labels and seq_index int64 [N], a softcap that
    is None or positive, a positive temperature."""
    if torch.float64 in (hidden.dtype, weight.dtype):
        raise ValueError("fused_sequence_logprobs: fp64 inputs take the torch path (ple_fast.loss)")
    require_runnable(hidden.device, "fused_sequence_logprobs", "use impl='torch'")
    safe_labels = torch.where(seq_index >= 0, labels, 0)
    slots = torch.where(seq_index >= 0, seq_index, num_seqs)
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedSequenceLogprobs.apply(hidden, weight, safe_labels, slots, num_seqs, softcap, temperature)
