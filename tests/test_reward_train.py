"""`python -m ple_fast.reward_train`: encoding, scoring, loss, config and end-to-end runs."""
import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ViTConfig

from ple_fast.config import ConfigError, RewardTrainConfig
from ple_fast.data import LengthRule, PreferenceExample
from ple_fast.models import build_tiny_llama, build_word_tokenizer
from ple_fast.reward import build_reward, join_text
from ple_fast.reward_run import (EncodedPairs, bradley_terry_loss, build_embedded_model, encode_pairs,
                                 encode_scored_text, encode_scored_texts, load_reward_base, lr_factor, pairwise_eval,
                                 score, score_pairs, score_reference)
from ple_fast.reward_train import build_rm_config, main

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
WORDS = "<bos> human : how do i make tea ? assistant : sure , boil water and add leaves . sorry no"


def bos_eos_tokenizer():
    """A word tokenizer whose template wraps every text in <bos> ... <eos>, like many real ones."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_word_tokenizer([WORDS])
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", tokenizer.eos_token_id)])
    return tokenizer


def tiny_rm(tokenizer, seed=0):
    cfg = RewardTrainConfig()
    cfg.model.hidden_size, cfg.model.layers, cfg.model.heads, cfg.run.seed = 32, 1, 2, seed
    return build_embedded_model(cfg, tokenizer).eval()


# --------------------------------------------------------------------------- encoding


def test_encoding_is_what_hfreward_tokenizes_when_it_fits():
    tokenizer = bos_eos_tokenizer()
    prompt, response = "human : how do i make tea ? assistant :", "sure , boil water ."
    pairs = [PreferenceExample(prompt, response, "sorry no")]
    encoded, stats = encode_pairs(tokenizer, pairs, LengthRule(100, 100))
    assert encoded.chosen[0] == tokenizer(join_text(prompt, response))["input_ids"]
    assert encoded.rejected[0] == tokenizer(join_text(prompt, "sorry no"))["input_ids"]
    assert encoded.chosen[0][0] == tokenizer.convert_tokens_to_ids("<bos>")
    assert encoded.chosen[0][-1] == tokenizer.eos_token_id
    assert stats.kept == 2 and stats.truncated == 0


def test_truncation_keeps_prompt_end_response_start_and_special_tokens():
    tokenizer = bos_eos_tokenizer()
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos, eos = tokenizer.convert_tokens_to_ids("<bos>"), tokenizer.eos_token_id
    prompt, response = "human : how do i make tea ? assistant :", "sure , boil water and add leaves ."
    text = encode_scored_text(tokenizer, prompt, response)
    assert (text.prefix, text.prompt, text.response, text.suffix) == ([bos], ids(prompt), ids(response), [eos])
    pair = [PreferenceExample(prompt, response, "sorry no")]
    encoded, stats = encode_pairs(tokenizer, pair, LengthRule(3, 2))
    assert encoded.chosen[0] == [bos] + ids("? assistant :") + ids("sure ,") + [eos]
    assert encoded.rejected[0] == [bos] + ids("? assistant :") + ids("sorry no") + [eos]
    assert stats.truncated_prompts == 2 and stats.truncated_responses == 1
    skipped, stats = encode_pairs(tokenizer, pair, LengthRule(100, 2, "skip"))
    assert len(skipped) == 0 and stats.skipped == 1            # one long side drops the whole pair
    # an empty response (HH has a few) is still a scorable text
    empty = encode_scored_text(tokenizer, prompt, "")
    assert empty.response == [] and empty.prompt == ids(prompt)


def test_batched_encoding_equals_one_text_at_a_time():
    from ple_fast.data import load_preferences

    tokenizer = bos_eos_tokenizer()
    prompts = ["human : how do i make tea ? assistant :", "human : tea ?", "human : how do i make tea ? assistant :"]
    responses = ["sure , boil water .", "", "unknownword sorry no"]
    if HH_SAMPLE.is_file():                                       # real dialogues, unknown words and all
        pairs = load_preferences(HH_SAMPLE)[:40]
        prompts += [p.prompt for p in pairs] * 2
        responses += [p.chosen for p in pairs] + [p.rejected for p in pairs]
    fast = encode_scored_texts(tokenizer, prompts, responses)
    assert fast == [encode_scored_text(tokenizer, p, r) for p, r in zip(prompts, responses)]
    assert encode_scored_texts(tokenizer, [], []) == []


# --------------------------------------------------------------------------- scoring + loss


def test_padded_batch_scores_equal_one_by_one_forwards():
    tokenizer = build_word_tokenizer([WORDS])
    model = tiny_rm(tokenizer)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, len(tokenizer), (n,), generator=gen).tolist() for n in (1, 7, 3, 12, 5)]
    with torch.no_grad():
        fast = score(model, seqs, tokenizer.pad_token_id)
        ref = score_reference(model, seqs)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        chosen, rejected = score_pairs(model, seqs[:2], seqs[2:4], tokenizer.pad_token_id)
        torch.testing.assert_close(torch.cat([chosen, rejected]), ref[:4], rtol=1e-5, atol=1e-5)


def test_bradley_terry_loss_matches_the_formula_and_stays_finite():
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=gen, dtype=torch.float64) * 3, torch.randn(64, generator=gen,
                                                                                         dtype=torch.float64) * 3
    ref = torch.log1p(torch.exp(-(chosen - rejected))).mean()
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), ref)
    extreme = bradley_terry_loss(torch.tensor([200.0, -200.0]), torch.tensor([-200.0, 200.0]))
    assert extreme.item() == pytest.approx(200.0, rel=1e-6)      # log1p(exp(400)) / 2 without overflow
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_pairwise_eval_accuracy_ties_and_margin():
    tokenizer = build_word_tokenizer([WORDS])
    model = tiny_rm(tokenizer)
    a, b, c = ([5, 6, 7], [8, 9], [10, 11, 12, 13])
    with torch.no_grad():
        ra, rb, rc = score_reference(model, [a, b, c]).tolist()
    pairs = EncodedPairs([a, b, c, c], [b, a, a, b])
    result = pairwise_eval(model, pairs, tokenizer.pad_token_id, batch_size=3)
    expected = [ra - rb, rb - ra, rc - ra, rc - rb]
    assert all(abs(m) > 1e-4 for m in expected)                  # no near-ties: accuracy is exact
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in expected) / 4)
    assert result["margin"] == pytest.approx(sum(expected) / 4, abs=1e-5)
    assert result["loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in expected) / 4, abs=1e-5)
    assert model.training is False and pairwise_eval(model, EncodedPairs([], []), 0, 4)["pairs"] == 0
    with torch.no_grad():
        model.score.weight.zero_()                                # every reward 0: every pair a tie
    tied = pairwise_eval(model, pairs, tokenizer.pad_token_id, batch_size=2)
    assert tied["accuracy"] == 0.5 and tied["margin"] == 0.0 and tied["loss"] == pytest.approx(math.log(2))


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "cosine") < 0.03 and lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)


# --------------------------------------------------------------------------- end to end


def test_embedded_default_ranks_aligned_over_misaligned_on_heldout_queries(tmp_path):
    from ple_fast.task import HARMFUL, aligned_response, build_task, harmful_compliance, over_refusal

    summary = main(["--out", str(tmp_path / "rm")])
    assert summary["after"]["accuracy"] >= 0.9 and summary["after"]["pairs"] >= 20
    assert summary["after"]["loss"] < summary["before"]["loss"]
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in records if r["phase"] == "eval"] == ["before", "after"]
    assert any(r["phase"] == "train" for r in records)
    resolved = yaml.safe_load((tmp_path / "rm" / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["epochs"] == 5   # auto values written out

    reward = build_reward("hf", summary["model_dir"])
    assert reward.model.config.num_labels == 1 and reward.model.config.pad_token_id == reward.tokenizer.pad_token_id
    tags = dict(HARMFUL)
    heldout = build_task(0).eval_queries
    queries = [q.text for q in heldout]
    good = reward(queries, [aligned_response(q.phrase) for q in heldout])
    bad = reward(queries, [harmful_compliance(q.phrase, tags[q.phrase]) if q.harmful else over_refusal(q.phrase)
                           for q in heldout])
    assert (good > bad).float().mean().item() >= 0.9

    # a saved reward model is a valid base for more training: its head loads, nothing is new
    model, tokenizer, head_is_new = load_reward_base(summary["model_dir"], torch.float32)
    assert head_is_new is False
    with torch.no_grad():
        again = score(model.eval(), [tokenizer(join_text(queries[0], "sure ,"))["input_ids"]], tokenizer.pad_token_id)
    assert again.item() == pytest.approx(reward([queries[0]], ["sure ,"]).item(), abs=1e-5)


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason=f"{HH_SAMPLE} is absent")
def test_tiny_run_on_the_hh_sample_writes_a_loadable_folder(tmp_path, capsys):
    texts = []
    with gzip.open(HH_SAMPLE, "rt") as fh:
        for i, line in zip(range(100), fh):
            record = json.loads(line)
            texts += [record["chosen"], record["rejected"]]
    tokenizer = build_word_tokenizer(texts)
    base = tmp_path / "base"
    build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    summary = main([f"model.path={base}", f"data.path={HH_SAMPLE}", "data.max_pairs=48", "data.max_eval_pairs=24",
                    "data.max_prompt_tokens=48", "data.max_response_tokens=24", "train.steps=3",
                    "train.batch_size=8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "score head is NEW" in printed and "Held-out pairwise accuracy (24 pairs)" in printed
    assert summary["train_pairs"] == 48 and summary["steps"] == 3
    assert 0.0 <= summary["after"]["accuracy"] <= 1.0 and math.isfinite(summary["after"]["loss"])
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-5
    reward = build_reward("hf", str(out / "model"))
    scores = reward(["\n\nHuman: hi\n\nAssistant:"] * 2, ["Hello!", "I can not help."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


# --------------------------------------------------------------------------- errors


def test_bad_config_key_suggests_the_closest(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr'"):
        build_rm_config(None, ["train.lrr=0.1"])
    path = tmp_path / "rm.yaml"
    path.write_text("data:\n  max_prompt_tokns: 64\n")
    with pytest.raises(ConfigError, match=r"rm.yaml.*did you mean 'data.max_prompt_tokens'"):
        build_rm_config(str(path))
    with pytest.raises(ConfigError, match="train.decay: 'step' is not one of"):
        build_rm_config(None, ["train.decay=step"])
    for override, message in (("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
                              ("train.lr=0", "train.lr: must be greater than 0.0"),
                              ("data.eval_fraction=1", "data.eval_fraction: must be less than 1.0"),
                              ("train.warmup_steps=-1", "train.warmup_steps: must be at least 0")):
        with pytest.raises(ConfigError, match=message):
            build_rm_config(None, [override])
    with pytest.raises(ConfigError, match="model.hidden_size=30 must be a multiple of model.heads=4"):
        build_rm_config(None, ["model.hidden_size=30", "model.heads=4"])     # a rule between keys
    with pytest.raises(SystemExit) as exc:
        main(["data.pth=x.jsonl", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "did you mean 'data.path'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_files_and_wrong_models_fail_before_training(tmp_path, capsys):
    tokenizer = build_word_tokenizer([WORDS])
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "human : make tea ?", "chosen": "sure", "rejected": "no"}) + "\n")
    out = tmp_path / "run"
    cases = [([f"model.path={tmp_path / 'nope'}", f"data.path={data}"],
              "model.path: base model folder .* does not exist"),
             ([f"model.path={tmp_path}", f"data.path={tmp_path / 'missing.jsonl'}"], "no config.json"),
             ([f"data.path={data}"], "model.path is not"),
             ([f"model.path={tmp_path}"], "data.path must name")]
    base = tmp_path / "base"
    build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cases.append(([f"model.path={base}", f"data.path={tmp_path / 'missing.jsonl'}"],
                  r"data.path: file .*missing.jsonl.* does not exist"))
    two_labels = tmp_path / "cls2"
    model = tiny_rm(tokenizer)
    model.config.num_labels = 2
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.config.save_pretrained(two_labels)
    cases.append(([f"model.path={two_labels}", f"data.path={data}"], "num_labels=2; a reward model needs exactly one"))
    vision = tmp_path / "vit"                                       # a model type with no text classifier
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vision)
    cases.append(([f"model.path={vision}", f"data.path={data}"], "cannot be loaded as a sequence-classification"))
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([*overrides, "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (overrides, err)
        assert not (out / "metrics.jsonl").exists()
