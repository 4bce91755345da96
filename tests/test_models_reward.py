import math
import random
import sys

import pytest
import torch

import ple_fast.reward
from ple_fast.models import build_tiny_llama, build_word_tokenizer, load_policy, save_policy
from ple_fast.reward import BuiltinReward, CallableReward, HFReward, RewardFunction, RewardNormalizer, build_reward

TEXTS = ["human : how do i make tea ? assistant :", "sure , boil water .", "sorry , i can not help ."]


def tiny_reward_folder(path, tokenizer, family: str = "llama"):
    """A tiny one-output sequence classifier. llama: 1 layer (the original fixture); qwen2: 2 layers,
    the second a 3-token sliding window; mistral: 2 layers, 4-token sliding window; bert: no `score`."""
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(**common, num_hidden_layers=1)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, num_hidden_layers=2, use_sliding_window=True,
                                          sliding_window=3, max_window_layers=1)
        assert config.layer_types[-1] == "sliding_attention"
    elif family == "mistral":
        config = transformers.MistralConfig(**common, num_hidden_layers=2, sliding_window=4)
    elif family == "bert":
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                         pad_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(str(path))
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


# ---- packed pair scoring == the padded reference ----------------------------------------------------

WORDS = ("human assistant : how do i make tea ? sure , boil water . sorry can not help with that it "
         "could hurt people please be kind the a cup of hot green").split()
MAX_LENGTH = 28


def bpe_tokenizer():
    """Byte-level BPE with a BOS: merges a query's trailing space into the response's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + TEXTS
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def word_tokenizer():
    return build_word_tokenizer([" ".join(WORDS)])


def pair_cases(seed: int = 0):
    """(queries, first, second) covering the shapes packing must get right."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    cases = [(words(2, 8) + " assistant :", words(1, 6), words(1, 6)) for _ in range(6)]
    q = words(2, 6) + " assistant :"
    r = words(2, 5)
    cases += [
        (q, "", r),                            # empty response
        (q, r, ""),
        (q, "", ""),
        (q, r, r),                             # identical responses
        (q, r, r + " " + words(1, 3)),         # one response a prefix of the other
        (q + " " + r, words(2, 3), r),
        (q + " ", "sure , boil", "sorry , no"),  # trailing space: BPE merges it into the response
        (q, r + " <pad>", r),                  # a text whose own tokens end in the pad id
        ("<pad> " + q, r, "<pad>"),
        (" ".join(WORDS), "help with that", "boil water ."),   # left truncation cuts the two differently
        (" ".join(WORDS) + " " + words(4, 8), words(3, 6), words(0, 2)),
    ]
    return tuple(list(c) for c in zip(*cases))


def scores_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} vs scale {scale:.3e}\n{got}\n{want}"


def padded_pairs(reward, queries, first, second):
    return torch.stack([reward(queries, first), reward(queries, second)], dim=1)


def count_forwards(monkeypatch):
    """Record the packed batches dual_forward sees (the reward model's packed forwards)."""
    seen = []
    real = ple_fast.reward.dual_forward

    def spy(model, batch, backend="auto", **kwargs):
        seen.append(batch)
        return real(model, batch, backend, **kwargs)

    monkeypatch.setattr(ple_fast.reward, "dual_forward", spy)
    return seen


# qwen2 + word tokenizer is left out: transformers loads any qwen2 folder's tokenizer as Qwen2Tokenizer,
# which rebuilds a byte-level BPE and does not reproduce a word-level vocabulary.
@pytest.mark.parametrize("family,tokenizer_kind", [("llama", "word"), ("llama", "bpe"), ("qwen2", "bpe"),
                                                   ("mistral", "word"), ("mistral", "bpe")])
