"""Whole PLE iterations through the real trainer, against what a user would otherwise run, in one run.

An iteration is the trainer's own loop (ple_fast.trainer.Trainer.alignment_step per batch): dual
rollout, reward scoring by a reward model through its tokenizer, the gated loss over micro-batches,
backward and the AdamW step. Every pipeline gets the same queries, seeds and sample budget (two
responses per query); only the plan (how forwards and rollouts run) differs:

  ple_fast      the defaults: fast rollout engine, packed dual forward (query once), fused layers, Triton loss
  hf_baseline   HF generate (dynamic cache), padded forwards with the query repeated, stock layers,
                full-logits log-softmax loss (loss impl "reference")
  hf_strong     HF generate with a static cache (transformers compiles its decode step), padded forwards,
                the chunked torch loss (logits never whole)
  no_<piece>    ple_fast with one piece put back to stock: rollout (HF generate), packing (padded
                forwards, which run stock layers), fused_layers (stock layers, packed), loss (chunked torch)

Models: the policy has Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8 heads, vocab 128256), random
bf16 weights from a config (nothing is downloaded); the reward model is a smaller random Llama
sequence classifier; the tokenizer is a synthetic word-level one over the model's vocabulary, so
decoding responses and encoding them for the reward model stay in the loop. Workload: 64 queries an
iteration, prompts of 128-384 tokens, at most 256 new tokens, temperature 1. With random weights EOS
is drawn at its random probability (about 1/V a token), so responses run to the cap: lengths are the
cap, not a realistic distribution, which favours the padded baselines (no padding between responses).

Reported per pipeline: response tokens per second over whole iterations (y and y_p of each query),
seconds per phase, the update phase's useful model FLOPs (query once, both responses, LM head on
scored rows) as a fraction of the bf16 matmul rate measured in the same run, peak GPU memory, and
ratios to hf_baseline and hf_strong. One warm-up iteration per pipeline is not timed (JIT, CUDA graphs,
torch.compile); every iteration takes the same 64 queries, so hf_strong's compiled shapes are the
warm-up's (a run with new queries would recompile: this favours it). Then a fit table: which configurations run on this GPU (1B full fine-tuning, 8B LoRA
r=8 alpha=16 as in the paper, 8B full fine-tuning), an out-of-memory recorded as such.

    python bench/bench_e2e.py                 # on a GPU; --allow-cpu --quick: a smoke test, no figures
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import tempfile
import time
from pathlib import Path

import torch

from common import (device_info, is_oom, matmul_peak_tflops, parse_args, require_cuda, result_path, seconds_left,
                    write_result)

BENCH = "bench_e2e"
POLICY = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256)                         # Llama-3.2-1B
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)                       # Llama-3-8B
REWARD = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=8, vocab_size=128256)
QUICK_POLICY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
QUICK_REWARD = dict(QUICK_POLICY, num_hidden_layers=1)
WORKLOAD = dict(queries=64, batch_size=64, grad_accum=8, prompt=(128, 384), new_tokens=256, principle=48)
QUICK_WORKLOAD = dict(queries=8, batch_size=4, grad_accum=2, prompt=(6, 12), new_tokens=6, principle=4)
# the config keys each pipeline sets on top of the defaults; stock pieces through the same trainer. In
# this order: the headline rows first, so a tight deadline (BENCH_DEADLINE) drops ablations, not them
PIPELINES = {
    "ple_fast": {},
    "hf_baseline": {"rollout.backend": "hf", "ple.layout": "padded", "ple.layers": "stock", "loss": "reference"},
    "hf_strong": {"rollout.backend": "hf", "ple.layout": "padded", "ple.layers": "stock", "ple.loss_impl": "torch",
                  "static_cache": True},
    "no_packing": {"ple.layout": "padded", "ple.layers": "stock"},
    "no_fused_layers": {"ple.layers": "stock"},
    "no_loss": {"ple.loss_impl": "torch"},
    "no_rollout": {"rollout.backend": "hf"},       # last: HF generate at batch 128 is the slowest row
}
SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2}


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer whose every id is one word (w3 ... w<V-1>): decode and encode round-trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL) | {f"w{i}": i for i in range(len(SPECIAL), vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="left")


def build_llama(shape: dict, device, dtype, *, classifier: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=SPECIAL["<pad>"],
                         eos_token_id=SPECIAL["<eos>"], bos_token_id=SPECIAL["<bos>"], tie_word_embeddings=False,
                         num_labels=1)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # initialised in dtype on the device: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype)


def make_workload(tokenizer, vocab: int, shape: dict, seed: int = 0):
    from ple_fast.workload import EvalSet, Query, Workload

    rng = random.Random(seed)
    low = len(SPECIAL)
    queries = []
    for _ in range(shape["queries"]):
        ids = [rng.randrange(low, vocab) for _ in range(rng.randint(*shape["prompt"]))]
        queries.append(Query(tokenizer.decode(ids), ids))
    principle = [rng.randrange(low, vocab) for _ in range(shape["principle"])]
    return Workload([], queries, principle, EvalSet([], [], []))


def pipeline_config(name: str, work: dict, overrides: dict, out: Path):
    from ple_fast.config import build_config

    keys = {k: v for k, v in overrides.items() if "." in k}
    return build_config(None, [f"ple.batch_size={work['batch_size']}", f"ple.grad_accum={work['grad_accum']}",
                               f"rollout.max_new_tokens={work['new_tokens']}", "ple.iterations=1", "sft.steps=0",
                               "model.dtype=bfloat16", f"run.out_dir={out / name}"], values=keys)


def release_memory(device: torch.device) -> None:
    """Give a finished pipeline's memory back before the next one builds its model."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def update_flops(model, work_tokens: dict) -> float:
    """Useful FLOPs of the update: 6 x (non-embedding params) per token forwarded once (query once, both
    responses), plus 6 x H x V per scored row for the LM head; attention's quadratic term left out."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - head.numel() - embed.numel()
    return 6.0 * body * work_tokens["layout"] + 6.0 * head.numel() * work_tokens["scored"]


def run_pipeline(name: str, overrides: dict, args, dev: dict, reward_fn, tokenizer, workload, out: Path) -> dict:
    """Warm-up then timed iterations of one pipeline through Trainer.alignment_step; a row for the JSON."""
    from ple_fast.plan import build_plan
    from ple_fast.runtime import MetricsLog
    from ple_fast.trainer import Trainer

    device = dev["device"]
    cfg = pipeline_config(name, dev["work"], overrides, out)
    model = build_llama(dev["policy"], device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if overrides.get("static_cache"):
        model.generation_config.cache_implementation = "static"    # transformers compiles the decode step
    plan = build_plan(cfg, model, device)
    if overrides.get("loss") == "reference":                        # full logits: not a training setting
        plan = dataclasses.replace(plan, forward=dataclasses.replace(plan.forward, loss_impl="reference"))
    trainer = Trainer(cfg, model, tokenizer, workload, reward_fn, MetricsLog(None, echo=lambda line: None),
                      device=device, plan=plan)
    trainer.optimizer_for("align")
    step = trainer.apply_update

    def synced_update(loss_value):                 # the optimizer step's kernels count in the update phase
        done = step(loss_value)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return done
    trainer.apply_update = synced_update
    batches = [workload.queries[i:i + cfg.ple.batch_size] for i in range(0, len(workload.queries), cfg.ple.batch_size)]

    def iteration() -> tuple[float, dict]:
        trainer.state.totals = trainer.fresh_totals()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            trainer.alignment_step(batch, [])
            trainer.state.align_step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, dict(trainer.state.totals)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    iteration()                                     # warm-up: not timed
    seconds, totals, runs = 0.0, {}, 0
    for _ in range(args.iterations):
        took, t = iteration()
        seconds += took
        runs += 1
        for key, value in t.items():
            totals[key] = totals.get(key, 0) + value
        if seconds_left() < dev["reserve_s"]:
            break
    queries = [q.ids for q in workload.queries]
    prompt_tokens = sum(map(len, queries)) * runs
    responses = totals["tokens"]
    tokens = dict(layout=prompt_tokens + responses + len(workload.principle_ids) * len(queries) * runs,
                  scored=responses)
    flops = update_flops(model, tokens)
    row = dict(pipeline=name, iterations=runs, seconds_per_iteration=seconds / runs,
               response_tok_s=responses / seconds, rollout_s=totals["gen_seconds"] / runs,
               scoring_s=totals["score_seconds"] / runs, update_s=totals["update_seconds"] / runs,
               update_matmul_fraction=flops / max(totals["update_seconds"], 1e-9) / (dev["peak_tflops"] * 1e12),
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               plan=trainer.plan.describe())
    del trainer, model
    release_memory(device)
    return row


def fit_check(label: str, shape: dict, lora: bool, args, dev: dict, reward_fn, tokenizer, out: Path) -> dict:
    """Does one short iteration (a quarter of the workload) of this configuration run on this device?"""
    from ple_fast.runtime import MetricsLog
    from ple_fast.trainer import Trainer

    device, work = dev["device"], dict(dev["work"], queries=max(2, dev["work"]["queries"] // 4))
    row = dict(config=label, fits=None)
    model = trainer = None
    try:
        model = build_llama(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        workload = make_workload(tokenizer, shape["vocab_size"], work, seed=1)
        cfg = pipeline_config(label, dict(work, batch_size=len(workload.queries)), {}, out)
        trainer = Trainer(cfg, model, tokenizer, workload, reward_fn, MetricsLog(None, echo=lambda line: None),
                          device=device)
        trainer.optimizer_for("align")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.state.totals = trainer.fresh_totals()
        start = time.perf_counter()
        trainer.alignment_step(workload.queries, [])
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        row.update(fits=True, response_tok_s=trainer.state.totals["tokens"] / took,
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    except ImportError as err:
        row.update(fits=None, note=f"not run: {err}")
    except Exception as err:                        # noqa: BLE001 - an OOM is a result; anything else is shown
        if not is_oom(err):
            raise
        row.update(fits=False, note="out of memory")
    finally:
        del trainer, model
        release_memory(device)
    return row


def main(argv=None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (quick shapes: a smoke test)")
        parser.add_argument("--iterations", type=int, default=1, help="timed iterations per pipeline, after one "
                                                                       "untimed warm-up (default 1)")
        parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated, in this order")
        parser.add_argument("--no-fit", action="store_true", help="skip the fit table")
    args = parse_args("whole PLE iterations: ple_fast against HF baselines through the same trainer", argv, extra)
    if not args.allow_cpu:
        require_cuda(BENCH)
    from transformers.utils import logging as hf_logging

    from ple_fast.reward import build_reward

    hf_logging.disable_progress_bar()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    dev = dict(device=device, policy=QUICK_POLICY if quick else POLICY, work=QUICK_WORKLOAD if quick else WORKLOAD,
               peak_tflops=matmul_peak_tflops(torch.bfloat16 if cuda else torch.float32), reserve_s=30)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        raise SystemExit(f"{BENCH}: unknown pipelines {unknown}; choose from {', '.join(PIPELINES)}")
    tokenizer = synthetic_tokenizer(dev["policy"]["vocab_size"])
    workload = make_workload(tokenizer, dev["policy"]["vocab_size"], dev["work"])
    path = result_path(args.out, BENCH)
    payload = dict(quick=quick, policy=dev["policy"], reward_model=QUICK_REWARD if quick else REWARD,
                   workload=dev["work"], matmul_peak_tflops=dev["peak_tflops"], rows=[], fit=[],
                   note="response_tok_s: y and y_p tokens of every query / whole-iteration seconds; responses run "
                        "to the cap (random weights); update_matmul_fraction: useful update FLOPs / bf16 matmul "
                        "rate of this run")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        reward_model = build_llama(payload["reward_model"], "cpu", torch.float32, classifier=True, seed=1)
        reward_model.save_pretrained(out / "rm")
        tokenizer.save_pretrained(out / "rm")
        del reward_model
        reward_fn = build_reward("hf", str(out / "rm"), device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                                 batch_size=64)
        print(f"{BENCH}: policy {dev['policy']}, {dev['work']['queries']} queries an iteration, "
              f"{dev['work']['new_tokens']} new tokens; {device_info().get('gpu', 'cpu')}")
        for name in names:
            if seconds_left() < 2 * dev["reserve_s"]:
                print(f"skipping {name}: {seconds_left():.0f}s left")
                continue
            try:
                row = run_pipeline(name, PIPELINES[name], args, dev, reward_fn, tokenizer, workload, out)
            except Exception as err:                # noqa: BLE001 - an OOM is a result, recorded as such
                if not is_oom(err):
                    raise
                row = dict(pipeline=name, note="out of memory")
                release_memory(device)
            payload["rows"].append(row)
            rates = {r["pipeline"]: r.get("response_tok_s") for r in payload["rows"]}
            for base in ("hf_baseline", "hf_strong"):
                for r in payload["rows"]:
                    if rates.get(base) and r.get("response_tok_s"):
                        r[f"x_{base}"] = r["response_tok_s"] / rates[base]
            print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in row.items() if k not in ("pipeline", "plan")))
            write_result(path, BENCH, payload)
        if not args.no_fit:
            configs = [("1B full", dev["policy"], False), ("8B LoRA r=8", QUICK_POLICY if quick else LLAMA_8B, True),
                       ("8B full", QUICK_POLICY if quick else LLAMA_8B, False)]
            for label, shape, lora in configs:
                if seconds_left() < 2 * dev["reserve_s"]:
                    print(f"skipping fit {label}: {seconds_left():.0f}s left")
                    continue
                payload["fit"].append(fit_check(label, shape, lora, args, dev, reward_fn, tokenizer, out))
                print(f"  fit {label}: {payload['fit'][-1]}")
                write_result(path, BENCH, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
