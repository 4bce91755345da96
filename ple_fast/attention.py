"""Tree attention over the packed prefix-tree layout, run by stock Hugging Face modeling code.

A PackedBatch (ple_fast.layout) is a forest of token segments laid out as ONE sequence of N rows.
Row i may attend to row j when j lies on i's root-to-leaf path: j is in an ancestor segment of i's,
or in i's own segment and j <= i (docs/method.md, "Packing"). HF models call their attention through
transformers' AttentionInterface; this module registers `tree_attention_forward` there under
ATTENTION_NAME, and `use_tree_attention` points a model at it for the length of one forward.
The per-batch metadata (TreeAttention) travels as the `ple_tree` keyword argument, which HF hands
unchanged from the model's forward to every attention call, so nothing is kept in globals.

Backends, all computing the same function of (q, k, v):
  sdpa      dense [N, N] boolean mask built from segment ancestry: the CPU reference, O(N^2) memory
  segments  the varlen form on stock SDPA: each segment's queries and its keys (gathered by
            kv_index: ancestors' rows, then its own) padded to [S, max_q, max_k], bottom-right
            causal mask; O(S * max_q * max_k); where the `triton` kernel fails to launch on a GPU,
            it warns once and runs this from then on
  triton    our Triton varlen kernel (ple_fast.kernels.varlen_attention, forward and backward): no
            padding, no repeated KV heads, no gathered copies (its loads read the keys through
            kv_index, its backward sums each row's copies in a fixed order); the CUDA default
  flash     flash_attn_varlen_func over keys gathered by kv_index; each segment's keys are its
            ancestors' rows then its own, so causal=True with bottom-right alignment is exact (the
            optional flash-attn; not yet timed against `triton`, so never picked by `auto`)
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from ple_fast.kernels.varlen_attention import kv_gather, varlen_attention

ATTENTION_NAME = "ple_fast_tree"
BACKENDS = ("auto", "sdpa", "segments", "triton", "flash")
METADATA_KWARG = "ple_tree"


def segment_ancestry(seg_parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth [S], ancestor_at_depth [S, D+1]) of a forest given each segment's parent (-1: root).

    ancestor_at_depth[s, d] is the segment at depth d on s's root path (s itself at d = depth[s]),
    or -1 past it. Segment t is on s's path exactly when ancestor_at_depth[s, depth[t]] == t, which
    turns the tree mask into one gather per (query, key) pair.
    """
    parent = seg_parent.long()
    num_segments = parent.numel()
    up = [torch.arange(num_segments, device=parent.device)]  # up[d][s]: d levels above s, or -1
    while True:
        above = up[-1]
        nxt = torch.where(above >= 0, parent[above.clamp(min=0)], above)
        if not bool((nxt >= 0).any()):
            break
        if len(up) > num_segments:
            raise ValueError("seg_parent has a cycle: a segment is its own ancestor")
        up.append(nxt)
    up_table = torch.stack(up, dim=1)                       # [S, L]
    depth = (up_table >= 0).sum(dim=1) - 1
    levels = torch.arange(up_table.shape[1], device=parent.device)
    steps_up = depth[:, None] - levels[None, :]
    at_depth = torch.where(steps_up >= 0, up_table.gather(1, steps_up.clamp(min=0)),
                           torch.full_like(up_table, -1))
    return depth, at_depth


def _visible(seg_q, seg_k, q_idx, kv_idx, pos_q, pos_k, depth, at_depth, sliding_window):
    """The tree rule over broadcasting tensors of (query, key) rows."""
    on_path = at_depth[seg_q, depth[seg_k]] == seg_k
    visible = on_path & ((seg_q != seg_k) | (kv_idx <= q_idx))
    if sliding_window is not None:  # HF semantics: a query sees the last `sliding_window` positions
        visible = visible & (pos_q - pos_k < sliding_window)
    return visible


