"""What a training run trains and evaluates on, tokenized: the embedded task, or files and a model folder.

The embedded task (ple_fast.task) comes with its word tokenizer and a tiny Llama built from scratch;
files come with a local HF policy folder, whose tokenizer (and chat template) encodes them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ple_fast.config import Config, ConfigError
from ple_fast.data import (DataError, LengthRule, SFTExample, apply_length_rule, encode_prompt, encode_response,
                           load_queries, load_sft, split_holdout, tokenize_sft)
from ple_fast.models import build_tiny_llama, build_word_tokenizer, load_policy, parse_dtype
from ple_fast.task import build_task, judge

DEFAULT_PRINCIPLE = ("\n\nPrinciple: Reply as a helpful, honest and harmless assistant. Give useful, "
                     "accurate help with safe requests, and politely refuse requests that could "
                     "harm people, explaining why.")


@dataclass
class Query:
    text: str
    ids: list[int]


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


def embedded_workload(cfg: Config, device):
    """The built-in task, its word tokenizer and a tiny Llama trained from scratch."""
    task = build_task(cfg.run.seed)
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


def file_workload(cfg: Config, device):
    """A local HF model folder and HH-RLHF / JSONL data files."""
    dc = cfg.data
    if dc.sft_path is None and dc.query_path is None:
        raise ConfigError("model.path is set, so data.sft_path or data.query_path must name a data file "
                          "(HH-RLHF or JSONL)")
    model, tokenizer = load_policy(cfg.model.path, dtype=parse_dtype(cfg.model.dtype), device=device)
    rule = LengthRule(dc.max_prompt_tokens, dc.max_response_tokens, dc.length_policy)

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
    sft_examples = [ex for ex in sft_examples if ex.prompt not in held_prompts]   # no held-out leakage
    sft, stats = tokenize_sft(sft_examples, tokenizer, rule)
    print(f"[data] SFT examples: {stats.summary()}")
    if dc.max_queries:
        train_items = train_items[:dc.max_queries]
    queries, dropped = [], 0
    for prompt, _ in train_items:
        fitted = apply_length_rule(encode_prompt(tokenizer, prompt), [], rule)
        if fitted is None:
            dropped += 1
        else:
            queries.append(Query(prompt, fitted[0]))
    print(f"[data] queries: {len(queries)} kept, {dropped} over max_prompt_tokens skipped; "
          f"held-out: {len(eval_items)}")
    eval_items = eval_items[:cfg.eval.max_queries]
    eval_rule = LengthRule(dc.max_prompt_tokens, dc.max_response_tokens, "truncate")
    eval_tok, _ = tokenize_sft([SFTExample(p, r) for p, r in eval_items], tokenizer, eval_rule)
    eval_set = EvalSet([p for p, _ in eval_items], [t[0] for t in eval_tok],
                       [t[1] if r else [] for t, (_, r) in zip(eval_tok, eval_items)])
    principle = cfg.principle if cfg.principle is not None else DEFAULT_PRINCIPLE
    return model, tokenizer, Workload(sft, queries, encode_prompt(tokenizer, principle), eval_set)
