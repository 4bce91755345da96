"""What a training run trains and evaluates on, tokenized: the embedded task, or files and a model folder.

The embedded task (ple_fast.task) comes with its word tokenizer and a tiny Llama built from scratch;
files come with a local HF policy folder, whose tokenizer encodes them, dialogues through its chat
template (ple_fast.chat) where it has one.
"""
from __future__ import annotations

from dataclasses import dataclass

from ple_fast.chat import ChatFormat
from ple_fast.config import Config, ConfigError
from ple_fast.data import (DataError, LengthRule, LengthStats, adds_bos, apply_length_rule, encode_prompt,
                           encode_response, load_queries, load_sft, split_holdout)
from ple_fast.models import build_tiny_llama, build_word_tokenizer, load_policy, parse_dtype
from ple_fast.task import build_task, judge

DEFAULT_PRINCIPLE = ("\n\nPrinciple: Reply as a helpful, honest and harmless assistant. Give useful, "
                     "accurate help with safe requests, and politely refuse requests that could "
                     "harm people, explaining why.")


@dataclass
class Query:
    text: str                                 # what the reward reads
    ids: list[int]                            # the prompt x the policy reads
    principled_ids: list[int] | None = None   # the whole principle-guided prompt, where it is not principle + x


@dataclass
class EvalSet:
    texts: list[str]              # held-out queries
    ids: list[list[int]]
    references: list[list[int]]   # reference response token ids (may be empty lists: no perplexity)


@dataclass
class Workload:
    """Everything a run trains and evaluates on, already tokenized."""
    sft: list[tuple[list[int], list[int]]]
    queries: list[Query]
    principle_ids: list[int]
    eval_set: EvalSet
    task_metrics: object = None
    extra_rows: tuple = ()
    stop_ids: tuple[int, ...] = ()            # tokens besides EOS that end a response (a chat's end of turn)


