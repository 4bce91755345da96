"""Drift that a reward can reward and a table could hide: response length, degenerate and distinct
responses, KL from the SFT start, the warnings they trigger; and the learning rates a pretrained model
gets by default."""
import json
import math

import pytest
import torch

from ple_fast.config import build_config, resolve_defaults
from ple_fast.distributed import Dist
from ple_fast.evaluate import degenerate, drift_metrics, format_table, kl_from_sft
from ple_fast.plan import ForwardPlan, Plan
from ple_fast.policy import Policy


def test_degenerate_is_empty_or_a_loop():
    special = {0, 2}
    assert degenerate([], special) and degenerate([2], special) and degenerate([0, 2], special)
    assert degenerate([5, 6, 7, 7, 7], special) and degenerate([9, 5, 6, 5, 6, 5, 6, 2], special)
    assert degenerate([1, 2, 3, 4] * 3, special)                     # a 4-token cycle three times
    assert not degenerate([5, 6, 5, 6], special) and not degenerate([1, 2, 3, 4, 5, 6], special)
    metrics = drift_metrics([[5, 6], [], [7, 7, 7], [5, 6]], ["a", "", "b b b", "a"], special)
    assert metrics == {"mean_response_tokens": 7 / 4, "degenerate_share": 0.5, "distinct_share": 0.75}


def test_kl_from_sft_is_the_mean_log_prob_gap_on_the_sft_samples():
    """KL(SFT || policy) per response: the SFT start's samples, their SFT log-probs taken once, the
    current policy's log-probs of the same samples; here the policy's are computed independently."""
    from ple_fast.models import build_tiny_llama

    model = build_tiny_llama(50, hidden_size=16, layers=1, heads=2, kv_heads=1, seed=3)
    policy = Policy(model, Plan(ForwardPlan("padded", None, "stock", "reference"), "hf", None, None),
                    pad_token_id=0, eos_token_id=2)
    prompts = [[5, 6], [7], [8, 9, 10]]
    samples = [[11, 12, 2], [13], [14, 15]]
    with torch.no_grad():
        now = policy.logprobs(prompts, samples).double().tolist()
    reference = {"samples": samples, "logps": [x + d for x, d in zip(now, (0.5, 1.0, 3.0))]}
    assert kl_from_sft(policy, reference, lambda i: prompts[i], 2, Dist()) == pytest.approx(4.5 / 3)
    assert kl_from_sft(policy, reference, lambda i: prompts[i], 2, Dist(), limit=2) == pytest.approx(1.5 / 2)


def test_the_table_shows_drift_beside_the_rewards():
    before = {"mean_reward": 0.1, "mean_response_tokens": 31.0, "degenerate_share": 0.0, "distinct_share": 0.9,
              "kl_vs_sft": 0.0}
    after = dict(before, mean_response_tokens=6.6, degenerate_share=0.25, distinct_share=0.05, kl_vs_sft=41.0)
    import re

    rows = {cells[0]: cells[1:] for line in format_table(before, after, "raft").splitlines()[2:]
            for cells in [re.split(r"\s{2,}", line.strip())]}
    assert rows["mean response length (tokens)"] == ["31.0", "6.6", "-24.400"]
    assert rows["degenerate responses (empty, loops)"] == ["0.0%", "25.0%", "+25.0 pts"]
    assert rows["distinct responses"] == ["90.0%", "5.0%", "-85.0 pts"]
    assert rows["KL(SFT || policy) per response"] == ["0.000", "41.000", "+41.000"]


@pytest.mark.parametrize("overrides,kind,lrs", [
    ([], "embedded", (3e-3, 1e-4)),
    (["model.path=/m", "reward.kind=hf"], "full", (1e-5, 1e-6)),
    (["model.path=/m", "reward.kind=hf", "lora.enabled=true"], "lora", (2e-4, 1e-4))])
def test_learning_rates_and_warmups_default_by_model_kind(overrides, kind, lrs):
    cfg = build_config(None, ["sft.steps=100", *overrides])
    filled = resolve_defaults(cfg, align_steps=40)
    assert (cfg.sft.lr, cfg.ple.lr) == lrs and filled["sft.lr"] == lrs[0]
    assert (cfg.sft.warmup_steps, cfg.ple.warmup_steps) == ((40, 0) if kind == "embedded" else (3, 2))
    explicit = build_config(None, ["sft.lr=0.5", "ple.warmup_steps=7", *overrides])
    assert "sft.lr" not in resolve_defaults(explicit, align_steps=40) and explicit.sft.lr == 0.5
    assert explicit.ple.warmup_steps == 7 and resolve_defaults(explicit, 40) == {}      # resolved: a no-op


def test_resolved_defaults_are_saved_and_drift_warnings_name_the_cause(tmp_path, capsys):
    from ple_fast.train import main

    main(["sft.steps=2", "sft.batch_size=8", "ple.iterations=1", "ple.batch_size=96", "eval.samples=1",
          "eval.max_queries=8", "run.plots=false", "run.threads=1", "eval.warn_kl=0", "eval.warn_length_change=0",
          "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "[run] defaults for the embedded model: sft.lr=0.003, ple.lr=0.0001, sft.warmup_steps=40" in out
    saved = build_config(str(tmp_path / "run" / "config.yaml"))
    assert (saved.sft.lr, saved.ple.lr, saved.sft.warmup_steps, saved.ple.warmup_steps) == (3e-3, 1e-4, 40, 0)
    (line,) = [x for x in out.splitlines() if x.startswith("[ple] iter 1/1")]
    assert " len " in line and " from SFT)" in line and " degenerate " in line and " KL " in line
    assert "[warn] iteration 1: KL(SFT || policy)" in out and "lower the learning rate (ple.lr=0.0001)" in out
    assert "[warn] the held-out evaluation: mean response length" in out and "reward hacking" in out
    kl = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"drift": "kl"' in r]
    assert len(kl) == 2 and math.isfinite(json.loads(kl[0])["kl_vs_sft"])
