"""q / k / v and gate / up projections as one matmul each, over the live weights.

A decode step at rollout batch sizes runs skinny [batch x hidden] matmuls: each launch fills part of
the GPU and pays a fixed latency, so one matmul over [q; k; v] (and one over [gate; up]) does the
work of three (two) in one launch. Serving engines get there by loading checkpoints into merged
weights; ours must train the HF modules' own parameters and read them live, without a copy.

`merge_projection_storage` therefore lays each group's weights (and biases) out back to back in one
buffer, once: the Parameter objects stay the same (only their storage moves, as `param.data = ...`
does), so an optimizer built before or after keeps working, and state dicts, safetensors and HF's
save_pretrained see the same tensors. `merged_projection` then views a group as one [sum N, K]
matrix only while the weights still lie so; anything that moves a parameter's storage (model.to(),
load_state_dict(assign=True), FSDP2's gathered copies) makes it answer None, and callers run the
projections one by one.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from ple_fast.models import decoder_of


def projection_groups(layer: nn.Module) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...]]:
    """The layer's projections that read one input: (q, k, v) and (gate, up)."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)


def plain_linear(module: nn.Module) -> bool:
    """A bare nn.Linear, no hooks: its forward is F.linear of its weight and bias (not LoRA, quantised)."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def _adjacent(tensors: list[Tensor]) -> bool:
    """Whether the contiguous tensors lie back to back, in order, in one storage."""
    first = tensors[0]
    if any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False                            # e.g. FSDP2's DTensor shards
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset):
            return False
        offset += t.numel()
    return True


def _span(tensors: list[Tensor], rows: int) -> Tensor:
    """The tensors, adjacent in one storage, viewed as one contiguous tensor of `rows` rows."""
    first = tensors[0].detach()
    shape = (rows, *first.shape[1:])
    strides = (first.shape[1], 1) if first.dim() == 2 else (1,)
    return first.as_strided(shape, strides, first.storage_offset())


def merged_projection(modules: tuple[nn.Module, ...]) -> tuple[Tensor, Tensor | None, list[int]] | None:
    """(weight [sum N, K], bias [sum N] or None, [N_i]) viewing the modules' parameters as one linear
    layer, while `merge_projection_storage` has them so; else None. The views share the parameters'
    storage (no copy) and carry no autograd history: for forwards without a graph (decode steps)."""
    if not all(plain_linear(m) for m in modules):
        return None
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if not _adjacent(weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    sizes = [w.shape[0] for w in weights]
    bias = None
    if any(b is not None for b in biases):
        if any(b is None for b in biases) or not _adjacent(biases):
            return None
        bias = _span(biases, sum(sizes))
    return _span(weights, sum(sizes)), bias, sizes


def _fsdp_managed(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def merge_projection_storage(model: nn.Module) -> int:
    """Move each decoder layer's q / k / v weights (and biases), and its gate / up weights, into one
    buffer per group, back to back, so `merged_projection` sees each group as one matrix. Values,
    dtypes, devices, requires_grad and the Parameter objects are unchanged; each group's old storage is
    freed as the new one takes its place. Groups that are not plain nn.Linear layers of one dtype and
    device (LoRA, quantised, hooked), and models FSDP2 shards, are left as they are. Returns the groups
    merged now."""
    if _fsdp_managed(model):
        return 0          # FSDP2 owns where the (gathered) weights live; its layers run unmerged
    merged = 0
    for layer in getattr(decoder_of(model), "layers", ()):
        for modules in projection_groups(layer):
            if not all(plain_linear(m) for m in modules) or merged_projection(modules) is not None:
                continue
            for name in ("weight", "bias"):
                params = [getattr(m, name) for m in modules]
                if all(p is None for p in params):
                    continue
                if any(p is None or type(p) is not nn.Parameter for p in params) or \
                        len({(p.dtype, p.device, p.shape[1:]) for p in params}) != 1:
                    break
                buffer = torch.empty((sum(p.shape[0] for p in params), *params[0].shape[1:]),
                                     dtype=params[0].dtype, device=params[0].device)
                row = 0
                for p in params:
                    part = buffer[row:row + p.shape[0]]
                    part.copy_(p)
                    p.data = part
                    row += p.shape[0]
            merged += merged_projection(modules) is not None
    return merged
