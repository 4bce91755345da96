"""Datasets for PLE: HH-RLHF dialogues and generic JSONL, turned into prompts and responses.

Every record problem is a DataError that says where it is ("file.jsonl:17: ..."), because a
training run that dies an hour in on line 41 233 of someone's export should say so plainly.

Accepted line formats (one JSON object per line; `.jsonl` or `.jsonl.gz`):

    hh               {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
    prompt_response  {"prompt": ..., "response": ...}
    prompt_only      {"prompt": ...}
    preference       {"prompt": ..., "chosen": ..., "rejected": ...}
    messages         {"messages": [{"role": "user", "content": ...}, ...]}

A `prompt` may also be a list of chat messages (rendered like a `messages` prompt), and a
`response`/`chosen`/`rejected` may be a list holding one assistant message. The first record
fixes the file's format; every later record must carry that format's keys.

HH-RLHF notes, measured on the 1800-line harmless-base sample:
- 4 lines (0.2 %) have `chosen` and `rejected` dialogues whose last "Assistant:" turns sit at
  different places (one side's response runs on into invented "Human:" turns). Such pairs are
  split at the last "\\n\\nAssistant:" turn the two dialogues share, so both responses answer
  the same prompt; `on_prompt_mismatch="error"` refuses them instead.
- 3 chosen responses are empty; they are kept (an empty preferred reply is still a preference).
- Duplicate queries are kept: a file is a distribution, and de-duplicating is the caller's call.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ple_fast.config import InputError

log = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
FORMATS = ("hh", "prompt_response", "prompt_only", "preference", "messages")
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- records + errors


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


class DataError(InputError):
    """A bad record. Raised bare by the pure helpers; loaders re-raise it with file and line."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        if self.path is None:
            where = ""
        elif line is None:
            where = f"{self.path}: "
        else:
            where = f"{self.path}:{line}: "
        super().__init__(where + reason)

    def at(self, path: str | os.PathLike, line: int | None) -> "DataError":
        return DataError(self.reason, path, line)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- reading lines


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "data file not found", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a .jsonl or .jsonl.gz file, got a directory", str(path))
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})", path, line_no) from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"bad JSON: {err.msg} (column {err.colno})", path, line_no) from None
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {_type_name(obj)}", path, line_no)
                yield line_no, obj
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"corrupt gzip data after line {line_no}: {err}", path) from None


# --------------------------------------------------------------------------- HH-RLHF dialogues


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def split_hh(dialogue: str) -> tuple[str, str]:
    """(query up to and including the last "\\n\\nAssistant:", the reply after it minus one leading space).

    Reconstruction: dialogue == query + (" " if a space was stripped) + response; on real HH
    data the space is always there, so query + " " + response == dialogue.
    """
    if not isinstance(dialogue, str):
        raise DataError(f"HH dialogue must be a string, got {_type_name(dialogue)}")
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError('HH dialogue has no "\\n\\nAssistant:" turn')
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], _strip_one_space(dialogue[cut:])


def _split_hh_pair(chosen: str, rejected: str, on_prompt_mismatch: str) -> tuple[PreferenceExample, bool]:
    """Split two HH dialogues at one shared prompt; the bool says whether they disagreed first."""
    prompt, chosen_reply = split_hh(chosen)
    rejected_prompt, rejected_reply = split_hh(rejected)
    if prompt == rejected_prompt:
        return PreferenceExample(prompt, chosen_reply, rejected_reply), False
    if on_prompt_mismatch == "error":
        raise DataError(
            "chosen and rejected dialogues end their prompts at different Assistant turns "
            f"(chosen prompt {len(prompt)} chars, rejected prompt {len(rejected_prompt)} chars)"
        )
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError('chosen and rejected dialogues share no "\\n\\nAssistant:" turn')
    cut += len(HH_ASSISTANT)
    example = PreferenceExample(chosen[:cut], _strip_one_space(chosen[cut:]), _strip_one_space(rejected[cut:]))
    return example, True


