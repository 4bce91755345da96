"""How the policy's forwards and rollouts run: one plan, resolved once from the config, model and device.

Every rule between the implementation choices lives here, and nowhere else: which layers a model's
family allows, what needs CUDA (or Triton's interpreter on a CPU), what excludes what. The functions
that run forwards and rollouts take the resolved plan and branch on its fields; none of them
decides a default or rejects a combination. A choice that cannot run is an error here, naming the
choice, before any step is taken.

ForwardPlan  the scoring forwards (SFT, alignment, perplexity): layout, tree attention, layers, loss
             (defined beside the functions that take it, in ple_fast.forward)
EngineOptions  the fast rollout engine (ple_fast.engine)
Plan         both, plus the rollout backend and the autocast dtype; `build_plan` makes it from a Config
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ple_fast.attention import BACKENDS as ATTENTION_BACKENDS
from ple_fast.attention import resolve_backend
from ple_fast.config import Config, ConfigError
from ple_fast.forward import LAYERS, LAYOUTS, LOSS_IMPLS, ForwardPlan
from ple_fast.fused_layers import unsupported_reason
from ple_fast.kernels._common import INTERPRETED
from ple_fast.models import unwrap_causal_lm

DECODE_ATTENTIONS = ("triton", "sdpa")

PREFILL_TOKENS = 32768          # tokens per packed prefill chunk
DENSE_PREFILL_TOKENS = 4096     # ... with the dense-mask attention (sdpa): [4096, 4096] scores per head


@dataclass(frozen=True)
class EngineOptions:
    """How the fast rollout engine runs, resolved by `engine_options` for one model and device.

    decode_attention  decode steps' attention: "triton" (kernels/decode_attention.py) or "sdpa" (masked SDPA)
    fused_layers      decode steps and the packed prefill through ple_fast.fused_layers
    cuda_graphs       decode steps captured once per cache length and replayed
    fused_sampling    plain temperature sampling by the race kernel (kernels/sampling.py)
    side_stream       fused decode step: k / v beside q, gate beside up, on a second CUDA stream
    merged_projections  fused decode step: q / k / v and gate / up as one matmul each (experimental)
    prefill_attention the tree-attention backend of the packed prefill
    prefill_tokens    tokens per packed prefill chunk
    kv_block          cache lengths are rounded up to this (one graph per length)
    check_every       decode steps between host checks that every row is done
    decode_tile       the decode attention kernel's tile in the fused step (benchmarks), None: its default
    """
    decode_attention: str
    fused_layers: bool
    cuda_graphs: bool
    fused_sampling: bool
    side_stream: bool
    merged_projections: bool
    prefill_attention: str
    prefill_tokens: int
    kv_block: int
    check_every: int
    decode_tile: dict | None = None


@dataclass(frozen=True)
class Plan:
    """Everything that decides how a run's forwards and rollouts execute."""
    forward: ForwardPlan
    rollout_backend: str             # "fast" (ple_fast.engine) | "hf" (Hugging Face generate)
    engine: EngineOptions | None     # the fast backend's options; None for hf
    autocast: torch.dtype | None     # autocast dtype of every forward, None: the weights' dtype

    def describe(self) -> str:
        """One line for the run's log."""
        f, e = self.forward, self.engine
        scoring = (f"{f.layout} forwards" + (f" ({f.attention} tree attention)" if f.attention else "")
                   + f", {f.layers} layers, {f.loss_impl} loss")
        rollout = "HF generate" if e is None else (
            f"fast engine ({e.decode_attention} decode attention, {'fused' if e.fused_layers else 'stock'} layers"
            + (", CUDA graphs" if e.cuda_graphs else "") + ")")
        precision = f"{str(self.autocast).removeprefix('torch.')} autocast" if self.autocast else "no autocast"
        return f"{scoring}; rollouts: {rollout}; {precision}"


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of this device: compiled on CUDA, interpreted on a CPU."""
    return device.type == "cuda" or INTERPRETED


_NO_TRITON = "the Triton kernels need CUDA, or TRITON_INTERPRET=1 on a CPU (slow)"


def forward_plan(model: nn.Module, *, layout: str = "auto", attention: str = "auto", layers: str = "auto",
                 loss_impl: str = "auto", gradient_checkpointing: bool = False) -> ForwardPlan:
    """The ForwardPlan for `model` on its device. "auto" picks what measured fastest there: packed,
    the `triton` tree attention and the fused layers on CUDA (for the families they cover), the
    `sdpa` attention and stock layers elsewhere; padded under HF gradient checkpointing, whose
    recomputed attention would not see the tree mask."""
    device = _device_of(model)
    if layout == "auto":
        layout = "padded" if gradient_checkpointing else "packed"
    elif layout == "packed" and gradient_checkpointing:
        raise ValueError("layout=packed: gradient checkpointing recomputes attention with the model's own "
                         "mask, not the tree's; use the padded layout (or auto) with it")
    elif layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose auto, {' or '.join(LAYOUTS)}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    backend = resolve_backend(attention, device) if layout == "packed" else None
    if backend == "triton" and not _triton_runs(device):
        raise ValueError(f"attention=triton: {_NO_TRITON}")
    reason = unsupported_reason(unwrap_causal_lm(model))
    if layers == "auto":
        layers = "fused" if layout == "packed" and device.type == "cuda" and reason is None else "stock"
    elif layers not in LAYERS:
        raise ValueError(f"layers={layers!r}: choose auto, {', '.join(LAYERS)}")
    elif layers != "stock" and layout == "padded":
        raise ValueError(f"layers={layers}: runs in packed forwards; the padded layout (gradient checkpointing, "
                         "or layout=padded) runs the model's own layers")
    elif layers == "fused" and (reason or not _triton_runs(device)):
        raise ValueError(f"layers=fused: {reason or _NO_TRITON}")
    if loss_impl == "auto":
        loss_impl = "triton" if device.type == "cuda" else "torch"
    elif loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={loss_impl!r}: choose auto, {', '.join(LOSS_IMPLS)}")
    elif loss_impl in ("triton", "whole_pairs") and not _triton_runs(device):
        raise ValueError(f"loss_impl={loss_impl}: {_NO_TRITON}")
    return ForwardPlan(layout, backend, layers, loss_impl)


def engine_options(model: nn.Module, *, decode_attention: str = "auto", layers: str = "auto",
                   cuda_graphs: bool | None = None, fused_sampling: bool | None = None,
                   side_stream: bool | None = None, merged_projections: bool = False,
                   prefill_attention: str = "auto", prefill_tokens: int | None = None, kv_block: int = 64,
                   check_every: int | None = None, decode_tile: dict | None = None) -> EngineOptions:
    """The rollout engine's options for `model` on its device; None / "auto" pick the measured defaults:
    on CUDA the Triton decode attention, fused layers (for the families they cover), CUDA graphs, the
    fused sampler and the side stream; on a CPU the torch paths. Keywords other than `layers` and
    `merged_projections` are for tests and benchmarks."""
    device = _device_of(unwrap_causal_lm(model))
    on_cuda = device.type == "cuda"
    if decode_attention == "auto":
        decode_attention = "triton" if on_cuda else "sdpa"
    elif decode_attention not in DECODE_ATTENTIONS:
        raise ValueError(f"decode_attention={decode_attention!r}: choose auto, triton or sdpa")
    if decode_attention == "triton" and not _triton_runs(device):
        raise ValueError(f"decode_attention=triton: {_NO_TRITON}")
    reason = unsupported_reason(unwrap_causal_lm(model))
    if layers == "auto":
        fused = decode_attention == "triton" and reason is None
    elif layers in ("fused", "stock"):
        fused = layers == "fused"
        if fused and (decode_attention != "triton" or reason):
            raise ValueError(f"layers=fused: {reason or 'it needs the triton decode attention (CUDA, or TRITON_INTERPRET=1 on a CPU)'}")
    else:
        raise ValueError(f"layers={layers!r}: choose auto, fused or stock")
    if cuda_graphs and not on_cuda:
        raise ValueError(f"cuda_graphs=True but the model is on {device}")
    if fused_sampling and not _triton_runs(device):
        raise ValueError(f"fused_sampling=True: {_NO_TRITON}")
    if side_stream and not (on_cuda and fused):
        raise ValueError("side_stream=True needs the fused layers on a CUDA device")
    for name, value in (("merged_projections", merged_projections), ("decode_tile", decode_tile)):
        if value and not fused:
            raise ValueError(f"{name} needs the fused layers (their decode step runs it)")
    if decode_tile is not None and {"BLOCK", "num_stages", "num_warps"} - set(decode_tile):
        raise ValueError(f"decode_tile {decode_tile!r} lacks {sorted({'BLOCK', 'num_stages', 'num_warps'} - set(decode_tile))}")
    if prefill_attention not in ATTENTION_BACKENDS:
        raise ValueError(f"prefill_attention={prefill_attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    prefill_attention = resolve_backend(prefill_attention, device)
    # the dense-mask backend holds [N, N] masks and scores per chunk (a CPU prefill of 6000 three-token
    # prompts peaked at 13.7 GB at 32768 tokens), so it gets smaller chunks; varlen ones grow with segments
    if prefill_tokens is None:
        prefill_tokens = DENSE_PREFILL_TOKENS if prefill_attention == "sdpa" else PREFILL_TOKENS
    return EngineOptions(
        decode_attention=decode_attention, fused_layers=fused,
        cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs,
        fused_sampling=on_cuda if fused_sampling is None else fused_sampling,
        side_stream=on_cuda and fused if side_stream is None else side_stream,
        merged_projections=merged_projections, prefill_attention=prefill_attention,
        prefill_tokens=prefill_tokens, kv_block=kv_block,
        check_every=check_every or (8 if on_cuda else 1), decode_tile=decode_tile)


def build_plan(cfg: Config, model: nn.Module, device: torch.device) -> Plan:
    """The Plan of a run: the config's choices resolved for this model on `device`, or a ConfigError
    naming the keys whose values cannot run together."""
    pc, rc = cfg.ple, cfg.rollout
    try:
        forward = forward_plan(model, layout=pc.layout, attention=pc.attention, layers=pc.layers,
                               loss_impl=pc.loss_impl, gradient_checkpointing=cfg.run.gradient_checkpointing)
    except ValueError as err:
        raise ConfigError(f"ple.{err}") from None
    engine = None
    if rc.backend == "fast":
        try:
            engine = engine_options(model, layers=rc.layers, merged_projections=rc.merged_projections)
        except ValueError as err:
            raise ConfigError(f"rollout.{err}") from None
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return Plan(forward, rc.backend, engine, torch.bfloat16 if precision == "bf16" else None)
