"""Trainer features for real runs: exact resume, signals, accumulation, schedules, robustness."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ple_fast.config import ConfigError, build_config
from ple_fast.reward import RewardFunction
from ple_fast.runtime import MetricsLog
from ple_fast.trainer import Trainer, lr_lambda

SMALL = ["sft.steps=24", "ple.iterations=3", "ple.batch_size=48", "eval.samples=1", "run.save_every=4",
         "run.progress=false", "run.plots=false", "run.threads=1"]


def train_cmd(out, *extra):
    return [sys.executable, "-m", "ple_fast.train", "--out", str(out), *SMALL, *extra]


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def checkpoint_steps(run_dir):
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def wait_for_checkpoint_after(proc, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s > step for s in checkpoint_steps(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before a checkpoint after step {step}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def align_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["phase"] == "align"]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    reference = tmp_path / "uninterrupted"
    subprocess.run(train_cmd(reference), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint_after(proc, killed, 24)          # inside the alignment phase
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "model").exists()
    resumed = subprocess.run(train_cmd(killed, "--resume", "auto"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    a, b = weights(reference), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    ref_iters, res_iters = align_records(reference), align_records(killed)
    assert [r["loss"] for r in ref_iters] == [r["loss"] for r in res_iters]
    assert [r["tau"] for r in ref_iters] == [r["tau"] for r in res_iters]
    assert len(checkpoint_steps(killed)) <= 2                 # keep_last


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(out, "run.save_every=1000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or "sft" not in (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by signal" in stderr and "Traceback" not in stderr
    steps = checkpoint_steps(out)
    assert len(steps) == 1 and 0 < steps[0] < 1000
    again = subprocess.run(train_cmd(out, "--resume", "auto"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()


def test_resume_from_an_explicit_path_and_bad_paths(tmp_path):
    from ple_fast.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r"), "--resume", str(tmp_path / "nope"), *SMALL])


def small_trainer(tmp_path, *overrides):
    from ple_fast.reward import BuiltinReward
    from ple_fast.workload import embedded_workload

    cfg = build_config(None, ["sft.steps=6", "sft.batch_size=8", "ple.iterations=1", "ple.batch_size=8",
                              "eval.samples=1", "run.progress=false", *overrides])
    model, tokenizer, work = embedded_workload(cfg, torch.device("cpu"))
    work.queries = work.queries[:16]
    log = MetricsLog(tmp_path / "metrics.jsonl")
    return Trainer(cfg, model, tokenizer, work, BuiltinReward(), log, run_dir=tmp_path)


def first_update(trainer, phase: str) -> tuple[list[torch.Tensor], float]:
    """(gradients of the trained parameters, loss) handed to the optimizer at the first update of the
    phase ("sft" or "ple")."""
    real_update = trainer.apply_update
    seen = []

    def capture(loss_value):
        seen.append(([p.grad.clone() for p in trainer.model.parameters() if p.requires_grad], loss_value))
        return real_update(loss_value)

    trainer.apply_update = capture
    if phase == "sft":
        trainer.run_sft()
    else:
        trainer.cfg.sft.steps = 0
        trainer.run_alignment()
    return seen[0]


@pytest.mark.parametrize("phase", ["sft", "ple"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, phase):
    """The gradient handed to the optimizer is the same with 1 or 3 micro-batches."""
    grads = {}
    for accum in (1, 3):
        trainer = small_trainer(tmp_path / f"a{accum}", f"sft.grad_accum={accum}", f"ple.grad_accum={accum}",
                                "sft.steps=1")
        grads[accum] = first_update(trainer, phase)
    assert grads[1][1] == pytest.approx(grads[3][1], rel=1e-5)
    for g1, g3 in zip(grads[1][0], grads[3][0]):
        torch.testing.assert_close(g1, g3, rtol=1e-4, atol=1e-7)


def test_whole_pairs_loss_gives_the_same_update(tmp_path):
    """ple.loss_impl=whole_pairs (experimental) hands the optimizer the gradient the torch path does."""
    updates = {impl: first_update(small_trainer(tmp_path / impl, f"ple.loss_impl={impl}", "experimental=true",
                                                "sft.steps=1", "ple.grad_accum=2"), "ple")
               for impl in ("torch", "whole_pairs")}
    assert updates["whole_pairs"][1] == pytest.approx(updates["torch"][1], rel=1e-5)
    for mine, theirs in zip(updates["whole_pairs"][0], updates["torch"][0]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    from ple_fast.run import prepare_model

    params = {}
    for ckpt in (False, True):
        trainer = small_trainer(tmp_path / str(ckpt), f"run.gradient_checkpointing={ckpt}")
        assert trainer.plan.forward.layout == ("padded" if ckpt else "packed")     # ple.layout=auto
        trainer.model = prepare_model(trainer.model, trainer.cfg)
        active = getattr(trainer.model, "is_activation_checkpointing", None)
        assert (active if active is not None else trainer.model.is_gradient_checkpointing) == ckpt
        trainer.run_sft()
        params[ckpt] = [p.detach().clone() for p in trainer.model.parameters()]
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains(tmp_path):
    trainer = small_trainer(tmp_path, "run.precision=bf16")
    assert trainer.plan.autocast == torch.bfloat16
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run_sft()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_cuda_defaults_train_under_bf16_autocast(tmp_path):
    """The trainer's CUDA defaults, on this CPU: fp32 weights under bf16 autocast, the triton tree
    attention and the fused layers (one autograd node each). The first alignment update's gradient
    agrees with the stock layers on the sdpa attention to bf16 accuracy; before the tree attention cast
    q / k / v to the autocast dtype, its backward failed on mixed dtypes."""
    grads = {}
    for name, overrides in (("defaults", ("ple.attention=triton", "ple.layers=fused")),
                            ("stock", ("ple.attention=sdpa", "ple.layers=stock"))):
        trainer = small_trainer(tmp_path / name, "run.precision=bf16", "sft.steps=1", *overrides)
        assert trainer.plan.autocast == torch.bfloat16
        assert trainer.plan.forward.layers == ("fused" if name == "defaults" else "stock")
        grads[name], loss = first_update(trainer, "ple")
        assert math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads[name])
    assert len(grads["defaults"]) == len(grads["stock"])
    for got, want in zip(grads["defaults"], grads["stock"]):
        assert float((got - want).abs().max()) <= 5e-2 * float(want.abs().max()) + 1e-6


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, monkeypatch):
    import ple_fast.algorithms as algorithms_module

    trainer = small_trainer(tmp_path, "ple.max_nonfinite_steps=2")
    trainer.cfg.sft.steps = 0
    real = algorithms_module.ple_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(algorithms_module, "ple_loss", poisoned)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row"):
        trainer.run_alignment()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    warnings = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [w["streak"] for w in warnings if w["phase"] == "warning"] == [1, 2]


def test_nonfinite_rewards_drop_pairs(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path)
    trainer.cfg.sft.steps = 0
    real = trainer.reward_fn

    class Holey(RewardFunction):
        def __call__(self, queries, responses):
            scores = real(queries, responses)
            scores[::4] = float("nan")
            return scores

    trainer.reward_fn = Holey()
    trainer.run_alignment()
    record = trainer.state.history[-1]
    assert record["dropped_pairs"] == 4 and math.isfinite(record["loss"])


def test_lr_schedules():
    cos = lr_lambda(10, 100, "cosine")
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(math.cos(math.pi * 0.09) * 0.5 + 0.5)
    assert cos(100) == pytest.approx(0.0)
    lin = lr_lambda(0, 100, "linear")
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5)
    assert lr_lambda(4, 100, "constant")(50) == 1.0


@pytest.mark.parametrize("terminal", [True, False])
def test_samples_and_progress_are_written(tmp_path, capsys, monkeypatch, terminal):
    """On a terminal a bar per phase (stderr); off one a plain line now and then (stdout, here after every
    update), never a carriage return."""
    import ple_fast.runtime as runtime

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    monkeypatch.setattr(runtime, "PLAIN_EVERY_S", 0.0)
    trainer = small_trainer(tmp_path, "run.progress=true")
    trainer.run_sft()
    trainer.run_alignment()
    samples = [json.loads(line) for line in (tmp_path / "samples" / "iter-0001.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {"query", "original", "principled", "reward", "reward_2"} <= samples[0].keys()
    out, err = capsys.readouterr()
    if terminal:
        assert "sft" in err and "ple iter 1/1" in err and "generated_tok_s" in err and "\r" in err
    else:
        assert "\r" not in out + err and "  sft 1/6  loss " in out
        assert "  ple iter 1/1 1/2  generated_tok_s " in out and "update_response_tok_s" in out


def test_lora_trains_adapters_only(tmp_path):
    pytest.importorskip("peft")
    from ple_fast.run import prepare_model, save_final_model

    trainer = small_trainer(tmp_path, "lora.enabled=true", "sft.steps=3")
    trainer.model = prepare_model(trainer.model, trainer.cfg)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.run_sft()
    trainer.run_alignment()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    path = trainer.save()
    assert path is not None and path.is_dir()
    folder = save_final_model(trainer.model, trainer.tokenizer, tmp_path)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(folder))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_tensorboard_logging_when_requested(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    log.write({"phase": "align", "global_step": 3, "loss": 0.5})
    log.close()
    assert any((tmp_path / "tb").iterdir())


def test_missing_logging_backends_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RuntimeError, match="pip install wandb"):
        MetricsLog(tmp_path / "m.jsonl", wandb_project="p")


def test_wandb_logging_when_requested(tmp_path, monkeypatch):
    """The W&B sink with a stand-in module (the real one needs an account or a network)."""
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(project, config, dir):
        calls["init"].append((project, config, dir))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = MetricsLog(tmp_path / "m.jsonl", wandb_project="ple", config={"ple": {"tau0": 0.2}})
    log.write({"phase": "align", "global_step": 7, "loss": 0.25, "ranked_share": 0.5, "algo": "ple"})
    log.close()
    assert calls["init"] == [("ple", {"ple": {"tau0": 0.2}}, str(tmp_path))]
    assert calls["log"] == [(7, {"align/loss": 0.25, "align/ranked_share": 0.5})]
    assert calls["finish"] == 1


def test_merged_projections_key_reaches_the_engine(tmp_path):
    """Experimental: refused without experimental=true; with it, refused where the engine's fused layers
    do not run (this CPU), naming the key; the engine and its merged step are tested in
    test_merged_projections."""
    with pytest.raises(ConfigError, match="rollout.merged_projections=true is experimental"):
        small_trainer(tmp_path, "rollout.merged_projections=true")
    with pytest.raises(ConfigError, match="rollout.merged_projections needs the fused layers"):
        small_trainer(tmp_path / "b", "rollout.merged_projections=true", "experimental=true")


def test_rollout_layers_key_reaches_the_engine(tmp_path):
    """stock: the HF layers; fused: refused where the Triton decode attention is not the engine's
    (this CPU), naming the key. The GPU default (auto) is covered by the engine tests."""
    trainer = small_trainer(tmp_path, "rollout.layers=stock")
    assert trainer.plan.engine.fused_layers is False
    assert trainer.policy.engine.options is trainer.plan.engine and not trainer.policy.engine.options.fused_layers
    assert not small_trainer(tmp_path / "a").policy.engine.options.fused_layers       # auto: stock on a CPU
    with pytest.raises(ConfigError, match="rollout.layers=fused: it needs the triton decode attention"):
        small_trainer(tmp_path / "b", "rollout.layers=fused")
    assert small_trainer(tmp_path / "c", "rollout.backend=hf").policy.engine is None


@pytest.mark.parametrize("phase", ["sft", "ple"])
def test_compiled_layers_give_the_same_update(tmp_path, phase):
    """ple.layers=compiled (torch.compile'd decoder layers in the packed forwards) hands the optimizer the
    eager gradient, in SFT and in the alignment step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    grads = {}
    for layers in ("stock", "compiled"):
        trainer = small_trainer(tmp_path / layers, f"ple.layers={layers}", "experimental=true", "sft.steps=1")
        assert trainer.plan.forward.layers == layers
        grads[layers] = first_update(trainer, phase)
        assert (counters["stats"]["unique_graphs"] > 0) == (layers == "compiled")    # the layers did run compiled
    assert grads["stock"][1] == pytest.approx(grads["compiled"][1], rel=1e-5)
    for a, b in zip(grads["stock"][0], grads["compiled"][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("faster", ["compiled", "fused"])
def test_compiled_or_fused_layers_with_lora_give_the_same_update(tmp_path, faster):
    """PEFT's LoRA layers inside the compiled / fused decoder layers: the adapters get the eager,
    stock-layer gradient."""
    pytest.importorskip("peft")
    from ple_fast.run import prepare_model

    torch._dynamo.reset()
    grads = {}
    for layers in ("stock", faster):
        trainer = small_trainer(tmp_path / layers, "lora.enabled=true", f"ple.layers={layers}", "experimental=true",
                                "sft.steps=0")
        torch.manual_seed(0)                     # the same LoRA initialisation for both
        trainer.model = prepare_model(trainer.model, trainer.cfg)
        grads[layers] = first_update(trainer, "ple")[0]
    assert grads["stock"] and len(grads["stock"]) == len(grads[faster])
    for a, b in zip(grads["stock"], grads[faster]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("phase", ["sft", "ple"])
def test_fused_layers_give_the_same_update(tmp_path, phase, monkeypatch):
    """ple.layers=fused (ple_fast.fused_layers in the packed forwards; Triton interpreted on this
    CPU) hands the optimizer the stock layers' gradient, in SFT and in the alignment step."""
    import ple_fast.fused_layers as fused_layers

    calls = []
    real = fused_layers.layer_forward
    monkeypatch.setattr(fused_layers, "layer_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = {}
    for layers in ("stock", "fused"):
        trainer = small_trainer(tmp_path / layers, f"ple.layers={layers}", "sft.steps=1")
        assert trainer.plan.forward.layers == layers
        grads[layers] = first_update(trainer, phase)
        assert bool(calls) == (layers == "fused")          # the layers did run fused
    assert grads["stock"][1] == pytest.approx(grads["fused"][1], rel=1e-5)
    for a, b in zip(grads["stock"][0], grads["fused"][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_ple_layers_and_layout_choices_and_conflicts(tmp_path):
    """ple.layout / ple.layers reach trainer.plan.forward; combinations that cannot run are ConfigErrors
    naming the key, before any work."""
    from ple_fast.plan import ForwardPlan

    assert small_trainer(tmp_path / "a").plan.forward == ForwardPlan("packed", "sdpa", "stock", "torch")  # auto, CPU
    assert small_trainer(tmp_path / "p", "ple.layout=padded").plan.forward == ForwardPlan("padded", None, "stock",
                                                                                           "torch")
    with pytest.raises(ConfigError, match="ple.layers=fused: runs in packed forwards"):
        small_trainer(tmp_path / "c", "ple.layers=fused", "ple.layout=padded")
    with pytest.raises(ConfigError, match="ple.layout=packed: gradient checkpointing"):
        small_trainer(tmp_path / "g", "ple.layout=packed", "run.gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="ple.layers: 'fast' is not one of auto, stock, fused, compiled"):
        build_config(None, ["ple.layers=fast"])
    for removed in ("ple.layer_impl=fused", "ple.compile=true", "ple.packed=false", "rollout.compile_decode=true",
                    "rollout.layer_impl=stock"):
        with pytest.raises(ConfigError, match="unknown config key"):
            build_config(None, [removed])


@pytest.mark.parametrize("override", ["ple.layers=compiled", "ple.attention=flash", "rollout.merged_projections=true",
                                      "ple.loss_impl=whole_pairs"])
def test_experimental_values_need_the_experimental_key(override):
    """A value not yet timed on a GPU is a ConfigError naming the key unless experimental=true."""
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"{key}={value} is experimental.*set experimental=true"):
        build_config(None, [override])
    cfg = build_config(None, [override, "experimental=true"])
    assert cfg.experimental is True


@pytest.mark.parametrize("algo", ["ple", "raft", "distill", "ple+whole_pairs"])
def test_alignment_micro_batches_read_nothing_from_the_device_once_queued(tmp_path, monkeypatch, algo):
    """After a micro-batch's forward is queued, nothing reads device data on the host until the last
    backward is: each such read (a loss.item(), a count, a copy of rewards to the GPU) would hold the
    host until the GPU caught up, and the next launches would trickle out behind an idle GPU. The loss
    and the ranked count are summed on the device and read once; each micro-batch's scored rows are
    picked (one nonzero, on the CPU-built layout) before its forward."""
    from host_reads import HostReads

    from ple_fast import loss
    from ple_fast.algorithms import Samples

    monkeypatch.setattr(loss, "_check_index_ranges", lambda *args: None)     # CPU-only checks
    # segments: a packed backend with no host reads of its own that runs on CPU tensors on any machine
    algo, _, loss_impl = algo.partition("+")    # whole_pairs: its chunk bounds come from the host's lengths
    trainer = small_trainer(tmp_path, f"ple.algo={algo}", "ple.grad_accum=3", "ple.attention=segments",
                            *([f"ple.loss_impl={loss_impl}", "experimental=true"] if loss_impl else []))
    trainer.model.train()
    trainer.state.totals = {"ranked": 0, "dropped": 0}
    rng = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, 50, (n,), generator=rng).tolist()  # noqa: E731
    q_ids, first, second = [draw(5) for _ in range(6)], [draw(4) for _ in range(6)], [draw(3) for _ in range(6)]
    samples = trainer.cfg.ple.raft_samples if algo == "raft" else 2
    drawn = [draw(4) for _ in range(6 * samples)] if algo == "raft" else None
    rewards = torch.randn(6, samples, generator=rng)
    with HostReads() as host:
        value = trainer.alignment_loss(q_ids, Samples(first, second, drawn), rewards, [True] * 6)
    assert math.isfinite(value)
    names = [name for name, _ in host.events]
    queued = names[names.index("embedding"):]
    between = [e for e in queued if e != "embedding"]
    assert between == ["nonzero", "nonzero"], queued        # micro-batches 2 and 3, before their forwards
    assert queued.count("embedding") == 3
