"""RolloutEngine: batched sampling from a live HF causal LM, composed of the engine's parts.

It drives the model's own modules and live weights (LoRA included); only the attention core is
swapped (engine/attention.py). Per call the packed prefill fills the static cache (engine/prefill.py),
the first token is picked from its last hidden states, then each decode step feeds every row one
token, on device and in place, replayed from a CUDA graph on a GPU (engine/graphs.py). EngineOptions
(ple_fast.plan) say how: the Triton decode attention (it rotates q and the new key, writes the cache,
reads each K/V block once per KV head) or masked SDPA; fused layers (their rotary read from tables
filled once per call, k / v beside q on a second stream); a step's bookkeeping as one kernel
(kernels/step_record.py); plain temperature sampling by the race kernel (kernels/sampling.py, random
numbers drawn on chip), top-k / top-p by the torch path with noise drawn outside the graph.
"""
from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ple_fast.engine.attention import ENGINE_ATTENTION, PASS_KWARG, DecodePass
from ple_fast.engine.cache import DecodeState, StaticKVCache
from ple_fast.engine.graphs import DecodeGraphs
from ple_fast.engine.prefill import prefill
from ple_fast.engine.sampling import noise_width, sample_tokens
from ple_fast.fused_layers import decode_hidden, position_independent_rotary, rotary_tables
from ple_fast.kernels.sampling import race_candidates, race_sample
from ple_fast.kernels.step_record import record_step, record_step_reference
from ple_fast.merged_projections import merge_projection_storage
from ple_fast.models import decoder_of, head_dim, unwrap_causal_lm
from ple_fast.plan import EngineOptions, engine_options


@dataclass
class RolloutStats:
    prefill_s: float
    decode_s: float
    decode_steps: int
    graphs: bool


