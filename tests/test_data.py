import gzip
import json
import logging
import random
from pathlib import Path

import pytest

from ple_fast.data import (
    DataError,
    LengthRule,
    LengthStats,
    PreferenceExample,
    SFTExample,
    apply_length_rule,
    detect_format,
    encode_prompt,
    encode_response,
    load_preferences,
    load_queries,
    load_sft,
    read_jsonl,
    render_messages,
    split_hh,
    split_holdout,
)

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "hello world how are you fine thanks bye Human: Assistant: sys be nice hi ok <|user|> <|assistant|> <|system|> <|end|>"


def make_tokenizer(*, bos=True, chat_template=None):
    """A WordLevel tokenizer built offline: ids 0-2 are [UNK] <s> </s>, words follow."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>"] + WORDS.split())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def write_jsonl(path: Path, records, *, raw_lines=()):
    """Write records (dicts or raw strings) as JSONL; .gz paths are gzipped."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records] + list(raw_lines)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def hh(*turns):
    """HH dialogue from alternating (human, assistant, ...) turn texts."""
    tags = ["Human:", "Assistant:"]
    return "".join(f"\n\n{tags[i % 2]} {t}" for i, t in enumerate(turns))


# --------------------------------------------------------------------------- real HH sample


@pytest.fixture(scope="module")
def hh_sample():
    if not HH_SAMPLE.is_file():
        pytest.skip(f"HH-RLHF sample not present at {HH_SAMPLE}")
    return [obj for _, obj in read_jsonl(HH_SAMPLE)]


def test_real_hh_split_round_trips(hh_sample):
    assert len(hh_sample) == 1800
    empty = 0
    for obj in hh_sample:
        for key in ("chosen", "rejected"):
            query, response = split_hh(obj[key])
            assert query.endswith("\n\nAssistant:")
            assert query.startswith("\n\nHuman:")
            assert "\n\nAssistant:" not in response
            assert query + " " + response == obj[key]
            empty += not response.strip()
    print(f"empty HH responses: {empty} of {2 * len(hh_sample)}")
    assert empty == 3  # measured on the sample: three chosen replies are bare "Assistant: "


def test_real_hh_loaders(hh_sample, caplog):
    sft = load_sft(HH_SAMPLE)
    queries = load_queries(HH_SAMPLE)
    with caplog.at_level(logging.INFO, logger="ple_fast.data"):
        prefs = load_preferences(HH_SAMPLE)
    assert len(sft) == len(queries) == len(prefs) == 1800
    assert all(q.endswith("Assistant:") for q in queries)
    assert [e.prompt for e in sft] == queries
    assert len(set(queries)) == 1799  # one duplicated query; duplicates are kept
    moved = 0
    for obj, pref, query in zip(hh_sample, prefs, queries):
        assert pref.prompt.endswith("\n\nAssistant:")
        assert obj["chosen"] == pref.prompt + " " + pref.chosen
        assert obj["rejected"] == pref.prompt + " " + pref.rejected
        own_splits = (query, split_hh(obj["rejected"])[0])
        moved += own_splits != (pref.prompt, pref.prompt)
    assert moved == 4  # the lines whose chosen/rejected split points differ: 972, 1308, 1517, 1584
    assert "4 of 1800 HH pairs" in caplog.text
    with pytest.raises(DataError, match=r"harmless-base-sample\.jsonl\.gz:972: HH pair: .*different Assistant turns"):
        load_preferences(HH_SAMPLE, on_prompt_mismatch="error")


# --------------------------------------------------------------------------- split_hh


def test_split_hh_edge_cases():
    assert split_hh(hh("hi", "hello")) == ("\n\nHuman: hi\n\nAssistant:", "hello")
    # the LAST Assistant turn wins; only one leading space is stripped
    assert split_hh(hh("a", "b", "c") + "\n\nAssistant:  two") == (hh("a", "b", "c") + "\n\nAssistant:", " two")
    assert split_hh("\n\nHuman: x\n\nAssistant:") == ("\n\nHuman: x\n\nAssistant:", "")
    assert split_hh("\n\nHuman: x\n\nAssistant:\nline") == ("\n\nHuman: x\n\nAssistant:", "\nline")
    with pytest.raises(DataError, match="no .*Assistant:.* turn"):
        split_hh("\n\nHuman: only a question")
    with pytest.raises(DataError, match="no .*Assistant:.* turn"):
        split_hh("Human: hi\nAssistant: single newline is not a turn")
    with pytest.raises(DataError, match="must be a string"):
        split_hh(None)


