"""End-to-end runs of `python -m ple_fast.train`: the embedded default and a real-format run."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ple_fast.train import main

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
FAST = ["sft.steps=150", "ple.iterations=1", "eval.samples=1"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_run_aligns_the_unprincipled_policy(tmp_path):
    """The full embedded default, exactly as `python -m ple_fast.train` runs it."""
    summary = main(["--out", str(tmp_path / "run")])
    before, after = summary["before"], summary["after"]
    assert after["refusal_rate_harmful"] >= before["refusal_rate_harmful"] + 0.3
    assert after["mean_reward"] >= before["mean_reward"] + 0.3
    assert after["win_rate_vs_sft"] > 0.6 and after["margin_vs_sft"] > 0.3
    assert after["over_refusal_benign"] <= before["over_refusal_benign"]
    assert after["perplexity"] < before["perplexity"]
    records = read_metrics(tmp_path / "run")
    iters = [r for r in records if r["phase"] == "align"]
    assert len(iters) == 5
    taus = [r["tau"] for r in iters]
    assert taus == pytest.approx([0.2 * 0.9 ** i for i in range(5)])
    assert all(0.0 <= r["ranked_share"] <= 1.0 for r in iters)
    assert iters[0]["ranked_share"] > 0.1 and iters[0]["mean_delta"] > 0.2


@pytest.mark.parametrize("algo", ["raft", "distill", "sft"])
def test_baselines_run_with_one_command(tmp_path, algo):
    out = tmp_path / algo
    proc = subprocess.run([sys.executable, "-m", "ple_fast.train", "--algo", algo, "--out", str(out), *FAST],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"after {algo}" in proc.stdout and "win rate over SFT" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo
    if algo == "sft":
        assert summary["iterations"] == [] and summary["after"]["margin_vs_sft"] == 0.0
    else:
        assert len(summary["iterations"]) == 1
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert (out / "config.yaml").is_file() and (out / "results.md").is_file()


def test_bad_config_fails_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ple.tua0=0.1", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "did you mean 'ple.tau0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model.path=" + str(tmp_path / "missing"), "data.sft_path=" + str(tmp_path / "no.jsonl"),
              "reward.kind=python", "reward.path=x:y", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):
        main(["model.path=" + str(tmp_path), "--out", str(tmp_path / "z")])   # builtin reward needs the task


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason="the HH-RLHF sample lives in ../shared (absent in a user's clone)")
def test_real_format_run_on_hh_rlhf(tmp_path, monkeypatch):
    """A local HF model folder + HH-RLHF data + an HF reward-model folder, end to end."""
    from ple_fast.data import read_jsonl, split_hh
    from ple_fast.models import build_tiny_llama, build_word_tokenizer, save_policy
    from test_models_reward import tiny_reward_folder

    lines = [obj for _, obj in read_jsonl(HH_SAMPLE)][:40]
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        for obj in lines:
            fh.write(json.dumps(obj) + "\n")
    texts = [part for obj in lines for part in split_hh(obj["chosen"])] + ["Principle: be harmless."]
    tokenizer = build_word_tokenizer(texts)
    tokenizer.padding_side = "left"
    save_policy(build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
                tokenizer, tmp_path / "policy")
    tiny_reward_folder(tmp_path / "rm", tokenizer)
    summary = main([f"model.path={tmp_path / 'policy'}", f"data.sft_path={data}", "reward.kind=hf",
                    f"reward.path={tmp_path / 'rm'}", "principle=Principle: be harmless.",
                    "sft.steps=4", "sft.batch_size=4", "ple.iterations=1", "ple.batch_size=8",
                    "data.max_queries=8", "data.eval_fraction=0.2", "data.max_prompt_tokens=48",
                    "data.max_response_tokens=16", "eval.samples=1", "eval.max_queries=4",
                    "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "--out", str(tmp_path / "run")])
    assert summary["after"]["perplexity"] > 1.0 and torch.isfinite(torch.tensor(summary["after"]["mean_reward"]))
    records = read_metrics(tmp_path / "run")
    assert [r["phase"] for r in records].count("align") == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
