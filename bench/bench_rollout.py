"""Rollout throughput: HF generate, HF static cache + torch.compile, and ple_fast's engine.

A ~1B Llama shape (Llama-3.2-1B: 16 layers, hidden 2048, 32/8 heads, vocab 128256, tied) with
random bf16 weights; prompts of 256 random tokens, 256 new tokens (no EOS), sampling at
temperature 1. Reports generated tokens/s per method and batch size, and for our engine the
fraction of the bandwidth floor: per decode step, one read of the weights plus the K/V of every
row's context, at the device-to-device copy bandwidth measured in the same run. Our engine runs
`fast` with its GPU defaults (fused decode layers, fused race sampler, Triton decode attention), and
with one of them swapped for the plain path, to show what each saves: `fast_one_stream` (the fused
step's projections on one stream, not q beside k / v and up beside gate), `fast_stock_layers` (the HF
layers' own norms, rotary and SwiGLU around the same attention kernel), `fast_torch_sampling` (softmax
sampling with a noise tensor), `fast_sdpa_decode` (masked SDPA over the cache, stock layers),
`fast_merged` (the other way: q / k / v and gate / up as one matmul each, over weights laid out back to
back by ple_fast.merged_projections; CUDA) and
`fast[BLOCK=.. num_stages=.. num_warps=..]` (the decode attention kernel with each of its other
CANDIDATE_TILES, in the step; at --tile-batches, default 256). (A torch.compile'd decode step was
slower than the fused layers at every batch on an H200, bench/results/2026-11-28-h200-session2, and
is gone.) For `fast`, `fast_stock_layers` and `fast_merged` a "profile" of 16 early decode steps records
kernels per step, the GPU's busy time per step (sum of kernel durations) against those steps'
CUDA-event time, and the top kernels: whether a step is launch-bound, and which kernels to fuse
next. After each batch's engine rows, `attention_kernel[triton]` and `attention_kernel[sdpa]` time
one layer's decode attention alone at the batch's mid-decode context (replayed from a CUDA graph):
its K/V read rate against the copy bandwidth (CUDA only), and
`attention_kernel[triton BLOCK=.. num_stages=.. num_warps=..]` the same kernel with each of its
CANDIDATE_TILES (and their largest difference from the default's output); and `matmuls_alone`
replays one step's matmuls from a CUDA graph: TFLOP/s against the bf16 matmul peak measured in the
same run. On CUDA, `matmuls_alone[cublaslt]` and the engine row `fast_cublaslt` repeat those with
torch's matmuls routed to cuBLASLt (torch.backends.cuda.preferred_blas_library), whose heuristics
choose other kernels for the skinny [batch x hidden] decode matmuls than cuBLAS's: whether the
engine should capture its graphs so.

The issue's floor counts bytes. At large batch a small model's step is also bound by its matmul
FLOPs (2 per weight per row): each engine row also reports `compute_floor_fraction`, the decode
FLOPs at the measured matmul peak over the decode time. A step can reach neither floor while the
other is far off; the two together say which one binds at that batch.

    python bench/bench_rollout.py [--out DIR] [--quick] [--batches 128,256,32] [--hf-batches 128] [--skip-compile]

--hf-batches limits HF generate (~16 s a batch on an H200, most of this bench's time) to the batches
named, e.g. 128, the one its speed target is set at; the default times it at every batch.

Batches run in target order (128: speed over HF, 256: floor fraction, then 32), first for the
eager methods (each batch followed by its step-part rows), then for HF + compile, only while
BENCH_DEADLINE leaves time. The JSON is rewritten
after every row.
Without CUDA it exits 0 with a message (--allow-cpu runs the quick shapes anyway, a smoke test).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (copy_bandwidth_gbs, is_oom, kernel_profile, linear_weights, matmul_peak_tflops,  # noqa: E402
                    parse_args, require_cuda, result_path, seconds_left, write_result)
from ple_fast.models import head_dim  # noqa: E402

BENCH = "bench_rollout"
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def weight_bytes_read_per_step(model) -> int:
    """Every parameter once (tied head counted once); an untied input embedding is only gathered."""
    seen, total = set(), 0
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def decode_flops(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of the decode steps: 2 per weight per row for the matmuls, and QK^T + PV over each row's
    context for attention. At large batch these, not the bytes, bound a small model's step: 2.5 GFLOP a
    row for the 1B Llama, so batch 256 is 0.63 TFLOP a step (0.79 ms at 800 TFLOP/s)."""
    c = model.config
    matmul = 2 * sum(w.numel() for w in linear_weights(model))
    attention_per_position = 4 * c.num_hidden_layers * c.num_attention_heads * head_dim(c)
    steps = new_tokens - 1
    positions = sum(prompt_len + s for s in range(1, new_tokens))
    return batch * (matmul * steps + attention_per_position * positions)