def test_packed_pairs_equal_padded_scores(tmp_path, monkeypatch, family, tokenizer_kind):
    tokenizer = word_tokenizer() if tokenizer_kind == "word" else bpe_tokenizer()
    reward = HFReward(str(tiny_reward_folder(tmp_path / "rm", tokenizer, family)), batch_size=5,
                      max_length=MAX_LENGTH)
    assert reward.packed
    probe = "human : how do i make tea ? assistant : sure <pad>"
    assert reward.tokenizer(probe)["input_ids"] == tokenizer(probe)["input_ids"]
    queries, first, second = pair_cases()
    tok = reward.tokenizer

    def ids(q, r):
        from ple_fast.reward import join_text
        return tok(join_text(q, r), truncation=True, max_length=MAX_LENGTH)["input_ids"]

    def lcp(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    shared = [lcp(ids(q, a), ids(q, b)) for q, a, b in zip(queries, first, second)]
    if tokenizer_kind == "word":      # the lcp == 0 path is exercised
        assert 0 in shared
    else:                             # BOS is always shared; a merge ends the root inside the query
        assert all(ids(q, "")[0] == tok.bos_token_id for q in queries)
        # a query ending in a space: alone it ends in a space token, in the text the space is merged
        # into the response's first token, so the query's own tokens are not a prefix of the text's
        assert any(ids(q, a)[:len(ids(q, ""))] != ids(q, "") for q, a in zip(queries, first) if q.endswith(" "))
    assert any(ids(q, a)[-1] == tok.pad_token_id for q, a in zip(queries, first))

    seen = count_forwards(monkeypatch)
    got = reward.score_pairs(queries, first, second)
    assert reward.packed                                   # no silent fallback to the padded path
    assert len(seen) == (2 if 0 in shared else 1)         # one packed forward (+ one for lcp == 0 pairs)
    scores_close(got, padded_pairs(reward, queries, first, second))

    # each query is computed once: fewer packed rows than the two texts have tokens
    assert sum(b.num_tokens for b in seen) < sum(len(ids(q, a)) + len(ids(q, b)) for q, a, b
                                                 in zip(queries, first, second))


def test_packed_pairs_chunk_by_token_budget(tmp_path, monkeypatch):
    tokenizer = word_tokenizer()
    folder = tiny_reward_folder(tmp_path / "rm", tokenizer, "mistral")
    budget = 24
    reward = HFReward(str(folder), batch_size=4, max_length=MAX_LENGTH, max_packed_tokens=budget)
    queries, first, second = (sum(parts, []) for parts in zip(pair_cases(1), pair_cases(2)))
    seen = count_forwards(monkeypatch)
    got = reward.score_pairs(queries, first, second)
    assert reward.packed and len(seen) > 4
    for batch in seen:   # whole pairs only; over budget only when one pair alone exceeds it
        pairs = batch.num_pairs or batch.seg_start.numel() // 2
        assert batch.num_tokens <= budget or pairs == 1
    scores_close(got, padded_pairs(reward, queries, first, second))
    whole = HFReward(str(folder), batch_size=4, max_length=MAX_LENGTH)
    scores_close(got, whole.score_pairs(queries, first, second))


def test_pairs_fall_back_to_padded_without_a_score_head(tmp_path, monkeypatch):
    tokenizer = word_tokenizer()
    reward = HFReward(str(tiny_reward_folder(tmp_path / "rm", tokenizer, "bert")), batch_size=3,
                      max_length=MAX_LENGTH)
    assert not reward.packed and not hasattr(reward.model, "score")
    queries, first, second = pair_cases()
    seen = count_forwards(monkeypatch)
    got = reward.score_pairs(queries, first, second)
    assert not seen and got.shape == (len(queries), 2)
    assert torch.equal(got, padded_pairs(reward, queries, first, second))


@pytest.mark.parametrize("error", [NotImplementedError("softcap"), "compile"])
def test_pairs_fall_back_when_tree_attention_refuses(tmp_path, monkeypatch, error):
    import torch._dynamo.exc

    if error == "compile":      # e.g. a compiled kernel fails to compile (out of shared memory)
        error = torch._dynamo.exc.TorchDynamoException("No valid triton configs")
    reward = HFReward(str(tiny_reward_folder(tmp_path / "rm", word_tokenizer())), max_length=MAX_LENGTH)
    queries, first, second = pair_cases()

    def refuse(model, batch, backend="auto", **kwargs):
        raise error

    monkeypatch.setattr(ple_fast.reward, "dual_forward", refuse)
    with pytest.warns(UserWarning, match="padded path"):
        got = reward.score_pairs(queries, first, second)
    assert not reward.packed
    assert torch.equal(got, padded_pairs(reward, queries, first, second))


def test_pairs_do_not_swallow_other_errors(tmp_path, monkeypatch):
    reward = HFReward(str(tiny_reward_folder(tmp_path / "rm", word_tokenizer())), max_length=MAX_LENGTH)

    def broken(model, batch, backend="auto", **kwargs):
        raise IndexError("a bug")

    monkeypatch.setattr(ple_fast.reward, "dual_forward", broken)
    with pytest.raises(IndexError, match="a bug"):
        reward.score_pairs(*pair_cases())
    assert reward.packed


def test_default_score_pairs_is_two_calls(monkeypatch, tmp_path):
    queries, first, second = ["q1", "q2"], ["a", "b c"], ["d e f", ""]
    builtin = BuiltinReward()
    assert torch.equal(builtin.score_pairs(queries, first, second),
                       torch.stack([builtin(queries, first), builtin(queries, second)], dim=1))
    (tmp_path / "len_rewards.py").write_text(
        "def length(queries, responses):\n    return [len(r.split()) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = CallableReward("len_rewards:length").score_pairs(queries, first, second)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 3.0], [2.0, 0.0]]
    sys.modules.pop("len_rewards", None)
    with pytest.raises(ValueError, match="one of each per pair"):
        RewardFunction().score_pairs(queries, first, second[:1])
