"""Decode attention over the static KV cache: one query token per row, grouped heads read K/V once.

Row b's query at position pos[b] attends to cache slots 0..pos[b] (slot == position; with a
sliding window only slots > pos[b] - window), of the first kv_length slots of its cache row. The
G query heads of one KV head form a [G, D] tile (padded to 16 rows for tl.dot), so each K/V
block is read once per KV head, not once per query head, and no mask tensor exists.

Why not SDPA with a boolean mask (the eager path): the masked SDPA kernel tiles queries in
blocks of 64, so a decode step's 1-4 query rows per head waste most of its tensor-core work, and
the mask is another [B, L] read per layer; decode is meant to be bound by reading the cache.

Given the step's new K/V, the kernel first writes them into their slot (the split whose keys hold
that slot writes it, then a block barrier), so the step needs no separate cache-write kernels.
Given also the step's rotary cos/sin, it applies the rotary embedding to the query and the new key
first (HF's rotate-half form, rounded as HF rounds it), which saves the ~10 kernels per layer that
eager `apply_rotary_pos_emb` costs.

Work is split over (row, KV head, key split); each program runs an online softmax over its
keys and writes (max, sum, unnormalised output); `combine` merges the splits in fp32. Splits
keep the GPU busy when B * kv_heads is small (batch 32 with 8 KV heads is 256 programs); when
one split suffices (batch 256: 2048 programs) the kernel writes the normalised output itself, as
a decode step of a small model is as much bound by its count of tiny kernels as by bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ple_fast.kernels._common import INTERPRETED, cdiv, dot_precision, next_power_of_2, require_runnable
from ple_fast.kernels.rotary import FP_FUSION as ROTARY_FP_FUSION, _rotary, _rotate_half_partners
from ple_fast.kernels.varlen_attention import _online_softmax_step

BLOCK_L = 64


# other half-precision tiles that bench_rollout times beside gpu_tile_config's, at head dim 64 (the
# attention_kernel[triton ...] rows): which one reads the cache fastest is a measurement, not a guess
CANDIDATE_TILES = (dict(BLOCK=128, num_stages=3, num_warps=4), dict(BLOCK=128, num_stages=3, num_warps=8),
                   dict(BLOCK=64, num_stages=4, num_warps=4), dict(BLOCK=64, num_stages=2, num_warps=8),
                   dict(BLOCK=32, num_stages=4, num_warps=4))


def gpu_tile_config(dtype: torch.dtype) -> dict:
    """Keys per block, pipeline depth and warps: fp32 caches get 32-key blocks and no pipelining, or
    head dim 256 would need 280 KB of shared memory (tests/compile_kernels.py checks the fit).
    bench_rollout's `attention_kernel[triton ...]` rows time other tiles beside this one."""
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK=BLOCK_L, num_stages=3, num_warps=4)
    return dict(BLOCK=32, num_stages=1, num_warps=4)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, new_k_ptr, new_v_ptr,
                             cos_ptr, sin_ptr,
                             stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_kl,
                             stride_vb, stride_vh, stride_vl, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                             stride_cos, stride_sin, stride_ob, stride_oh, stride_og,
                             kv_heads, groups, head_dim, kv_length, keys_per_split, window, scale,
                             HAS_WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                             FINAL: tl.constexpr, WRITE: tl.constexpr, ROPE: tl.constexpr,
                             ROPE_TABLE: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = bh // kv_heads
    h = bh % kv_heads
    pos = tl.load(pos_ptr + b)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    ls = tl.arange(0, BLOCK)
    q_mask = (gs < groups)[:, None] & (ds < head_dim)[None, :]
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + gs[:, None] * stride_qg
    q = tl.load(q_rows + ds[None, :], mask=q_mask, other=0.0)
    if ROPE:
        first_half, partner = _rotate_half_partners(ds, head_dim)
        rope_row = pos.to(tl.int64) if ROPE_TABLE else b.to(tl.int64)     # a table by position, or a row per b
        cos = tl.load(cos_ptr + rope_row * stride_cos + ds, mask=ds < head_dim, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rope_row * stride_sin + ds, mask=ds < head_dim, other=0.0).to(tl.float32)
        q_partner = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0)
        q = _rotary(q, q_partner, first_half[None, :], cos[None, :], sin[None, :], q_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(tl.minimum(lo + keys_per_split, kv_length), pos + 1)
    if WRITE:   # this step's K/V go to slot pos, by the one split that reads it, before it reads it
        if (pos >= lo) & (pos < lo + keys_per_split):
            d_ok = ds < head_dim
            new_k_row = new_k_ptr + b.to(tl.int64) * stride_nkb + h * stride_nkh
            new_k = tl.load(new_k_row + ds, mask=d_ok)
            if ROPE:
                new_k = _rotary(new_k, tl.load(new_k_row + partner, mask=d_ok), first_half, cos, sin,
                                new_k_ptr.dtype.element_ty)
            new_v = tl.load(new_v_ptr + b.to(tl.int64) * stride_nvb + h * stride_nvh + ds, mask=d_ok)
            tl.store(k_base + pos.to(tl.int64) * stride_kl + ds, new_k.to(k_ptr.dtype.element_ty), mask=d_ok)
            tl.store(v_base + pos.to(tl.int64) * stride_vl + ds, new_v.to(v_ptr.dtype.element_ty), mask=d_ok)
        tl.debug_barrier()      # the block's threads see the stores before loading that slot
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
        lo = tl.maximum(lo, first // BLOCK * BLOCK)                # skip blocks wholly outside the window
    else:
        first = 0
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK):
        slots = start + ls
        valid = (slots < hi) & (slots >= first)
        kv_mask = valid[:, None] & (ds < head_dim)[None, :]
        k = tl.load(k_base + slots.to(tl.int64)[:, None] * stride_kl + ds[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slots.to(tl.int64)[:, None] * stride_vl + ds[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale    # [BLOCK_G, BLOCK]
        s = tl.where(valid[None, :], s, float("-inf"))
        m, l, acc = _online_softmax_step(s, m, l, acc, v, PRECISION)
    if FINAL:   # one split: normalise here, in the query's layout and dtype (no merge kernels)
        l_safe = tl.where(l > 0, l, 1.0)
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + gs[:, None] * stride_og + ds[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        out = (bh * num_splits + split).to(tl.int64)
        tl.store(m_ptr + out * BLOCK_G + gs, m)
        tl.store(l_ptr + out * BLOCK_G + gs, l)
        tl.store(acc_ptr + (out * BLOCK_G + gs[:, None]) * BLOCK_D + ds[None, :], acc)


def _splits(rows: int, kv_heads: int, kv_length: int, device: torch.device) -> int:
    """Key splits: enough programs for one wave of the SMs, at least BLOCK_L keys each.

    One wave, not more: splitting costs the partial buffers and the torch-op merge (~10 small kernels
    per layer). On an H200 at batch 32 x 8 KV heads (256 programs), the two splits the earlier
    two-wave rule chose made the 1B Llama's decode step slower than masked SDPA, 3.23 against
    2.96 ms (bench/results/2026-11-28-h200-suite); 256 programs already fill 132 SMs."""
    if device.type != "cuda":     # the interpreter: one split for few keys, else exercise the merge
        return min(2, cdiv(kv_length, BLOCK_L))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = cdiv(sms, max(1, rows * kv_heads))
    return max(1, min(want, cdiv(kv_length, BLOCK_L)))


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, positions: Tensor, kv_length: int,
                     scale: float, sliding_window: int | None = None, new_keys: Tensor | None = None,
                     new_values: Tensor | None = None, cos: Tensor | None = None, sin: Tensor | None = None,
                     rope_table: bool = False, tile: dict | None = None) -> Tensor:
    """query [B, Hq, 1, D]; keys/values [B, Hkv, C, D] cache views (D contiguous, C >= kv_length);
    positions [B] int64 (the query's slot). Returns [B, Hq, 1, D] in the query's dtype.

    With new_keys / new_values ([B, Hkv, 1, D] or [B, Hkv, D]) the kernel first writes them into
    slot positions[b] of the cache (in place), saving the step its separate cache-write kernels.
    With cos / sin ([B, D] or [B, 1, D], the model's rotary embedding at positions[b]) the query and
    the new keys come unrotated and the kernel rotates them (HF's rotate-half convention). With
    rope_table, cos / sin are [T, D] tables of every position (T > every positions[b]), and row
    positions[b] is read: a decode step then needs no rotary kernels of its own. tile: BLOCK,
    num_stages and num_warps instead of `gpu_tile_config`'s (benches compare tiles with it)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    require_runnable(query.device, "decode_attention", "use the SDPA path")
    if q_len != 1 or q_heads % kv_heads or keys.shape[-1] != dim or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"decode_attention: query {tuple(query.shape)} and cache {tuple(keys.shape)} do not "
                         "form a one-token decode step with unit-stride head dims")
    write, rope = new_keys is not None, cos is not None
    if rope:
        if not write or sin is None or dim % 2:
            raise ValueError("decode_attention: the rotary embedding needs cos and sin, the new keys it rotates, "
                             f"and an even head dim (got {dim})")
        if rope_table:
            if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != dim:
                raise ValueError(f"decode_attention: rope tables must be [positions, {dim}], got cos "
                                 f"{tuple(cos.shape)} and sin {tuple(sin.shape)}")
        else:
            cos, sin = (t.reshape(batch, dim) for t in (cos, sin))
        if cos.stride(-1) != 1 or sin.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = positions               # unused (ROPE=False)
    if write:
        new_keys, new_values = (t.reshape(batch, kv_heads, dim) for t in (new_keys, new_values))
        if new_keys.stride(-1) != 1 or new_values.stride(-1) != 1:
            new_keys, new_values = new_keys.contiguous(), new_values.contiguous()
    else:
        new_keys = new_values = keys        # unused (WRITE=False)
    groups = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, groups, dim)       # a view where it can be (a merged q / k / v output)
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_g = max(16, next_power_of_2(groups))
    block_d = max(16, next_power_of_2(dim))
    splits = _splits(batch, kv_heads, kv_length, query.device)
    tile = tile or gpu_tile_config(query.dtype)
    keys_per_split = cdiv(cdiv(kv_length, splits), tile["BLOCK"]) * tile["BLOCK"]
    final = splits == 1
    out = torch.empty(batch, kv_heads, groups, dim, dtype=query.dtype, device=query.device)
    if final:     # the kernel writes out ([B, Hkv, G, D], contiguous) itself; the partial buffers go unused
        m = l = acc = out
    else:
        m = torch.empty(batch * kv_heads, splits, block_g, dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        acc = torch.empty(batch * kv_heads, splits, block_g, block_d, dtype=torch.float32, device=query.device)
    if batch:
        _decode_attention_kernel[(batch * kv_heads, splits)](
            q, keys, values, positions, m, l, acc, out, new_keys, new_values, cos, sin,
            q.stride(0), q.stride(1), q.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            new_keys.stride(0), new_keys.stride(1), new_values.stride(0), new_values.stride(1),
            cos.stride(0), sin.stride(0), out.stride(0), out.stride(1), out.stride(2),
            kv_heads, groups, dim, kv_length, keys_per_split, int(sliding_window or 0), float(scale),
            HAS_WINDOW=sliding_window is not None, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK=tile["BLOCK"],
            PRECISION=dot_precision(query.dtype), UPCAST=INTERPRETED and query.dtype == torch.bfloat16,
            FINAL=final, WRITE=write, ROPE=rope, ROPE_TABLE=rope and rope_table, num_warps=tile["num_warps"],
            num_stages=tile["num_stages"], enable_fp_fusion=ROTARY_FP_FUSION if rope else True,
        )
    if not final:
        out = combine(m, l, acc)[:, :groups, :dim].reshape(batch, kv_heads, groups, dim).to(query.dtype)
    return out.reshape(batch, q_heads, 1, dim)


def combine(m: Tensor, l: Tensor, acc: Tensor) -> Tensor:
    """Merge per-split online-softmax states [R, S, G], [R, S, G], [R, S, G, D] -> [R, G, D]."""
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)      # rows of padding (g >= groups)
    weight = torch.exp(m - top)                                         # 0 for a split with no key
    total = (l * weight).sum(dim=1)
    out = (acc * weight.unsqueeze(-1)).sum(dim=1)
    return out / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)


def decode_attention_reference(query: Tensor, keys: Tensor, values: Tensor, positions: Tensor, kv_length: int,
                               scale: float, sliding_window: int | None = None) -> Tensor:
    """The same attention in fp64 with an explicit mask and repeated KV heads: the test oracle."""
    batch, q_heads, _, dim = query.shape
    groups = q_heads // keys.shape[1]
    k = keys[:, :, :kv_length].double().repeat_interleave(groups, dim=1)
    v = values[:, :, :kv_length].double().repeat_interleave(groups, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scale                # [B, Hq, 1, L]
    slots = torch.arange(kv_length, device=query.device)
    allowed = slots[None, :] <= positions[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[None, :] > positions[:, None] - sliding_window)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(query.dtype)
