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
@pytest.mark.parametrize("script", ["bench_logprob_loss.py", "bench_dual_prefill.py", "bench_rollout.py",
                                    "bench_e2e.py"])
def test_bench_exits_cleanly_without_cuda(script, tmp_path):
    proc = run_bench(script, "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped, no CUDA device" in proc.stdout


def test_rollout_bench_smoke_run_on_cpu(tmp_path):
    proc = run_bench("bench_rollout.py", "--allow-cpu", "--quick", "--batches", "2,3", "--hf-batches", "3",
                     "--prompt-len", "8", "--new-tokens", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_rollout-*.json")
    payload = json.loads(result.read_text())
    # HF generate at the --hf-batches only, and the speed-ups only where it ran
    assert [r["batch"] for r in payload["rows"] if r["method"] == "hf"] == [3]
    assert {r["batch"] for r in payload["rows"] if "speedup_vs_hf" in r} == {3}
    rows = [r for r in payload["rows"] if r["method"] != "matmuls_alone" and r["batch"] == 3]
    assert {r["method"] for r in rows} == {"hf", "fast", "fast_one_stream", "fast_stock_layers",
                                           "fast_torch_sampling", "fast_sdpa_decode"}
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)
    assert all(0 < r["compute_floor_fraction"] and 0 < r["floor_fraction"] for r in rows if r["method"] != "hf")
    (matmuls,) = [r for r in payload["rows"] if r["method"] == "matmuls_alone" and r["batch"] == 3]
    assert "error" not in matmuls and matmuls["kernels"] == 2 * 7 + 1 and matmuls["ms"] > 0   # 2 layers + head
    assert matmuls["tflops"] == pytest.approx(matmuls["peak_fraction"] * payload["matmul_peak_tflops"])
    profiled = {r["method"]: r["profile"] for r in rows if "profile" in r}
    assert set(profiled) == {"fast", "fast_stock_layers"}, [r.get("profile_error") for r in rows]
    for prof in profiled.values():       # CPU ops stand in for kernels here: the plumbing, not a figure
        assert prof["unit"] == "cpu ops" and prof["count"] > 0 and prof["timed_ms"] > 0
        # counts are exact; CPU times of a difference of two runs are noise-dominated, only present
        assert prof["top"] and all(k["count"] > 0 and isinstance(k["ms"], float) for k in prof["top"])
        assert isinstance(prof["busy_ms"], float)
    from_summary = subprocess.run([sys.executable, str(BENCH / "common.py"), "summarize", str(tmp_path)],
                                  capture_output=True, text=True, check=True).stdout
    assert "Kernel profiles" in from_summary and "method fast_stock_layers:" in from_summary


def test_rollout_bench_runs_the_methods_named(tmp_path):
    proc = run_bench("bench_rollout.py", "--allow-cpu", "--quick", "--batches", "2", "--hf-batches", "none",
                     "--methods", "fast,fast_torch_sampling", "--prompt-len", "8", "--new-tokens", "3",
                     "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_rollout-*.json")
    methods = [r["method"] for r in json.loads(result.read_text())["rows"]]
    assert [m for m in methods if m != "matmuls_alone"] == ["fast", "fast_torch_sampling"]   # no hf, in pass order
    proc = run_bench("bench_rollout.py", "--allow-cpu", "--quick", "--methods", "fast,fastest", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--methods ['fastest'] unknown" in proc.stderr


def test_time_cuda_splits_a_call_at_its_marks():
    """phases: fn gets the mark, each part gets its own time (wall clock here, host == device), and a
    fn that marks too few or too many times is an error, not a misattributed figure."""
    sys.path.insert(0, str(BENCH))
    import time

    from common import time_cuda

    def two_parts(mark, slow=0.02, fast=0.0):
        mark()
        time.sleep(slow)
        mark()
        time.sleep(fast)
        mark()

    timing = time_cuda(two_parts, warmup=1, iters=3, phases=("slow", "fast"))
    assert timing["slow_ms"] >= 20 and timing["slow_ms"] > timing["fast_ms"] >= 0
    assert (timing["slow_host_ms"], timing["fast_host_ms"]) == (timing["slow_ms"], timing["fast_ms"])
    assert timing["ms"] >= 0.95 * (timing["slow_ms"] + timing["fast_ms"])     # medians: the parts' need not add up
    assert "slow_ms" not in time_cuda(lambda: None, warmup=0, iters=1)
    with pytest.raises(ValueError, match="3 phases need 4 marks, fn made 3"):
        time_cuda(two_parts, warmup=0, iters=1, phases=("a", "b", "c"))


def test_kernel_profile_reports_the_difference_per_unit():
    """The counts from torch.profiler, exactly; the times only as present (a CPU time of a difference of
    two runs is noise under load: a -n 2 run measured -0.37 ms). The arithmetic on times is checked on
    fixed tallies."""
    sys.path.insert(0, str(BENCH))
    from common import kernel_profile, profile_difference

    a = torch.randn(256, 256)
    prof = kernel_profile(lambda: [a @ a for _ in range(7)], baseline=lambda: [a @ a for _ in range(3)], units=4)
    mm = {k["name"]: k for k in prof["top"]}["aten::mm"]
    assert prof["unit"] == "cpu ops" and mm["count"] == 1 and isinstance(mm["ms"], float)   # 7 - 3 over 4 units
    work = {"gemm": [7, 14.0], "norm": [3, 3.0], "setup": [1, 5.0]}
    base = {"gemm": [3, 6.0], "setup": [1, 4.0]}
    diff = profile_difference(work, base, units=2, timed_ms=10.0)
    assert diff["count"] == 3.5 and diff["busy_ms"] == 5.5            # setup's count did not grow: left out
    assert [(k["name"], k["count"], k["ms"]) for k in diff["top"]] == [("gemm", 2.0, 4.0), ("norm", 1.5, 1.5)]
    assert diff["top"][0]["share"] == 4.0 / 5.5 and diff["idle_fraction"] == 1 - 5.5 / 10.0


def test_host_profile_and_its_summary(tmp_path):
    """host_profile (the dual-prefill bench's view of what the host does while the GPU idles): host
    events by self time, the synchronising calls named apart; summarize prints both under the row."""
    sys.path.insert(0, str(BENCH))
    from common import host_profile, summarize

    a = torch.randn(128, 128)
    host = host_profile(lambda: [float((a @ a).sum()) for _ in range(3)])
    mm = {k["name"]: k for k in host["top"]}["aten::mm"]
    assert mm["count"] == 3 and host["self_ms"] >= mm["ms"] > 0
    assert host["syncing_calls"] == {}                       # none without CUDA
    host["syncing_calls"] = {"cudaStreamSynchronize": dict(count=2, ms=1.5)}
    profile = dict(unit="cuda kernels", count=3, busy_ms=1.0, timed_ms=2.0, idle_fraction=0.5, top=[], host=host)
    (tmp_path / "b.json").write_text(json.dumps(dict(bench="b", rows=[dict(variant="v", ms=2.0, profile=profile)])))
    text = summarize(tmp_path)
    assert "host: " in text and "syncing calls: cudaStreamSynchronize x2 1.5 ms" in text and "`aten::mm`" in text


def test_dual_prefill_bench_smoke_run_on_cpu(tmp_path):
    proc = run_bench("bench_dual_prefill.py", "--allow-cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_dual_prefill-*.json")
    rows = json.loads(result.read_text())["rows"]
    timed = [r for r in rows if not r["variant"].startswith("ratios")]
    assert {r["variant"] for r in timed} == {"padded_hf", "packed_shared[segments]", "packed_duplicated[segments]"}
    assert len(timed) == 3 * 2 and all(r["ms"] > 0 and "error" not in r for r in timed)   # 2 quick shapes
    assert all(r["host_ms"] == r["ms"] for r in timed)          # without CUDA the host time is the time
    for r in timed:                                              # the step split at its backward
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0
        assert (r["forward_host_ms"], r["backward_host_ms"]) == (r["forward_ms"], r["backward_ms"])
    assert all(r["profile"]["count"] > 0 and r["profile"]["busy_ms"] > 0 for r in timed)
    peak = json.loads(result.read_text())["matmul_peak_tflops"]
    assert all(r["model_tflops"] > 0 and r["peak_fraction"] == pytest.approx(r["model_tflops"] / peak) for r in timed)
    ratios = [r for r in rows if r["variant"] == "ratios[segments]"]
    assert len(ratios) == 2 and all(r["shared_over_dup"] > 0 and r["shared_over_padded"] > 0 for r in ratios)


@pytest.mark.parametrize("lengths", [(5, 1, 3), (1, 4, 4), (7, 2, 0)])
def test_dual_prefill_visible_pairs_count_the_layouts_masks(lengths):
    """The FLOP count's attention term: the true entries of the shared and duplicated layouts' masks."""
    sys.path.insert(0, str(BENCH))
    from bench_dual_prefill import visible_pairs

    from ple_fast.layout import pack_dual, pack_sequences

    q, o, p = ([1] * n for n in lengths)
    for batch in (pack_dual([q, q], [o, o], [p, p]), pack_sequences([q, q, q, q], [o, p, o, p])):
        assert visible_pairs(batch) == int(batch.dense_mask().sum())


@pytest.mark.parametrize("suffix,layers", [("compile", "compiled"), ("fused", "fused")])
def test_dual_prefill_bench_compiled_and_fused_variants_on_cpu(tmp_path, suffix, layers):
    """A backend with the +compile / +fused suffix runs the packed forwards through compiled layers /
    ple_fast.fused_layers (Triton interpreted here), and padded HF through the same layers joins as its
    baseline (smoke: one tiny shape, the CPU's sdpa backend)."""
    backend = f"sdpa+{suffix}"
    proc = run_bench("bench_dual_prefill.py", "--allow-cpu", "--shapes", "8/4/4", "--backends", backend,
                     "--pairs", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_dual_prefill-*.json")
    payload = json.loads(result.read_text())
    assert payload["pairs"] == 3 and "3 pairs/step" in proc.stdout
    rows = {r["variant"]: r for r in payload["rows"]}
    assert rows["padded_hf"]["tokens_per_s"] * rows["padded_hf"]["ms"] == pytest.approx(3 * (2 * 8 + 4 + 4) * 1e3)
    assert set(rows) == {"padded_hf", f"packed_shared[{backend}]", f"packed_duplicated[{backend}]",
                         f"padded_hf[{suffix}]", f"ratios[{backend}]"}
    assert all("error" not in r for r in rows.values())
    assert rows[f"ratios[{backend}]"][f"shared_over_padded_{layers}"] > 0


def test_decode_flops_counts_every_matmul_weight_and_the_attention_context():
    sys.path.insert(0, str(BENCH))
    import bench_rollout

    model = bench_rollout.build_model(bench_rollout.TINY, torch.float32, torch.device("cpu"))
    c = model.config
    norms = c.hidden_size * (2 * c.num_hidden_layers + 1)
    matmul_weights = sum(p.numel() for p in model.parameters()) - norms     # tied: the embedding is the head
    # 3 new tokens: 2 decode steps, attending over 9 and 10 positions of a prompt of 8
    per_row = 2 * matmul_weights * 2 + 4 * c.num_hidden_layers * c.num_attention_heads * 32 * (9 + 10)
    assert bench_rollout.decode_flops(model, 3, 8, 3) == 3 * per_row


def test_rollout_bench_attention_bandwidth_rows(monkeypatch):
    """The decode-attention-alone rows (run on CUDA after the engine rows): both paths timed, the K/V
    bytes of the mid-decode context against the given bandwidth (CPU: the plumbing, not a figure)."""
    sys.path.insert(0, str(BENCH))
    import bench_rollout

    monkeypatch.setattr(bench_rollout, "ATTENTION_CALLS", 2)      # interpreted calls are slow
    model = bench_rollout.build_model(bench_rollout.TINY, torch.float32, torch.device("cpu"))
    assert [r["method"] for r in bench_rollout.attention_bandwidth(model, 2, 8, 4, bandwidth=1e9)] == \
        ["attention_kernel[triton]", "attention_kernel[sdpa]"]          # CPU: no other tiles unless named
    tile = dict(BLOCK=16, num_stages=1, num_warps=2)
    rows = bench_rollout.attention_bandwidth(model, 2, 8, 4, bandwidth=1e9, tiles=(tile,))
    assert [r["method"] for r in rows] == ["attention_kernel[triton]", "attention_kernel[sdpa]",
                                           "attention_kernel[triton BLOCK=16 num_stages=1 num_warps=2]"]
    assert rows[2]["tile"] == tile and rows[2]["max_abs_diff_vs_default"] < 1e-5   # the same attention
    for row in rows:
        assert row["context"] == 10 and row["ms"] > 0
        nbytes = 2 * 2 * 2 * 10 * 32 * 4        # K and V, batch, kv heads, context, head dim, fp32
        assert row["kv_gbs"] == pytest.approx(nbytes / row["ms"] / 1e6)
        assert row["bandwidth_fraction"] == pytest.approx(nbytes / (row["ms"] * 1e-3) / 1e9)


def test_rollout_bench_blas_library_switch_is_undone():
    """fast_cublaslt / matmuls_alone[cublaslt] capture their matmuls with cuBLASLt, and every row after
    them gets torch's choice back (CUDA builds of torch only: a CPU build cannot name cuBLASLt)."""
    sys.path.insert(0, str(BENCH))
    import bench_rollout

    before = torch.backends.cuda.preferred_blas_library()
    with bench_rollout.blas_library(None):
        assert torch.backends.cuda.preferred_blas_library() == before
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch has no cuBLASLt to prefer")
    with pytest.raises(RuntimeError, match="inside"):
        with bench_rollout.blas_library("cublaslt"):
            assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
            raise RuntimeError("inside")
    assert torch.backends.cuda.preferred_blas_library() == before


def test_e2e_bench_smoke_run_on_cpu(tmp_path):
    """Every pipeline goes through the trainer's iteration on the tiny shapes, and the fit table runs."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_e2e import PIPELINES
    finally:
        sys.path.remove(str(BENCH))
    proc = run_bench("bench_e2e.py", "--allow-cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("bench_e2e-*.json")
    payload = json.loads(result.read_text())
    rows = {r["pipeline"]: r for r in payload["rows"]}
    assert list(rows) == list(PIPELINES)
    for row in rows.values():
        assert row["response_tok_s"] > 0 and row["iterations"] == 1
        phases = row["rollout_s"] + row["scoring_s"] + row["update_s"]
        assert 0 < phases <= row["seconds_per_iteration"] * 1.01
        assert row["x_hf_strong"] == pytest.approx(row["response_tok_s"] / rows["hf_strong"]["response_tok_s"])
    assert rows["hf_baseline"]["x_hf_baseline"] == 1.0
    assert "packed" in rows["ple_fast"]["plan"] and "fast engine" in rows["ple_fast"]["plan"]
    assert "padded" in rows["hf_baseline"]["plan"] and "reference loss" in rows["hf_baseline"]["plan"]
    assert "HF generate" in rows["hf_strong"]["plan"] and "torch loss" in rows["hf_strong"]["plan"]
    assert [f["config"] for f in payload["fit"]] == ["1B full", "8B LoRA r=8", "8B full"]
    assert all(f["fits"] for f in payload["fit"])