def test_hh_pairs_split_at_shared_turn(tmp_path):
    prompt = hh("q1", "a1", "q2") + "\n\nAssistant:"
    runs_on = prompt + " r1\n\nHuman: fake\n\nAssistant: more"
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"chosen": prompt + " good", "rejected": prompt + " bad"},
            {"chosen": runs_on, "rejected": prompt + " short"},
            {"chosen": hh("x", "y"), "rejected": hh("z", "w")},
        ],
    )
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: HH pair: .*share no"):
        load_preferences(path)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": prompt + " good", "rejected": prompt + " bad"},
                                                  {"chosen": runs_on, "rejected": prompt + " short"}])
    first, second = load_preferences(path)
    assert first == PreferenceExample(prompt, "good", "bad")
    assert second == PreferenceExample(prompt, "r1\n\nHuman: fake\n\nAssistant: more", "short")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: "):
        load_preferences(path, on_prompt_mismatch="error")
    with pytest.raises(ValueError, match="on_prompt_mismatch"):
        load_preferences(path, on_prompt_mismatch="skip")


# --------------------------------------------------------------------------- generic formats


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_prompt_response_and_prompt_only(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"sft{suffix}", [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": ""}])
    assert load_sft(path) == [SFTExample("P1", "R1"), SFTExample("P2", "")]
    assert load_queries(path) == ["P1", "P2"]
    only = write_jsonl(tmp_path / f"q{suffix}", [{"prompt": "P1"}, "", "   ", {"prompt": "P1", "extra": 3}])
    assert load_queries(only) == ["P1", "P1"]
    with pytest.raises(DataError, match=rf"q{suffix.replace('.', '[.]')}:1: load_sft needs a record with a response"):
        load_sft(only)
    with pytest.raises(DataError, match=r":1: load_preferences needs a record with a preference pair"):
        load_preferences(only)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_preference_format(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"p{suffix}", [{"prompt": "P", "chosen": "C", "rejected": "R"}])
    assert load_preferences(path) == [PreferenceExample("P", "C", "R")]
    assert load_sft(path) == [SFTExample("P", "C")]
    assert load_queries(path) == ["P"]
    # conversational variant: prompt as turns, replies as one assistant message each
    conv = write_jsonl(
        tmp_path / f"c{suffix}",
        [{"prompt": [{"role": "user", "content": "hi"}],
          "chosen": [{"role": "assistant", "content": "C"}],
          "rejected": [{"role": "assistant", "content": "R"}]}],
    )
    assert load_preferences(conv) == [PreferenceExample("\n\nHuman: hi\n\nAssistant:", "C", "R")]
    templated = load_preferences(conv, tokenizer=make_tokenizer(chat_template=CHAT_TEMPLATE))
    assert templated == [PreferenceExample("<s><|user|> hi <|end|> <|assistant|>", "C", "R")]


MESSAGES = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_messages_with_and_without_chat_template(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"m{suffix}", [{"messages": MESSAGES}, {"messages": MESSAGES[1:4]}])
    plain = "be nice\n\nHuman: hello\n\nAssistant: hi\n\nHuman: how are you\n\nAssistant:"
    with pytest.raises(DataError, match=rf"m{suffix.replace('.', '[.]')}:2: the last message must be an assistant turn"):
        load_sft(path)
    assert load_queries(path) == [plain, plain[len("be nice"):]]
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE)
    templated = "<s><|system|> be nice <|end|> <|user|> hello <|end|> <|assistant|> hi <|end|> <|user|> how are you <|end|> <|assistant|>"
    assert load_queries(path, tokenizer=tok) == [templated, templated.replace("<|system|> be nice <|end|> ", "")]
    sft_path = write_jsonl(tmp_path / f"s{suffix}", [{"messages": MESSAGES}])
    assert load_sft(sft_path) == [SFTExample(plain, "fine thanks")]
    assert load_sft(sft_path, tokenizer=tok) == [SFTExample(templated, "fine thanks")]
    # the plain rendering is an HH dialogue: split_hh recovers the same pair
    assert split_hh(plain + " fine thanks") == (plain, "fine thanks")


def test_render_messages_validation():
    assert render_messages(MESSAGES[1:3]) == ("\n\nHuman: hello\n\nAssistant:", "hi")
    assert render_messages(MESSAGES[1:2], require_response=False) == ("\n\nHuman: hello\n\nAssistant:", "")
    bad = [
        ("hello", "must be a list"),
        ([], "messages is empty"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"role": "user"}], r"messages\[0\] is missing key 'content'"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\] has role 'bot'; expected one of"),
        ([{"role": "user", "content": ["x"]}], r"messages\[0\]\['content'\] must be a string, got list"),
        ([MESSAGES[1], MESSAGES[0], MESSAGES[2]], r"messages\[1\] is a system turn after"),
        ([MESSAGES[0], MESSAGES[2]], "no user turn before the response"),
        (MESSAGES[1:2], "last message must be an assistant turn"),
    ]
    for messages, pattern in bad:
        with pytest.raises(DataError, match=pattern):
            render_messages(messages)