def kv_bytes_read(model, batch: int, prompt_len: int, new_tokens: int) -> int:
    """K/V bytes the decode steps must read: step s attends over prompt_len + s positions per row."""
    c = model.config
    per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim(c) * model.dtype.itemsize
    positions = sum(prompt_len + s for s in range(1, new_tokens))
    return batch * positions * per_position


def run_hf(model, input_ids, new_tokens: int, static: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                  top_p=1.0, top_k=None, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    if static:
        kwargs["cache_implementation"] = "static"    # transformers compiles the decode step for it
    return model.generate(input_ids, **kwargs)


PROFILED_STEPS = 16
PROFILED_METHODS = ("fast", "fast_stock_layers", "fast_merged")


def decode_step_profile(engine, prompts: list[list[int]]) -> dict:
    """Kernels of one decode step: generate with PROFILED_STEPS more steps minus generate without
    them (same prefill), per step; against the same steps' CUDA-event time (their idle fraction)."""
    kw = dict(temperature=1.0, seed=0)
    more = lambda: engine.generate(prompts, max_new_tokens=1 + PROFILED_STEPS, **kw)
    more()                                  # unprofiled: the time of those same steps
    timed_ms = 1e3 * engine.last_stats.decode_s / PROFILED_STEPS
    return kernel_profile(more, baseline=lambda: engine.generate(prompts, max_new_tokens=1, **kw),
                          units=PROFILED_STEPS, timed_ms=timed_ms)


ATTENTION_CALLS = 50     # decode attention calls per timed loop: one call is ~tens of microseconds


def tile_label(tile: dict) -> str:
    """'BLOCK=64 num_stages=2 num_warps=8': a decode attention tile in a row's method name."""
    return " ".join(f"{k}={v}" for k, v in tile.items())


def attention_bandwidth(model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
                        tiles: tuple[dict, ...] | None = None) -> list[dict]:
    """One layer's decode attention alone, at the run's mid-decode context: K/V bytes read per second
    against the copy bandwidth, for the Triton kernel and for masked SDPA over the cache (the torch path).
    How close the kernel is to bandwidth, separately from the rest of the step (CUDA only).

    tiles: other tiles of the Triton kernel to time beside its default (None: the kernel module's
    CANDIDATE_TILES on CUDA at head dim 64 in half precision, else none); each such row also gives
    its largest difference from the default tile's output, so a fast wrong tile cannot pass."""
    import functools

    import torch.nn.functional as F

    from common import time_cuda
    from ple_fast.kernels.decode_attention import CANDIDATE_TILES, decode_attention

    c, device, dtype = model.config, model.device, model.dtype
    dim = head_dim(c)
    kv_heads, q_heads = c.num_key_value_heads, c.num_attention_heads
    context = prompt_len + new_tokens // 2
    kv_length = -(-context // 64) * 64
    g = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(batch, kv_heads, kv_length + 64, dim, generator=g, device=device, dtype=dtype)
                    for _ in range(2))
    query = torch.randn(batch, q_heads, 1, dim, generator=g, device=device, dtype=dtype)
    positions = torch.full((batch,), context - 1, device=device)
    mask = (torch.arange(kv_length, device=device) <= positions[:, None])[:, None, None, :]
    grouped = query.view(batch, kv_heads, q_heads // kv_heads, dim)
    triton_call = functools.partial(decode_attention, query, keys, values, positions, kv_length, dim ** -0.5)
    calls = {
        "triton": triton_call,
        "sdpa": lambda: F.scaled_dot_product_attention(grouped, keys[:, :, :kv_length], values[:, :, :kv_length],
                                                       attn_mask=mask),
    }
    if tiles is None:
        tiles = CANDIDATE_TILES if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dim == 64 \
            else ()
    tile_of = {"triton " + tile_label(tile): tile for tile in tiles}
    calls.update({name: functools.partial(triton_call, tile=tile) for name, tile in tile_of.items()})
    reference = triton_call() if tile_of else None
    nbytes = 2 * batch * kv_heads * context * dim * dtype.itemsize
    rows = []
    for name, call in calls.items():
        # replayed from a graph: timed alone, a ~50 us launch-heavy call also measures the host (a tile's
        # standalone time moved by 1.6x between two H200 runs, bench/results/2026-11-28-h200-session2)
        run = graph_replay(lambda: [call() for _ in range(ATTENTION_CALLS)])
        ms = time_cuda(run, warmup=2, iters=5)["ms"] / ATTENTION_CALLS
        row = dict(batch=batch, method=f"attention_kernel[{name}]", context=context, ms=ms,
                   kv_gbs=nbytes / ms / 1e6, bandwidth_fraction=nbytes / (ms * 1e-3) / bandwidth)
        if name in tile_of:
            row.update(tile=tile_of[name], max_abs_diff_vs_default=float((call() - reference).abs().max()))
        rows.append(row)
    return rows


@contextlib.contextmanager
def blas_library(name: str | None):
    """torch's CUDA matmuls through `name` ("cublas" / "cublaslt") inside the block; None: as they are."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def graph_replay(work):
    """On CUDA, work() captured once in a CUDA graph and its replay returned, as the engine replays its
    step: no host launch cost in the timing. Elsewhere work itself (smoke runs)."""
    if not torch.cuda.is_available():
        return work
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):              # lazy inits (cuBLAS, Triton's compiles) stay out of the graph
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph.replay


def matmuls_alone(model, batch: int, peak_tflops: float, bandwidth: float, blas: str | None = None) -> dict:
    """One decode step's matmuls alone (every projection and the LM head, on random [batch, in] rows),
    replayed from a CUDA graph as the engine's step is: the GEMMs' share of a step at this batch, as
    TFLOP/s against the matmul peak and weight bytes/s against the copy bandwidth. With the
    attention_kernel rows, what is left of the step is the rest (norms, sampling, launch gaps).
    Without CUDA the matmuls run eagerly (smoke runs only). blas: see `blas_library`."""
    import torch.nn.functional as F

    from common import time_cuda

    weights = linear_weights(model)
    g = torch.Generator(device=model.device).manual_seed(0)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], generator=g, device=model.device, dtype=model.dtype)
              for w in weights}
    step = lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]
    with blas_library(blas):                   # the kernels are chosen at capture; replays keep them
        run = graph_replay(step)
    ms = time_cuda(run, warmup=2, iters=10)["ms"]
    flops = 2 * batch * sum(w.numel() for w in weights)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return dict(batch=batch, method="matmuls_alone" + (f"[{blas}]" if blas else ""), kernels=len(weights), ms=ms,
                tflops=flops / (ms * 1e-3) / 1e12, peak_fraction=flops / (ms * 1e-3) / (peak_tflops * 1e12),
                weight_gbs=nbytes / ms / 1e6, bandwidth_fraction=nbytes / (ms * 1e-3) / bandwidth)


def step_parts(model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float, peak_tflops: float
               ) -> list[dict]:
    """The decode step's parts alone, each its own row (an error is a row, never lost rows): the decode
    attention (CUDA only) and the matmuls."""
    rows = []
    try:
        for row in attention_bandwidth(model, batch, prompt_len, new_tokens, bandwidth) \
                if model.device.type == "cuda" else []:
            rows.append(row)
            print(f"batch {batch:4d}  {row['method']:24s}  {row['ms'] * 1e3:8.1f} us  "
                  f"{row['kv_gbs']:7.0f} GB/s  {row['bandwidth_fraction']:.0%} of copy bandwidth")
    except Exception as err:  # noqa: BLE001 - a diagnostic must not lose the run's rows
        rows.append(dict(batch=batch, method="attention_kernel", error=f"{type(err).__name__}: {err}"[:300]))
    for blas in (None, "cublaslt") if model.device.type == "cuda" else (None,):
        method = "matmuls_alone" + (f"[{blas}]" if blas else "")
        try:
            rows.append(row := matmuls_alone(model, batch, peak_tflops, bandwidth, blas))
            print(f"batch {batch:4d}  {method:24s}  {row['ms'] * 1e3:8.1f} us  {row['tflops']:7.0f} TFLOP/s "
                  f"({row['peak_fraction']:.0%} of matmul peak)  {row['bandwidth_fraction']:.0%} of copy bandwidth")
        except Exception as err:  # noqa: BLE001
            rows.append(dict(batch=batch, method=method, error=f"{type(err).__name__}: {err}"[:300]))
    return rows


def batch_set(text: str) -> set[int]:
    """--hf-batches / --tile-batches: comma-separated batch sizes, or 'none'."""
    return set() if text == "none" else {int(b) for b in text.split(",")}


def time_call(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--batches", help="comma-separated batch sizes (default 128,256,32; quick 4,8)")
        ap.add_argument("--hf-batches", help="comma-separated batches to time HF generate at (default: every one; "
                                             "'none' for none)")
        ap.add_argument("--methods", help="comma-separated methods to run (default: all; 'fast_tiles' names every "
                                          "fast[BLOCK=..] row; the step-part rows always run)")
        ap.add_argument("--tile-batches", default="256",
                        help="batches to time the engine at with each CANDIDATE_TILE of the decode attention "
                             "(CUDA; default 256, the floor target's; 'none' for none)")
        ap.add_argument("--prompt-len", type=int)
        ap.add_argument("--new-tokens", type=int)
        ap.add_argument("--skip-compile", action="store_true", help="skip HF static cache + torch.compile")
        ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (smoke test only)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if not args.allow_cpu:
        require_cuda(BENCH)
    from ple_fast.engine import RolloutEngine
    from ple_fast.kernels.decode_attention import CANDIDATE_TILES
    from ple_fast.plan import engine_options

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    shape = TINY if quick else LLAMA_1B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt_len = args.prompt_len or (32 if quick else 256)
    new_tokens = args.new_tokens or (32 if quick else 256)
    batches = [int(b) for b in (args.batches or ("4,8" if quick else "128,256,32")).split(",")]
    hf_batches = set(batches) if args.hf_batches is None else batch_set(args.hf_batches)
    # the compiled baseline in a pass of its own, after every batch of the eager ones: a first compile can
    # take minutes, and must not push the batch-256 rows (the floor target) past the deadline
    tile_batches = batch_set(args.tile_batches)
    eager = ("hf", "fast", "fast_one_stream", "fast_stock_layers", "fast_torch_sampling", "fast_sdpa_decode")
    # the engine with each other tile of its decode attention kernel (CUDA: the fused step's launch)
    tiled = {f"fast[{tile_label(tile)}]": tile for tile in (CANDIDATE_TILES if device.type == "cuda" else ())}
    passes = [eager + (("fast_cublaslt", "fast_merged") if device.type == "cuda" else ()) + tuple(tiled),
              () if quick or args.skip_compile else ("hf_static_compile",)]
    if args.methods:
        chosen = args.methods.split(",")
        if "fast_tiles" in chosen:
            chosen = [m for m in chosen if m != "fast_tiles"] + list(tiled)
        unknown = set(chosen) - {m for p in passes for m in p}
        if unknown:
            raise SystemExit(f"{BENCH}: --methods {sorted(unknown)} unknown; choose from "
                             f"{[m for p in passes for m in p]}")
        passes = [tuple(m for m in p if m in chosen) for p in passes]

    model = build_model(shape, dtype, device)
    bandwidth = 1e9 * copy_bandwidth_gbs()
    peak_tflops = matmul_peak_tflops()
    weights = weight_bytes_read_per_step(model)
    engine = lambda **options: RolloutEngine(model, engine_options(model, **options))  # noqa: E731
    engines = {"fast": engine(),
               "fast_one_stream": engine(side_stream=False),
               "fast_stock_layers": engine(layers="stock"),
               "fast_torch_sampling": engine(fused_sampling=False),
               "fast_sdpa_decode": engine(decode_attention="sdpa"),
               "fast_cublaslt": engine(),      # its graphs captured with cuBLASLt matmuls
               # q / k / v and gate / up as one matmul each (its first call lays the weights out so)
               **({"fast_merged": engine(merged_projections=True)} if device.type == "cuda" else {}),
               **{name: engine(decode_tile=tile) for name, tile in tiled.items()}}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s  weights {weights / 1e9:.2f} GB  "
          f"prompt {prompt_len}  new {new_tokens}  batches {batches}")
    out_path = result_path(args.out, BENCH)
    rows: list[dict] = []
    hf_rate: dict[int, float] = {}

    def save():
        fast = {r["batch"]: r for r in rows if r["method"] == "fast" and "tokens_per_s" in r}
        targets = {"speedup_vs_hf_at_128": {"target": 10.0, "measured": fast.get(128, {}).get("speedup_vs_hf")},
                   "floor_fraction_at_256": {"target": 0.6, "measured": fast.get(256, {}).get("floor_fraction")}}
        write_result(out_path, BENCH, dict(quick=quick, dtype=str(dtype).removeprefix("torch."), model_shape=shape,
                                           prompt_len=prompt_len, new_tokens=new_tokens,
                                           copy_bandwidth_gbs=bandwidth / 1e9, matmul_peak_tflops=peak_tflops,
                                           weight_bytes=weights,
                                           targets=targets, rows=rows))

    for methods in passes:
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, shape["vocab_size"], (batch, prompt_len), generator=g)
            input_ids = prompts.to(device)
            floor_s = (weights * (new_tokens - 1) + kv_bytes_read(model, batch, prompt_len, new_tokens)) / bandwidth
            compute_floor_s = decode_flops(model, batch, prompt_len, new_tokens) / (peak_tflops * 1e12)
            for method in methods:
                if method in ("hf", "hf_static_compile") and batch not in hf_batches:
                    continue
                if method in tiled and batch not in tile_batches:
                    continue
                row = {"batch": batch, "method": method}
                rows.append(row)
                if seconds_left() < (90 if method == "hf_static_compile" else 20):   # compiles
                    row["error"] = "skipped: BENCH_DEADLINE"
                    save()
                    continue
                try:
                    # fast_cublaslt: the engine's graphs captured (and its prefill run) with cuBLASLt matmuls
                    with blas_library("cublaslt" if method == "fast_cublaslt" else None):
                        if method in engines:
                            engine = engines[method]
                            for other in engines.values():   # one KV cache at a time
                                if other is not engine:
                                    other.release()
                            call = lambda: engine.generate(prompts.tolist(), max_new_tokens=new_tokens,
                                                           temperature=1.0, seed=0)
                            call()                             # warm-up: captures every cache-length graph
                        else:
                            static = method == "hf_static_compile"
                            call = lambda: run_hf(model, input_ids, new_tokens, static)
                            if static:
                                call()                             # warm-up: compiles for this batch size
                            else:
                                run_hf(model, input_ids, 4, False)
                        seconds = time_call(call, device)
                except Exception as err:                       # e.g. torch.compile unsupported here
                    row["error"] = ("OOM: " if is_oom(err) else "") + f"{type(err).__name__}: {err}"[:300]
                    print(f"batch {batch:4d}  {method:18s}  failed: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    save()
                    continue
                rate = batch * new_tokens / seconds
                row.update(seconds=seconds, tokens_per_s=rate, end_to_end_floor_fraction=floor_s / seconds)
                if method == "hf":
                    hf_rate[batch] = rate
                if batch in hf_rate and method != "hf":
                    row["speedup_vs_hf"] = rate / hf_rate[batch]
                note = ""
                if method in engines:
                    stats = engine.last_stats
                    steps = max(stats.decode_steps - 1, 1)
                    row.update(prefill_s=stats.prefill_s, decode_s=stats.decode_s, cuda_graphs=stats.graphs,
                               decode_step_ms=1e3 * stats.decode_s / steps,
                               floor_fraction=floor_s / stats.decode_s if stats.decode_s > 0 else None,
                               compute_floor_fraction=compute_floor_s / stats.decode_s if stats.decode_s > 0 else None)
                    note = (f"  step {row['decode_step_ms']:.2f} ms  floor {row['floor_fraction']:.0%}"
                            f" (compute floor {row['compute_floor_fraction']:.0%})")
                    if method in PROFILED_METHODS and seconds_left() > 60:
                        try:
                            row["profile"] = prof = decode_step_profile(engine, prompts.tolist())
                            note += f"  {prof['count']:.0f} {prof['unit']}/step, idle {prof['idle_fraction']:.0%}"
                        except Exception as err:  # noqa: BLE001 - a profiler failure must not lose the row
                            row["profile_error"] = f"{type(err).__name__}: {err}"[:300]
                if "speedup_vs_hf" in row:
                    note += f"  x{row['speedup_vs_hf']:.1f} vs hf"
                print(f"batch {batch:4d}  {method:18s}  {rate:12,.0f} tok/s  {seconds:8.2f} s{note}")
                save()
            del input_ids
            if methods is passes[0] and seconds_left() > 20:    # before the compile pass, which may not finish
                for engine in engines.values():
                    engine.release()
                rows.extend(step_parts(model, batch, prompt_len, new_tokens, bandwidth, peak_tflops))
                save()
    for engine in engines.values():
        engine.release()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