@dataclass
class TreeAttention:
    """Everything the backends need for one packed batch; built by `tree_attention_metadata`."""

    backend: str                 # resolved: "sdpa" | "segments" | "triton" | "flash"
    num_tokens: int
    position_ids: torch.Tensor   # [N] int64
    segment_ids: torch.Tensor    # [N] int64
    seg_parent: torch.Tensor     # [S], -1 for a root
    cu_seqlens_q: torch.Tensor   # [S+1] int32
    cu_seqlens_k: torch.Tensor   # [S+1] int32
    kv_index: torch.Tensor       # [K] int64
    max_seqlen_q: int
    max_seqlen_k: int
    _masks: dict = field(default_factory=dict, repr=False)  # built on first use: masks per window, ancestry, gather

    def ancestry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`segment_ancestry` of the batch, built on first use: only the dense mask reads it, and building
        it costs ~25 small kernels and a sync per tree level, every forward."""
        if "ancestry" not in self._masks:
            self._masks["ancestry"] = segment_ancestry(self.seg_parent)
        return self._masks["ancestry"]

    def kv_gather(self):
        """The `triton` backend's keys: kv_index read by the kernels' loads (KVGather), built on first use
        and shared by every layer."""
        if "kv_gather" not in self._masks:
            self._masks["kv_gather"] = kv_gather(self.kv_index, self.num_tokens)
        return self._masks["kv_gather"]

    def prepare(self, *sliding_windows: int | None) -> "TreeAttention":
        """Build what the backend reads (dense mask, segment gather, key gather) for no window and for
        each given one, ahead of a torch.compile'd forward, which then only looks them up."""
        if self.backend == "triton":
            self.kv_gather()
        build = {"sdpa": self.dense_mask, "segments": self.segment_gather}.get(self.backend)
        if build is not None:
            for window in {None, *sliding_windows}:
                build(window)
        return self

    def dense_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """[N, N] bool, True where row i may attend to row j."""
        key = ("dense", sliding_window)
        if key not in self._masks:
            rows = torch.arange(self.num_tokens, device=self.segment_ids.device)
            seg, pos = self.segment_ids, self.position_ids
            self._masks[key] = _visible(seg[:, None], seg[None, :], rows[:, None], rows[None, :],
                                        pos[:, None], pos[None, :], *self.ancestry(), sliding_window)
        return self._masks[key]

    def segment_gather(self, sliding_window: int | None = None):
        """(q_rows [S, Q], k_rows [S, K], q_valid [S, Q], mask [S, 1, Q, K]) of the varlen form.

        Row index N stands for a zero pad row. Q and K are max_seqlen_q/k rounded up to 16 (SDPA's
        fused kernels want aligned masks). Padding queries see one key, so no softmax row is empty.
        """
        key = ("segments", sliding_window)
        if key not in self._masks:
            device, n = self.segment_ids.device, self.num_tokens
            cu_q, cu_k = self.cu_seqlens_q.long(), self.cu_seqlens_k.long()
            len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
            width_q, width_k = (-(-max(m, 1) // 16) * 16 for m in (self.max_seqlen_q, self.max_seqlen_k))
            i = torch.arange(width_q, device=device)
            j = torch.arange(width_k, device=device)
            q_valid = i[None, :] < len_q[:, None]
            k_valid = j[None, :] < len_k[:, None]
            q_rows = torch.where(q_valid, cu_q[:-1, None] + i, n)
            keys = torch.cat([self.kv_index, self.kv_index.new_full((1,), n)])
            k_rows = torch.where(k_valid, keys[(cu_k[:-1, None] + j).clamp(max=keys.numel() - 1)], n)
            offset = (len_k - len_q)[:, None, None]                      # bottom-right alignment
            mask = k_valid[:, None, :] & (j[None, None, :] <= i[None, :, None] + offset)
            if sliding_window is not None:
                pos = torch.cat([self.position_ids, self.position_ids.new_zeros(1)])
                mask = mask & (pos[q_rows][:, :, None] - pos[k_rows][:, None, :] < sliding_window)
            mask = mask | (~q_valid[:, :, None] & (j == 0)[None, None, :])
            self._masks[key] = (q_rows, k_rows, q_valid, mask[:, None])
        return self._masks[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA (measured fastest there: docs/performance.md), sdpa elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "sdpa"


def tree_attention_metadata(batch, backend: str = "auto") -> TreeAttention:
    """Per-batch metadata for `batch` (a PackedBatch, already on the model's device)."""
    return TreeAttention(
        backend=resolve_backend(backend, batch.input_ids.device),
        num_tokens=batch.input_ids.numel(),
        position_ids=batch.position_ids.long(),
        segment_ids=batch.segment_ids.long(),
        seg_parent=batch.seg_parent,
        cu_seqlens_q=batch.cu_seqlens_q.to(torch.int32),
        cu_seqlens_k=batch.cu_seqlens_k.to(torch.int32),
        kv_index=batch.kv_index.long(),
        max_seqlen_q=int(batch.max_seqlen_q),
        max_seqlen_k=int(batch.max_seqlen_k),
    )


# ---- backends: q [N, H, D], k / v [N, Hkv, D] -> [N, H, D] -----------------------------------------

def _sdpa(tree: TreeAttention, q, k, v, scale: float, sliding_window: int | None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=tree.dense_mask(sliding_window), scale=scale)
    return out.transpose(0, 1)


def _segments(tree: TreeAttention, q, k, v, scale: float, sliding_window: int | None):
    q_rows, k_rows, q_valid, mask = tree.segment_gather(sliding_window)
    groups = q.shape[1] // k.shape[1]

    def padded(t):                        # [N + 1, heads, D]: row N is the zero pad row
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])])

    k, v = (padded(t.repeat_interleave(groups, dim=1) if groups > 1 else t) for t in (k, v))
    out = F.scaled_dot_product_attention(padded(q)[q_rows].transpose(1, 2), k[k_rows].transpose(1, 2),
                                         v[k_rows].transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[q_valid]   # segments hold consecutive rows, in order: row order again


def _flash_varlen_func() -> Callable:
    """flash_attn.flash_attn_varlen_func (tests replace this function with a documented double)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("attention backend 'flash' needs the flash-attn package "
                          f"(pip install flash-attn); import failed: {err}") from err
    return flash_attn_varlen_func


def _flash(tree: TreeAttention, q, k, v, scale: float, sliding_window: int | None):
    extra = {}
    if sliding_window is not None:  # left window W-1 keys = HF's "last W positions", same as its FA2 path
        extra["window_size"] = (sliding_window - 1, 0)
    return _flash_varlen_func()(
        q, k.index_select(0, tree.kv_index), v.index_select(0, tree.kv_index),
        cu_seqlens_q=tree.cu_seqlens_q, cu_seqlens_k=tree.cu_seqlens_k,
        max_seqlen_q=tree.max_seqlen_q, max_seqlen_k=tree.max_seqlen_k,
        softmax_scale=scale, causal=True, **extra)


_triton_failed: list[str] = []     # the launch error, once the Triton kernel failed on this GPU


def _gpu_launch_failure(err: Exception, device: torch.device) -> bool:
    """A Triton compile/launch error on a GPU (worth a fallback); on CPU (the interpreter) it is a bug."""
    return device.type == "cuda" and type(err).__module__.startswith("triton")


def triton_kernel_usable() -> bool:
    """Whether the `triton` backend still runs its own kernel (no launch has failed on this GPU)."""
    return not _triton_failed


def fall_back_from_triton(err: Exception, device: torch.device) -> bool:
    """After an exception in a `triton` tree attention: True when it was a Triton launch failure on a GPU,
    which is then recorded and warned about once (every later call runs `segments`); False when it is
    a bug to raise. Shared with the one-node training layer of ple_fast.fused_layers."""
    if not _gpu_launch_failure(err, device):
        return False
    _triton_failed.append(repr(err))
    warnings.warn(f"tree attention: the Triton kernel failed on this GPU ({err!r}); using the "
                  "'segments' backend from now on", RuntimeWarning)
    return True


def _triton(tree: TreeAttention, q, k, v, scale: float, sliding_window: int | None):
    if _triton_failed:
        return _segments(tree, q, k, v, scale, sliding_window)
    attend = lambda: varlen_attention(q, k, v, tree.cu_seqlens_q, tree.cu_seqlens_k,  # noqa: E731
                                      tree.max_seqlen_q, tree.max_seqlen_k, scale, sliding_window,
                                      gather=tree.kv_gather())
    if torch.compiler.is_compiling():     # a launch failure surfaces at the compiled graph's first run
        return attend()
    try:
        return attend()
    except Exception as err:  # noqa: BLE001 - e.g. triton's OutOfResources on a smaller GPU
        if not fall_back_from_triton(err, q.device):
            raise
        return _segments(tree, q, k, v, scale, sliding_window)


_BACKEND_FUNCTIONS = {"sdpa": _sdpa, "segments": _segments, "flash": _flash, "triton": _triton}


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The attention inputs as SDPA takes them under autocast: fp32 cast to the autocast dtype.

    Why: under autocast a Llama layer's rotary promotes q and k to fp32 (bf16 projections times fp32
    cos / sin) while v stays bf16. SDPA, the `sdpa` and `segments` backends' kernel, casts all three
    to bf16, as HF's flash-attention path does; the `triton` kernels and flash-attn would get mixed
    dtypes (whose backward cannot run), so every backend gets the same cast here."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)


def tree_attention(tree: TreeAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   sliding_window: int | None = None) -> torch.Tensor:
    """q [N, H, D], k / v [N, Hkv, D] -> [N, H, D] under the tree mask, by tree.backend (under autocast
    in its dtype, as SDPA: `autocast_inputs`)."""
    return _BACKEND_FUNCTIONS[tree.backend](tree, *autocast_inputs(q, k, v), scale, sliding_window)


def tree_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    """AttentionInterface function: query [1, H, N, D], key / value [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    tree = kwargs.get(METADATA_KWARG)
    # a function, not a string built up front: under torch.compile reading layer_idx would make every
    # layer a graph of its own (dynamo specialises on module ints)
    where = lambda: f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"  # noqa: E731
    if not isinstance(tree, TreeAttention):
        raise RuntimeError(
            f"{where()}: attention implementation {ATTENTION_NAME!r} was called without its "
            f"`{METADATA_KWARG}` metadata; run packed batches through ple_fast.forward.dual_forward")
    if query.shape[0] != 1 or query.shape[2] != tree.num_tokens or key.shape[2] != tree.num_tokens:
        raise ValueError(f"{where()}: tree attention expects one packed sequence of {tree.num_tokens} tokens, "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)} (a KV cache is not supported)")
    if attention_mask is not None:
        raise ValueError(f"{where()}: got an attention mask; the packed layout defines its own mask, so "
                         "call the model without one")
    if dropout:
        raise NotImplementedError(f"{where()}: attention dropout {dropout} is not supported by tree attention; "
                                  "set config.attention_dropout = 0.0")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{where()}: `{unsupported}` (attention logit softcapping / sinks) is not "
                                      "supported by tree attention")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{where()}: {query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # squeeze, not [0]: its backward is a view, where select's writes each gradient into a fresh zero tensor
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
    return tree_attention(tree, q, k, v, scale, sliding_window).unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)