def test_chat_template_errors_become_data_errors():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}"
    tok = make_tokenizer(chat_template=strict)
    assert render_messages(MESSAGES[1:3], tok) == ("hello", "hi")
    with pytest.raises(DataError, match="chat template rejected these messages: no system turns"):
        render_messages(MESSAGES, tok)


def test_detect_format():
    assert detect_format({"chosen": "x", "rejected": "y"}) == "hh"
    assert detect_format({"chosen": "x"}) == "hh"
    assert detect_format({"prompt": "p", "response": "r"}) == "prompt_response"
    assert detect_format({"prompt": "p"}) == "prompt_only"
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_format({"messages": [], "prompt": "p"}) == "messages"
    with pytest.raises(DataError, match=r"expected key 'prompt', 'chosen' or 'messages'; got keys \['a', 'b'\]"):
        detect_format({"b": 1, "a": 2})
    with pytest.raises(DataError, match="expected a JSON object, got list"):
        detect_format([1])


# --------------------------------------------------------------------------- errors name file and line


def test_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, "", '{"prompt": "b",}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: bad JSON") as info:
        load_queries(path)
    assert info.value.path == str(path) and info.value.line == 3
    gz = write_jsonl(tmp_path / "bad.jsonl.gz", [{"prompt": "a"}, {"prompt": "b"}, "not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:3: bad JSON"):
        load_queries(gz)
    arr = write_jsonl(tmp_path / "arr.jsonl", [{"prompt": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"arr\.jsonl:2: expected a JSON object, got list"):
        list(read_jsonl(arr))
    raw = tmp_path / "latin.jsonl"
    raw.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_queries(raw)


def test_missing_key_and_wrong_type_name_line_and_key(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "respnse": "d"}])
    with pytest.raises(DataError, match=r"k\.jsonl:2: missing key 'response' .*got keys \['prompt', 'respnse'\]"):
        load_sft(path)
    path = write_jsonl(tmp_path / "none.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"none\.jsonl:1: expected key 'prompt', 'chosen' or 'messages'; got keys \['text'\]"):
        load_queries(path)
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": 7, "response": "d"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: key 'prompt' must be a string or a list of messages, got int"):
        load_sft(path)
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": None}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: key 'response' must be a string, got null"):
        load_sft(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": "  "}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: key 'prompt' is empty"):
        load_queries(path)
    path = write_jsonl(tmp_path / "h.jsonl", [{"chosen": hh("q", "a"), "rejected": hh("q", "b")}, {"chosen": hh("q", "a")}])
    assert len(load_sft(path)) == 2
    with pytest.raises(DataError, match=r"h\.jsonl:2: missing key 'rejected'"):
        load_preferences(path)
    path = write_jsonl(tmp_path / "h2.jsonl", [{"chosen": hh("q", "a")}, {"chosen": "\n\nHuman: no reply"}])
    with pytest.raises(DataError, match=r"h2\.jsonl:2: key 'chosen': HH dialogue has no"):
        load_queries(path)
    path = write_jsonl(tmp_path / "h3.jsonl", [{"chosen": hh("q", "a"), "rejected": 5}])
    with pytest.raises(DataError, match=r"h3\.jsonl:1: key 'rejected' must be a string \(an HH dialogue\), got int"):
        load_preferences(path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES}, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: messages\[0\] has role 'robot'"):
        load_sft(path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: key 'chosen' as a message list must hold exactly one assistant"):
        load_preferences(path)


def test_empty_missing_and_corrupt_files(tmp_path):
    for name, body in [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n")]:
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: file has no records") as info:
            load_sft(tmp_path / name)
        assert info.value.line is None
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=r"empty\.jsonl\.gz: file has no records"):
        load_queries(tmp_path / "empty.jsonl.gz")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_jsonl(str(tmp_path / "nope.jsonl")))
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"prompt": "plain text, not gzip"}\n')
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: corrupt gzip"):
        load_queries(tmp_path / "fake.jsonl.gz")
    whole = gzip.compress(b'{"prompt": "a"}\n' * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: corrupt gzip"):
        load_queries(tmp_path / "cut.jsonl.gz")


def test_read_jsonl_line_numbers_and_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b"}')
    assert list(read_jsonl(path)) == [(1, {"prompt": "a"}), (3, {"prompt": "b"})]


# --------------------------------------------------------------------------- tokenising


def test_encode_prompt_and_response():
    tok = make_tokenizer()
    assert encode_prompt(tok, "hello world") == [1] + tok.encode("hello world", add_special_tokens=False)
    assert encode_prompt(tok, "<s> hello") == tok.encode("<s> hello", add_special_tokens=False)  # no double BOS
    assert encode_prompt(tok, "")[:1] == [1]
    assert encode_response(tok, "hello world") == tok.encode("hello world", add_special_tokens=False) + [2]
    assert encode_response(tok, "hello world", add_eos=False) == tok.encode("hello world", add_special_tokens=False)
    no_bos = make_tokenizer(bos=False)
    assert encode_prompt(no_bos, "hello world") == no_bos.encode("hello world", add_special_tokens=False)

    class NoEos:
        bos_token_id = None
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    assert encode_response(NoEos(), "ab c") == [2, 1]
    assert encode_prompt(NoEos(), "ab c") == [2, 1]


def reference_length_rule(prompt, response, rule, keep_first=0):
    """Token-by-token statement of the rule, for comparing against the slicing version."""
    max_p = len(prompt) if rule.max_prompt_tokens is None else rule.max_prompt_tokens
    max_r = len(response) if rule.max_response_tokens is None else rule.max_response_tokens
    if rule.policy == "skip":
        return None if len(prompt) > max_p or len(response) > max_r else (list(prompt), list(response))
    if len(prompt) > max_p:
        head = min(keep_first, max_p)
        tail_start = len(prompt) - (max_p - head)
        prompt = [t for i, t in enumerate(prompt) if i < head or i >= tail_start]
    return list(prompt), [t for i, t in enumerate(response) if i < max_r]


def test_length_rule_matches_reference_on_random_inputs():
    rng = random.Random(0)
    for _ in range(500):
        prompt = [rng.randrange(100) for _ in range(rng.randrange(0, 12))]
        response = [rng.randrange(100) for _ in range(rng.randrange(0, 12))]
        rule = LengthRule(rng.choice([None, 1, 3, 8]), rng.choice([None, 1, 4, 9]), rng.choice(["truncate", "skip"]))
        keep_first = rng.choice([0, 1, 2])
        got = apply_length_rule(prompt, response, rule, keep_first=keep_first)
        assert got == reference_length_rule(prompt, response, rule, keep_first)
        if got is not None:
            assert rule.max_prompt_tokens is None or len(got[0]) <= rule.max_prompt_tokens
            assert rule.max_response_tokens is None or len(got[1]) <= rule.max_response_tokens


def test_length_rule_truncate_and_skip():
    prompt, response = list(range(10)), list(range(100, 108))
    assert apply_length_rule(prompt, response, LengthRule(4, 3)) == ([6, 7, 8, 9], [100, 101, 102])
    assert apply_length_rule(prompt, response, LengthRule(4, 3), keep_first=1) == ([0, 7, 8, 9], [100, 101, 102])
    assert apply_length_rule(prompt, response, LengthRule(10, 8)) == (prompt, response)
    assert apply_length_rule(prompt, response, LengthRule(None, None)) == (prompt, response)
    assert apply_length_rule(prompt, response, LengthRule(10, 8, "skip")) == (prompt, response)
    assert apply_length_rule(prompt, response, LengthRule(9, None, "skip")) is None
    assert apply_length_rule(prompt, response, LengthRule(None, 7, "skip")) is None
    for bad in [dict(max_prompt_tokens=0, max_response_tokens=None), dict(max_prompt_tokens=None, max_response_tokens=2.5),
                dict(max_prompt_tokens=None, max_response_tokens=True), dict(max_prompt_tokens=1, max_response_tokens=1, policy="drop")]:
        with pytest.raises(ValueError, match="LengthRule"):
            LengthRule(**bad)


def test_encoding_sft_examples_under_a_length_rule():
    """ple_fast.workload.Encoder on plain text (no chat template): BOS kept, the prompt's tail and the
    response's head, EOS only on an uncut response; the stats say what the rule did."""
    from ple_fast.chat import ChatFormat
    from ple_fast.workload import Encoder

    tok = make_tokenizer()
    encode = Encoder(tok, ChatFormat(tok, "never"), "")
    examples = [
        SFTExample("hello", "fine"),                               # prompt 2, response 2: fits
        SFTExample("hello world how are you", "fine"),             # prompt 6: cut to BOS + last 3
        SFTExample("hi", "fine thanks bye ok"),                    # response 5: cut to 3
        SFTExample("hello world how are you", "fine thanks bye"),  # both cut
    ]

    def run(rule):
        stats = LengthStats()
        fitted = [encode(ex.prompt, ex.response, rule, stats) for ex in examples]
        return [(f[0], f[2]) for f in fitted if f is not None], stats

    pairs, stats = run(LengthRule(4, 3))
    ids = {w: tok.convert_tokens_to_ids(w) for w in WORDS.split()}
    assert pairs[0] == ([1, ids["hello"]], [ids["fine"], 2])
    assert pairs[1] == ([1, ids["how"], ids["are"], ids["you"]], [ids["fine"], 2])
    assert pairs[2] == ([1, ids["hi"]], [ids["fine"], ids["thanks"], ids["bye"]])  # cut response has no EOS
    assert pairs[3][0] == pairs[1][0] and pairs[3][1] == [ids["fine"], ids["thanks"], ids["bye"]]
    assert (stats.kept, stats.skipped, stats.truncated, stats.truncated_prompts, stats.truncated_responses) == (4, 0, 3, 2, 2)
    assert stats.summary() == "kept 4/4, skipped 0, truncated 3 (prompt 2, response 2)"

    pairs, stats = run(LengthRule(4, 3, "skip"))
    assert pairs == [([1, ids["hello"]], [ids["fine"], 2])]
    assert (stats.kept, stats.skipped, stats.truncated) == (1, 3, 0)
    assert stats.summary() == "kept 1/4, skipped 3, truncated 0 (prompt 0, response 0)"


def test_length_stats_record():
    stats = LengthStats()
    stats.record([1, 2], [3], None)
    stats.record([1, 2], [3], ([1, 2], [3]))
    stats.record([1, 2, 3], [3], ([3], [3]))
    assert (stats.kept, stats.skipped, stats.truncated, stats.truncated_prompts, stats.truncated_responses) == (2, 1, 1, 1, 0)


# --------------------------------------------------------------------------- holdout


def test_split_holdout():
    items = list(range(100))
    train, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # input order kept on each side
    assert split_holdout(items, 0.1, seed=3) == (train, held)
    assert split_holdout(items, 0.1, seed=4)[1] != held
    assert split_holdout(items, 0.0, seed=0) == (items, [])
    assert split_holdout(list("ab"), 0.01, seed=0)[1] in (["a"], ["b"])  # at least one held out
    assert split_holdout(["only"], 0.5, seed=0) == (["only"], [])  # training never empty
    assert split_holdout([], 0.5, seed=0) == ([], [])
    assert len(split_holdout(range(10), 0.25, seed=0)[1]) == 3  # 2.5 rounds half up
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="holdout fraction"):
            split_holdout(items, bad, seed=0)
