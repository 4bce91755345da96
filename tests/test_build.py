"""The installed package: ple_fast._C and ple_fast.kernels import, and `python -m ple_fast.<x>` runs,
both from the repository root (source tree first on sys.path) and from elsewhere."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import torch                             # first, as ple_fast._ext loads _C: it links libtorch without an RPATH
import ple_fast, ple_fast._C, ple_fast.kernels, ple_fast.layout
assert ple_fast.kernels.__name__ == "ple_fast.kernels"
assert ple_fast.kernels.__file__.startswith(REPO + "/ple_fast/kernels/"), ple_fast.kernels.__file__
import ple_fast.kernels.logprob
import transformers.modeling_utils       # imports the hub's `kernels` package where it is installed
import importlib.util                    # no top-level kernels/ of the repo shadows it (the hub's may live
spec = importlib.util.find_spec("kernels")    # in a venv inside the repo, as CI's .ci-venv does)
assert spec is None or spec.origin is None or not spec.origin.startswith(REPO + "/kernels/"), spec.origin
assert hasattr(torch.ops.ple_fast, "dual_layout")
print("ok", ple_fast._C.__file__)
"""


def run_python(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_extension_and_kernels_import(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    result = run_python(["-c", f"REPO = {str(REPO)!r}\n" + IMPORT_ALL], cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_run_module(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    result = run_python(["-m", "ple_fast._ext"], cwd)
    assert result.returncode == 0, result.stderr
    assert "torch.ops.ple_fast.dual_layout [CPU]: True" in result.stdout


def test_pyproject_contract():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["build-system"]["build-backend"] == "scikit_build_core.build"
    project = config["project"]
    assert project["name"] == "ple_fast" and project["requires-python"] == ">=3.10"
    names = {dep.split(";")[0].split(">")[0].strip() for dep in project["dependencies"]}
    assert names == {"torch", "triton", "transformers", "safetensors", "numpy", "pyyaml", "tqdm"}
    assert set(project["optional-dependencies"]) >= {"test", "lora", "plots", "logging"}
    packages = config["tool"]["scikit-build"]["wheel"]["packages"]
    assert packages == ["ple_fast"]                   # the kernels are the real subpackage ple_fast/kernels
    assert (REPO / "ple_fast" / "kernels" / "__init__.py").is_file() and not (REPO / "kernels" / "logprob.py").exists()
