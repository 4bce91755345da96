"""HH dialogues through a chat template (ple_fast.chat): the turns, the principle's place, the end-of-turn
token, and how an over-long dialogue loses its oldest exchanges (ple_fast.workload.Encoder). A word-level
tokenizer with a small template stands in for a real one; tests/test_real_model.py runs SmolLM2's."""
import pytest

from ple_fast.chat import ChatFormat, hh_messages
from ple_fast.config import ConfigError
from ple_fast.data import LengthRule
from ple_fast.workload import Encoder
from test_data import CHAT_TEMPLATE, make_tokenizer

NO_SYSTEM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
             "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_hh_prompts_become_chat_turns():
    assert hh_messages("\n\nHuman: hello world\n\nAssistant:") == [{"role": "user", "content": "hello world"}]
    assert hh_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"}]
    for not_hh in ("hello world", "\n\nHuman: hi", "\n\nAssistant: hi\n\nAssistant:",
                   "\n\nHuman: a\n\nHuman: b\n\nAssistant:"):
        assert hh_messages(not_hh) is None, not_hh


def test_the_principle_is_the_system_message_and_turns_end_with_the_templates_token():
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE)
    chat = ChatFormat(tok, "auto")
    assert chat.active and chat.system_role and chat.end_of_turn == tok.convert_tokens_to_ids("<|end|>")
    turns = chat.messages("\n\nHuman: hello\n\nAssistant:")
    assert chat.render(turns) == "<s><|user|> hello <|end|> <|assistant|>"
    assert chat.render(turns, "be nice") == "<s><|system|> be nice <|end|> <|user|> hello <|end|> <|assistant|>"
    assert chat.response_ids("fine thanks") == [tok.convert_tokens_to_ids(w) for w in ("fine", "thanks", "<|end|>")]
    no_system = ChatFormat(make_tokenizer(chat_template=NO_SYSTEM), "auto")
    assert not no_system.system_role                    # then the principle leads the first user turn
    assert no_system.render(turns, "be nice") == "<s><|user|> be nice\n\nhello <|end|> <|assistant|>"


def test_modes():
    plain = make_tokenizer()
    assert not ChatFormat(plain, "auto").active and ChatFormat(plain, "auto").messages("\n\nHuman: x\n\nAssistant:") \
        is None
    assert not ChatFormat(make_tokenizer(chat_template=CHAT_TEMPLATE), "never").active
    with pytest.raises(ConfigError, match="data.chat_template=always, but the policy's tokenizer has no chat template"):
        ChatFormat(plain, "always")


def test_an_over_long_dialogue_loses_its_oldest_exchanges_first():
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE)
    encode = Encoder(tok, ChatFormat(tok, "auto"), "be nice")
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:"
    ids = lambda text: [tok.convert_tokens_to_ids(w) for w in text.split()]      # noqa: E731
    prompt, principled, response = encode(dialogue, "fine", LengthRule(None, None))
    assert prompt == [1] + ids("<|user|> hi <|end|> <|assistant|> hello <|end|> <|user|> how are you <|end|> "
                               "<|assistant|>")
    assert principled == [1] + ids("<|system|> be nice <|end|>") + prompt[1:] and response == ids("fine <|end|>")
    prompt, principled, _ = encode(dialogue, "fine", LengthRule(9, None))      # the first exchange goes
    assert prompt == [1] + ids("<|user|> how are you <|end|> <|assistant|>")
    assert principled == [1] + ids("<|system|> be nice <|end|>") + prompt[1:]
    prompt, principled, _ = encode(dialogue, "fine", LengthRule(5, None))      # then the tail of the last turn
    assert prompt == [1] + ids("are you <|end|> <|assistant|>")                 # and the principle stays
    assert principled == [1] + ids("<|system|> be nice <|end|>") + prompt[1:]
    plain = Encoder(tok, ChatFormat(tok, "never"), "be nice")
    assert plain("\n\nHuman: hi\n\nAssistant:", None, LengthRule(None, None))[1] is None    # raw text: no chat
