"""Fused log-prob + loss (kernels/logprob.py) against the usual ways of computing it.

For each (N, H, V), bf16 hidden and weight [V, H], forward + backward (dX and dW). N counts the rows of
a packed layout (per pair a 128-row query and two 192-row responses); every method gets only its
N_scored response rows, as the trainer's forward passes them (the query rows carry no label and never
reach the LM head), and useful FLOPs count those rows only.
  ple_triton            ple_loss(impl="triton"): fused Triton forward, V-chunked backward (default)
  ple_whole_pairs       ple_loss(impl="whole_pairs"): chunks of whole pairs, cuBLAS logits, Triton row
                        passes, the loss gradient inside the chunk, fp32 dW (6NHV; experimental)
  ple_torch_chunked     ple_loss(impl="torch"): the recompute design on cuBLAS: row chunks, chunk
                        logits for lse in the forward and again in the backward (8NHV)
  ple_naive             full logits -> float -> log_softmax -> gather, as HF / TRL do it
  ple_compiled_chunked  torch.compile'd chunk (logits -> log_softmax -> gather) under checkpoint
  ce_torch_linear_ce    torch.nn.functional.linear_cross_entropy, when this torch has it
  ce_liger_flce         Liger's fused linear cross-entropy, when importable (bf16 accumulation)
  ce_liger_flce_fp32    the same with accum_dtype=float32, where this Liger has it
  ce_cce / ce_cce_exact Cut Cross-Entropy, default (gradient filtering) and filter_eps=None
ple_* compute the gated PLE loss; ce_* a summed token cross-entropy: the same 6NHV of useful
work (logits, their softmax, dX, dW) and the same memory problem, a different scalar on top.
The ple_* rows are the candidates for ple_loss(impl="auto") on CUDA (today: triton). (An earlier 6NHV
design by chunks of whole pairs, impl="pairs", with fp32 logits, eight elementwise passes and ~520-row
chunks, was slower than triton at every shape on an H200, bench/results/2026-11-28-h200-suite, and is
gone; whole_pairs is its redesign.)

Reported per method: ms (median fwd+bwd), useful TFLOP/s = 6NHV / time and its fraction of
the bf16 matmul rate measured in this run, peak extra memory (above inputs and the returned
gradients), and max relative error (max|a - b| / max|b|) of loss, dX and dW against fp64.
fp64 at full size would need N*V*8 bytes of logits several times over, so the error is taken
on a reduced problem: a random sample of whole pairs (ERR_ROWS scored rows) with the full weight,
i.e. the same V and H; the fp64 oracle is the reference implementation on fp64 copies of the bf16 inputs.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth_gbs, is_oom, matmul_peak_tflops, parse_args, peak_extra_memory,  # noqa: E402
                    require_cuda, result_path, seconds_left, time_cuda, write_result)

# the headline shape first, so a run cut short by the suite's deadline still has it
SHAPES = [(16384, 4096, 128256), (4096, 4096, 128256), (8192, 2048, 151936), (8192, 3584, 152064)]
MIN_SECONDS_PER_METHOD = 20
QUICK_SHAPES = [(1024, 256, 5003), (2048, 512, 32000)]
QUERY_ROWS, RESPONSE_ROWS = 128, 192  # one pair = 512 rows: unscored query, two responses
ERR_ROWS = 2048
COMPILED_CHUNK_ROWS = 2048


def make_batch(num_rows: int, hidden_size: int, vocab: int, seed: int = 0, device: str = "cuda") -> dict:
    """Packed pairs (per 512 layout rows a 128-row query and two 192-row responses), scored rows only."""
    pair_rows = QUERY_ROWS + 2 * RESPONSE_ROWS
    if num_rows % pair_rows:
        raise ValueError(f"N = {num_rows} must be a multiple of {pair_rows} rows per pair")
    num_pairs = num_rows // pair_rows
    g = torch.Generator(device=device).manual_seed(seed)
    one_pair = torch.cat([torch.full((QUERY_ROWS,), -1), torch.zeros(RESPONSE_ROWS), torch.ones(RESPONSE_ROWS)])
    seq_index = (one_pair[None, :] + torch.where(one_pair >= 0, 2, 0)[None, :] * torch.arange(num_pairs)[:, None])
    seq_index = seq_index.flatten().long().to(device)
    labels = torch.randint(0, vocab, (num_rows,), device=device, generator=g)
    hidden = torch.randn(num_rows, hidden_size, device=device, generator=g).bfloat16()
    scored = seq_index >= 0                 # the rows the trainer's forward hands the loss
    return dict(
        hidden=hidden[scored], labels=labels[scored], seq_index=seq_index[scored],
        weight=(torch.randn(vocab, hidden_size, device=device, generator=g) * 2 / hidden_size**0.5).bfloat16(),
        rewards=torch.randn(num_pairs, 2, device=device, generator=g), num_pairs=num_pairs,
    )


# ----------------------------------------------------------------------------------------
# methods: name -> (objective, factory(batch) -> loss_fn(hidden, weight) or None if unavailable)


def _ple_impl(impl):
    def factory(b):
        from ple_fast.loss import ple_loss

        return lambda h, w: ple_loss(h, w, b["labels"], b["seq_index"], b["rewards"], 0.2, impl=impl).loss
    return factory


def _ple_from_token_logps(b, token_logps):
    from ple_fast.loss import gated_loss, sequence_token_counts

    num_seqs = 2 * b["num_pairs"]
    slots = torch.where(b["seq_index"] >= 0, b["seq_index"], num_seqs)
    seq_logps = token_logps.new_zeros(num_seqs + 1).index_add(0, slots, token_logps)[:num_seqs]
    loss, *_ = gated_loss(seq_logps, sequence_token_counts(b["seq_index"], num_seqs), b["rewards"], 0.2,
                          rank_loss="hinge", weighting="softmax", rank_sft_coef=1.0, length_normalize=True, beta=1.0)
    return loss


def _ple_naive(b):
    safe = torch.where(b["seq_index"] >= 0, b["labels"], 0)

    def loss_fn(h, w):
        logits = (h @ w.T).float()
        token_logps = logits.log_softmax(-1).gather(1, safe[:, None]).squeeze(1)
        return _ple_from_token_logps(b, token_logps)
    return loss_fn


def _ple_compiled_chunked(b):
    from torch.utils.checkpoint import checkpoint

    safe = torch.where(b["seq_index"] >= 0, b["labels"], 0)

    @torch.compile(dynamic=False)
    def chunk_logps(h, w, t):
        return (h @ w.T).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)

    def loss_fn(h, w):
        parts = [checkpoint(chunk_logps, h[i:i + COMPILED_CHUNK_ROWS], w, safe[i:i + COMPILED_CHUNK_ROWS],
                            use_reentrant=False) for i in range(0, h.shape[0], COMPILED_CHUNK_ROWS)]
        return _ple_from_token_logps(b, torch.cat(parts))
    return loss_fn


def _ce_torch_linear_ce(b):
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        return None
    return lambda h, w: fn(h, w, b["labels"], reduction="sum", ignore_index=-100)


# why a method's factory returned None (its import error), shown in the row's status
UNAVAILABLE: dict[str, str] = {}


def _ce_liger(name, **options):
    """Liger's fused linear cross-entropy with these constructor options (accum_dtype: only newer Ligers)."""
    def factory(b):
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", **options)
        except (ImportError, TypeError) as err:       # TypeError: a Liger without that option
            UNAVAILABLE[name] = f"{type(err).__name__}: {err}"[:200]
            return None
        return lambda h, w: module(w, h, b["labels"])
    return factory


