"""The bench scripts still start: without CUDA each exits 0 with its message, and bench_rollout's
--allow-cpu smoke run goes through every step of a measurement and writes its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; the GPU suite runs the benches")
@pytest.mark.parametrize("script", ["bench_logprob_loss.py", "bench_dual_prefill.py", "bench_rollout.py"])
def test_bench_exits_cleanly_without_cuda(script, tmp_path):
    proc = run_bench(script, "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped, no CUDA device" in proc.stdout


def test_rollout_bench_smoke_run_on_cpu(tmp_path):
    proc = run_bench("bench_rollout.py", "--allow-cpu", "--quick", "--batches", "2", "--prompt-len", "8",
                     "--new-tokens", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_rollout-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["method"] for r in rows} == {"hf", "fast", "fast_torch_sampling", "fast_sdpa_decode", "fast_compiled"}
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)


def test_dual_prefill_bench_smoke_run_on_cpu(tmp_path):
    proc = run_bench("bench_dual_prefill.py", "--allow-cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_dual_prefill-*.json")
    rows = json.loads(result.read_text())["rows"]
    timed = [r for r in rows if not r["variant"].startswith("ratios")]
    assert {r["variant"] for r in timed} == {"padded_hf", "packed_shared[segments]", "packed_duplicated[segments]"}
    assert len(timed) == 3 * 2 and all(r["ms"] > 0 and "error" not in r for r in timed)   # 2 quick shapes
    ratios = [r for r in rows if r["variant"] == "ratios[segments]"]
    assert len(ratios) == 2 and all(r["shared_over_dup"] > 0 and r["shared_over_padded"] > 0 for r in ratios)
