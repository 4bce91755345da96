"""Compile every Triton kernel of ple_fast.kernels for a CUDA architecture, without a GPU.

    python tests/compile_kernels.py 90      # sm_90; exits non-zero naming the kernel that failed

The interpreter (how CPU tests run the kernels) accepts programs that the compiler rejects and
never sees the GPU tile shapes, so this compiles each kernel exactly as it launches on a GPU:
the launch's tile constexprs, argument dtypes and warps, down to a cubin with Triton's bundled
ptxas. Run without TRITON_INTERPRET (tests/test_kernels_compile.py does that in a subprocess).
"""
from __future__ import annotations

import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ple_fast.kernels import (_common, decode_attention, logit_rows, logprob, rms_norm, rotary, sampling,
                              step_record, swiglu, varlen_attention)

# per-block shared memory a kernel may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB
SHARED_MEMORY_BYTES = {80: 166912, 90: 232448}
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types by name: the given pointer dtypes, constexprs, fp32 for the float scalars, i32 else."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            raise KeyError(f"{kernel.__name__}: no dtype given for pointer {name}")
        elif name in ("softcap", "inv_temp", "scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def fp_fusion(kernel, constexprs: dict) -> bool:
    """enable_fp_fusion as the kernel's launch sets it: off wherever `_rotary` runs (rounding like HF)."""
    if kernel is rotary._rotary_kernel or (kernel is decode_attention._decode_attention_kernel
                                           and constexprs.get("ROPE")):
        return rotary.FP_FUSION
    return True


FLOAT_FMA = re.compile(r"^\s*fma\.rn(?:\.ftz)?\.(?:bf16|f16|f32)\s+([^;]+);", re.M)
NEGATIVE_ZERO = {"0x8000", "0f80000000"}        # bf16 / f16, f32
ONE = {"0x3F80", "0x3C00", "0f3F800000"}         # bf16, f16, f32


def contracted_fmas(ptx: str) -> int:
    """Floating-point FMAs in PTX that fuse a product with a sum. sm_80 has no bf16 mul or add, and
    emulates them as fma(a, b, -0) and fma(a, 1, b): each rounds once, as the plain op does, so those
    are not counted."""
    constants = dict(re.findall(r"mov\.b(?:16|32)\s+(%\w+),\s*(0[xf][0-9A-Fa-f]+);", ptx))
    value = lambda operand: constants.get(operand, operand)
    count = 0
    for operands in FLOAT_FMA.findall(ptx):
        _, a, b, c = (o.strip() for o in operands.split(","))
        if value(c) not in NEGATIVE_ZERO and value(a) not in ONE and value(b) not in ONE:
            count += 1
    return count


def compile_one(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int):
    src = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    fusion = fp_fusion(kernel, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=fusion))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{kernel.__name__}: no cubin produced")
    # the bug this guards: with fusion on, the rotary's product and sum became fma.rn.bf16 (H200 tests)
    if not fusion and kernel is rotary._rotary_kernel and contracted_fmas(compiled.asm["ptx"]):
        raise RuntimeError(f"{kernel.__name__}: a product fused with a sum (fma) in a kernel that must "
                           "round each product and sum as HF does")
    shared = compiled.metadata.shared
    if shared > SHARED_MEMORY_BYTES[arch]:
        raise RuntimeError(f"{kernel.__name__}: {shared} bytes of shared memory, sm_{arch} has "
                           f"{SHARED_MEMORY_BYTES[arch]} (launch would fail with OutOfResources)")


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def launches(arch: int):
    """(label, kernel, pointer dtypes, constexprs, num_warps, num_stages) as the host code launches them.

    Each kernel family is compiled over a covering of its variants (every dtype once, every option
    once, the widest tiles included), not their full product: CI time, at ~2-4 s per compile."""
    for dtype, softcap in ((BF16, False), (FP16, True), (FP32, False)):
        cfg = logprob.gpu_tile_config(arch // 10, dtype)
        mm = "*" + TRITON_DTYPE[dtype]
        const = dict(HAS_SOFTCAP=softcap, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                     GROUP_N=cfg["GROUP_N"], EVEN_K=not softcap, PRECISION="tf32", DOT_UPCAST=False)
        yield (f"logprob lse {dtype} softcap={softcap}", logprob._lse_partials_kernel,
               dict(x_ptr=mm, w_ptr=mm, labels_ptr="*i64", part_max_ptr="*fp32", part_sum_ptr="*fp32",
                    target_ptr="*fp32"), const, cfg["num_warps"], cfg["num_stages"])
        yield (f"logprob dlogits {dtype} softcap={softcap}", logprob._dlogits_kernel,
               dict(x_ptr=mm, w_ptr=mm, labels_ptr="*i64", lse_ptr="*fp32", dz_ptr=mm), const,
               cfg["num_warps"], cfg["num_stages"])
    for dtype, softcap in ((BF16, False), (FP16, True), (FP32, False)):
        z = "*" + TRITON_DTYPE[dtype]
        const = dict(HAS_SOFTCAP=softcap, BLOCK_V=logit_rows._block(128256, False))
        yield (f"logit rows stats {dtype} softcap={softcap}", logit_rows._row_stats_kernel,
               dict(z_ptr=z, labels_ptr="*i64", lse_ptr="*fp32", target_ptr="*fp32"), const, 8, 3)
        yield (f"logit rows grad {dtype} softcap={softcap}", logit_rows._logit_grad_kernel,
               dict(z_ptr=z, labels_ptr="*i64", lse_ptr="*fp32"), const, 8, 3)
    for dtype, softcap in ((BF16, False), (FP32, True)):
        yield (f"sampling race {dtype} softcap={softcap}", sampling._race_kernel,
               dict(logits_ptr="*" + TRITON_DTYPE[dtype], seed_ptr="*i64", step_ptr="*i64",
                    best_score_ptr="*fp32", best_col_ptr="*i32"),
               dict(HAS_SOFTCAP=softcap, LANES=sampling.LANES, **sampling.GPU_TILE), 4, 3)
    yield ("sampling uniforms", sampling._uniforms_kernel, dict(out_ptr="*fp32", seed_ptr="*i64", step_ptr="*i64"),
           dict(ROWS=sampling.GPU_TILE["ROWS"], LANES=sampling.LANES), 4, 3)
    for dtype, head_dim, window, final in ((BF16, 64, False, True), (FP16, 128, True, False),
                                           (FP32, 128, False, True), (FP32, 256, False, True)):
        kv = "*" + TRITON_DTYPE[dtype]
        part = kv if final else "*fp32"
        tile = decode_attention.gpu_tile_config(dtype)
        rope = final and head_dim < 256       # the fused decode layers' launch: rotary, cache write, attention
        yield (f"decode attention {dtype} head_dim={head_dim} window={window} final={final} write={final} "
               f"rope={rope}", decode_attention._decode_attention_kernel,
               dict(q_ptr=kv, k_ptr=kv, v_ptr=kv, pos_ptr="*i64", m_ptr=part, l_ptr=part, acc_ptr=part, out_ptr=kv,
                    new_k_ptr=kv, new_v_ptr=kv, cos_ptr=kv if rope else "*i64", sin_ptr=kv if rope else "*i64"),
               dict(HAS_WINDOW=window, BLOCK_G=16, BLOCK_D=head_dim, BLOCK=tile["BLOCK"],
                    PRECISION="ieee" if dtype == FP32 else "tf32", UPCAST=False, FINAL=final, WRITE=final,
                    ROPE=rope, ROPE_TABLE=rope and dtype == BF16),
               tile["num_warps"], tile["num_stages"])
    for tile in decode_attention.CANDIDATE_TILES:      # the other tiles bench_rollout times (bf16, head dim 64)
        yield (f"decode attention bf16 head_dim=64 tile {tile}", decode_attention._decode_attention_kernel,
               dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", m_ptr="*bf16", l_ptr="*bf16",
                    acc_ptr="*bf16", out_ptr="*bf16", new_k_ptr="*bf16", new_v_ptr="*bf16", cos_ptr="*bf16",
                    sin_ptr="*bf16"),
               dict(HAS_WINDOW=False, BLOCK_G=16, BLOCK_D=64, BLOCK=tile["BLOCK"], PRECISION="tf32", UPCAST=False,
                    FINAL=True, WRITE=True, ROPE=True, ROPE_TABLE=True),
               tile["num_warps"], tile["num_stages"])
    for race, advance in ((True, True), (False, False)):
        yield (f"step record race={race} advance={advance}", step_record._record_kernel,
               dict(next_ptr="*i64", score_ptr="*fp32", col_ptr="*i32", tokens_ptr="*i64", positions_ptr="*i64",
                    done_ptr="*u8", out_ptr="*i64", step_ptr="*i64", pad_ptr="*i64", eos_ptr="*i64"),
               dict(RACE=race, ADVANCE=advance, BLOCK=256, BLOCK_S=32, BLOCK_E=4), 8, 1)
    for x_dtype, w_dtype, hidden, residual in ((BF16, BF16, 2048, True), (FP16, FP16, 4096, False),
                                               (FP32, FP32, 8192, True), (BF16, FP32, 128, False)):
        x, w = "*" + TRITON_DTYPE[x_dtype], "*" + TRITON_DTYPE[w_dtype]
        out = "*" + TRITON_DTYPE[torch.promote_types(x_dtype, w_dtype)]
        block, warps = triton.next_power_of_2(hidden), rms_norm._warps(hidden)
        yield (f"add rms_norm {x_dtype} weight {w_dtype} hidden={hidden} residual={residual}",
               rms_norm._add_rms_norm_kernel, dict(x_ptr=x, res_ptr=x, w_ptr=w, out_ptr=out, sum_ptr=x),
               dict(HAS_RESIDUAL=residual, ROWS=1, BLOCK=block), warps, 3)
        yield (f"rms_norm backward {x_dtype} weight {w_dtype} hidden={hidden} residual={residual}",
               rms_norm._rms_norm_backward_kernel,
               dict(dy_ptr=out, ds_ptr=x, s_ptr=x, w_ptr=w, dx_ptr=x, dw_ptr="*fp32"),
               dict(HAS_DS=residual, BLOCK=block), warps, 3)
    for dtype in (BF16, FP16, FP32):
        t = "*" + TRITON_DTYPE[dtype]
        for strided in (False, True):
            yield (f"silu_mul {dtype} strided={strided}", swiglu._silu_mul_kernel,
                   dict(gate_ptr=t, up_ptr=t, out_ptr=t), dict(BLOCK=swiglu.BLOCK, PRECISE=True, STRIDED=strided), 4, 3)
        yield (f"silu_mul backward {dtype}", swiglu._silu_mul_backward_kernel,
               dict(dy_ptr=t, gate_ptr=t, up_ptr=t, dgate_ptr=t, dup_ptr=t), dict(BLOCK=swiglu.BLOCK, PRECISE=True),
               4, 3)
    for x_dtype, table_dtype, q_heads, kv_heads, head_dim in ((BF16, BF16, 32, 8, 64), (BF16, FP32, 32, 4, 128),
                                                             (FP16, FP16, 12, 4, 80), (FP32, FP32, 64, 8, 128)):
        x, table = "*" + TRITON_DTYPE[x_dtype], "*" + TRITON_DTYPE[table_dtype]
        out = "*" + TRITON_DTYPE[torch.promote_types(x_dtype, table_dtype)]
        for backward in (False, True):
            yield (f"rotary {'backward' if backward else 'forward'} {x_dtype} tables {table_dtype} "
                   f"heads={q_heads}/{kv_heads} head_dim={head_dim}", rotary._rotary_kernel,
                   dict(q_ptr=out if backward else x, k_ptr=out if backward else x, cos_ptr=table, sin_ptr=table,
                        q_out_ptr=x if backward else out, k_out_ptr=x if backward else out),
                   dict(BACKWARD=backward, ROWS=max(1, 2048 // triton.next_power_of_2(head_dim)),
                        BLOCK_D=triton.next_power_of_2(head_dim)), 4, 3)
    for dtype, head_dim, window in ((BF16, 64, False), (BF16, 128, True), (FP16, 256, False), (FP32, 128, True),
                                    (FP32, 256, False)):
        t = "*" + TRITON_DTYPE[dtype]
        cfg = varlen_attention.gpu_tile_config(dtype, head_dim)
        gather = head_dim == 64 or window           # the gathered keys of tree layouts, in half the configs
        const = dict(HAS_WINDOW=window, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                     PRECISION="ieee" if dtype == FP32 else "tf32", UPCAST=False, GATHER=gather)
        rows = dict(Q=t, K=t, V=t, cu_q="*i32", cu_k="*i32", KV_INDEX="*i32")
        for name, kernel, pointers in (
                ("forward", varlen_attention._fwd_kernel, dict(rows, O=t, LSE="*fp32")),
                ("dK dV", varlen_attention._bwd_dkdv_kernel, dict(rows, dO=t, LSE="*fp32", Delta="*fp32", dK=t, dV=t)),
                ("dQ", varlen_attention._bwd_dq_kernel, dict(rows, dO=t, LSE="*fp32", Delta="*fp32", dQ=t))):
            yield (f"varlen attention {name} {dtype} head_dim={head_dim} window={window} gather={gather}", kernel,
                   pointers, const, cfg["num_warps"], cfg["num_stages"])
        yield (f"varlen attention delta {dtype} head_dim={head_dim}", varlen_attention._bwd_delta_kernel,
               dict(O=t, dO=t, Delta="*fp32"), dict(BLOCK_M=varlen_attention.DELTA_ROWS, BLOCK_D=cfg["BLOCK_D"]),
               4, 1)
    for dtype, row_elems in ((BF16, 4 * 64), (FP32, 8 * 128), (FP16, 8 * 256)):
        t = "*" + TRITON_DTYPE[dtype]
        yield (f"varlen attention gathered dK dV sum {dtype} row={row_elems}", varlen_attention._gather_grad_kernel,
               dict(dKg=t, dVg=t, ORDER="*i32", OFFSETS="*i32", dK=t, dV=t),
               dict(ROWS=1, BLOCK=triton.next_power_of_2(row_elems)), 4 if row_elems <= 2048 else 8, 3)


def main(arch: int) -> int:
    if _common.INTERPRETED:
        raise SystemExit("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    failed = 0
    for label, kernel, pointers, constexprs, warps, stages in launches(arch):
        try:
            compile_one(kernel, pointers, constexprs, warps, stages, arch)
            print(f"sm_{arch} {label}: ok")
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"sm_{arch} {label}: FAILED {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