@contextlib.contextmanager
def use_tree_attention(decoder: nn.Module) -> Iterator[None]:
    """Point every config under `decoder` at tree attention for the block, then restore it.

    The swap lives on the model, not in a global: the model must not run other forwards
    concurrently, and HF gradient checkpointing (which re-runs attention in backward, after the
    swap is undone) is refused rather than silently recomputed with the wrong mask.
    """
    configs, checkpointing, stack = {}, False, [decoder]
    while stack:    # parents before children; plain attributes read from __dict__ (this is host time in
        module = stack.pop()    # every packed forward: 0.9 ms through modules() and getattr, 22 layers)
        attributes = module.__dict__
        checkpointing = checkpointing or bool(attributes.get("gradient_checkpointing", False))
        config = attributes.get("config")
        if config is not None and id(config) not in configs and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
        stack.extend(child for child in module._modules.values() if child is not None)
    if decoder.training and checkpointing:
        raise NotImplementedError(
            "dual_forward does not support Hugging Face gradient checkpointing: the recomputed attention "
            "would run with the model's own implementation; disable it (model.gradient_checkpointing_disable())")
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = ATTENTION_NAME
        yield
    finally:  # module order puts a model's config before its sub-configs, which the setter recurses into
        for key, config in configs.items():
            config._attn_implementation = saved[key]
