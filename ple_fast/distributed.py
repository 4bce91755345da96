"""Multi-process runs under torchrun: FSDP2 sharding, per-rank work splits, and reductions.

`torchrun --nproc_per_node N -m ple_fast.train ...` starts N copies; each shards the decoder
layers with FSDP2 (`fully_shard`) and takes 1/N of every batch of queries for rollouts, scoring
and the update. The embedding, final norm and lm_head stay replicated: the fused loss reads the
lm_head weight outside any module forward, where FSDP would hold it sharded, so their gradients
are all-reduced by hand instead (DDP-style). Every rank runs the same number of forwards (FSDP's
all-gathers are collectives), so shards are padded to equal length and padding is masked out.
The fast rollout engine is the exception: `unsharded_for_inference` gathers the full weights once
per rollout, so its forwards communicate nothing and each rank stops decoding when its rows are done.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ple_fast.checkpoint import (RNG, SCHEDULER, TRAINER_STATE, CheckpointError, is_peft, restore_rng_state,
                                 save_checkpoint)
from ple_fast.models import decoder_of


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- work splits
    def shard(self, items: Sequence) -> tuple[list, list[bool]]:
        """This rank's contiguous share, padded (with copies of an item) to the same length on
        every rank; the flags say which entries are real."""
        items = list(items)
        if not self.enabled:
            return items, [True] * len(items)
        per_rank = -(-len(items) // self.world_size) if items else 0
        mine = items[self.rank * per_rank:(self.rank + 1) * per_rank]
        real = [True] * len(mine)
        filler = mine[0] if mine else (items[0] if items else None)
        while len(mine) < per_rank:
            mine.append(filler)
            real.append(False)
        return mine, real

    def gather(self, local: list, real: list[bool]) -> list:
        """Concatenate every rank's real entries in rank order (the inverse of shard)."""
        if not self.enabled:
            return list(local)
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, [x for x, keep in zip(local, real) if keep])
        return [x for part in parts for x in part]

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def sum_dict(self, values: dict) -> dict:
        """Sum the numeric entries of a dict across ranks (one collective)."""
        if not self.enabled:
            return dict(values)
        keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        out = dict(values)
        out.update({k: (int(v) if isinstance(values[k], int) else v) for k, v in zip(keys, t.tolist())})
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on each decoder layer; everything else stays replicated (see the module docstring)."""

    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: no decoder `layers` list to shard with FSDP2")
    for layer in layers:
        fully_shard(layer)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP module back in its sharded state. generate() runs forwards under no_grad,
    after which FSDP2 can leave layers unsharded; a training forward from that state would
    put the gradients on the unsharded copies, and the optimizer would never see them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def unsharded_for_inference(model: torch.nn.Module):
    """Every FSDP2 module's full weights, gathered once (a collective: all ranks enter together),
    for a block of no_grad forwards that then communicate nothing, so ranks may run different
    numbers of them (the rollout engine stops when its own rows are done). Costs the full weights'
    memory on every rank for the block; re-sharded on exit. A no-op without FSDP modules."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:          # shard_model keeps fully_shard's default: reshard after forward
        module.set_reshard_after_forward(False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)


def replicated_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def sync_replicated_grads(model: torch.nn.Module, world_size: int) -> None:
    """Average the gradients of the parameters FSDP does not manage, as FSDP averages its own."""
    for p in replicated_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def clip_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global-norm clipping over a mix of FSDP-sharded (DTensor) and replicated parameters."""
    sharded_sq = torch.zeros((), dtype=torch.float64)
    replicated_sq = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in parameters if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded_sq += g.to_local().double().pow(2).sum().cpu()
        else:
            replicated_sq += g.double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(sharded_sq)
    total = (sharded_sq + replicated_sq).sqrt()
    scale = min(1.0, max_norm / (total.item() + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's weights on rank 0 (CPU), for saving an HF folder."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _FullOptimizerState:
    """Stands in for the optimizer in save_checkpoint: its state_dict is the gathered one."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def whole_model(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """An unsharded copy of `model` holding `state` (rank 0), for save_pretrained; a PEFT model
    is rebuilt around a copy of its base with the same adapter config."""

    with torch.device("meta"):
        if is_peft(model):
            from peft import get_peft_model

            (name, adapter), = model.peft_config.items()
            base = model.get_base_model()
            whole = get_peft_model(type(base)(base.config), copy.deepcopy(adapter), adapter_name=name)
        else:
            whole = type(model)(model.config)
    whole.load_state_dict(state, strict=False, assign=True)
    whole.tie_weights()
    return whole


def _adapter_state(model: torch.nn.Module, adapter_file_state: dict, folder) -> dict:
    """A saved adapter's weights under the model's own parameter names. PEFT saves them without
    the adapter name (lora_A.weight for the model's lora_A.default.weight); the frozen base
    weights are not in the checkpoint and stay those the run loaded."""
    (name,) = model.peft_config
    state = {}
    # in parameter order, identical on every rank: loading distributes key by key (collectives)
    expected = {n.replace(f".{name}.", "."): n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = set(expected) - set(adapter_file_state), set(adapter_file_state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: adapter does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    for saved, own in expected.items():
        state[own] = adapter_file_state[saved]
    return state


def save_distributed_checkpoint(dist_info: Dist, run_dir, step: int, *, model, tokenizer, optimizer, scheduler,
                                trainer_state: dict, keep_last: int):
    """Gather the full model and optimizer state (a collective), then rank 0 writes an ordinary
    checkpoint folder; its optimizer.pt is keyed by parameter name, as torch's distributed
    state-dict API writes it."""

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = full_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    path = None
    if dist_info.is_main:
        path = save_checkpoint(run_dir, step, model=whole_model(model, model_state), tokenizer=tokenizer,
                               optimizer=_FullOptimizerState(optim_state), scheduler=scheduler,
                               trainer_state={**trainer_state, "world_size": dist_info.world_size},
                               keep_last=keep_last)
    dist_info.barrier()
    return path


def _check_full_state(model: torch.nn.Module, state: dict, folder) -> None:
    """The checkpoint's weights are exactly the model's (a tied lm_head may be absent)."""
    own = set(model.state_dict())
    if "lm_head.weight" in own and "lm_head.weight" not in state and getattr(model.config, "tie_word_embeddings",
                                                                             False):
        embed = [k for k in state if k.endswith("embed_tokens.weight")]
        if embed:
            state["lm_head.weight"] = state[embed[0]]
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def load_distributed_checkpoint(path, *, model, optimizer=None, scheduler=None) -> dict:
    """Every rank reads the checkpoint and keeps its own shards of the model and optimizer."""
    path = Path(path)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    saved_world = trainer_state.get("world_size", 1)
    if saved_world != dist.get_world_size():
        raise CheckpointError(f"{path} was written by {saved_world} process(es); resume it with the same "
                              f"number (this run has {dist.get_world_size()})")
    files = sorted((path / "model").glob("*.safetensors"))
    state: dict = {}
    for file in files:
        state.update(load_file(str(file)))

    if is_peft(model):             # adapter only: load it into the sharded model, leave the base
        state = _adapter_state(model, state, path / "model")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        _check_full_state(model, state, path / "model")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    options = StateDictOptions(full_state_dict=True)
    if optimizer is not None:
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=options)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / SCHEDULER, map_location="cpu", weights_only=True))
    restore_rng_state(torch.load(path / RNG, map_location="cpu", weights_only=True))
    return trainer_state