class RolloutEngine:
    """Batched sampling from a live HF causal LM with a static KV cache.

    Buffers and graphs are kept between calls while the batch size fits, and graphs are dropped when
    any parameter's storage moved (e.g. model.to()). Call `release()` to free the cache memory. The
    engine holds its model weakly: its owner (the trainer) keeps both.
    """

    def __init__(self, model: nn.Module, options: EngineOptions | None = None):
        model = unwrap_causal_lm(model)
        self.options = engine_options(model) if options is None else options
        self._model_ref = weakref.ref(model)
        config = self.config = model.config
        self.device = model.get_output_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.num_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = head_dim(config)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.decode_kernel = self.options.decode_attention == "triton"
        self.side_stream = torch.cuda.Stream(self.device) if self.options.side_stream else None
        self.graphs = DecodeGraphs()
        self.rope_from_tables = self.options.fused_layers and position_independent_rotary(model)
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cache: StaticKVCache | None = None
        self.state: DecodeState | None = None
        self._param_ptrs: tuple[int, ...] = ()
        self._constant_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_stats: RolloutStats | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("rollout engine: its model has been garbage-collected")
        return model

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def release(self) -> None:
        self.cache = self.state = self.rope_tables = None
        self.graphs.clear()

    def _ensure_buffers(self, batch: int, capacity: int, max_new: int) -> None:
        cache, state = self.cache, self.state
        fits = (cache is not None and cache.batch == batch and cache.capacity >= capacity
                and state.out.shape[1] >= max_new)
        ptrs = tuple(p.data_ptr() for p in self.model.parameters())
        if ptrs != self._param_ptrs:
            self.graphs.clear()
            self._param_ptrs = ptrs
        if fits:
            return
        self.release()
        self.cache = StaticKVCache(self.num_layers, batch, self.kv_heads, self.head_dim, capacity,
                                   self.dtype, self.device)
        self.state = DecodeState(batch, max_new, self.device)
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

    # -- one step ------------------------------------------------------------------------------------
    def _stock_hidden(self, kv_length: int) -> torch.Tensor:
        """Last hidden states [B, H] of one token per row through the model's own layers."""
        st = self.state
        batch = st.tokens.shape[0]
        positions = st.positions.view(batch, 1)
        attended = torch.arange(kv_length, device=self.device)
        mask = (attended.view(1, 1, kv_length) <= positions.unsqueeze(-1)).unsqueeze(1)   # [R, 1, Q, L]
        rows = slice(0, batch)
        # cache slots of the new tokens, for the write of the SDPA path (the decode kernel writes its own)
        slots = None if self.decode_kernel else self.cache.row_slots(rows, positions)
        step = DecodePass(self.cache, rows, positions, slots, kv_length, self.decode_kernel)
        out = decoder_of(self.model)(input_ids=st.tokens.view(batch, 1), attention_mask=mask,
                                     position_ids=positions, use_cache=False, **{PASS_KWARG: step})
        return out[0][:, -1]

    def _emit(self, hidden: torch.Tensor, sampling: tuple[float, int, float, bool], pad: torch.Tensor,
              eos: torch.Tensor, advance: bool = False) -> None:
        """Pick, record and feed back every row's next token; advance: the rows' positions move on too
        (a decode step; not the prefill's first token). The race kernel applies the softcap itself."""
        st = self.state
        temperature, top_k, top_p, fused = sampling
        logits = self.head(hidden)
        if fused and self.decode_kernel:        # the step record reduces the race's per-split candidates
            picked = dict(candidates=race_candidates(logits, st.seed, st.step, temperature, self.softcap))
        elif fused:
            picked = dict(sampled=race_sample(logits, st.seed, st.step, temperature, self.softcap))
        else:
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            picked = dict(sampled=sample_tokens(logits, st.noise, temperature, top_k, top_p))
        record = record_step if self.decode_kernel else record_step_reference
        record(st.tokens, st.positions, st.done, st.out, st.step, pad, eos, advance=advance, **picked)

    def _decode_step(self, kv_length: int, sampling, pad: torch.Tensor, eos: torch.Tensor) -> None:
        """One token for every row, entirely on device and in place (the graph body)."""
        st, options = self.state, self.options
        if options.fused_layers:
            hidden = decode_hidden(self.model, self.cache.keys, self.cache.values, st.tokens, st.positions, kv_length,
                                   side_stream=self.side_stream, rope_tables=self.rope_tables,
                                   tile=options.decode_tile, merged_projections=options.merged_projections)
        else:
            hidden = self._stock_hidden(kv_length)
        self._emit(hidden, sampling, pad, eos, advance=True)

    def _capture_failed(self, err: Exception) -> bool:
        """A failed capture on two streams is retried on one."""
        if self.side_stream is None:
            return False
        warnings.warn(f"rollout engine: CUDA graph capture with concurrent projections failed ({err!r}); "
                      "capturing on one stream")
        self.side_stream = None
        return True

    # -- the public call -----------------------------------------------------------------------------
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
        options = self.options
        prefix = [int(t) for t in prefix]
        offsets = [len(prefix) if flag and prefix else 0 for flag in prefixed]
        ends = [o + len(p) for o, p in zip(offsets, prompts)]
        capacity = _round_up(max(ends) + max_new_tokens, options.kv_block)
        vocab = self.head.weight.shape[0]
        if temperature > 0:
            plain = not 0 < top_k < vocab and top_p >= 1.0      # no candidate filtering
            sampling = (float(temperature), int(top_k), float(top_p), plain and options.fused_sampling)
        else:
            sampling = (0.0, 0, 1.0, False)
        draws_noise = sampling[0] > 0 and not sampling[3]
        if options.merged_projections:          # before the storage check: a merge moves the weights once
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
        use_graphs = options.cuda_graphs

        with self._engine_mode():
            timer.mark()
            if self.rope_tables is not None:     # in place: graphs read the tables by address
                for table, fresh in zip(self.rope_tables, rotary_tables(self.model, self.cache.capacity, self.dtype,
                                                                       self.device)):
                    table.copy_(fresh)
            hidden = prefill(self.model, self.cache, [[int(t) for t in p] for p in prompts],
                             [bool(o) for o in offsets], prefix, attention=options.prefill_attention,
                             max_tokens=options.prefill_tokens, fused_layers=options.fused_layers)
            st.done.zero_()
            st.step.zero_()
            st.positions.copy_(torch.tensor(ends, device=self.device))
            if draws_noise:
                st.noise.exponential_(generator=generator)
            self._emit(hidden, sampling, pad, eos)
            timer.mark()
            steps = 1
            for step in range(1, max_new_tokens):
                if step % options.check_every == 0 and bool(st.done.all()):
                    break
                kv_length = min(capacity, _round_up(max(ends) + step, options.kv_block))
                if draws_noise:
                    st.noise.exponential_(generator=generator)
                run_step = lambda: self._decode_step(kv_length, sampling, pad, eos)  # noqa: E731
                if use_graphs:
                    key = (kv_length, sampling, int(pad_token_id), eos_ids, st.out.shape[1])
                    self.graphs.run(key, run_step, st, self._capture_failed)
                else:
                    run_step()
                steps += 1
            timer.mark()
            rows = st.out[:, :max_new_tokens].tolist()
        prefill_s, decode_s = timer.intervals()
        self.last_stats = RolloutStats(prefill_s, decode_s, steps, use_graphs and self.graphs.enabled)
        return [cut_at_eos(row[:steps], set(eos_ids)) for row in rows]


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Everything up to and including the first EOS."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
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
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
