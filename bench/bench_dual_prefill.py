"""Dual prefill: a PLE training step (forward + backward) with each query computed once.

For each (query / original / principled) length, P pairs of random tokens (P = 8; --pairs) through a
~1B Llama shape (random weights, bf16), forward + log-probs of both responses + backward:
  packed_shared[B]      pack_dual: one query per pair, shared by both responses (tree attention B)
  packed_duplicated[B]  pack_sequences: query + original, query + principled, packed, nothing shared
  padded_hf             padded_response_rows: 2P right-padded rows, the model's own SDPA attention
B is each tree-attention backend run: by default flash (flash-attn installed), triton+fused (our
varlen Triton kernel in the fused decoder layers of ple_fast.fused_layers: the trainer's CUDA
default, ple.layers=auto), triton (the same attention in the stock HF layers) and triton+compile (the
stock layers torch.compile'd: ple.layers=compiled, experimental until timed here). A +fused or +compile
backend brings its like-for-like baseline: padded_hf[fused] / padded_hf[compile], HF's padded forward
through the same layers. --backends names others, e.g. segments (varlen on stock SDPA).
--allow-cpu runs a smoke test on CPU (fp32, tiny shapes, segments unless --backends; no figures).
The packed layouts are built on the CPU before timing, as the trainer builds them (the layout op is
timed separately, pack_ms); each step moves its layout to the GPU and picks the scored rows as the
trainer does (ple_fast.forward.packed_rows: no host sync once the forward is queued). The log-probs
use sequence_logprobs(impl="auto"), the same for every variant. Each timed variant also
gets a "profile" of one step (common.kernel_profile): kernels launched, the GPU's busy time against
the timed step (the idle fraction: a launch-bound step shows here) and the top kernels by time;
host_ms is the host's unprofiled time to issue a step (common.time_cuda): near ms, the host is the limit;
forward_ms / backward_ms and forward_host_ms / backward_host_ms split the step into its two phases, GPU and
host time each (common.time_cuda's phases).

tokens/s counts the tokens of the 2P separate sequences (query + response each), so every variant
has the same numerator and the ratios are ratios of step time. model_tflops counts the FLOPs each
variant's own layout needs (step_flops), against the bf16 matmul peak measured in the same run
(peak_fraction): a shared step that falls short of theory while running at a lower fraction than the
duplicated one loses to inefficiency, not to extra work. The theoretical ratio of shared
over duplicated is the token-FLOP ratio (2Q+C+R)/(Q+C+R); the measured one is beside it.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (is_oom, kernel_profile, linear_weights, matmul_peak_tflops, parse_args,  # noqa: E402
                    require_cuda, result_path, seconds_left, time_cuda, write_result)

BENCH = "bench_dual_prefill"
# ~1.1B Llama (TinyLlama's shape): 22 layers, hidden 2048, GQA 32/4 heads, vocab 32000
MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
QUICK_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
SHAPES = [(512, 128, 128), (256, 256, 256), (64, 512, 512)]  # the 1.5x-over-padded target shape first
QUICK_SHAPES = [(64, 16, 16), (8, 64, 64)]
PAIRS, QUICK_PAIRS = 8, 2
MIN_SECONDS_PER_SHAPE = 40
MIN_SECONDS_TO_COMPILE = 120   # a compiled variant's first step compiles the layer graph, forward and backward


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def visible_pairs(batch) -> int:
    """(query, key) pairs a packed layout attends over: each segment's q_len rows see the k_len - q_len
    rows of its ancestors and, causally, its own (the varlen metadata's bottom-right alignment)."""
    q_len = (batch.cu_seqlens_q[1:] - batch.cu_seqlens_q[:-1]).long()
    k_len = (batch.cu_seqlens_k[1:] - batch.cu_seqlens_k[:-1]).long()
    return int((q_len * (q_len + 1) // 2 + q_len * (k_len - q_len)).sum())


def step_flops(model, tokens: int, pairs: int, scored_rows: int) -> float:
    """Model FLOPs of one forward + backward (3x the forward's): 2 per decoder weight per token computed,
    4 per head dim per head per visible (query, key) pair per layer, and the LM head over the scored
    rows only (the log-prob op sees nothing else). Each variant counts the work its own layout needs,
    so TFLOP/s against the matmul peak is how well it runs, apart from how much it saves."""
    from ple_fast.models import decoder_of, head_dim

    c = model.config
    decoder = sum(w.numel() for w in linear_weights(decoder_of(model)))
    forward = (2 * decoder * tokens + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim(c) * pairs
               + 2 * c.vocab_size * c.hidden_size * scored_rows)
    return 3 * forward


def make_pairs(num_pairs: int, lengths: tuple[int, int, int], vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def seqs(n):
        return [torch.randint(3, vocab, (n,), generator=gen).tolist() for _ in range(num_pairs)]

    return tuple(seqs(n) for n in lengths)


def training_step(model, rows_fn, mark=None):
    """One forward + backward of the summed response log-probs; mark (common.time_cuda's phases), if
    given, is called before the step, between its forward (log-probs included) and backward, and after."""
    from ple_fast.loss import sequence_logprobs

    mark = mark or (lambda: None)
    mark()
    model.zero_grad(set_to_none=True)
    rows = rows_fn()
    logps = sequence_logprobs(rows.hidden, rows.weight, rows.labels, rows.seq_index, rows.num_seqs,
                              impl="auto", softcap=rows.softcap)
    mark()
    logps.sum().backward()
    mark()
    return logps.detach()


PHASES = ("forward", "backward")   # time_cuda's split of a step: a GPU can idle in one of them only
COMPILED = "+compile"     # a backend name with this suffix: the same backend, decoder layers torch.compile'd
FUSED = "+fused"          # ... with this one: the decoder layers of ple_fast.fused_layers


def variants(model, queries, originals, principled, backends: list[str], device: str):
    """variant name -> (zero-arg ResponseRows builder, rows its layout runs through the model, the
    (query, key) pairs its attention covers)."""
    from ple_fast.forward import compiled_layers, packed_rows, padded_response_rows
    from ple_fast.fused_layers import fused_decoder_layers
    from ple_fast.layout import pack_dual, pack_sequences
    from ple_fast.models import decoder_of
    from ple_fast.plan import ForwardPlan

    prompts = [q for q in queries for _ in (0, 1)]
    responses = [r for pair in zip(originals, principled) for r in pair]
    shared = pack_dual(queries, originals, principled)          # on the CPU, as the trainer builds them
    duplicated = pack_sequences(prompts, responses)

    def packed(batch, backend):
        layers = "compiled" if backend.endswith(COMPILED) else "fused" if backend.endswith(FUSED) else "stock"
        plan = ForwardPlan("packed", backend.removesuffix(COMPILED).removesuffix(FUSED), layers, "torch")
        return lambda: packed_rows(model, batch, len(prompts), plan)    # the plan's loss_impl is not read here

    def padded_compiled():
        with compiled_layers(decoder_of(model)):
            return padded_response_rows(model, prompts, responses, pad_token_id=0)

    def padded_fused():
        with fused_decoder_layers(model):
            return padded_response_rows(model, prompts, responses, pad_token_id=0)

    # padded HF first: a compile that fails slowly must not eat the baselines' time
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    padded = (len(prompts) * width, len(prompts) * width * (width + 1) // 2)     # causal over the padded width
    out = {"padded_hf": (lambda: padded_response_rows(model, prompts, responses, pad_token_id=0), *padded)}
    for backend in backends:
        out[f"packed_shared[{backend}]"] = (packed(shared, backend), shared.num_tokens, visible_pairs(shared))
        out[f"packed_duplicated[{backend}]"] = (packed(duplicated, backend), duplicated.num_tokens,
                                                visible_pairs(duplicated))
    if any(b.endswith(COMPILED) for b in backends):   # the fair baseline for compiled layers: HF compiled too
        out[f"padded_hf[{COMPILED[1:]}]"] = (padded_compiled, *padded)
    if any(b.endswith(FUSED) for b in backends):      # ... and for fused layers: HF's padded forward fused
        out[f"padded_hf[{FUSED[1:]}]"] = (padded_fused, *padded)
    return out


def available_backends(dtype: torch.dtype, device: str) -> list[str]:
    """The default backends: flash (if installed), triton in fused, stock and compiled layers. `segments`
    (0.52x of padded on an H200) runs when named by --backends."""
    if device == "cpu":   # smoke runs: interpreted triton takes minutes
        return ["segments"]
    backends = []
    if dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash")
    backends += ["triton" + FUSED, "triton", "triton" + COMPILED]
    return backends


def main() -> None:
    args = parse_args("dual prefill: packed-shared vs packed-duplicated vs padded HF training steps",
                      extra=lambda ap: (ap.add_argument("--allow-cpu", action="store_true",
                                                        help="run without CUDA (quick shapes, fp32: a smoke test)"),
                                        ap.add_argument("--shapes", help="Q/C/R,... (default: "
                                                        + ",".join("/".join(map(str, s)) for s in SHAPES) + ")"),
                                        ap.add_argument("--pairs", type=int, help=f"pairs per step (default "
                                                        f"{PAIRS}; {QUICK_PAIRS} quick): more pairs give the GPU more "
                                                        "work per launch, the same host work"),
                                        ap.add_argument("--backends", help="comma-separated tree-attention backends, "
                                                        f"a {COMPILED!r} suffix for compiled layers, {FUSED!r} for "
                                                        f"fused ones (default: flash if installed, triton{FUSED}, "
                                                        f"triton, triton{COMPILED})")))
    if not args.allow_cpu:
        require_cuda(BENCH)
    from ple_fast.layout import pack_dual

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_shape = QUICK_MODEL if quick else MODEL
    shapes = QUICK_SHAPES if quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("/")) for shape in args.shapes.split(",")]
    num_pairs = args.pairs if args.pairs is not None else (QUICK_PAIRS if quick else PAIRS)
    if num_pairs < 1:
        raise SystemExit(f"{BENCH}: --pairs must be at least 1, got {num_pairs}")
    model = build_model(model_shape, device, dtype)
    peak_tflops = matmul_peak_tflops(dtype)
    backends = args.backends.split(",") if args.backends else available_backends(dtype, device)
    path = result_path(args.out, BENCH)
    payload = dict(quick=quick, model=dict(model_shape, params=sum(p.numel() for p in model.parameters())),
                   dtype=str(dtype), pairs=num_pairs, backends=backends, matmul_peak_tflops=peak_tflops, rows=[],
                   note="tokens/s = tokens of the 2P separate sequences / fwd+bwd time; "
                        "theory = (2Q+C+R)/(Q+C+R)")
    print(f"{BENCH}: {payload['model']['params'] / 1e9:.2f}B params, {num_pairs} pairs/step, backends {backends}")
    # Eager backends over every shape first, then compiled layers (a compile per shape and backward): a
    # tight budget spends its time on the shapes of the default paths, not on compiles.
    compiled = [b for b in backends if b.endswith(COMPILED)]
    passes = [[b for b in backends if b not in compiled], compiled]
    measured: dict[tuple, dict[str, float]] = {}
    for pass_backends in (p for p in passes if p):
        for q_len, o_len, p_len in shapes:
            if seconds_left() < MIN_SECONDS_PER_SHAPE:
                print(f"skipping {pass_backends} at ({q_len}/{o_len}/{p_len}): {seconds_left():.0f}s left")
                continue
            lengths = (q_len, o_len, p_len)
            queries, originals, principled = make_pairs(num_pairs, lengths, model_shape["vocab_size"])
            logical_tokens = num_pairs * (2 * q_len + o_len + p_len)
            theory = (2 * q_len + o_len + p_len) / (q_len + o_len + p_len)
            times = measured.setdefault(lengths, {})
            for name, (rows_fn, layout_tokens, attention_pairs) in variants(model, queries, originals, principled,
                                                           pass_backends, device).items():
                if name in times:                    # padded_hf: once per shape
                    continue
                row = dict(shape=f"{q_len}/{o_len}/{p_len}", variant=name, layout_tokens=layout_tokens,
                           theory_shared_over_dup=round(theory, 3))
                if COMPILED[1:] in name and seconds_left() < MIN_SECONDS_TO_COMPILE:   # +compile, [compile]
                    row["error"] = f"skipped: BENCH_DEADLINE ({seconds_left():.0f} s left, a compile needs more)"
                    payload["rows"].append(row)
                    continue
                try:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    timing = time_cuda(lambda mark: training_step(model, rows_fn, mark), warmup=3, iters=5,
                                       phases=PHASES)
                    times[name] = timing["ms"]
                    flops = step_flops(model, layout_tokens, attention_pairs, num_pairs * (o_len + p_len))
                    tflops = flops / (timing["ms"] * 1e-3) / 1e12
                    row.update(ms=timing["ms"], host_ms=timing["host_ms"],
                               tokens_per_s=logical_tokens / (timing["ms"] * 1e-3),
                               model_tflops=tflops, peak_fraction=tflops / peak_tflops,
                               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
                    row.update({key: timing[key] for name in PHASES for key in (f"{name}_ms", f"{name}_host_ms")})
                    if seconds_left() > MIN_SECONDS_PER_SHAPE:
                        row["profile"] = kernel_profile(lambda: training_step(model, rows_fn), timed_ms=timing["ms"],
                                                        host=True)
                except Exception as err:  # noqa: BLE001 - record and go on to the next variant
                    row.update(error=("OOM: " if is_oom(err) else "") + f"{type(err).__name__}: {err}"[:300])
                    traceback.print_exc()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                payload["rows"].append(row)
                write_result(path, BENCH, payload)   # after every row: a bench timeout keeps what it measured
                phases = "" if "forward_ms" not in row else (
                    f"forward {row['forward_ms']:.1f} (host {row['forward_host_ms']:.1f}), "
                    f"backward {row['backward_ms']:.1f} (host {row['backward_host_ms']:.1f}), ")
                print(f"({q_len}/{o_len}/{p_len}) {name}: " + (f"{row['ms']:.1f} ms (host {row['host_ms']:.1f}), "
                                                             f"{phases}"
                                                             f"{row['model_tflops']:.0f} TFLOP/s "
                                                             f"({row['peak_fraction']:.0%} of matmul peak)"
                                                             if "ms" in row else "failed"),
                      flush=True)
            pack_ms = time_cuda(lambda: pack_dual(queries, originals, principled))["host_ms"]   # a CPU op
            for backend in pass_backends:
                shared, dup = times.get(f"packed_shared[{backend}]"), times.get(f"packed_duplicated[{backend}]")
                padded = times.get("padded_hf")
                summary = dict(shape=f"{q_len}/{o_len}/{p_len}", variant=f"ratios[{backend}]", pack_ms=pack_ms,
                               theory_shared_over_dup=round(theory, 3),
                               shared_over_dup=dup / shared if shared and dup else None,
                               shared_over_padded=padded / shared if shared and padded else None)
                for suffix, layers in ((COMPILED, "compiled"), (FUSED, "fused")):   # against the same layers
                    padded_same = times.get(f"padded_hf[{suffix[1:]}]")
                    if backend.endswith(suffix) and shared and padded_same:
                        summary[f"shared_over_padded_{layers}"] = padded_same / shared
                if summary["shared_over_dup"]:
                    summary["of_theory"] = summary["shared_over_dup"] / theory
                payload["rows"].append(summary)
                print(f"({q_len}/{o_len}/{p_len}) {backend}: shared/dup {summary['shared_over_dup'] or float('nan'):.3f} "
                      f"(theory {theory:.3f}), shared/padded {summary['shared_over_padded'] or float('nan'):.3f}")
            write_result(path, BENCH, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
