"""A decode step through Llama-family layers with their glue fused: ~11 kernels a layer, not ~40.

A one-token step of a 1B model on an H100-class GPU is bound by how many kernels it launches as
much as by the bytes it reads: eager HF layers run each RMSNorm as ~7 kernels, the rotary
embedding as ~10, SwiGLU and the residual adds as 4 more, each a few microseconds for a few KB
(on an H200 the engine's step cost ~3.2 ms at batch 32, where reading the weights takes ~0.6 ms:
bench/results/2026-11-28-h200-suite). Here, per layer:
    add + RMSNorm                    kernels/rms_norm.py  (the residual add folded in)
    q, k, v projections              the model's own modules
    rotary + cache write + attention kernels/decode_attention.py (cos/sin from the model's rotary module)
    o projection                     the model's own module
    add + RMSNorm                    kernels/rms_norm.py
    gate, up projections             the model's own modules
    SiLU(gate) * up                  kernels/swiglu.py
    down projection                  the model's own module
The projections, the embedding and the rotary tables stay the model's modules, so the step reads
the live training weights and LoRA (PEFT) layers work as they are. Every fused kernel rounds as the
eager HF op sequence does (tests/test_decode_layers.py compares logits and tokens with the stock
layers). Covered: the families whose decoder layers are exactly this (FAMILIES); anything else
decodes through the stock HF layers.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ple_fast.models import decoder_of

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_rms_norm(norm) -> bool:
    return isinstance(norm, nn.Module) and hasattr(norm, "variance_epsilon") and isinstance(
        getattr(norm, "weight", None), torch.Tensor)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `decode_hidden` cannot run this HF causal LM, or None when it can."""
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


def decode_hidden(model: nn.Module, keys: Tensor, values: Tensor, tokens: Tensor, positions: Tensor,
                  kv_length: int) -> Tensor:
    """Final-normed hidden states [B, H] of one new token per row.

    keys / values: the static cache [layers, B, kv_heads, capacity, D] (ple_fast.engine.StaticKVCache),
    row b's token goes to slot positions[b] of every layer, attending over slots 0..positions[b] of the
    first kv_length. tokens, positions: [B] int64."""
    from ple_fast.kernels.decode_attention import decode_attention
    from ple_fast.kernels.rms_norm import add_rms_norm
    from ple_fast.kernels.swiglu import silu_mul

    config, trunk = model.config, decoder_of(model)
    batch = tokens.shape[0]
    stream = trunk.embed_tokens(tokens)                                   # [B, H]
    cos, sin = trunk.rotary_emb(stream, positions.view(batch, 1))         # [B, 1, D], the model dtype
    delta = None            # what the next add + norm adds to `stream` (None: nothing, at layer 0)
    for layer in trunk.layers[: config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        norm = layer.input_layernorm
        x, stream = add_rms_norm(stream if delta is None else delta, norm.weight, norm.variance_epsilon,
                                 None if delta is None else stream)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        dim = attn.head_dim
        if hasattr(attn, "q_norm"):          # Qwen3: RMSNorm over each head before the rotation
            q = add_rms_norm(q.view(-1, dim), attn.q_norm.weight, attn.q_norm.variance_epsilon)[0]
            k = add_rms_norm(k.view(-1, dim), attn.k_norm.weight, attn.k_norm.variance_epsilon)[0]
        q_heads, kv_heads = q.numel() // (batch * dim), k.numel() // (batch * dim)
        layer_idx = attn.layer_idx
        out = decode_attention(q.view(batch, q_heads, 1, dim), keys[layer_idx], values[layer_idx], positions,
                               kv_length, attn.scaling, _window(attn, config), new_keys=k.view(batch, kv_heads, dim),
                               new_values=v.view(batch, kv_heads, dim), cos=cos, sin=sin)
        norm = layer.post_attention_layernorm
        x, stream = add_rms_norm(attn.o_proj(out.view(batch, q_heads * dim)), norm.weight,
                                 norm.variance_epsilon, stream)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        delta = mlp.down_proj(silu_mul(gate, up) if _is_silu(mlp.act_fn) else mlp.act_fn(gate) * up)
    norm = trunk.norm
    if delta is None:
        return add_rms_norm(stream, norm.weight, norm.variance_epsilon)[0]
    return add_rms_norm(delta, norm.weight, norm.variance_epsilon, stream)[0]