def _ce_cce(filter_eps):
    def factory(b):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as err:
            UNAVAILABLE["ce_cce" if filter_eps == "auto" else "ce_cce_exact"] = f"{type(err).__name__}: {err}"[:200]
            return None
        return lambda h, w: linear_cross_entropy(h, w, b["labels"], ignore_index=-100, reduction="sum",
                                                 filter_eps=filter_eps)
    return factory


METHODS = {  # in run order: the comparisons the targets name first, slow compiles last
    "ple_triton": ("ple", _ple_impl("triton")),
    "ple_whole_pairs": ("ple", _ple_impl("whole_pairs")),
    "ce_liger_flce": ("ce", _ce_liger("ce_liger_flce")),
    "ce_liger_flce_fp32": ("ce", _ce_liger("ce_liger_flce_fp32", accum_dtype=torch.float32)),
    "ce_cce": ("ce", _ce_cce("auto")),
    "ce_cce_exact": ("ce", _ce_cce(None)),
    "ple_torch_chunked": ("ple", _ple_impl("torch")),
    "ple_naive": ("ple", _ple_naive),
    "ce_torch_linear_ce": ("ce", _ce_torch_linear_ce),
    "ple_compiled_chunked": ("ple", _ple_compiled_chunked),
}


# ----------------------------------------------------------------------------------------
# measurement


