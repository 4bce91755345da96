"""The fast rollout engine: static KV cache, on-device sampling, CUDA-graph decode steps.

It drives a stock Hugging Face causal LM through its own modules and live weights. The only
thing swapped in is the attention *core*: while the engine runs, `config._attn_implementation`
names `ENGINE_ATTENTION`, a function that writes each layer's fresh (rotated) K/V into
`StaticKVCache` and attends over the cache. Nothing else of HF's cache API is used, so the
same code runs on transformers 5.17 and 5.24.

Cache layout: row b's token at position p lives in slot p, so position == slot for every row
and the attention mask is a pure function of the query positions (`slot <= position`). Prompts
are therefore right-aligned at slot 0 (no left padding), and a shared prefix (the principle)
occupies slots 0..Lp-1 of every row that uses it.

Prefill runs the prompts padding-free through the prefix-tree packing (ple_fast.layout.pack_prefill,
DESIGN.md §2): one packed sequence holds the prefix once, each principle-guided prompt as its child
and each plain prompt as a root, under tree attention (ple_fast.attention); each layer scatters the
packed K/V into the cache rows, the prefix's into every row that follows it. Rows differ only in
where they end; decode steps have fixed shapes
[B, 1] and attend over the first L slots, L rounded up to `kv_block`, so one CUDA graph per L
serves every step of that length. On CUDA that attention is the Triton decode kernel
(ple_fast.kernels.decode_attention: it writes the step's K/V into the cache itself, then grouped
query heads read each K/V block once, no mask tensor); elsewhere an index_copy_ into the cache
and masked SDPA over it.

Fused layers: for the Llama family (Llama, Mistral, Qwen2, Qwen3) a step with the Triton decode
attention runs the layers through ple_fast.fused_layers, the same modules and weights with their
glue fused (add + RMSNorm, rotary inside the attention kernel, SwiGLU): ~11 kernels a layer
instead of ~40; the packed prefill runs the same fused layers around its tree attention
(`fused_layers`, default on wherever it applies and the step is not compiled). On CUDA their decode
step runs the k / v projections on a second stream beside the q projection, and gate beside up
(`concurrent_projections`, default on with the fused layers; a failed capture retries on one stream).
The fused step reads the rotary cos / sin of each row's position from tables filled once per call
(for rotary types whose frequencies do not follow the batch), and with the Triton decode attention
a step's bookkeeping (pick, record, EOS check, advance) is one kernel (ple_fast.kernels.step_record).

Sampling: plain temperature sampling (no top-k / top-p) on CUDA runs the fused race kernel
(ple_fast.kernels.sampling): one read of the logits, random numbers drawn on chip from the call's
seed and the device-side step counter, so graphs need no noise input. With top-k / top-p the
per-step exponential noise is drawn outside the graph, from a seeded torch.Generator, into a
static buffer the graph reads.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ple_fast import ops
from ple_fast.attention import TreeAttention, resolve_backend, tree_attention, tree_attention_metadata
from ple_fast.fused_layers import (decode_hidden, fused_decoder_layers, position_independent_rotary, rotary_tables,
                                   unsupported_reason)
from ple_fast.kernels.sampling import race_candidates
from ple_fast.kernels.step_record import record_step, record_step_reference
from ple_fast.layout import pack_prefill
from ple_fast.merged_projections import merge_projection_storage
from ple_fast.models import decoder_of, head_dim

ENGINE_ATTENTION = "ple_fast_static_kv"


# ----------------------------------------------------------------------------------- sampling

def candidate_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution over each row's candidates: (probs [B, C], ids [B, C] or None).

    Same order as HF's warpers: temperature, then top-k, then top-p on the renormalised top-k.
    ids is None when the candidates are the whole vocabulary (C = V, no sort needed).
    Filtered-out candidates get probability exactly 0.
    """
    if temperature <= 0:
        raise ValueError("candidate_probs: temperature must be > 0 (temperature 0 is greedy)")
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    ids = None
    if 0 < top_k < vocab:
        scaled, ids = scaled.topk(top_k, dim=-1)             # sorted, descending
    elif top_p < 1.0:
        scaled, ids = scaled.sort(dim=-1, descending=True)
    probs = scaled.softmax(dim=-1)
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs           # probs are sorted descending here
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


