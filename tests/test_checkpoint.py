"""Checkpoints: bitwise round trip, RNG streams, atomicity under crashes and SIGKILL, keep-last-k."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ple_fast.checkpoint import (CheckpointError, capture_rng_state, find_checkpoint, load_checkpoint,
                                 read_manifest, restore_rng_state, save_checkpoint)
from ple_fast.models import build_tiny_llama, build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 48


def tiny(seed=0, layers=1, hidden=32, dtype=torch.float32, tie=True):
    model = build_tiny_llama(VOCAB, hidden_size=hidden, layers=layers, heads=2, kv_heads=1, seed=seed)
    if not tie:
        from transformers import LlamaForCausalLM

        config = model.config
        config.tie_word_embeddings = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    return model.to(dtype)


def tokenizer():
    return build_word_tokenizer(["alpha beta gamma delta"])


def train_step(model, optimizer, scheduler=None):
    """One AdamW step on a batch drawn from the global torch RNG."""
    ids = torch.randint(3, VOCAB, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def make_optim(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_same_nested(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_nested(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save(run_dir, step, model, optimizer, scheduler=None, keep_last=3, **state):
    return save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer(), optimizer=optimizer,
                           scheduler=scheduler, trainer_state={"step": step, **state}, keep_last=keep_last)


def test_round_trip_is_bitwise_and_training_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = tiny(seed=0)
    optimizer, scheduler = make_optim(model)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    tau = 0.2
    for _ in range(37):
        tau *= 0.9
    state = {"iteration": 3, "cursor": 17, "tau": tau, "tiny": 5e-324, "third": 0.1 + 0.2,
             "normalizer": {"mode": "running_zscore", "count": 12, "mean": -0.123456789012345678, "m2": 3.3},
             "history": [{"loss": 1.25, "ranked_share": None}], "inf": math.inf}
    path = save(tmp_path, 2, model, optimizer, scheduler, **state)
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert (path / "model" / "model.safetensors").is_file() and (path / "model" / "config.json").is_file()
    assert (path / "model" / "tokenizer.json").is_file()
    assert read_manifest(path)["model_format"] == "hf_safetensors"

    train_step(model, optimizer, scheduler)           # the uninterrupted run goes on
    expected_after = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)                            # a fresh "process": other weights, other RNG
    resumed = tiny(seed=1)
    opt2, sched2 = make_optim(resumed)
    train_step(resumed, opt2, sched2)
    loaded = load_checkpoint(path, model=resumed, optimizer=opt2, scheduler=sched2)
    assert loaded == {"step": 2, **state}
    assert loaded["tau"] == tau and loaded["third"] == 0.1 + 0.2 and loaded["tiny"] == 5e-324
    assert resumed.lm_head.weight.data_ptr() == resumed.model.embed_tokens.weight.data_ptr()  # still tied
    assert sched2.state_dict()["last_epoch"] == 2
    train_step(resumed, opt2, sched2)
    assert_same_tensors(resumed.state_dict(), expected_after)
    assert_same_nested(opt2.state_dict(), optimizer.state_dict())
    assert sched2.state_dict() == scheduler.state_dict()


@pytest.mark.parametrize("dtype,tie", [(torch.bfloat16, True), (torch.float32, False)])
def test_round_trip_bf16_and_untied(tmp_path, dtype, tie):
    model = tiny(seed=0, dtype=dtype, tie=tie)
    optimizer, _ = make_optim(model)
    train_step(model, optimizer)
    path = save(tmp_path, 1, model, optimizer)
    other = tiny(seed=5, dtype=dtype, tie=tie)
    opt2, _ = make_optim(other)
    load_checkpoint(path, model=other, optimizer=opt2)
    assert_same_tensors(other.state_dict(), model.state_dict())
    assert_same_nested(opt2.state_dict(), optimizer.state_dict())


def test_rng_streams_continue_after_restore(tmp_path):
    def draw(gens):
        return (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist(),
                torch.randn(2).tolist(), gens["shuffle"].random(), torch.rand(3, generator=gens["torch"]).tolist(),
                gens["numpy"].integers(0, 1 << 62, 2).tolist())

    def new_gens(seed):
        gen = torch.Generator()
        gen.manual_seed(seed)
        return {"shuffle": random.Random(seed), "torch": gen, "numpy": np.random.default_rng(seed)}

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    gens = new_gens(4)
    draw(gens)
    np.random.randn()                         # leaves a cached gaussian in numpy's legacy state
    model = tiny()
    optimizer, _ = make_optim(model)
    path = save_checkpoint(tmp_path, 0, model=model, tokenizer=None, optimizer=optimizer,
                           trainer_state={}, keep_last=0, generators=gens)
    expected = [draw(gens) for _ in range(3)]

    random.seed(9), np.random.seed(9), torch.manual_seed(9)      # scramble everything
    fresh = new_gens(99)
    draw(fresh)
    load_checkpoint(path, model=tiny(seed=3), generators=fresh)
    assert [draw(fresh) for _ in range(3)] == expected

    state = capture_rng_state(gens)                               # in memory, no files
    expected = draw(gens)
    restore_rng_state(state, gens)
    assert draw(gens) == expected

    with pytest.raises(CheckpointError, match=r"generators\['missing'\] is not in the checkpoint"):
        load_checkpoint(path, model=tiny(), generators={"missing": random.Random(0)})
    with pytest.raises(CheckpointError, match="saved as a python generator"):
        load_checkpoint(path, model=tiny(), generators={"shuffle": torch.Generator()})
    with pytest.raises(TypeError, match="cannot checkpoint a int"):
        capture_rng_state({"bad": 3})


def test_injected_crash_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    optimizer, _ = make_optim(model)
    train_step(model, optimizer)
    first = save(tmp_path, 1, model, optimizer)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def disk_full(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.truncate(fh.tell() // 2)
        raise OSError(28, "No space left on device")

    train_step(model, optimizer)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 2, model, optimizer)
    monkeypatch.undo()
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert entries == ["step-00000001"]                          # no half checkpoint, no temp left
    assert find_checkpoint(tmp_path, "auto") == first
    other = tiny(seed=7)
    load_checkpoint(first, model=other)
    assert_same_tensors(other.state_dict(), saved_weights)

    with pytest.raises(KeyboardInterrupt):                       # interrupted by the user mid-save
        save_checkpoint(tmp_path, 3, model=model, tokenizer=None, optimizer=optimizer,
                        scheduler=_Interrupting(), trainer_state={}, keep_last=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


class _Interrupting:
    def state_dict(self):
        raise KeyboardInterrupt


def _fake_incomplete(parent: Path, first: Path):
    """The leftovers a crash or a careless copy can leave, all newer than `first`."""
    stale = parent / ".tmp-step-00000009-4242"
    (stale / "model").mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"\0" * 10)
    no_manifest = parent / "step-00000010"
    no_manifest.mkdir()
    (no_manifest / "trainer_state.json").write_text("{}")
    truncated = parent / "step-00000011"
    import shutil

    shutil.copytree(first, truncated)
    with open(truncated / "optimizer.pt", "r+b") as fh:
        fh.truncate(5)
    missing_file = parent / "step-00000012"
    shutil.copytree(first, missing_file)
    (missing_file / "rng.pt").unlink()
    bad_manifest = parent / "step-00000013"
    shutil.copytree(first, bad_manifest)
    (bad_manifest / "checkpoint.json").write_text('{"step": 13')
    return stale, [no_manifest, truncated, missing_file, bad_manifest]


def test_auto_picks_newest_complete_and_next_save_cleans_temps(tmp_path):
    assert find_checkpoint(tmp_path, "auto") is None                 # no checkpoints folder yet
    assert find_checkpoint(tmp_path, None) is None
    model = tiny()
    optimizer, _ = make_optim(model)
    save(tmp_path, 1, model, optimizer)
    second = save(tmp_path, 2, model, optimizer)
    stale, incomplete = _fake_incomplete(tmp_path / "checkpoints", second)
    assert find_checkpoint(tmp_path, "auto") == second
    for path in incomplete:
        with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
            find_checkpoint(tmp_path, path)
    third = save(tmp_path, 3, model, optimizer, keep_last=2)
    assert not stale.exists()
    assert find_checkpoint(tmp_path, "auto") == third
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # keep-last counts complete checkpoints only; the odd folders are left for a human to look at
    assert remaining == ["step-00000002", "step-00000003"] + [p.name for p in incomplete]


def test_find_checkpoint_explicit_paths(tmp_path):
    model = tiny()
    optimizer, _ = make_optim(model)
    path = save(tmp_path, 4, model, optimizer)
    assert find_checkpoint(tmp_path / "elsewhere", str(path)) == path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path, tmp_path / "checkpoints" / "step-00000005")
    with pytest.raises(CheckpointError, match="looks like a run folder"):
        find_checkpoint(tmp_path, tmp_path)
    with pytest.raises(CheckpointError, match="pass one of the step-XXXXXXXX folders"):
        find_checkpoint(tmp_path, tmp_path / "checkpoints")


def test_keep_last_and_resave(tmp_path):
    model = tiny()
    optimizer, _ = make_optim(model)
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep_last=2)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names() == ["step-00000004", "step-00000005"]
    for step in range(6, 9):
        save(tmp_path, step, model, optimizer, keep_last=0)          # 0 keeps all
    assert names() == [f"step-{s:08d}" for s in range(4, 9)]
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    path = save(tmp_path, 8, model, optimizer, keep_last=0, again=True)   # same step again: replaced
    assert json.loads((path / "trainer_state.json").read_text())["again"] is True
    other = tiny(seed=2)
    load_checkpoint(path, model=other)
    assert torch.equal(other.model.norm.weight, torch.full_like(other.model.norm.weight, 3.0))
    save(tmp_path, 3, model, optimizer, keep_last=1)       # the one just written is never pruned
    assert names() == ["step-00000003"]
    assert find_checkpoint(tmp_path, "auto").name == "step-00000003"
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 9, model, optimizer, keep_last=-1)
    with pytest.raises(ValueError, match="step must be an int"):
        save(tmp_path, -1, model, optimizer)


def test_trainer_state_must_round_trip_through_json(tmp_path):
    model = tiny()
    optimizer, _ = make_optim(model)
    bad = [({"cursor": (1, 2)}, r"\['cursor'\] is a tuple.*use a list"),
           ({"tau": np.float32(0.2)}, r"\['tau'\] is a float32.*\.item\(\)"),
           ({"a": [{"b": torch.tensor(1.0)}]}, r"\['a'\]\[0\]\['b'\] is a Tensor"),
           ({"by_step": {3: 1.0}}, r"key 3 is a int")]
    for state, message in bad:
        with pytest.raises(TypeError, match=message):
            save_checkpoint(tmp_path, 1, model=model, tokenizer=None, optimizer=optimizer,
                            trainer_state=state, keep_last=1)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_strict_weight_loading_names_the_problem(tmp_path):
    model = tiny(layers=1)
    optimizer, _ = make_optim(model)
    path = save(tmp_path, 1, model, optimizer)
    with pytest.raises(CheckpointError, match=r"missing keys, e.g. \['model.layers.1"):
        load_checkpoint(path, model=tiny(layers=2))
    with pytest.raises(CheckpointError, match=r"step-00000001/model: .*model.embed_tokens.weight: file has "
                                              r"torch.float32 \(48, 32\), model has torch.float32 \(48, 64\)"):
        load_checkpoint(path, model=tiny(hidden=64))
    bigger = tiny(layers=2)
    opt2, _ = make_optim(bigger)
    path2 = save(tmp_path / "b", 1, bigger, opt2)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(path2, model=tiny(layers=1))
    opt_small, _ = make_optim(tiny(layers=2))
    with pytest.raises(CheckpointError, match="optimizer.pt: does not match the optimizer"):
        load_checkpoint(path, model=tiny(layers=1), optimizer=opt_small)
    _, sched = make_optim(tiny())
    with pytest.raises(CheckpointError, match="no scheduler.pt"):
        load_checkpoint(path, model=tiny(), scheduler=sched)


def test_peft_adapter_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)

    def lora(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return peft.get_peft_model(tiny(seed=0), config)

    model = lora(0)
    optimizer, _ = make_optim(model)
    train_step(model, optimizer)
    path = save(tmp_path, 1, model, optimizer)
    manifest = read_manifest(path)
    assert manifest["model_format"] == "peft_adapter" and "adapter" in manifest["note"]
    assert (path / "model" / "adapter_model.safetensors").is_file()
    assert not (path / "model" / "model.safetensors").exists()
    other = lora(1)
    opt2, _ = make_optim(other)
    load_checkpoint(path, model=other, optimizer=opt2)
    assert_same_tensors(other.state_dict(), model.state_dict())
    assert_same_nested(opt2.state_dict(), optimizer.state_dict())
    with pytest.raises(CheckpointError, match="holds a PEFT adapter"):
        load_checkpoint(path, model=tiny())
    plain_path = save(tmp_path / "plain", 1, tiny(), make_optim(tiny())[0])
    with pytest.raises(CheckpointError, match="holds a full model"):
        load_checkpoint(plain_path, model=lora(2))


# --- SIGKILL in a separate process --------------------------------------------------------------

CHILD_SETUP = """
import sys, time, torch
from ple_fast.checkpoint import save_checkpoint
from ple_fast.models import build_tiny_llama

