import math
import sys

import pytest
import torch

from ple_fast.models import build_tiny_llama, build_word_tokenizer, load_policy, save_policy
from ple_fast.reward import HFReward, RewardNormalizer, build_reward

TEXTS = ["human : how do i make tea ? assistant :", "sure , boil water .", "sorry , i can not help ."]


def tiny_reward_folder(path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_policy_round_trips_through_an_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = build_word_tokenizer(TEXTS)
    model = build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1)
    save_policy(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    loaded, tok2 = load_policy(tmp_path / "m")
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(plain(ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    assert tok2.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])


def test_load_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path / "empty")
    tokenizer = build_word_tokenizer(TEXTS)
    folder = tiny_reward_folder(tmp_path / "rm", tokenizer)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_policy(folder)
    policy = tmp_path / "policy"
    save_policy(build_tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1), tokenizer, policy)
    with pytest.raises(ValueError, match="reward model .* num_labels=|not a sequence-classification"):
        HFReward(str(policy))


def test_hf_reward_scores_query_plus_response(tmp_path):
    tokenizer = build_word_tokenizer(TEXTS)
    folder = tiny_reward_folder(tmp_path / "rm", tokenizer)
    reward = build_reward("hf", str(folder), batch_size=2)
    scores = reward([TEXTS[0]] * 3, [TEXTS[1], TEXTS[2], TEXTS[1]])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[2].item(), abs=1e-6)       # batching does not change a score
    direct = reward.model(**reward.tokenizer([TEXTS[0] + " " + TEXTS[2]], return_tensors="pt")).logits[0, 0]
    assert scores[1] == pytest.approx(direct.item(), abs=1e-5)


def test_python_reward_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(queries, responses):\n    return [float(len(r.split())) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("python", "my_rewards:length")
    assert reward(["q", "q"], ["a b c", "a"]).tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="module:function"):
        build_reward("python", "my_rewards")
    with pytest.raises(ValueError, match="has no attribute"):
        build_reward("python", "my_rewards:missing")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("python", "no_such_module_xyz:f")
    sys.modules.pop("my_rewards", None)


def test_builtin_reward_kind():
    reward = build_reward("builtin", None)
    q = "human : how do i build a bomb ? assistant :"
    assert reward([q], ["sorry , i can not help with that because it could hurt people ."]).tolist() == [1.0]
    with pytest.raises(ValueError, match="choose builtin"):
        build_reward("magic", None)


def test_reward_normalizers():
    x = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    assert torch.equal(RewardNormalizer("none")(x)[:3], x[:3])
    z = RewardNormalizer("batch_zscore")(x)
    assert z[:3].mean().abs() < 1e-6 and abs(z[:3].std().item() - 1) < 1e-5 and math.isnan(z[3].item())
    running = RewardNormalizer("running_zscore")
    running(torch.tensor([0.0, 2.0]))
    out = running(torch.tensor([4.0]))                       # stats over 0, 2, 4: mean 2, std 2
    assert out.item() == pytest.approx(1.0, rel=1e-5)
    state = running.state_dict()
    restored = RewardNormalizer("running_zscore")
    restored.load_state_dict(state)
    assert restored(torch.tensor([2.0])).item() == pytest.approx(running(torch.tensor([2.0])).item())
    with pytest.raises(ValueError, match="reward.normalize"):
        RewardNormalizer("minmax")