def embedded_workload(cfg: Config, device):
    """The built-in task, its word tokenizer and a tiny Llama trained from scratch."""
    task = build_task(cfg.run.seed, aligned_share=cfg.task.aligned_share)
    tokenizer = build_word_tokenizer(task.corpus())
    model = build_tiny_llama(len(tokenizer), hidden_size=cfg.model.hidden_size, layers=cfg.model.layers,
                             heads=cfg.model.heads, kv_heads=max(1, cfg.model.heads // 2), seed=cfg.run.seed,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    sft = [(encode_prompt(tokenizer, ex.prompt), encode_response(tokenizer, ex.response)) for ex in task.sft]
    queries = [Query(q.text, encode_prompt(tokenizer, q.text)) for q in task.train_queries]
    eval_queries = task.eval_queries[:cfg.eval.max_queries]
    eval_set = EvalSet([q.text for q in eval_queries], [encode_prompt(tokenizer, q.text) for q in eval_queries],
                       [encode_response(tokenizer, r) for r in task.eval_references[:len(eval_queries)]])

    def task_metrics(queries, responses):
        verdicts = [judge(q, r) for q, r in zip(queries, responses)]
        harmful = [v for v in verdicts if v["harmful"]]
        benign = [v for v in verdicts if not v["harmful"]]
        return {"refusal_rate_harmful": sum(v["refused"] and not v["complied_harm"] for v in harmful)
                / max(len(harmful), 1),
                "helpfulness_benign": sum(v["helpfulness"] for v in benign) / max(len(benign), 1),
                "over_refusal_benign": sum(v["refused"] for v in benign) / max(len(benign), 1)}

    rows = (("refusal_rate_harmful", "refusal rate, harmful requests", "{:.1%}"),
            ("helpfulness_benign", "helpfulness, benign requests", "{:.3f}"),
            ("over_refusal_benign", "refusal rate, benign requests", "{:.1%}"))
    principle = cfg.principle if cfg.principle is not None else task.principle
    workload = Workload(sft, queries, encode_prompt(tokenizer, principle), eval_set, task_metrics, rows)
    return model.to(device=device, dtype=parse_dtype(cfg.model.dtype)), tokenizer, workload


class Encoder:
    """(prompt ids, principle-guided prompt ids or None, response ids) of an example under a length rule;
    dialogues through the chat format, losing their oldest exchanges first when over budget."""

    def __init__(self, tokenizer, chat: ChatFormat, principle: str):
        self.tokenizer, self.chat, self.principle = tokenizer, chat, principle
        self.with_bos = adds_bos(tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None)

    def __call__(self, prompt: str, response: str | None, rule: LengthRule, stats: LengthStats | None = None):
        turns = self.chat.messages(prompt)
        principled = None
        if turns is None:
            prompt_ids = encode_prompt(self.tokenizer, prompt, self.with_bos)
            response_ids = encode_response(self.tokenizer, response) if response is not None else []
        else:
            while len(turns) > 2 and rule.max_prompt_tokens is not None \
                    and len(self._render(turns)) > rule.max_prompt_tokens:
                turns = turns[2:]                       # the oldest exchange goes first
            prompt_ids, principled = self._render(turns), self._render(turns, self.principle)
            response_ids = self.chat.response_ids(response) if response is not None else []
        keep_first = 1 if self.bos is not None and prompt_ids[:1] == [self.bos] else 0
        fitted = apply_length_rule(prompt_ids, response_ids, rule, keep_first=keep_first)
        if stats is not None:
            stats.record(prompt_ids, response_ids, fitted)
        if fitted is None:
            return None
        if principled is not None and len(fitted[0]) < len(prompt_ids):
            # cut where the prompt was cut, inside the conversation both share, so the principle stays
            shared = _common_suffix(principled, prompt_ids)
            kept = fitted[0][keep_first:]
            principled = principled[:len(principled) - shared] + kept[len(kept) - min(shared, len(kept)):]
        return fitted[0], principled, fitted[1]

    def _render(self, turns, principle: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, self.chat.render(turns, principle), self.with_bos)


def _common_suffix(a: list[int], b: list[int]) -> int:
    """How many tokens a and b end with in common."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def file_workload(cfg: Config, device):
    """A local HF model folder and HH-RLHF / JSONL data files."""
    dc = cfg.data
    if dc.sft_path is None and dc.query_path is None:
        raise ConfigError("model.path is set, so data.sft_path or data.query_path must name a data file "
                          "(HH-RLHF or JSONL)")
    model, tokenizer = load_policy(cfg.model.path, dtype=parse_dtype(cfg.model.dtype), device=device)
    rule = LengthRule(dc.max_prompt_tokens, dc.max_response_tokens, dc.length_policy)
    chat = ChatFormat(tokenizer, dc.chat_template)
    principle = cfg.principle if cfg.principle is not None else DEFAULT_PRINCIPLE
    encode = Encoder(tokenizer, chat, principle)

    def prompts_and_refs(path):
        """(prompt, reference response) pairs; prompt-only files give no references."""
        try:
            return [(ex.prompt, ex.response) for ex in load_sft(path, tokenizer=tokenizer)]
        except DataError:
            return [(q, "") for q in load_queries(path, tokenizer=tokenizer)]

    query_source = dc.query_path or dc.sft_path
    items = prompts_and_refs(query_source)
    if dc.eval_path:
        train_items, eval_items = items, prompts_and_refs(dc.eval_path)
    else:
        train_items, eval_items = split_holdout(items, dc.eval_fraction, cfg.run.seed)
    held_prompts = {p for p, _ in eval_items}
    sft_examples = load_sft(dc.sft_path, tokenizer=tokenizer) if dc.sft_path else []
    stats = LengthStats()
    sft = []
    for ex in sft_examples:
        if ex.prompt in held_prompts:                                                 # no held-out leakage
            continue
        fitted = encode(ex.prompt, ex.response, rule, stats)
        if fitted is not None:
            sft.append((fitted[0], fitted[2]))
    print(f"[data] SFT examples: {stats.summary()}" + ("; dialogues through the chat template" if chat.active else ""))
    if dc.max_queries:
        train_items = train_items[:dc.max_queries]
    queries, dropped = [], 0
    for prompt, _ in train_items:
        fitted = encode(prompt, None, rule)
        if fitted is None:
            dropped += 1
        else:
            queries.append(Query(prompt, fitted[0], fitted[1]))
    print(f"[data] queries: {len(queries)} kept, {dropped} over max_prompt_tokens skipped; "
          f"held-out: {len(eval_items)}")
    eval_items = eval_items[:cfg.eval.max_queries]
    eval_rule = LengthRule(dc.max_prompt_tokens, dc.max_response_tokens, "truncate")
    eval_tok = [encode(p, r, eval_rule) for p, r in eval_items]
    eval_set = EvalSet([p for p, _ in eval_items], [t[0] for t in eval_tok],
                       [t[2] if r else [] for t, (_, r) in zip(eval_tok, eval_items)])
    stop = (chat.end_of_turn,) if chat.active and chat.end_of_turn != tokenizer.eos_token_id else ()
    return model, tokenizer, Workload(sft, queries, encode_prompt(tokenizer, principle), eval_set, stop_ids=stop)
