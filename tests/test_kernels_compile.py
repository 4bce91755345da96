"""Every Triton kernel compiles for Ampere and Hopper as the GPU launches it (tile shapes, dtypes,
warps), down to a cubin, on a machine without a GPU: the interpreter that runs them on CPU accepts
programs the compiler rejects. tests/compile_kernels.py does the work, outside the interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_the_gpu(arch):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HELPER), str(arch)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") >= 28, proc.stdout