def fp64_oracle(objective: str, b: dict) -> tuple:
    """(loss, dX, dW) in fp64 from the reference implementation on fp64 copies of the inputs."""
    from ple_fast.loss import ple_loss

    h = b["hidden"].double().requires_grad_(True)
    w = b["weight"].double().requires_grad_(True)
    if objective == "ple":
        loss = ple_loss(h, w, b["labels"], b["seq_index"], b["rewards"], 0.2, impl="reference").loss
    else:
        loss = F.cross_entropy(h @ w.T, b["labels"], reduction="sum", ignore_index=-100)
    return (loss.detach(), *torch.autograd.grad(loss, [h, w]))


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def reduced_batch(b: dict, seed: int = 0) -> dict:
    """A random sample of whole pairs, about ERR_ROWS scored rows, renumbered as pairs 0..k-1."""
    per_pair = 2 * RESPONSE_ROWS
    count = max(1, min(ERR_ROWS // per_pair, b["num_pairs"]))
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(b["num_pairs"], generator=g)[:count].sort().values.to(b["seq_index"].device)
    new_id = torch.full((b["num_pairs"],), -1, dtype=torch.long, device=pairs.device)
    new_id[pairs] = torch.arange(count, device=pairs.device)
    pair_of_row = new_id[b["seq_index"] // 2]
    keep = pair_of_row >= 0
    return dict(b, hidden=b["hidden"][keep], labels=b["labels"][keep],
                seq_index=2 * pair_of_row[keep] + b["seq_index"][keep] % 2, rewards=b["rewards"][pairs],
                num_pairs=count)


def measure(name: str, objective: str, factory, b: dict, oracle: dict, useful_flop: float, peak: float,
            warmup: int, iters: int) -> dict:
    row = dict(method=name, objective=objective)
    loss_fn = factory(b)
    if loss_fn is None:
        reason = UNAVAILABLE.get(name)
        return dict(row, status="unavailable" + (f" ({reason})" if reason else ""))
    hidden = b["hidden"].detach().requires_grad_(True)
    weight = b["weight"].detach().requires_grad_(True)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    def step():
        return torch.autograd.grad(loss_fn(hidden, weight), [hidden, weight])

    try:
        timing = time_cuda(step, warmup=warmup, iters=iters)
        extra = peak_extra_memory(step) - grad_bytes
        small = reduced_batch(b)
        small_fn = factory(small)
        h = small["hidden"].detach().requires_grad_(True)
        w = small["weight"].detach().requires_grad_(True)
        loss = small_fn(h, w)
        dx, dw = torch.autograd.grad(loss, [h, w])
        if objective not in oracle:
            oracle[objective] = fp64_oracle(objective, small)
        ref_loss, ref_dx, ref_dw = oracle[objective]
        tflops = useful_flop / (timing["ms"] * 1e-3) / 1e12
        row.update(status="ok", ms=timing["ms"], ms_min=timing["ms_min"], useful_tflops=tflops,
                   frac_of_matmul_peak=tflops / peak, peak_extra_gib=extra / 2**30,
                   err_loss=max_rel_error(loss.detach(), ref_loss), err_dx=max_rel_error(dx, ref_dx),
                   err_dw=max_rel_error(dw, ref_dw))
    except Exception as err:  # one failing method must not stop the others
        row.update(status="oom" if is_oom(err) else "error", error=f"{type(err).__name__}: {err}"[:300])
        if not is_oom(err):
            traceback.print_exc()
    finally:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)))
    require_cuda("bench_logprob_loss")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    warmup, iters = (1, 3) if args.quick else (1, 5)

    path = result_path(args.out, "bench_logprob_loss")
    peak = matmul_peak_tflops(torch.bfloat16)
    payload = dict(quick=args.quick, matmul_peak_tflops=peak, copy_bandwidth_gbs=copy_bandwidth_gbs(),
                   err_rows=ERR_ROWS, note="err_* = max|a-b|/max|b| vs fp64 on a random sample of whole pairs, "
                   "err_rows scored rows (full V, H); peak_extra_gib excludes inputs and returned grads; useful "
                   "TFLOP/s count the N_scored rows every method gets", rows=[])
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s, copy {payload['copy_bandwidth_gbs']:.0f} GB/s")
    for num_rows, hidden_size, vocab in shapes:
        b = make_batch(num_rows, hidden_size, vocab)
        useful = 6.0 * b["hidden"].shape[0] * hidden_size * vocab      # scored rows only
        oracle: dict = {}
        for name in methods:
            objective, factory = METHODS[name]
            start = time.time()
            if seconds_left() < MIN_SECONDS_PER_METHOD:
                row = dict(method=name, objective=objective, status="skipped(deadline)")
            else:
                row = measure(name, objective, factory, b, oracle, useful, peak, warmup, iters)
            row = dict(N=num_rows, N_scored=b["hidden"].shape[0], H=hidden_size, V=vocab, **row,
                       wall_s=round(time.time() - start, 1))
            payload["rows"].append(row)
            write_result(path, "bench_logprob_loss", payload)  # after every row: survives a timeout
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(shown, flush=True)
        del b, oracle
        torch.cuda.empty_cache()
    print(f"bench_logprob_loss: wrote {path}")


if __name__ == "__main__":
    main()
