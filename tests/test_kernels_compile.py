"""Every Triton kernel compiles for Ampere and Hopper as the GPU launches it (tile shapes, dtypes,
warps), down to a cubin, on a machine without a GPU: the interpreter that runs them on CPU accepts
programs the compiler rejects. tests/compile_kernels.py does the work, outside the interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("compile_kernels.py")


def test_kernels_compile_for_the_gpu():
    """sm_80 and sm_90 at once, one process each: compiling is single-threaded, and CI has two cores."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, str(HELPER), str(arch)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for arch in (80, 90)}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch}: " + out[-3000:] + err[-3000:]
        assert out.count(": ok") >= 60, out


def test_contracted_fma_count_tells_fusion_from_sm80_emulation():
    """compile_kernels' guard for the rotary kernels (HF rounds the product and the sum apart): an FMA
    of two products' worth is counted; sm_80's bf16 mul as fma(a, b, -0) and add as fma(a, 1, b) are
    not (PTX shapes as Triton emits them; with fusion on, sm_80 and sm_90 both gave the fused form)."""
    sys.path.insert(0, str(HELPER.parent))
    from compile_kernels import contracted_fmas

    emulated = ("mov.b16 \t%rs197, 0x8000;\n mov.b16 \t%rs198, 0x3F80;\n"
                "fma.rn.bf16 \t%rs1, %rs2, %rs3, %rs197;\nfma.rn.bf16 \t%rs4, %rs1, %rs198, %rs5;\n")
    fused = "fma.rn.bf16 \t%rs6, %rs7, %rs8, %rs9;\n"
    f32 = ("fma.rn.f32 \t%f1, %f2, %f3, 0f80000000;\nfma.rn.ftz.f32 \t%f4, %f5, %f6, %f7;\n"
           "mad.lo.s32 \t%r1, %r2, %r3, %r4;\n")
    assert contracted_fmas(emulated) == 0
    assert contracted_fmas(emulated + fused) == 1
    assert contracted_fmas(f32) == 1