def reference_candidate_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                              top_p: float = 1.0) -> torch.Tensor:
    """The same distribution as a dense [B, V] fp64 table, built row by row: the test oracle."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for row, row_logits in enumerate(logits.double().cpu()):
        order = sorted(range(row_logits.numel()), key=lambda v: -float(row_logits[v]))
        if top_k > 0:
            order = order[:top_k]
        kept = torch.tensor([float(row_logits[v]) / temperature for v in order], dtype=torch.float64)
        p = torch.exp(kept - kept.max())
        p = p / p.sum()
        cut, mass = len(order), 0.0
        for i in range(len(order)):
            if mass >= top_p:
                cut = i
                break
            mass += float(p[i])
        p = p[:cut] / p[:cut].sum()
        out[row, order[:cut]] = p
    return out


def noise_width(vocab: int, top_k: int, top_p: float) -> int:
    """How many exponential draws one row needs per step: one per candidate."""
    return top_k if 0 < top_k < vocab else vocab


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token per row [B] int64; argmax at temperature 0, else an exponential race.

    argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i; `noise` holds the E_i
    ([B, noise_width]) so that the RNG draw can live outside a CUDA graph.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs, ids = candidate_probs(logits, temperature, top_k, top_p)
    score = (probs / noise).masked_fill(probs <= 0, -1.0)
    choice = score.argmax(dim=-1)
    if ids is None:
        return choice
    return ids.gather(1, choice.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------ static cache

class StaticKVCache:
    """K and V slots [layers, batch, kv_heads, capacity, head_dim]; slot == position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        # zeros, not empty: masked slots still meet the P @ V product, and 0 * NaN is NaN
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.kv_heads, self.capacity, self.head_dim = batch, kv_heads, capacity, head_dim
        rows = torch.arange(batch, device=device).view(batch, 1)
        heads = torch.arange(kv_heads, device=device).view(1, kv_heads)
        self.head_base = (rows * kv_heads + heads) * capacity   # flat slot 0 of (row, head)

    def row_slots(self, rows: slice, positions: torch.Tensor) -> torch.Tensor:
        """[R, kv_heads, Q] flat slots of rows[r] at positions [R, Q] (computed once per step, not per layer)."""
        return self.head_base[rows].unsqueeze(-1) + positions.unsqueeze(1)

    def check(self, layer: int, keys: torch.Tensor) -> None:
        """A layer's fresh keys [R, kv_heads, Q, D] fit this cache (the model config's head counts)."""
        if keys.shape[1:2] != (self.kv_heads,) or keys.shape[-1] != self.head_dim:
            raise ValueError(f"StaticKVCache: layer {layer} produced keys of shape {tuple(keys.shape)}, "
                             f"expected [rows, {self.kv_heads}, q, {self.head_dim}] from the model config")

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [R, kv_heads, Q, D] go to the `row_slots` slots [R, kv_heads, Q]."""
        self.check(layer, keys)
        self.scatter(layer, slots, keys, values)

    def scatter(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [..., D] go to the flat slots [...] of the same leading shape (see `flat_slots`),
        in place, through an op that torch.compile cannot turn into a copy of the cache."""
        ops.kv_cache_write(self.keys, self.values, layer, slots, keys, values)

    def flat_slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[W, kv_heads] flat indices into one layer's K (or V) of (rows[w], head, positions[w])."""
        return self.head_base[rows] + positions.unsqueeze(1)

    def read(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [R, kv_heads, length, D] of the first `length` slots."""
        return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]



@dataclass
class _Pass:
    """A decode step (or any padded forward) over cache rows: what the attention core needs."""
    cache: StaticKVCache
    rows: slice                 # cache rows of the batch rows
    positions: torch.Tensor     # [R, Q] position (= slot) of each query token
    slots: torch.Tensor | None  # [R, kv_heads, Q] flat cache slots of those tokens (StaticKVCache.row_slots)
    kv_length: int              # attend over slots 0..kv_length-1
    decode_kernel: bool = False  # one-token steps through kernels/decode_attention.py, not masked SDPA


@dataclass
class _PackedPass:
    """A packed prefill: tree attention over the N packed tokens, and where their K/V go."""
    cache: StaticKVCache
    tree: TreeAttention
    sources: torch.Tensor       # [W] packed token whose K/V fill ...
    slots: torch.Tensor         # [W, kv_heads] ... these flat cache slots (a prefix token: one per follower)


_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def static_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, sliding_window: int | None = None, ple_pass: _Pass | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: cache the new K/V, attend over the cache.

    Grouped-query heads are folded into the query length ([B, Hkv, G*Q, D]) so that K/V are
    read once per KV head and never repeated; the mask is shared by the heads of a group.
    """
    if ple_pass is None:
        raise RuntimeError(f"{ENGINE_ATTENTION} attention was called outside the rollout engine")
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"rollout engine: attention with {name!r} "
                                      f"({type(module).__name__}) is not supported; use rollout.backend=hf")
    if isinstance(ple_pass, _PackedPass):
        q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
        ple_pass.cache.scatter(module.layer_idx, ple_pass.slots, k.index_select(0, ple_pass.sources),
                               v.index_select(0, ple_pass.sources))
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        return tree_attention(ple_pass.tree, q, k, v, scale, sliding_window).unsqueeze(0), None
    cache, rows, length = ple_pass.cache, ple_pass.rows, ple_pass.kv_length
    if ple_pass.decode_kernel and query.shape[2] == 1:    # the kernel writes the new K/V itself
        cache.check(module.layer_idx, key)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = ops.decode_attention(query, cache.keys, cache.values, module.layer_idx, rows.start,
                                   ple_pass.positions[:, 0], length, scale, sliding_window, key, value)
        return out.transpose(1, 2), None
    cache.write(module.layer_idx, ple_pass.slots, key, value)
    keys, values = cache.read(module.layer_idx, rows, length)
    mask = attention_mask                                  # [R, 1, Q, L] bool, slot <= position
    if sliding_window is not None and sliding_window < length:
        slots = torch.arange(length, device=query.device)
        mask = mask & (slots > ple_pass.positions.unsqueeze(-1) - sliding_window).unsqueeze(1)
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // keys.shape[1]
    grouped = query.reshape(batch, keys.shape[1], groups * q_len, dim)
    if groups > 1 and q_len > 1:
        mask = mask.unsqueeze(2).expand(batch, 1, groups, q_len, length).reshape(batch, 1, groups * q_len, length)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.view(batch, q_heads, q_len, dim).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION, static_kv_attention)


