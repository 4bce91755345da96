"""Llama-family layers with their glue fused: ~11 kernels a layer where HF's eager layer runs ~40.

Eager HF layers run each RMSNorm as ~7 kernels, the rotary embedding as ~10, SwiGLU and the two
residual adds as 4 more, each a few microseconds for little work, and in training each keeps its
temporaries for backward: most of a small model's decode step, and a launch-bound share of a
training step. Here, per layer:
    add + RMSNorm                    kernels/rms_norm.py  (the residual add folded in)
    q, k, v projections              the model's own modules
    rotary embedding                 kernels/rotary.py; in a decode step inside the attention kernel,
                                     which also writes the cache (kernels/decode_attention.py)
    attention                        decode: the decode kernel; training: the model's attention
                                     interface (the packed tree attention, ple_fast.attention)
    o projection                     the model's own module
    add + RMSNorm                    kernels/rms_norm.py
    gate, up projections             the model's own modules
    SiLU(gate) * up                  kernels/swiglu.py
    down projection                  the model's own module
The projections, the embedding and the rotary tables stay the model's modules, so the weights are
the live ones and LoRA (PEFT) layers work as they are; in training, plain nn.Linear projections that
read the same input run as one autograd node (`project`), whose backward sums their input gradients
inside the GEMMs. Every fused kernel rounds as the eager HF op sequence does, and its backward
computes in fp32 (tests/test_fused_layers.py compares hidden states, tokens, log-probs and
gradients with the stock layers). Covered: the families whose layers are exactly this (FAMILIES);
anything else runs the stock HF layers.

A packed training forward on the `triton` tree attention, with plain projections in one dtype or
under autocast, runs each layer as one autograd node (`_PackedTrainingLayer`, its backward written out over the
same kernels): the per-op layer's bits for a fraction of its host-side bookkeeping.

`decode_hidden` is the rollout engine's decode step (EngineOptions.fused_layers);
`fused_decoder_layers` swaps the layers' forward for `layer_forward`, and the final norm's for
`final_norm_forward`, in the packed training forwards (ForwardPlan.layers == "fused") and the
rollout engine's packed prefill.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ple_fast.attention import (ATTENTION_NAME, METADATA_KWARG, TreeAttention, autocast_inputs, fall_back_from_triton,
                                triton_kernel_usable)
from ple_fast.kernels.decode_attention import decode_attention
from ple_fast.kernels.rms_norm import add_rms_norm, add_rms_norm_backward, add_rms_norm_forward, rms_norm
from ple_fast.kernels.rotary import rotary, rotary_backward, rotary_forward
from ple_fast.kernels.swiglu import silu_mul, silu_mul_backward, silu_mul_forward
from ple_fast.kernels.varlen_attention import varlen_backward, varlen_forward
from ple_fast.merged_projections import merged_projection, plain_linear
from ple_fast.models import decoder_of

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_rms_norm(norm) -> bool:
    return isinstance(norm, nn.Module) and hasattr(norm, "variance_epsilon") and isinstance(
        getattr(norm, "weight", None), torch.Tensor)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused layers (`decode_hidden`, `layer_forward`) cannot run this HF causal LM, or None."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} is not one of {', '.join(FAMILIES)}"
    trunk = decoder_of(model)
    for name in ("embed_tokens", "rotary_emb", "norm", "layers"):
        if not hasattr(trunk, name):
            return f"{type(trunk).__name__} has no {name}"
    if not _is_rms_norm(trunk.norm):
        return f"{type(trunk).__name__}.norm is not an RMSNorm"
    for i, layer in enumerate(trunk.layers[: config.num_hidden_layers]):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "layer_idx", "head_dim")),
                 (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn"))]
        for module, names in parts:
            missing = [n for n in names if not hasattr(module, n)]
            if module is None or missing:
                return f"layer {i} ({type(layer).__name__}) lacks {missing or 'self_attn / mlp'}"
        norms = [layer.input_layernorm, layer.post_attention_layernorm] if hasattr(layer, "input_layernorm") \
            and hasattr(layer, "post_attention_layernorm") else []
        if hasattr(attn, "q_norm"):
            norms += [attn.q_norm, attn.k_norm]
        if len(norms) < 2 or not all(_is_rms_norm(n) for n in norms):
            return f"layer {i} ({type(layer).__name__}) has a norm that is not an RMSNorm"
        if attn.head_dim % 2:
            return f"layer {i}: the rotary embedding needs an even head dim, not {attn.head_dim}"
    return None


def _window(attn: nn.Module, config) -> int | None:
    # Qwen2 / Qwen3 keep a per-layer window (None on full-attention layers); Mistral reads the config
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None)


def _add_norm(norm: nn.Module, delta: Tensor | None, stream: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(stream + delta), stream + delta) in one kernel, with the norm module's own weight and eps;
    delta None: nothing to add (the first layer's input)."""
    if delta is None:
        return add_rms_norm(stream, norm.weight, norm.variance_epsilon)
    return add_rms_norm(delta, norm.weight, norm.variance_epsilon, stream)


