"""torchrun with 2 CPU processes (gloo, FSDP2) against one process on the same global batch."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ple_fast.config import ConfigError, build_config
from ple_fast.distributed import Dist
from ple_fast.run import check_distributed

GREEDY = ["sft.steps=120", "ple.iterations=2", "ple.batch_size=16", "eval.samples=1", "rollout.temperature=0",
          "eval.temperature=0", "run.progress=false", "run.plots=false", "run.threads=1"]


def torchrun(nproc: int) -> list[str]:
    """The launcher's command, on a free port (--standalone): two tests may run at once (pytest -n 2)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def launch(out, nproc, *args):
    prefix = torchrun(nproc) if nproc > 1 else [sys.executable]
    proc = subprocess.run([*prefix, "-m", "ple_fast.train", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo,rollout", [("ple", "fast"), ("raft", "hf")])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, algo, rollout):
    """Greedy rollouts, so both process counts see the same responses: the fast engine (each rank on
    gathered weights, stopping on its own) and HF generate (sharded weights, synchronised ranks)."""
    args = [*GREEDY, f"ple.algo={algo}", f"rollout.backend={rollout}"]
    one = launch(tmp_path / "one", 1, *args)
    two = launch(tmp_path / "two", 2, *args)
    for phase in ("sft", "align"):
        a = [r["loss"] for r in one if r["phase"] == phase]
        b = [r["loss"] for r in two if r["phase"] == phase]
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), phase
    for key in ("mean_reward", "mean_reward_principled") + (("ranked_share",) if algo == "ple" else ()):
        assert [r[key] for r in one if r["phase"] == "align"] == \
            pytest.approx([r[key] for r in two if r["phase"] == "align"], rel=1e-6, abs=1e-9)
    if algo != "ple":
        assert all(r["ranked_share"] is None for r in one + two if r["phase"] == "align")
    wa, wb = load_file(str(tmp_path / "one" / "model" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_two_process_lora_matches_one_and_resumes_bitwise(tmp_path):
    """LoRA under FSDP2: same losses and merged weights as one process; a resume from the
    second-last checkpoint (adapter-only) ends with the same weights bit for bit."""
    args = ["lora.enabled=true", "sft.steps=16", "ple.iterations=2", "ple.batch_size=16", "eval.samples=1",
            "rollout.temperature=0", "eval.temperature=0", "run.progress=false", "run.plots=false",
            "run.threads=1", "run.save_every=4"]
    one = launch(tmp_path / "one", 1, *args)
    two = launch(tmp_path / "two", 2, *args)
    for phase in ("sft", "align"):
        a = [r["loss"] for r in one if r["phase"] == phase]
        b = [r["loss"] for r in two if r["phase"] == phase]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-5, abs=1e-7), phase
    merged = [load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("one", "two")]
    for name in merged[0]:
        torch.testing.assert_close(merged[0][name], merged[1][name], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(sorted((resumed / "checkpoints").glob("step-*"))[-1])
    launch(resumed, 2, *args, "--resume", "auto")
    for folder, file in (("model", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a, b = (load_file(str(run / folder / file)) for run in (tmp_path / "two", resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_two_process_default_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m ple_fast.train` on the embedded default."""
    records = launch(tmp_path / "run", 2, "run.progress=false")
    evals = {r["when"]: r for r in records if r["phase"] == "eval"}
    assert evals["final"]["refusal_rate_harmful"] >= evals["sft"]["refusal_rate_harmful"] + 0.3
    assert len([r for r in records if r["phase"] == "align"]) == 5
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_two_process_sigkill_then_resume_is_bitwise_identical(tmp_path):
    args = ["sft.steps=24", "ple.iterations=2", "ple.batch_size=48", "eval.samples=1", "run.save_every=4",
            "run.progress=false", "run.plots=false", "run.threads=1"]
    launch(tmp_path / "uninterrupted", 2, *args)
    cmd = [*torchrun(2), "-m", "ple_fast.train", "--out", str(tmp_path / "killed"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while not (folder.is_dir() and any(int(p.name[5:]) > 24 for p in folder.glob("step-*"))):
        assert proc.poll() is None and time.time() < deadline, "run ended before an alignment checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                 # the launcher and both ranks
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()
    launch(tmp_path / "killed", 2, *args, "--resume", "auto")
    a = load_file(str(tmp_path / "uninterrupted" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    # resuming the finished run is a no-op that exits cleanly on every rank (a rank used to abort in
    # gloo teardown now and then, when it left while its peer was still writing the model)
    launch(tmp_path / "killed", 2, *args, "--resume", "auto")
    again = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[name], again[name]) for name in a)


def test_fsdp2_sharded_layers_run_the_one_node_fused_layer():
    """The CUDA training default (fused layers, triton tree attention) under torchrun's FSDP2, on two CPU
    processes: each sharded layer runs as one autograd node on the weights FSDP2 gathered, with the
    log-probs and gradients of an unsharded copy, before and after an SGD step, and returns no view
    (FSDP2's warning made an error). The ranks (tests/fsdp_fused_worker.py) assert; this checks they did."""
    worker = Path(__file__).with_name("fsdp_fused_worker.py")
    families = ("llama", "qwen2", "qwen3")     # plain, q / k / v biases + sliding window, head norms
    proc = subprocess.run([*torchrun(2), str(worker), *families], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert [line.split()[1].rstrip(":") for line in done] == list(families), proc.stdout[-2000:]
    assert all("one-node layer ran 8 times" in line for line in done)


def test_shard_and_gather_round_trip():
    items = list(range(7))
    shards = [Dist(rank, 3).shard(items) for rank in range(3)]
    assert [len(s[0]) for s in shards] == [3, 3, 3]
    assert [x for local, real in shards for x, keep in zip(local, real) if keep] == items
    assert Dist().shard(items) == (items, [True] * 7)
    assert Dist().sum_dict({"a": 2, "b": 1.5, "c": "x"}) == {"a": 2, "b": 1.5, "c": "x"}


def test_distributed_config_checks():
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        check_distributed(build_config(None, []), 3)
    cfg = build_config(None, [])
    check_distributed(cfg, 2)
    assert cfg.rollout.backend == "fast"          # the engine runs under torchrun too
    check_distributed(build_config(None, ["lora.enabled=true"]), 2)        # and LoRA