# -------------------------------------------------------------------------------------- engine

def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP / torch.compile / PEFT wrappers (LoRA layers stay in place)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):             # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module                                                   # DDP / FSDP
    if not hasattr(model, "config") or model.get_output_embeddings() is None:
        raise TypeError(f"rollout engine: {type(model).__name__} is not a Hugging Face causal LM "
                        "(no config or no output embeddings)")
    return model


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class _DecodeState:
    """The static buffers one decode step reads and updates in place (graph inputs/outputs)."""

    def __init__(self, batch: int, max_new: int, device: torch.device):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)    # fed at this step
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)          # output column
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)          # fused sampling's key
        self.out = torch.zeros(batch, max_new, dtype=torch.long, device=device)
        self.noise = torch.ones(batch, 1, device=device)     # swapped per sampling width, see _use_noise
        self.noise_by_width = {1: self.noise}               # kept: captured graphs point at them

    def use_noise(self, width: int) -> None:
        if width not in self.noise_by_width:
            self.noise_by_width[width] = torch.ones(self.tokens.shape[0], width, device=self.tokens.device)
        self.noise = self.noise_by_width[width]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in vars(self).items() if isinstance(t, torch.Tensor)}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, t in saved.items():
            getattr(self, name).copy_(t)


@dataclass
class RolloutStats:
    prefill_s: float
    decode_s: float
    decode_steps: int
    graphs: bool