# --------------------------------------------------------------------------- chat messages


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list of {{'role', 'content'}} objects, got {_type_name(messages)}")
    if not messages:
        raise DataError("messages is empty")
    seen_turn = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{i}] must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"messages[{i}] is missing key '{key}'; got keys {sorted(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"messages[{i}] has role {role!r}; expected one of {', '.join(map(repr, ROLES))}")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}]['content'] must be a string, got {_type_name(content)}")
        if role == "system" and seen_turn:
            raise DataError(f"messages[{i}] is a system turn after the conversation started; put system turns first")
        seen_turn = seen_turn or role != "system"
    return messages


def _render_prompt_messages(messages: list[dict], tokenizer) -> str:
    """Render checked prompt turns (last one a user turn) ready for the assistant's reply."""
    if messages[-1]["role"] != "user":
        raise DataError(f"the prompt's last turn must be a user turn, got {messages[-1]['role']!r}")
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            raise DataError(f"the tokenizer's chat template rejected these messages: {err}") from None
        if not isinstance(rendered, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {_type_name(rendered)}, expected str")
        return rendered
    system = [m["content"] for m in messages if m["role"] == "system"]
    parts = ["\n\n".join(system)] if system else []
    for m in messages:
        if m["role"] != "system":
            parts.append(f"{HH_HUMAN if m['role'] == 'user' else HH_ASSISTANT} {m['content']}")
    return "".join(parts) + HH_ASSISTANT


def render_messages(messages: Any, tokenizer=None, *, require_response: bool = True) -> tuple[str, str]:
    """(prompt, response) from a chat: the prompt is every turn before the final assistant turn.

    The prompt uses the tokenizer's chat template (with the generation prompt) when it has one,
    else HH style: system text first, then "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns,
    ending in "\\n\\nAssistant:". With require_response=False a chat ending on a user turn is
    all prompt and the response is "".
    """
    messages = _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        prompt_turns, response = messages[:-1], messages[-1]["content"]
    elif require_response:
        raise DataError(f"the last message must be an assistant turn (the response), got {messages[-1]['role']!r}")
    else:
        prompt_turns, response = messages, ""
    if not any(m["role"] == "user" for m in prompt_turns):
        raise DataError("messages have no user turn before the response")
    return _render_prompt_messages(prompt_turns, tokenizer), response


# --------------------------------------------------------------------------- record formats


def detect_format(obj: Any) -> str:
    """Name the record format by its keys: messages, then prompt (+chosen / +response), then chosen."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        return "messages"
    if "prompt" in obj:
        if "chosen" in obj:
            return "preference"
        return "prompt_response" if "response" in obj else "prompt_only"
    if "chosen" in obj:
        return "hh"
    raise DataError(f"expected key 'prompt', 'chosen' or 'messages'; got keys {sorted(obj)}")


def _require(obj: dict, key: str, fmt: str) -> Any:
    if key not in obj:
        raise DataError(
            f"missing key '{key}' (the file's format is '{fmt}', set by its first record); got keys {sorted(obj)}"
        )
    return obj[key]


def _text_field(obj: dict, key: str, fmt: str) -> str:
    """A response-like field: a string, or a list holding one assistant message."""
    value = _require(obj, key, fmt)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            turns = _check_messages(value)
        except DataError as err:
            raise DataError(f"key '{key}': {err.reason}") from None
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(f"key '{key}' as a message list must hold exactly one assistant message")
        return turns[0]["content"]
    raise DataError(f"key '{key}' must be a string, got {_type_name(value)}")


def _prompt_field(obj: dict, fmt: str, tokenizer) -> str:
    """The `prompt` field: a non-blank string, or chat turns rendered as a prompt."""
    value = _require(obj, "prompt", fmt)
    if isinstance(value, list):
        try:
            return _render_prompt_messages(_check_messages(value), tokenizer)
        except DataError as err:
            raise DataError(f"key 'prompt': {err.reason}") from None
    if not isinstance(value, str):
        raise DataError(f"key 'prompt' must be a string or a list of messages, got {_type_name(value)}")
    if not value.strip():
        raise DataError("key 'prompt' is empty")
    return value


def _hh_field(obj: dict, key: str) -> tuple[str, str]:
    value = _require(obj, key, "hh")
    if not isinstance(value, str):
        raise DataError(f"key '{key}' must be a string (an HH dialogue), got {_type_name(value)}")
    try:
        return split_hh(value)
    except DataError as err:
        raise DataError(f"key '{key}': {err.reason}") from None


def _records(path, allowed: Sequence[str], purpose: str) -> Iterator[tuple[int, str, dict]]:
    """(line, format, object) for every record; the first record's format holds for the file."""
    fmt = None
    for line_no, obj in read_jsonl(path):
        if fmt is None:
            try:
                fmt = detect_format(obj)
            except DataError as err:
                raise err.at(path, line_no) from None
            if fmt not in allowed:
                raise DataError(
                    f"{purpose} needs a record with {_NEEDS[purpose]}; this one is '{fmt}' with keys {sorted(obj)}",
                    path,
                    line_no,
                )
        yield line_no, fmt, obj
    if fmt is None:
        raise DataError("file has no records (empty or only blank lines)", path)


_NEEDS = {
    "load_sft": "a response ('prompt'+'response', 'prompt'+'chosen', HH 'chosen', or 'messages')",
    "load_queries": "a prompt",
    "load_preferences": "a preference pair ('prompt'+'chosen'+'rejected', or HH 'chosen'+'rejected')",
}


def load_sft(path, *, tokenizer=None) -> list[SFTExample]:
    """SFT pairs: HH (query, chosen reply), prompt/response, preference (prompt, chosen), or messages."""
    examples = []
    for line_no, fmt, obj in _records(path, ("hh", "prompt_response", "preference", "messages"), "load_sft"):
        try:
            if fmt == "hh":
                examples.append(SFTExample(*_hh_field(obj, "chosen")))
            elif fmt == "messages":
                examples.append(SFTExample(*render_messages(_require(obj, "messages", fmt), tokenizer)))
            else:
                reply_key = "response" if fmt == "prompt_response" else "chosen"
                examples.append(SFTExample(_prompt_field(obj, fmt, tokenizer), _text_field(obj, reply_key, fmt)))
        except DataError as err:
            raise err.at(path, line_no) from None
    return examples


def load_queries(path, *, tokenizer=None) -> list[str]:
    """Prompts to generate from, one per record, duplicates kept (the file's distribution)."""
    queries = []
    for line_no, fmt, obj in _records(path, FORMATS, "load_queries"):
        try:
            if fmt == "hh":
                queries.append(_hh_field(obj, "chosen")[0])
            elif fmt == "messages":
                queries.append(render_messages(_require(obj, "messages", fmt), tokenizer, require_response=False)[0])
            else:
                queries.append(_prompt_field(obj, fmt, tokenizer))
        except DataError as err:
            raise err.at(path, line_no) from None
    return queries


def load_preferences(path, *, tokenizer=None, on_prompt_mismatch: str = "shared") -> list[PreferenceExample]:
    """Preference pairs from HH dialogues or prompt/chosen/rejected records.

    on_prompt_mismatch: what to do with an HH pair whose two dialogues end their prompts at
    different Assistant turns: "shared" splits both at the last Assistant turn they share
    (logged with a count), "error" raises a DataError naming the line.
    """
    if on_prompt_mismatch not in ("shared", "error"):
        raise ValueError(f"on_prompt_mismatch must be 'shared' or 'error', got {on_prompt_mismatch!r}")
    pairs, mismatched = [], []
    for line_no, fmt, obj in _records(path, ("hh", "preference"), "load_preferences"):
        try:
            if fmt == "hh":
                for key in ("chosen", "rejected"):
                    if not isinstance(_require(obj, key, fmt), str):
                        raise DataError(f"key '{key}' must be a string (an HH dialogue), got {_type_name(obj[key])}")
                try:
                    pair, moved = _split_hh_pair(obj["chosen"], obj["rejected"], on_prompt_mismatch)
                except DataError as err:
                    raise DataError(f"HH pair: {err.reason}") from None
                if moved:
                    mismatched.append(line_no)
                pairs.append(pair)
            else:
                prompt = _prompt_field(obj, fmt, tokenizer)
                chosen, rejected = _text_field(obj, "chosen", fmt), _text_field(obj, "rejected", fmt)
                pairs.append(PreferenceExample(prompt, chosen, rejected))
        except DataError as err:
            raise err.at(path, line_no) from None
    if mismatched:
        shown = ", ".join(map(str, mismatched[:10])) + (", ..." if len(mismatched) > 10 else "")
        log.info(
            "%s: %d of %d HH pairs had chosen/rejected prompts ending at different turns; "
            "split at the last shared Assistant turn (lines %s)", path, len(mismatched), len(pairs), shown,
        )
    return pairs


# --------------------------------------------------------------------------- tokenising + lengths


def adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return len(ids) > 0 and ids[0] == bos


def _encode_prompt(tokenizer, text: str, with_bos: bool) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if with_bos and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def encode_prompt(tokenizer, text: str, with_bos: bool | None = None) -> list[int]:
    """Prompt ids, led by BOS when the tokenizer adds one (with_bos: `adds_bos`, when known), never two
    (a chat template may already have written it) and never a trailing EOS (some tokenizers append one
    as a special token)."""
    return _encode_prompt(tokenizer, text, adds_bos(tokenizer) if with_bos is None else with_bos)


def encode_response(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Response ids without special tokens, plus EOS (if wanted and the tokenizer has one) so the
    policy learns where to stop."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        ids.append(eos)
    return ids


@dataclass
class LengthRule:
    """Token budgets per example (None = unlimited), counted on ids as given (BOS and EOS included).

    policy "truncate" keeps the prompt's tail and the response's head; "skip" drops the example.
    """

    max_prompt_tokens: int | None
    max_response_tokens: int | None
    policy: str = "truncate"

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LengthRule.{name} must be a positive int or None, got {value!r}")
        if self.policy not in ("truncate", "skip"):
            raise ValueError(f"LengthRule.policy must be 'truncate' or 'skip', got {self.policy!r}")


def apply_length_rule(
    prompt_ids: Sequence[int], response_ids: Sequence[int], rule: LengthRule, *, keep_first: int = 0
) -> tuple[list[int], list[int]] | None:
    """Fit one example to the rule, or None when the rule skips it.

    Truncation keeps the LAST prompt tokens (the end of a dialogue is what the reply answers)
    plus the first `keep_first` ones (e.g. BOS), and the FIRST response tokens; a cut response
    loses its EOS, so the policy is not taught to stop mid-thought.
    """
    prompt, response = list(prompt_ids), list(response_ids)
    max_p, max_r = rule.max_prompt_tokens, rule.max_response_tokens
    over_p = max_p is not None and len(prompt) > max_p
    over_r = max_r is not None and len(response) > max_r
    if rule.policy == "skip":
        return None if over_p or over_r else (prompt, response)
    if over_p:
        head = min(max(keep_first, 0), max_p)
        prompt = prompt[:head] + prompt[len(prompt) - (max_p - head):]
    if over_r:
        response = response[:max_r]
    return prompt, response


@dataclass
class LengthStats:
    """What a LengthRule did to a dataset; `truncated` counts kept examples cut on either side."""

    kept: int = 0
    skipped: int = 0
    truncated: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def record(self, prompt_ids: Sequence[int], response_ids: Sequence[int], result) -> None:
        if result is None:
            self.skipped += 1
            return
        self.kept += 1
        cut_prompt = len(result[0]) < len(prompt_ids)
        cut_response = len(result[1]) < len(response_ids)
        self.truncated_prompts += cut_prompt
        self.truncated_responses += cut_response
        self.truncated += cut_prompt or cut_response

    def summary(self) -> str:
        total = self.kept + self.skipped
        return (
            f"kept {self.kept}/{total}, skipped {self.skipped}, truncated {self.truncated} "
            f"(prompt {self.truncated_prompts}, response {self.truncated_responses})"
        )


# --------------------------------------------------------------------------- splits


def split_holdout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded random `fraction` held out, each side in the input's order.

    The held-out count is fraction * n rounded half up, at least 1 when fraction > 0 and n >= 2,
    and at most n - 1 so training never comes up empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction!r}")
    items = list(items)
    n = len(items)
    n_held = math.floor(fraction * n + 0.5)
    if fraction > 0 and n >= 2:
        n_held = max(n_held, 1)
    n_held = min(n_held, max(n - 1, 0))
    held = set(random.Random(seed).sample(range(n), n_held))
    train = [item for i, item in enumerate(items) if i not in held]
    heldout = [item for i, item in enumerate(items) if i in held]
    return train, heldout