def build(vocab, hidden):
    model = build_tiny_llama(vocab, hidden_size=hidden, layers=1, heads=4, kv_heads=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)       # elementwise only: the parent reproduces it exactly
    optimizer.step()
    return model, optimizer
"""


def _child(script: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD_SETUP) + textwrap.dedent(script),
                             *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)     # never hang the test suite
    watchdog.daemon = True
    watchdog.start()
    return proc


def _reference(vocab, hidden):
    model = build_tiny_llama(vocab, hidden_size=hidden, layers=1, heads=4, kv_heads=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return model, optimizer


def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path):
    proc = _child("""
        run_dir = sys.argv[1]
        model, optimizer = build(500, 64)
        save_checkpoint(run_dir, 1, model=model, tokenizer=None, optimizer=optimizer,
                        trainer_state={"step": 1}, keep_last=3)
        real_save = torch.save
        def stall_halfway(obj, fh, *args, **kwargs):
            real_save(obj, fh, *args, **kwargs)
            fh.truncate(fh.tell() // 2)
            fh.flush()
            print("MIDWRITE", flush=True)
            time.sleep(600)
        torch.save = stall_halfway
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        save_checkpoint(run_dir, 2, model=model, tokenizer=None, optimizer=optimizer,
                        trainer_state={"step": 2}, keep_last=3)
    """, tmp_path)
    line = proc.stdout.readline()
    assert line.strip() == "MIDWRITE", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parent = tmp_path / "checkpoints"
    temps = [p for p in parent.iterdir() if p.name.startswith(".tmp-step-00000002")]
    assert len(temps) == 1 and (temps[0] / "model" / "model.safetensors").is_file()   # killed mid-save
    assert not (parent / "step-00000002").exists()
    found = find_checkpoint(tmp_path, "auto")
    assert found == parent / "step-00000001"

    expected_model, expected_opt = _reference(500, 64)
    model = build_tiny_llama(500, hidden_size=64, layers=1, heads=4, kv_heads=2, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert load_checkpoint(found, model=model, optimizer=optimizer) == {"step": 1}
    assert_same_tensors(model.state_dict(), expected_model.state_dict())
    assert_same_nested(optimizer.state_dict(), expected_opt.state_dict())

    save_checkpoint(tmp_path, 2, model=model, tokenizer=None, optimizer=optimizer,
                    trainer_state={"step": 2}, keep_last=3)
    assert sorted(p.name for p in parent.iterdir()) == ["step-00000001", "step-00000002"]


def test_sigkill_at_a_random_moment_of_a_save_loop(tmp_path):
    """A ~50 MB checkpoint saved over and over; whenever the kill lands, only complete ones remain."""
    keep_last = 2
    proc = _child("""
        run_dir = sys.argv[1]
        model, optimizer = build(16000, 256)
        for step in range(1, 1000):
            with torch.no_grad():
                model.model.norm.weight.fill_(float(step))
            save_checkpoint(run_dir, step, model=model, tokenizer=None, optimizer=optimizer,
                            trainer_state={"step": step}, keep_last=%d)
            print(step, flush=True)
    """ % keep_last, tmp_path)
    assert proc.stdout.readline().strip() == "1", proc.stderr.read()
    time.sleep(random.Random().uniform(0.0, 0.6))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parent = tmp_path / "checkpoints"
    steps = sorted(p for p in parent.iterdir() if p.name.startswith("step-"))
    assert 1 <= len(steps) <= keep_last + 1          # +1: killed between the rename and the pruning
    for path in steps:
        assert find_checkpoint(tmp_path, path) == path                  # complete, or this raises
    newest = find_checkpoint(tmp_path, "auto")
    assert newest == steps[-1]
    step = int(newest.name.split("-")[1])
    model = build_tiny_llama(16000, hidden_size=256, layers=1, heads=4, kv_heads=2, seed=1)
    assert load_checkpoint(newest, model=model) == {"step": step}
    assert torch.equal(model.model.norm.weight, torch.full((256,), float(step)))
    expected, _ = _reference(16000, 256)
    assert torch.equal(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_states_and_weights_on_device(tmp_path):
    torch.manual_seed(0)
    model = tiny().cuda()
    optimizer, _ = make_optim(model)
    torch.rand(3, device="cuda")                       # CUDA is initialised and its stream moved on
    path = save(tmp_path, 1, model, optimizer)
    assert len(torch.load(path / "rng.pt", weights_only=True)["torch_cuda"]) == torch.cuda.device_count()
    expected = [torch.rand(5, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(9)
    other = tiny(seed=2).cuda()
    opt2, _ = make_optim(other)
    load_checkpoint(path, model=other, optimizer=opt2)
    assert all(torch.equal(torch.rand(5, device=f"cuda:{i}").cpu(), e) for i, e in enumerate(expected))
    assert_same_tensors(other.state_dict(), model.state_dict())
    assert_same_nested(opt2.state_dict(), optimizer.state_dict())