PREFILL_TOKENS = 32768          # tokens per packed prefill chunk (RolloutEngine(prefill_tokens=))
DENSE_PREFILL_TOKENS = 4096     # ... with the dense-mask attention: [4096, 4096] scores per head


class RolloutEngine:
    """Batched sampling from a live HF causal LM with a static KV cache.

    On CUDA the decode step is captured once per (batch, cache length L, sampling settings) and
    replayed; elsewhere it runs eagerly. Buffers and graphs are kept between calls while the batch
    size fits, and graphs are dropped when any parameter's storage moved (e.g. model.to()).
    Call `release()` to free the cache memory.
    """

    def __init__(self, model: nn.Module, *, cuda_graphs: bool | None = None, kv_block: int = 64,
                 check_every: int | None = None, prefill_tokens: int | None = None, prefill_attention: str = "auto",
                 fused_sampling: bool | None = None, decode_attention: str = "auto",
                 compile_decode: bool = False, fused_layers: bool | None = None,
                 concurrent_projections: bool | None = None, decode_tile: dict | None = None,
                 merged_projections: bool = False):
        model = unwrap_causal_lm(model)
        self._model_ref = weakref.ref(model)     # the engine must not keep the policy alive
        config = model.config
        self.config = config
        self.device = model.get_output_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.num_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = head_dim(config)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"rollout engine: cuda_graphs=True but the model is on {self.device}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self._graphs_required = bool(cuda_graphs)
        self.kv_block = kv_block
        self.check_every = check_every or (8 if on_cuda else 1)
        self.prefill_attention = prefill_attention      # tree-attention backend of the packed prefill
        # tokens per packed prefill chunk. The dense-mask backend (sdpa, the CPU default) holds [N, N]
        # masks and scores per chunk: at 32768 tokens a CPU prefill of 6000 three-token prompts peaked
        # at 13.7 GB, so it gets smaller chunks; the varlen backends grow with the segments, not N^2.
        dense = resolve_backend(prefill_attention, self.device, self.dtype) == "sdpa"
        self.prefill_tokens = prefill_tokens or (DENSE_PREFILL_TOKENS if dense else PREFILL_TOKENS)
        # the Triton race kernel for plain temperature sampling: default on CUDA; on CPU tensors it
        # needs TRITON_INTERPRET=1 (tests), so eager CPU runs keep the torch path
        self.fused_sampling = on_cuda if fused_sampling is None else fused_sampling
        # decode steps' attention: "triton" (kernels/decode_attention.py; the CUDA default) or "sdpa"
        # (masked SDPA over the cache; the CPU default: the kernel needs TRITON_INTERPRET=1 there)
        if decode_attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"rollout engine: decode_attention={decode_attention!r}; choose auto, triton or sdpa")
        self.decode_kernel = on_cuda if decode_attention == "auto" else decode_attention == "triton"
        # torch.compile the decode step, so inductor fuses each layer's elementwise kernels (norms,
        # rotary, SwiGLU, residuals); the CUDA graph is then captured around the compiled step.
        # Opt-in: on an H200 the compiled step of a 1B Llama was slower than the fused layers' at batch
        # 32, 128 and 256 (1.58 / 2.17 / 2.75 ms against 1.33 / 1.94 / 2.66 ms; bench/results/
        # 2026-11-28-h200-session2, run A). Compiles once, on the first step (dynamic=True, with
        # symbolic batch and length: one compile serves every step and batch size).
        self.compile_decode = compile_decode
        self._decode = torch.compile(self._decode_step, dynamic=True) if compile_decode else self._decode_step
        # decode steps through ple_fast.fused_layers (fused add + RMSNorm, rotary inside the decode
        # attention kernel, fused SwiGLU): the default wherever the Triton decode attention runs and the
        # step is not compiled (inductor fuses the stock layers itself), for the families it covers
        reason = unsupported_reason(model)
        if fused_layers:
            problem = ("it needs decode_attention='triton'" if not self.decode_kernel else
                       "compile_decode fuses the stock layers instead; choose one" if compile_decode else reason)
            if problem:
                raise ValueError(f"rollout engine: fused_layers=True, but {problem}")
        self.fused_layers = (self.decode_kernel and not compile_decode and reason is None
                             if fused_layers is None else fused_layers)
        # in the fused decode step, the k / v projections run on a second stream beside q, and gate
        # beside up (fused_layers.side_by_side): at decode batch sizes each of these matmuls fills part
        # of the SMs. CUDA with the fused layers only; the default there.
        if concurrent_projections and not (on_cuda and self.fused_layers):
            raise ValueError("rollout engine: concurrent_projections=True needs the fused layers on a CUDA device")
        use_streams = on_cuda and self.fused_layers if concurrent_projections is None else concurrent_projections
        # the decode attention kernel's tile (BLOCK, num_stages, num_warps) in the fused step, instead of
        # kernels/decode_attention.gpu_tile_config's: bench_rollout times the CANDIDATE_TILES in the step
        if decode_tile is not None:
            if not self.fused_layers:
                raise ValueError("rollout engine: decode_tile needs the fused layers (their step launches the kernel)")
            missing = {"BLOCK", "num_stages", "num_warps"} - set(decode_tile)
            if missing:
                raise ValueError(f"rollout engine: decode_tile {decode_tile!r} lacks {sorted(missing)}")
        self.decode_tile = decode_tile
        # q / k / v, and gate / up, as one matmul each in the fused decode step: each call first lays the
        # model's projection weights out back to back (ple_fast.merged_projections; once, then a check), so
        # the training weights stay the weights read. Opt-in until a GPU run times it against the second
        # stream's separate matmuls (bench_rollout's `fast_merged` row).
        if merged_projections and not self.fused_layers:
            raise ValueError("rollout engine: merged_projections=True needs the fused layers (their step runs them)")
        self.merged_projections = merged_projections
        self._projection_stream = torch.cuda.Stream(self.device) if use_streams else None
        # a step's bookkeeping (pick, record, EOS, advance) in one Triton kernel wherever the Triton
        # decode attention runs, uncompiled (a compiled step leaves those ops to inductor)
        self.record_kernel = self.decode_kernel and not compile_decode
        # the fused step reads its rotary cos / sin from tables of every cache slot, filled once per call,
        # instead of running the rotary module (~7 kernels) in every step
        self.rope_from_tables = self.fused_layers and position_independent_rotary(model)
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cache: StaticKVCache | None = None
        self.state: _DecodeState | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._param_ptrs: tuple[int, ...] = ()
        self._constant_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_stats: RolloutStats | None = None
        _register_attention()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("rollout engine: its model has been garbage-collected")
        return model

    @property
    def concurrent_projections(self) -> bool:
        return self._projection_stream is not None

    @property
    def trunk(self) -> nn.Module:
        return decoder_of(self.model)

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def release(self) -> None:
        self.cache = self.state = self.rope_tables = None
        self._graphs.clear()
        self._graph_pool = None

    def _ensure_buffers(self, batch: int, capacity: int, max_new: int) -> None:
        cache, state = self.cache, self.state
        fits = (cache is not None and cache.batch == batch and cache.capacity >= capacity
                and state.out.shape[1] >= max_new)
        ptrs = tuple(p.data_ptr() for p in self.model.parameters())
        if ptrs != self._param_ptrs:
            self._graphs.clear()
            self._param_ptrs = ptrs
        if fits:
            return
        self.release()
        self.cache = StaticKVCache(self.num_layers, batch, self.kv_heads, self.head_dim, capacity,
                                   self.dtype, self.device)
        self.state = _DecodeState(batch, max_new, self.device)
        if self.rope_from_tables:
            self.rope_tables = tuple(torch.empty(capacity, self.head_dim, dtype=self.dtype, device=self.device)
                                     for _ in range(2))

    @contextlib.contextmanager
    def _engine_mode(self):
        """Eval mode, no autograd, and the model's attention core routed to the static cache."""
        config, model = self.config, self.model
        saved_attention, was_training = config._attn_implementation, model.training
        config._attn_implementation = ENGINE_ATTENTION
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            config._attn_implementation = saved_attention
            model.train(was_training)

    def _constants(self, pad_id: int, eos_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device tensors for pad/EOS ids, kept for the engine's life: graphs read them by address."""
        key = (pad_id, eos_ids)
        if key not in self._constant_tensors:
            self._constant_tensors[key] = (torch.tensor(pad_id, device=self.device),
                                           torch.tensor(eos_ids, dtype=torch.long, device=self.device))
        return self._constant_tensors[key]

    # -- forward pieces ---------------------------------------------------------------------
    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: slice, kv_length: int) -> torch.Tensor:
        attended = torch.arange(kv_length, device=self.device)
        mask = (attended.view(1, 1, kv_length) <= positions.unsqueeze(-1)).unsqueeze(1)   # [R, 1, Q, L]
        # cache slots of the new tokens, for the write of the SDPA path (the decode kernel writes its own)
        slots = None if self.decode_kernel and input_ids.shape[1] == 1 else self.cache.row_slots(rows, positions)
        out = self.trunk(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         ple_pass=_Pass(self.cache, rows, positions, slots, kv_length, self.decode_kernel))
        return out[0]

    def _next_tokens(self, hidden: torch.Tensor, sampling: tuple[float, int, float, bool]) -> dict:
        """The pick of every row from its last hidden state [B, H], as record_step takes it: sampled
        tokens [B], or the race kernel's per-split candidates when the step record reduces them
        itself. The race kernel applies the softcap itself."""
        temperature, top_k, top_p, fused = sampling
        logits = self.head(hidden)
        if fused and self.record_kernel:
            return dict(candidates=race_candidates(logits, self.state.seed, self.state.step, temperature, self.softcap))
        if fused:
            return dict(sampled=ops.race_sample(logits, self.state.seed, self.state.step, temperature, self.softcap))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return dict(sampled=sample_tokens(logits, self.state.noise, temperature, top_k, top_p))

    def _prefill(self, prompts: list[list[int]], prefixed: list[bool], prefix: list[int]) -> torch.Tensor:
        """Packed prefill of every prompt (after the prefix where prefixed); hidden states [B, H] at
        each prompt's last token. Chunks of about `prefill_tokens` tokens; a chunk with followers carries
        the prefix once (so a long batch recomputes the prefix once per chunk, not once per prompt)."""
        hidden, lo = [], 0
        while lo < len(prompts):
            hi, tokens = lo + 1, len(prompts[lo])
            while hi < len(prompts) and tokens + len(prompts[hi]) <= self.prefill_tokens:
                tokens += len(prompts[hi])
                hi += 1
            chunk_prefix = prefix if any(prefixed[lo:hi]) else []
            hidden.append(self._prefill_chunk(lo, prompts[lo:hi], prefixed[lo:hi], chunk_prefix))
            lo = hi
        return torch.cat(hidden)

    def _prefill_chunk(self, first_row: int, prompts: list[list[int]], prefixed: list[bool],
                       prefix: list[int]) -> torch.Tensor:
        batch = pack_prefill(prefix, prompts, prefixed, device=self.device)
        prefix_len, num_tokens = len(prefix), batch.num_tokens
        has_prefix = 1 if prefix_len else 0
        # Prompt tokens fill their own row's slots; prefix tokens those of every row that follows it.
        sources = [torch.arange(prefix_len, num_tokens, device=self.device)]
        rows = [batch.segment_ids[prefix_len:] - has_prefix + first_row]
        positions = [batch.position_ids[prefix_len:]]
        followers = [first_row + b for b, flag in enumerate(prefixed) if flag]
        if prefix_len and followers:
            prefix_rows = torch.arange(prefix_len, device=self.device)
            sources.append(prefix_rows.repeat(len(followers)))
            rows.append(torch.tensor(followers, device=self.device).repeat_interleave(prefix_len))
            positions.append(prefix_rows.repeat(len(followers)))
        sources, slots = torch.cat(sources), self.cache.flat_slots(torch.cat(rows), torch.cat(positions))
        packed = _PackedPass(self.cache, tree_attention_metadata(batch, self.prefill_attention, dtype=self.dtype),
                             sources, slots)
        # the fused layers serve the prefill too: their kernels replace the eager glue's passes over
        # every prompt token (fp32 copies in each RMSNorm), the attention stays the packed pass's
        layers = fused_decoder_layers(self.model) if self.fused_layers else contextlib.nullcontext()
        with layers:
            hidden = self.trunk(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                                use_cache=False, ple_pass=packed)[0][0]
        last_rows = batch.cu_seqlens_q[has_prefix + 1:].long() - 1
        return hidden.index_select(0, last_rows)

    def _decode_step(self, kv_length: int, sampling: tuple[float, int, float, bool], pad: torch.Tensor,
                     eos: torch.Tensor) -> None:
        """One token for every row, entirely on device and in place (the graph body)."""
        st = self.state
        batch = st.tokens.shape[0]
        if self.fused_layers:
            hidden = decode_hidden(self.model, self.cache.keys, self.cache.values, st.tokens, st.positions, kv_length,
                                   side_stream=self._projection_stream, rope_tables=self.rope_tables,
                                   tile=self.decode_tile, merged_projections=self.merged_projections)
        else:
            hidden = self._hidden(st.tokens.view(batch, 1), st.positions.view(batch, 1), slice(0, batch),
                                  kv_length)[:, -1]
        self._emit(hidden, sampling, pad, eos, advance=True)

    def _emit(self, hidden: torch.Tensor, sampling: tuple[float, int, float, bool], pad: torch.Tensor,
              eos: torch.Tensor, advance: bool = False) -> None:
        """Pick, record and feed back every row's next token (ple_fast.kernels.step_record);
        advance: the rows' positions move on too (a decode step; not the prefill's first token)."""
        st = self.state
        record = record_step if self.record_kernel else record_step_reference
        record(st.tokens, st.positions, st.done, st.out, st.step, pad, eos, advance=advance,
               **self._next_tokens(hidden, sampling))

    def _graph(self, kv_length: int, sampling, pad, eos, key) -> torch.cuda.CUDAGraph | None:
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        saved = self.state.snapshot()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):        # warm-up: lazy inits (cuBLAS, compiles) stay out of the graph
                self._decode(kv_length, sampling, pad, eos)
            torch.cuda.current_stream().wait_stream(side)
            self.state.restore(saved)            # the warm-up's K/V writes are the same ones the real step makes
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode(kv_length, sampling, pad, eos)
        except Exception as err:                 # capture is an optimisation: fall back unless asked for
            if self._projection_stream is not None:     # first without the second stream, then eagerly
                warnings.warn(f"rollout engine: CUDA graph capture with concurrent projections failed ({err!r}); "
                              "capturing on one stream")
                self._projection_stream = None
                torch.cuda.synchronize()
                self.state.restore(saved)
                return self._graph(kv_length, sampling, pad, eos, key)
            if self._graphs_required:
                raise
            warnings.warn(f"rollout engine: CUDA graph capture failed ({err!r}); decoding eagerly")
            self.cuda_graphs = False
            torch.cuda.synchronize()
            self.state.restore(saved)
            return None
        self._graphs[key] = graph
        return graph

    # -- the public call -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 seed: int = 0, prefix: Sequence[int] = (), prefixed: Sequence[bool] | None = None
                 ) -> list[list[int]]:
        """Token ids generated after each prompt (prefix + prompt where prefixed[b]), up to and
        including the first EOS, at most max_new_tokens. The prefix is prefilled once."""
        batch = len(prompts)
        if prefixed is None:
            prefixed = [bool(prefix)] * batch
        if len(prefixed) != batch:
            raise ValueError(f"rollout engine: {len(prefixed)} prefixed flags for {batch} prompts")
        for b, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"rollout engine: prompt {b} is empty; every prompt needs at least one token")
        if not 0 < top_p <= 1.0:
            raise ValueError(f"rollout engine: top_p={top_p} must be in (0, 1]")
        if top_k < 0 or max_new_tokens < 0:
            raise ValueError(f"rollout engine: top_k={top_k} and max_new_tokens={max_new_tokens} must be >= 0")
        if batch == 0 or max_new_tokens == 0:
            return [[] for _ in range(batch)]
        prefix = [int(t) for t in prefix]
        offsets = [len(prefix) if flag and prefix else 0 for flag in prefixed]
        ends = [o + len(p) for o, p in zip(offsets, prompts)]
        capacity = _round_up(max(ends) + max_new_tokens, self.kv_block)
        if self.compile_decode:
            # one spare block, so that no step attends over the whole cache: a step that does reads a
            # contiguous cache slice, which the compiled step specialises on (a second compile)
            capacity += self.kv_block
        vocab = self.head.weight.shape[0]
        if temperature > 0:
            plain = not 0 < top_k < vocab and top_p >= 1.0      # no candidate filtering
            sampling = (float(temperature), int(top_k), float(top_p), plain and self.fused_sampling)
        else:
            sampling = (0.0, 0, 1.0, False)
        draws_noise = sampling[0] > 0 and not sampling[3]
        if self.merged_projections:             # before the storage check: a merge moves the weights once
            merge_projection_storage(self.model)
        self._ensure_buffers(batch, capacity, max_new_tokens)
        st = self.state
        st.use_noise(noise_width(vocab, top_k, top_p) if draws_noise else 1)
        st.seed.fill_(int(seed))
        eos_ids = tuple(sorted({int(e) for e in eos_token_ids}))
        pad, eos = self._constants(int(pad_token_id), eos_ids)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        timer = _Timer(self.device)

        with self._engine_mode():
            timer.mark()
            if self.rope_tables is not None:     # in place: graphs read the tables by address
                for table, fresh in zip(self.rope_tables, rotary_tables(self.model, self.cache.capacity, self.dtype,
                                                                       self.device)):
                    table.copy_(fresh)
            hidden = self._prefill([[int(t) for t in p] for p in prompts], [bool(o) for o in offsets], prefix)
            st.done.zero_()
            st.step.zero_()
            st.positions.copy_(torch.tensor(ends, device=self.device))
            if draws_noise:
                st.noise.exponential_(generator=generator)
            self._emit(hidden, sampling, pad, eos)
            timer.mark()
            steps = 1
            for step in range(1, max_new_tokens):
                if step % self.check_every == 0 and bool(st.done.all()):
                    break
                kv_length = min(capacity, _round_up(max(ends) + step, self.kv_block))
                if draws_noise:
                    st.noise.exponential_(generator=generator)
                key = (kv_length, sampling, int(pad_token_id), eos_ids, st.out.shape[1])
                graph = self._graph(kv_length, sampling, pad, eos, key) if self.cuda_graphs else None
                if graph is not None:
                    graph.replay()
                else:
                    self._decode(kv_length, sampling, pad, eos)
                steps += 1
            timer.mark()
            rows = st.out[:, :max_new_tokens].tolist()
        prefill_s, decode_s = timer.intervals()
        self.last_stats = RolloutStats(prefill_s, decode_s, steps, self.cuda_graphs)
        return [_cut(row[:steps], set(eos_ids)) for row in rows]


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i + 1]
    return tokens


class _Timer:
    """Wall-clock marks; CUDA events on GPU so that marking does not synchronise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            import time
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


# model -> (its engine, the options engine_for built it with)
_ENGINES: "weakref.WeakKeyDictionary[nn.Module, tuple[RolloutEngine, dict]]" = weakref.WeakKeyDictionary()


def engine_for(model: nn.Module, **options) -> RolloutEngine:
    """The engine cached for this model (its buffers and graphs are reused between calls).

    `options` (RolloutEngine's keywords) replace a cached engine built with other ones; a call
    without options takes the cached engine as it is, so the trainer sets them once up front."""
    base = unwrap_causal_lm(model)
    engine, built_with = _ENGINES.get(base, (None, {}))
    if (engine is None or engine.device != base.get_output_embeddings().weight.device
            or (options and built_with != options)):
        if engine is not None:
            engine.release()
        engine = RolloutEngine(base, **options)
        _ENGINES[base] = (engine, dict(options))
    return engine