def _head_norms(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Qwen3's RMSNorm over each query / key head ([..., D]) before the rotation; others: q, k as they are."""
    if not hasattr(attn, "q_norm"):
        return q, k
    dim = attn.head_dim
    return tuple(rms_norm(t.reshape(-1, dim), norm.weight, norm.variance_epsilon).view(t.shape)
                 for t, norm in ((q, attn.q_norm), (k, attn.k_norm)))


class _SharedInputLinear(torch.autograd.Function):
    """x W_i^T + b_i for projections reading the same x [T, H] (q, k, v; gate, up), as one autograd node.

    Why: autograd sums the projections' input gradients with an add kernel per extra projection
    (three for a layer: two for q, k, v and one for gate, up), each a full pass over [T, H]; here
    the GEMMs accumulate them (addmm_). Under autocast x is cast once, not once per projection, and
    saved once. Forward bits are F.linear's, as nn.Linear's; weight and bias gradients are the GEMMs
    and row sums autograd runs, cast to the parameters' dtypes as autocast's casts do."""
    @staticmethod
    def forward(ctx, x, compute_dtype, count, *params):
        weights, biases = params[:count], params[count:]
        x_c = x.to(compute_dtype)
        w_c = [w.to(compute_dtype) for w in weights]
        outs = tuple(F.linear(x_c, w, None if b is None else b.to(compute_dtype)) for w, b in zip(w_c, biases))
        ctx.save_for_backward(x_c, *w_c)
        ctx.dtypes = (x.dtype, [w.dtype for w in weights], [None if b is None else b.dtype for b in biases])
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x_c, *w_c = ctx.saved_tensors
        x_dtype, w_dtypes, b_dtypes = ctx.dtypes
        count = len(w_c)
        need_w, need_b = ctx.needs_input_grad[3:3 + count], ctx.needs_input_grad[3 + count:]
        dx, dws, dbs = None, [None] * count, [None] * count
        with torch.autocast(x_c.device.type, enabled=False):
            for i, (g, w) in enumerate(zip(grads, w_c)):
                if g is None:
                    continue
                if ctx.needs_input_grad[0]:
                    dx = g.mm(w) if dx is None else dx.addmm_(g, w)
                if need_w[i]:
                    dws[i] = g.t().mm(x_c).to(w_dtypes[i])
                if need_b[i]:
                    dbs[i] = g.sum(0).to(b_dtypes[i])
        return (None if dx is None else dx.to(x_dtype), None, None, *dws, *dbs)


def project(x: Tensor, modules: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
    """(module(x) for module in modules): plain nn.Linear layers in a forward that builds a graph go
    through _SharedInputLinear; anything else (LoRA, quantised or hooked modules) is called as is."""
    if not torch.is_grad_enabled() or x.dim() != 2 or not all(plain_linear(m) for m in modules):
        return tuple(m(x) for m in modules)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    if not autocast and any(m.weight.dtype != compute_dtype for m in modules):
        return tuple(m(x) for m in modules)          # mixed dtypes without autocast: F.linear's error, as HF's
    return _SharedInputLinear.apply(x, compute_dtype, len(modules), *(m.weight for m in modules),
                                    *(m.bias for m in modules))


def side_by_side(side, main_fn, side_fn):
    """(main_fn(), side_fn()), side_fn queued on CUDA stream `side` so the two run at once (parallel
    branches of the graph when captured); side None: one after the other.

    Why: a decode step's k / v projections (N = kv_heads * head_dim, 512 for a 1B Llama) and its q
    projection each fill a fraction of the SMs, and run back to back cost their sum of fixed times.
    Memory stays safe without record_stream: the side stream's blocks are only reused by the side
    stream, whose next work waits on everything the current stream queued before it (this fork)."""
    if side is None:
        return main_fn(), side_fn()
    current = torch.cuda.current_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        side_out = side_fn()
    main_out = main_fn()
    current.wait_stream(side)
    return main_out, side_out


def _mlp(mlp: nn.Module, x: Tensor, side=None, merged: bool = False) -> Tensor:
    """down(act(gate(x)) * up(x)), SiLU * up in one kernel (another activation: in torch); gate on the
    side stream, if given, while up runs (side_by_side). merged (no autograd): gate and up as one
    matmul where merge_projection_storage laid their weights out so, its halves read in place."""
    gate_up = merged_projection((mlp.gate_proj, mlp.up_proj)) if merged else None
    if gate_up is not None:
        weight, bias, sizes = gate_up
        gate, up = F.linear(x, weight, bias).split(sizes, dim=-1)
        return mlp.down_proj(silu_mul_forward(gate, up) if _is_silu(mlp.act_fn) else mlp.act_fn(gate) * up)
    up, gate = side_by_side(side, lambda: mlp.up_proj(x), lambda: mlp.gate_proj(x))
    return mlp.down_proj(_activation_mul(mlp, gate, up))


def _qkv(attn: nn.Module, x: Tensor, side=None, merged: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k, v projections of x: one matmul where merged and merge_projection_storage laid their
    weights out so (views of its output, no autograd), else k / v on the side stream beside q."""
    qkv = merged_projection((attn.q_proj, attn.k_proj, attn.v_proj)) if merged else None
    if qkv is not None:
        weight, bias, sizes = qkv
        return F.linear(x, weight, bias).split(sizes, dim=-1)
    q, (k, v) = side_by_side(side, lambda: attn.q_proj(x), lambda: (attn.k_proj(x), attn.v_proj(x)))
    return q, k, v


def _activation_mul(mlp: nn.Module, gate: Tensor, up: Tensor) -> Tensor:

    return silu_mul(gate, up) if _is_silu(mlp.act_fn) else mlp.act_fn(gate) * up


def position_independent_rotary(model: nn.Module) -> bool:
    """Whether the model's rotary embedding at a position is the same whatever else is in the batch, so
    that a table of every position (`rotary_tables`) can serve every decode step. HF's dynamic and
    longrope types rescale their frequencies by the batch's longest position; the others do not."""
    rope_type = getattr(decoder_of(model).rotary_emb, "rope_type", None)
    return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"


def rotary_tables(model: nn.Module, positions: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos, sin [positions, D] of positions 0..positions-1, by the model's own rotary module (so each
    row is the bits that module gives that position in a step)."""
    trunk = decoder_of(model)
    cos, sin = trunk.rotary_emb(torch.empty(0, dtype=dtype, device=device),
                                torch.arange(positions, device=device).view(1, positions))
    return cos[0], sin[0]


def decode_hidden(model: nn.Module, keys: Tensor, values: Tensor, tokens: Tensor, positions: Tensor,
                  kv_length: int, side_stream=None, rope_tables: tuple[Tensor, Tensor] | None = None,
                  tile: dict | None = None, merged_projections: bool = False) -> Tensor:
    """Final-normed hidden states [B, H] of one new token per row.

    keys / values: the static cache [layers, B, kv_heads, capacity, D] (ple_fast.engine.StaticKVCache),
    row b's token goes to slot positions[b] of every layer, attending over slots 0..positions[b] of the
    first kv_length. tokens, positions: [B] int64. side_stream (CUDA): the k / v projections run on it
    beside the q projection, and the gate projection beside the up projection (side_by_side).
    rope_tables: `rotary_tables` covering every position (the attention kernel reads row positions[b]),
    for a model with `position_independent_rotary`; None: the rotary module runs in the step. tile: the
    decode attention kernel's (None: its gpu_tile_config). merged_projections: q / k / v, and gate / up,
    as one matmul each in the layers whose weights ple_fast.merged_projections laid out back to back
    (the side stream then serves only the layers that are not)."""
    config, trunk = model.config, decoder_of(model)
    batch = tokens.shape[0]
    stream = trunk.embed_tokens(tokens)                                   # [B, H]
    if rope_tables is None:
        cos, sin = trunk.rotary_emb(stream, positions.view(batch, 1))     # [B, 1, D], the model dtype
    else:
        cos, sin = rope_tables                                            # [T, D], row = position
    delta = None            # what the next add + norm adds to `stream` (None: nothing, at layer 0)
    for layer in trunk.layers[: config.num_hidden_layers]:
        attn, dim = layer.self_attn, layer.self_attn.head_dim
        x, stream = _add_norm(layer.input_layernorm, delta, stream)
        q, k, v = _qkv(attn, x, side_stream, merged_projections)
        q, k = _head_norms(attn, q.view(batch, -1, dim), k.view(batch, -1, dim))
        out = decode_attention(q[:, :, None], keys[attn.layer_idx], values[attn.layer_idx], positions, kv_length,
                               attn.scaling, _window(attn, config), new_keys=k, new_values=v.view(batch, -1, dim),
                               cos=cos, sin=sin, rope_table=rope_tables is not None, tile=tile)
        x, stream = _add_norm(layer.post_attention_layernorm, attn.o_proj(out.view(batch, -1)), stream)
        delta = _mlp(layer.mlp, x, side_stream, merged_projections)
    return _add_norm(trunk.norm, delta, stream)[0]


class _LayerPlan(NamedTuple):
    """What the one-node layer reads besides tensors: epsilons, head size, the attention's arguments."""
    eps_in: float
    eps_post: float
    eps_head: tuple[float, float] | None      # Qwen3's q / k head norms, else None
    head_dim: int
    scale: float
    window: int | None
    tree: object                               # the batch's ple_fast.attention.TreeAttention
    compute_dtype: torch.dtype | None          # the projections' autocast dtype, None without autocast
    shape: torch.Size                          # the layer's output shape, [B, N, H]


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _one_node_params(layer: nn.Module) -> tuple:
    attn, linears = layer.self_attn, _projections(layer)
    norms = (attn.q_norm.weight, attn.k_norm.weight) if hasattr(attn, "q_norm") else (None, None)
    return (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *norms,
            *(m.weight for m in linears), *(m.bias for m in linears))


class _PackedTrainingLayer(torch.autograd.Function):
    """A decoder layer of the packed training forward as ONE autograd node, its backward written out.

    Why: the per-op fused layer records ~20 autograd nodes a layer (the glue Functions, each linear's
    mm / t / view nodes, the attention interface's squeezes and transposes) and dispatches ~130 aten
    ops, most of them views; on a GPU each costs host time, and a packed step of a 1B model at 8 pairs
    was host-bound (the GPU idled 22-25% of the shared step: docs/performance.md). Here
    the same kernels run in the same order, with autocast's casts where it puts them (the projections
    in compute_dtype, their gradients cast back to each input's dtype) and the GEMMs as autograd's
    linear backward runs them (dX = dY W, dW = dY^T X), so values and gradients are the per-op layer's
    bits; only the bookkeeping goes. Inputs: hidden [T, H], cos / sin [T, D], the plan, then
    `_one_node_params`."""
    @staticmethod
    def forward(ctx, hidden, cos, sin, plan, *params):

        dtype = plan.compute_dtype
        cast = (lambda t: t) if dtype is None else (lambda t: t if t is None else t.to(dtype))  # noqa: E731
        w_in, w_post, w_qn, w_kn, *linear = params
        wq, wk, wv, wo, wg, wu, wd, bq, bk, bv, bo, bg, bu, bd = (cast(t) for t in linear)
        tokens, dim, tree = hidden.shape[0], plan.head_dim, plan.tree
        x_in = add_rms_norm_forward(hidden, w_in, plan.eps_in, None)[0]
        x_in_c = cast(x_in)
        q, k, v = (F.linear(x_in_c, w, b).view(tokens, -1, dim) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        q_pre = k_pre = None                   # the head norms' inputs, kept for their backward only
        if plan.eps_head is not None:
            q_pre, k_pre = q, k
            q, k = (add_rms_norm_forward(t.view(-1, dim), w, eps, None)[0].view(t.shape)
                    for t, w, eps in ((q, w_qn, plan.eps_head[0]), (k, w_kn, plan.eps_head[1])))
        q_rot, k_rot, v = autocast_inputs(*rotary_forward(q, k, cos, sin), v)       # as the tree attention's
        attn, lse = varlen_forward(q_rot, k_rot, v, tree.cu_seqlens_q, tree.cu_seqlens_k, tree.max_seqlen_q,
                                   tree.max_seqlen_k, plan.scale, plan.window, tree.kv_gather())
        attn_c = cast(attn.view(tokens, -1))
        o = F.linear(attn_c, wo, bo)
        x_post, stream = add_rms_norm_forward(o, w_post, plan.eps_post, hidden)
        x_post_c = cast(x_post)
        gate, up = F.linear(x_post_c, wg, bg), F.linear(x_post_c, wu, bu)
        act = silu_mul_forward(gate, up)
        down = F.linear(act, wd, bd)
        out = torch.add(stream.view(plan.shape), down.view(plan.shape))   # a fresh tensor, no view (see layer_forward)
        ctx.save_for_backward(hidden, cos, sin, x_in_c, q_pre, k_pre, q_rot, k_rot, v, attn, attn_c, lse, stream,
                              x_post_c, gate, up, act, w_in, w_post, w_qn, w_kn, wq, wk, wv, wo, wg, wu, wd)
        ctx.plan = plan
        ctx.dtypes = (q.dtype, k.dtype, x_in.dtype, o.dtype, x_post.dtype, down.dtype,
                      *(None if t is None else t.dtype for t in params))
        return out

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):
            return _PackedTrainingLayer._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):

        (hidden, cos, sin, x_in_c, q_pre, k_pre, q_rot, k_rot, v, attn, attn_c, lse, stream, x_post_c, gate, up,
         act, w_in, w_post, w_qn, w_kn, wq, wk, wv, wo, wg, wu, wd) = ctx.saved_tensors
        q_dtype, k_dtype, x_in_dtype, o_dtype, x_post_dtype, down_dtype, *param_dtypes = ctx.dtypes
        names = ("w_in", "w_post", "w_qn", "w_kn", "wq", "wk", "wv", "wo", "wg", "wu", "wd",
                 "bq", "bk", "bv", "bo", "bg", "bu", "bd")
        wants, dtypes = dict(zip(names, ctx.needs_input_grad[4:])), dict(zip(names, param_dtypes))
        grads = dict.fromkeys(names)
        plan, tree, tokens = ctx.plan, ctx.plan.tree, hidden.shape[0]

        def linear_grads(name: str, d_y: Tensor, x: Tensor) -> None:      # as autograd's linear backward
            if wants["w" + name]:
                grads["w" + name] = d_y.t().mm(x).to(dtypes["w" + name])
            if wants["b" + name]:
                grads["b" + name] = d_y.sum(0).to(dtypes["b" + name])

        d_out = d_out.reshape(tokens, -1).contiguous()
        d_down = d_out.to(down_dtype)          # the residual add's gradient, in each input's dtype
        d_act = d_down.mm(wd)
        linear_grads("d", d_down, act)
        d_gate, d_up = silu_mul_backward(d_act, gate, up)
        d_post = d_gate.mm(wg).addmm_(d_up, wu).to(x_post_dtype)
        linear_grads("g", d_gate, x_post_c)
        linear_grads("u", d_up, x_post_c)
        d_stream, grads["w_post"] = add_rms_norm_backward(d_post, d_out, stream, w_post, plan.eps_post)
        d_o = d_stream.to(o_dtype)
        d_attn = d_o.mm(wo).to(attn.dtype)
        linear_grads("o", d_o, attn_c)
        dq, dk, dv = varlen_backward(d_attn.view(attn.shape), q_rot, k_rot, v, attn, lse, tree.cu_seqlens_q,
                                     tree.cu_seqlens_k, tree.max_seqlen_q, tree.max_seqlen_k, plan.scale,
                                     plan.window, tree.kv_gather())
        dq, dk = rotary_backward(dq, dk, cos, sin, q_dtype, k_dtype)
        if plan.eps_head is not None:
            dim = plan.head_dim
            (dq, grads["w_qn"]), (dk, grads["w_kn"]) = (
                add_rms_norm_backward(d.view(-1, dim), None, pre.reshape(-1, dim), w, eps)
                for d, pre, w, eps in ((dq, q_pre, w_qn, plan.eps_head[0]), (dk, k_pre, w_kn, plan.eps_head[1])))
            dq, dk = dq.to(q_pre.dtype), dk.to(k_pre.dtype)
        dq, dk, dv = (t.reshape(tokens, -1) for t in (dq, dk, dv))
        d_in = dq.mm(wq).addmm_(dk, wk).addmm_(dv, wv).to(x_in_dtype)
        for name, d_y in (("q", dq), ("k", dk), ("v", dv)):
            linear_grads(name, d_y, x_in_c)
        d_hidden, grads["w_in"] = add_rms_norm_backward(d_in, d_stream, hidden, w_in, plan.eps_in)
        return (d_hidden.to(hidden.dtype), None, None, None,
                *(grads[name] if wants[name] else None for name in names))


def _one_node_reason(layer: nn.Module, hidden_states: Tensor, position_embeddings, past_key_values,
                     kwargs: dict, params: tuple) -> str | None:
    """Why `_PackedTrainingLayer` cannot run this call (the per-op fused layer does), or None: it covers
    the packed forward on the `triton` tree attention with plain nn.Linear projections, under autocast
    or in one dtype throughout. params: `_one_node_params(layer)`."""
    attn = layer.self_attn
    tree = kwargs.get(METADATA_KWARG)
    if attn.config._attn_implementation != ATTENTION_NAME or not isinstance(tree, TreeAttention):
        return "not a packed tree-attention forward"
    if tree.backend != "triton" or not triton_kernel_usable():
        return f"tree attention backend {tree.backend!r}"
    if past_key_values is not None or kwargs.get("cache") is not None or position_embeddings is None:
        return "a KV cache, or no rotary embedding given"
    if hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or (attn.training and attn.attention_dropout):
        return "not one packed sequence, or attention dropout"
    if not _is_silu(layer.mlp.act_fn):
        return "an activation other than SiLU"
    if not all(plain_linear(m) for m in _projections(layer)):
        return "a projection that is not a plain nn.Linear (LoRA, hooks)"
    dtype = hidden_states.dtype
    if not torch.is_autocast_enabled(hidden_states.device.type) and any(
            t is not None and t.dtype != dtype for t in (*params, *position_embeddings)):
        return "mixed dtypes without autocast"
    return None


def _one_node_layer(layer: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                    tree, params: tuple) -> Tensor:
    attn, config = layer.self_attn, layer.self_attn.config
    shape, dim = hidden_states.shape, attn.head_dim
    tokens = shape[0] * shape[1]
    cos, sin = (t.expand(shape[0], shape[1], dim).reshape(tokens, dim) for t in position_embeddings)
    eps_head = (attn.q_norm.variance_epsilon, attn.k_norm.variance_epsilon) if hasattr(attn, "q_norm") else None
    device_type = hidden_states.device.type
    plan = _LayerPlan(layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon,
                      eps_head, dim, attn.scaling, None if config.model_type == "llama" else _window(attn, config),
                      tree, torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None,
                      shape)
    return _PackedTrainingLayer.apply(hidden_states.reshape(tokens, shape[-1]), cos.contiguous(), sin.contiguous(),
                                      plan, *params)


def layer_forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, past_key_values=None, use_cache: bool | None = False,
                  position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
    """The HF decoder layer's forward (same arguments, same output) with the glue fused; differentiable.
    A packed forward on the `triton` tree attention runs as one autograd node (`_PackedTrainingLayer`);
    anything else per op, with attention through the model's attention interface, as in HF's own layer.
    The output is a fresh tensor, as HF's layer returns: FSDP2 hooks its pre-backward all-gather on a
    layer's outputs and warns of a view, whose in-place update would drop that hook."""

    params = _one_node_params(layer)          # read once: the check's dtypes, then the node's inputs
    if _one_node_reason(layer, hidden_states, position_embeddings, past_key_values, kwargs, params) is None:
        try:
            return _one_node_layer(layer, hidden_states, position_embeddings, kwargs[METADATA_KWARG], params)
        except Exception as err:  # noqa: BLE001 - a Triton launch failure on a GPU: per op, on `segments`
            if not fall_back_from_triton(err, hidden_states.device):
                raise
    attn, config = layer.self_attn, layer.self_attn.config
    shape = hidden_states.shape                         # [B, N, H]
    stream = hidden_states.reshape(-1, shape[-1])
    tokens, dim = stream.shape[0], attn.head_dim
    x, stream = _add_norm(layer.input_layernorm, None, stream)    # stream: a view, whose gradient the norm's adds
    q, k, v = (t.view(tokens, -1, dim) for t in project(x, (attn.q_proj, attn.k_proj, attn.v_proj)))
    cos, sin = (t.expand(shape[0], shape[1], dim).reshape(tokens, dim) for t in position_embeddings)  # [1, N, D] too
    q, k = rotary(*_head_norms(attn, q, k), cos, sin)
    heads = lambda t: t.view(shape[0], shape[1], -1, dim).transpose(1, 2)      # [B, heads, N, D], as HF's
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)
    if config.model_type != "llama":        # Mistral, Qwen2, Qwen3 pass their window; Llama passes none
        kwargs["sliding_window"] = _window(attn, config)
    keys, values = heads(k), heads(v)
    cache = kwargs.pop("cache", None)        # transformers >= 5.24 names it `cache`
    cache = past_key_values if cache is None else cache      # (an empty Cache is falsy: no `or`)
    if cache is not None:                   # a caller that asked HF for a cache gets it filled, as HF does
        keys, values = cache.update(keys, values, attn.layer_idx)
    out, _ = interface(attn, heads(q), keys, values, attention_mask,
                       dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                       position_ids=position_ids, **kwargs)
    x, stream = _add_norm(layer.post_attention_layernorm, attn.o_proj(out.reshape(tokens, -1)), stream)
    mlp = layer.mlp
    gate, up = project(x, (mlp.gate_proj, mlp.up_proj))
    return stream.view(shape) + mlp.down_proj(_activation_mul(mlp, gate, up)).view(shape)


def final_norm_forward(norm: nn.Module, hidden_states: Tensor) -> Tensor:
    """The decoder's final RMSNorm module's forward as one kernel each way (HF's runs ~7 forward, more
    backward), rounding as the module does."""
    shape = hidden_states.shape
    return rms_norm(hidden_states.reshape(-1, shape[-1]), norm.weight, norm.variance_epsilon).view(shape)


@contextlib.contextmanager
def fused_decoder_layers(model: nn.Module) -> Iterator[None]:
    """Run the model's decoder layers through `layer_forward`, and its final norm through
    `final_norm_forward`, for the block (their own forward again on exit; a backward after the block
    needs nothing of it)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"fused decoder layers: {reason}")
    trunk = decoder_of(model)
    swapped = [*trunk.layers, trunk.norm]
    for layer in trunk.layers:
        layer.forward = functools.partial(layer_forward, layer)
    trunk.norm.forward = functools.partial(final_norm_forward, trunk.norm)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward        # the instance attribute: the class's forward again
