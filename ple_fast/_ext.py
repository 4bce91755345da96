"""Loads the compiled extension ple_fast._C, whose import registers torch.ops.ple_fast.*.

torch is imported first because _C links against libtorch/libc10 without an RPATH: the libraries
that `import torch` loaded are the ones it must use. `python -m ple_fast._ext` prints build facts.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

_INSTALL_HINT = (
    "ple_fast._C (the C++/CUDA ops) is not built or cannot be loaded. Build it from the repository "
    'root with: pip install --no-build-isolation -e ".[test]"'
)


def load_extension() -> ModuleType:
    """Import ple_fast._C once (later calls are cheap) or raise ImportError saying how to build it."""
    try:
        return importlib.import_module("ple_fast._C")
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT}\n(original error: {err})") from err


@functools.cache
def extension_available(caller: str) -> bool:
    """Whether _C loads; the first failure per caller warns (the build hint and the import error),
    so a Python fallback never runs unannounced. Tests assert the load itself (tests/test_layout.py)."""
    try:
        load_extension()
        return True
    except ImportError as err:
        warnings.warn(f"{caller}: using the plain-Python fallback (slower). {err}", RuntimeWarning, stacklevel=3)
        return False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.ple_fast.<op> has a kernel for a dispatch key such as "CPU" or "CUDA"."""
    load_extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ple_fast::{op}", dispatch_key)


def built_with_cuda() -> bool:
    """Whether the CUDA sources (csrc/*.cu) were compiled into ple_fast._C."""
    return bool(load_extension().WITH_CUDA)


def _main() -> None:
    ext = load_extension()
    print(f"ple_fast._C: {ext.__file__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), built with CUDA ops: {built_with_cuda()}")
    for op in ("dual_layout", "prefill_layout"):
        for key in ("CPU", "CUDA"):
            print(f"torch.ops.ple_fast.{op} [{key}]: {has_kernel(op, key)}")


if __name__ == "__main__":
    _main()
