"""Dialogue prompts through the tokenizer's chat template (`data.chat_template`).

An instruct model answers in its own format: HH-RLHF's raw "\\n\\nHuman: ...\\n\\nAssistant:" text is not
it, and a model that never saw its end-of-turn token there has to be taught to stop from scratch. So
where the tokenizer has a chat template, an HH dialogue becomes chat messages (Human -> user, Assistant
-> assistant) rendered through it with the generation prompt; a response ends with the template's
end-of-turn token, which also ends generation. The principle goes where a user would put it: the
system message (on a template without a system role, the head of the first user turn).

The principle-guided prompt is then not "principle + query": the template puts the principle inside
the rendered conversation, so it shares only a prefix with the original prompt. The rollout engine
prefills the longest prefix the principle-guided prompts share once (rollout.generate_pairs); the
training forward conditions both responses on the original prompt alone, as always.
"""
from __future__ import annotations

import re
from typing import Sequence

from ple_fast.config import ConfigError
from ple_fast.data import HH_ASSISTANT, HH_HUMAN, DataError

_TURN = re.compile(r"\n\n(Human|Assistant):")
_MARK = "\u2063ple_fast_response\u2063"       # a response text no template changes, to find what follows it


def hh_messages(prompt: str) -> list[dict] | None:
    """An HH prompt ("\\n\\nHuman: ...\\n\\nAssistant:", the reply to come) as chat turns, or None when the
    text is not one: it must start with a Human turn, alternate, and end on an empty Assistant turn."""
    if not prompt.startswith(HH_HUMAN) or not prompt.endswith(HH_ASSISTANT):
        return None
    cuts = list(_TURN.finditer(prompt))
    turns = []
    for i, cut in enumerate(cuts[:-1]):
        role = "user" if cut.group(1) == "Human" else "assistant"
        text = prompt[cut.end():cuts[i + 1].start()]
        turns.append({"role": role, "content": text[1:] if text.startswith(" ") else text})
    roles = [t["role"] for t in turns]
    if cuts[-1].group(1) != "Assistant" or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        return None
    return turns


class ChatFormat:
    """How a file workload renders dialogue prompts and ends responses; inactive: raw text."""

    def __init__(self, tokenizer, mode: str):
        template = getattr(tokenizer, "chat_template", None)
        if mode == "always" and not template:
            raise ConfigError("data.chat_template=always, but the policy's tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.active = bool(template) and mode != "never"
        self.system_role = self.active and self._renders_system()
        self.end_of_turn = self._end_of_turn() if self.active else None

    def _apply(self, turns: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    def _renders_system(self) -> bool:
        try:
            return _MARK in self._apply([{"role": "system", "content": _MARK}, {"role": "user", "content": "x"}], True)
        except Exception:  # noqa: BLE001 - a template that raises on a system turn has no system role
            return False

    def _end_of_turn(self) -> int:
        """The token the template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>)."""
        text = self._apply([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}], False)
        tail = self.tokenizer.encode(text[text.index(_MARK) + len(_MARK):], add_special_tokens=False)
        if not tail:
            raise ConfigError("the tokenizer's chat template ends an assistant turn with nothing; set "
                              "data.chat_template=never")
        return tail[0]

    def messages(self, prompt: str) -> list[dict] | None:
        """The prompt's turns when it is a dialogue this format renders; None: use the text as it is."""
        return hh_messages(prompt) if self.active else None

    def render(self, turns: Sequence[dict], principle: str | None = None) -> str:
        """The conversation ready for the assistant's reply, with the principle as its system message."""
        turns = [dict(t) for t in turns]
        if principle:
            if self.system_role:
                turns.insert(0, {"role": "system", "content": principle.strip()})
            else:
                turns[0]["content"] = f"{principle.strip()}\n\n{turns[0]['content']}"
        try:
            return self._apply(turns, True)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError, or a template's own raise
            raise DataError(f"the tokenizer's chat template rejected a dialogue: {err}") from None

    def response_ids(self, text: str) -> list[int]:
        """A reply's ids, closed by the end-of-turn token."""
        return list(self.tokenizer.encode(text, add_special_tokens=False)) + [self.end_of_turn]
