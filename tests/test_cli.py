"""The command lines as a user meets them: help, bad input (exit 2, one line, the run folder untouched),
rewards that give nothing to learn from, and output that reads the same in a terminal and in a log."""
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ple_fast.train import main

TINY = ["sft.steps=2", "sft.batch_size=8", "ple.iterations=1", "ple.batch_size=96", "eval.samples=1",
        "eval.max_queries=8", "run.plots=false", "run.threads=1"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(capsys, args, message: str) -> None:
    """Exit status 2, and one line on stderr that says `message`, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    main([*TINY, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    from ple_fast.models import build_tiny_llama, build_word_tokenizer, save_policy

    folder = tmp_path_factory.mktemp("policy")
    tokenizer = build_word_tokenizer(["hello there", "how are you", "fine thanks"])
    save_policy(build_tiny_llama(len(tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
                tokenizer, folder)
    return folder


def test_help_answers_at_once_and_lists_what_to_set():
    for module in ("ple_fast.train", "ple_fast.reward_train"):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and time.perf_counter() - started < 10, proc.stderr
        assert "Sections:" in proc.stdout and "docs/config.md" in proc.stdout and "Examples:" in proc.stdout
        assert proc.stdout.count(f"python -m ple_fast.") >= 3
    assert "Shipped configs (--config NAME): default, hh_rlhf, lora, multi_gpu" in \
        subprocess.run([sys.executable, "-m", "ple_fast.train", "--help"], capture_output=True, text=True).stdout
    probe = "import sys, ple_fast.train, ple_fast.reward_train; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_a_failed_start_leaves_a_finished_run_folder_as_it_was(finished_run, policy_folder, tmp_path, capsys):
    before = snapshot(finished_run)
    assert "metrics.jsonl" in before and "config.yaml" in before and "model/model.safetensors" in before
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "hello", "response": "fine"}\n{"prompt": "how are\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "hello", "response": "fine"}\n{"prompt": "how are you"}\n')
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    real = [f"model.path={policy_folder}", "reward.kind=python", "reward.path=json:dumps"]
    for args, message in (
            ([*real, f"data.sft_path={bad_json}"], "bad.jsonl:2:"),
            ([*real, f"data.sft_path={missing}"], "missing.jsonl:2:"),
            (["reward.kind=python", "reward.path=nomodule_xyz:fn"], "cannot import module 'nomodule_xyz'"),
            (["reward.kind=python", "reward.path=json:missing_fn"], "has no attribute 'missing_fn'"),
            ([f"data.sft_path={missing}"], "data.sft_path is set but model.path is not"),
            ([f"model.path={empty_folder}"], "has no config.json"),     # the folder before the reward's rule
            (["ple.tua0=0.1"], "did you mean 'ple.tau0'")):
        fails_cleanly(capsys, [*TINY, *args, "--out", str(finished_run)], message)
        assert snapshot(finished_run) == before, args


def write_reward(tmp_path, monkeypatch, body: str) -> str:
    module = tmp_path / "rewards_under_test.py"
    module.write_text("import math\n\ndef reward(queries, responses):\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rewards_under_test", None)
    return "rewards_under_test:reward"


def test_a_reward_of_nothing_but_nan_stops_the_run(tmp_path, monkeypatch, capsys):
    spec = write_reward(tmp_path, monkeypatch, "    return [math.nan] * len(responses)\n")
    fails_cleanly(capsys, [*TINY, "ple.iterations=3", "reward.kind=python", f"reward.path={spec}",
                           "--out", str(tmp_path / "run")],
                  f"2 batches in a row had no pair with finite rewards: the reward {spec} returned e.g. [nan")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["phase"] == "align"]       # it stopped inside the first iteration


def test_dropped_pairs_and_nonfinite_rewards_are_shown(tmp_path, monkeypatch, capsys):
    spec = write_reward(tmp_path, monkeypatch,
                        "    return [math.nan if i % 4 == 0 else float(len(r)) for i, r in enumerate(responses)]\n")
    main([*TINY, "reward.kind=python", f"reward.path={spec}", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("[ple] iter 1/1")]
    assert " dropped " in line and " of 192 (" in line
    assert "non-finite rewards (left out)" in (tmp_path / "run" / "results.md").read_text()
    assert "| non-finite rewards 2 (25.0%)" in out                  # the SFT-start evaluation's line: 2 of 8


def test_output_to_a_file_has_no_bars_and_one_line_per_record(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "ple_fast.train", *TINY, "--algo", "raft",
                               "sft.warmup_steps=5", "--out", str(tmp_path / "run")], stdout=fh,
                              stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "Loading weights" not in text and "Writing model shards" not in text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = text.splitlines()
    for phase, prefix in (("sft", "[sft] step"), ("align", "[raft] iter"), ("eval", "[eval] ")):
        assert len([r for r in records if r["phase"] == phase]) == len([x for x in lines if x.startswith(prefix)])
    (raft,) = [x for x in lines if x.startswith("[raft] iter")]
    assert "best " in raft and "2nd " in raft and "best beat the 2nd" in raft and "tau" not in raft
    assert "[warn] sft.warmup_steps=5 is longer than the phase's 2 steps: the learning rate peaks at 20% of sft.lr" \
        in lines


def test_raft_scores_its_samples_two_by_two():
    """RAFT's samples go through score_pairs (the batched path PLE takes), an odd one alone; same numbers."""
    import torch

    from ple_fast.algorithms import RAFT, Samples
    from ple_fast.config import PLEConfig, RolloutConfig
    from ple_fast.reward import RewardFunction

    class Length(RewardFunction):
        pairs = 0

        def __call__(self, queries, responses):
            return torch.tensor([float(len(r)) for r in responses])

        def score_pairs(self, queries, first, second):
            Length.pairs += 1
            return super().score_pairs(queries, first, second)

    for n in (2, 3, 4):
        algo = RAFT(PLEConfig(raft_samples=n), RolloutConfig())
        drawn = [[1] * (k + 1) for k in range(2 * n)]                # query-major: query 0's n, then query 1's
        Length.pairs = 0
        raw = algo.score(Length(), ["q0", "q1"], Samples(drawn[0::n], drawn[1::n], drawn),
                         lambda seqs: ["x" * len(s) for s in seqs])
        assert raw.tolist() == [[float(k + 1) for k in range(n)], [float(n + k + 1) for k in range(n)]]
        assert Length.pairs == n // 2
