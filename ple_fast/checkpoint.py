"""Crash-safe training checkpoints: write atomically, find the newest complete one, restore bitwise.

Layout of one checkpoint, run_dir/checkpoints/step-00000120/:
    model/               HF folder from save_pretrained (safetensors) + tokenizer; for a PEFT
                         model the adapter only (adapter_model.safetensors), noted in the manifest
    optimizer.pt         optimizer.state_dict()          (torch.save)
    scheduler.pt         scheduler.state_dict(), if a scheduler was given
    rng.pt               python / numpy / torch CPU / torch CUDA (all devices) RNG states,
                         plus any named generators the caller passes
    trainer_state.json   whatever the caller passes (data cursor, iteration, step, tau, ...)
    checkpoint.json      the manifest, written last: step, model format, every file and its size

Why it survives a crash: everything is built in a sibling temp folder (.tmp-step-...), every file
and folder is fsynced, and only then is the folder renamed to its final name (os.replace, atomic on
POSIX) and the parent folder fsynced. A folder named step-* therefore either is complete or does
not exist; a manifest check guards against anything else (a copy cut short, a manual edit). Older
checkpoints are deleted only after the new one is in place, and are renamed to a temp name before
removal, so a crash mid-delete leaves nothing that looks like a checkpoint. Stale temp folders are
ignored by find_checkpoint and removed by the next save.

One process saves (rank 0 in a distributed run); the RNG states saved are that process's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from ple_fast.config import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
TEMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
HF_FORMAT, PEFT_FORMAT = "hf_safetensors", "peft_adapter"


class CheckpointError(InputError):
    """A checkpoint that is incomplete, or does not match the model/optimizer it is loaded into."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG states


def _generator_state(name: str, gen) -> dict:
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": gen.getstate()}
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": gen.bit_generator.state}
    raise TypeError(f"generators[{name!r}]: cannot checkpoint a {type(gen).__name__}; "
                    "pass a random.Random, torch.Generator or numpy.random.Generator")


def _set_generator_state(name: str, gen, saved: dict) -> None:
    expected = _generator_state(name, gen)["kind"]
    if saved["kind"] != expected:
        raise CheckpointError(f"generators[{name!r}] was saved as a {saved['kind']} generator, "
                              f"but a {expected} generator was passed to restore it into")
    if expected == "python":
        gen.setstate(saved["state"])
    elif expected == "torch":
        gen.set_state(saved["state"])
    else:
        gen.bit_generator.state = saved["state"]


def capture_rng_state(generators: dict[str, Any] | None = None) -> dict:
    """Every global RNG this process draws from, plus the caller's own named generators.

    CUDA states are captured only once CUDA is initialised: before that its generators have not
    been used, and capturing would create a context on every visible GPU.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": (torch.cuda.get_rng_state_all()
                       if torch.cuda.is_available() and torch.cuda.is_initialized() else []),
        "generators": {name: _generator_state(name, gen) for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, Any] | None = None) -> None:
    """Inverse of capture_rng_state: afterwards every RNG continues the saved stream."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state["torch_cuda"]
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != len(cuda_states):
            log.warning("checkpoint has RNG states for %d CUDA devices, this process sees %d; "
                        "restoring the first %d", len(cuda_states), available, min(available, len(cuda_states)))
        for index in range(min(available, len(cuda_states))):
            torch.cuda.set_rng_state(cuda_states[index], index)
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"generators[{name!r}] is not in the checkpoint; it holds {sorted(saved)}")
        _set_generator_state(name, gen, saved[name])


# ---------------------------------------------------------------------------------------------
# trainer_state.json


def _check_json_value(value, where: str) -> None:
    """Only types that json turns back into an equal value (floats exactly, via repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"trainer_state{where}: key {key!r} is a {type(key).__name__}; JSON keys "
                                "must be str (an int key would come back as a string)")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    hint = (" (call .item() or float())" if isinstance(value, (np.generic, torch.Tensor))
            else " (use a list)" if isinstance(value, tuple) else "")
    raise TypeError(f"trainer_state{where} is a {type(value).__name__}, which does not round-trip "
                    f"through JSON{hint}")


# ---------------------------------------------------------------------------------------------
# model weights


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns save_pretrained: strips DDP (.module) and torch.compile (._orig_mod)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _no_hf_progress_bar():
    """save_pretrained draws a 'Writing model shards' bar; a periodic save should not."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save_model(model: torch.nn.Module, tokenizer, folder: Path) -> dict:
    with _no_hf_progress_bar():
        return _save_model_files(_unwrap(model), tokenizer, folder)


def _save_model_files(model: torch.nn.Module, tokenizer, folder: Path) -> dict:
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_checkpoint: {type(model).__name__} has no save_pretrained; pass a Hugging Face "
                        "model (or a PEFT model around one)")
    if is_peft(model):
        if len(model.peft_config) != 1:
            raise NotImplementedError(f"save_checkpoint: the PEFT model has {len(model.peft_config)} adapters "
                                      f"({sorted(model.peft_config)}); checkpoints support exactly one")
        model.save_pretrained(str(folder))
        adapter = next(iter(model.peft_config.values()))
        info = {"model_format": PEFT_FORMAT, "peft_base_model": adapter.base_model_name_or_path,
                "note": "model/ holds the PEFT adapter only; resume needs the same base model"}
        expected = folder / "adapter_model.safetensors"
    else:
        model.save_pretrained(str(folder))
        info = {"model_format": HF_FORMAT}
        expected = folder / "model.safetensors.index.json"
        if not expected.is_file():
            expected = folder / "model.safetensors"
    if not expected.is_file():
        raise CheckpointError(f"save_checkpoint: save_pretrained did not write {expected} "
                              f"(it wrote {sorted(p.name for p in folder.iterdir())})")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return info


def _alias_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _load_weights_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `tensors` into `module` in place; every state_dict entry must be covered exactly once.

    save_pretrained writes one of a tied group (embeddings / lm_head); a missing key is fine only
    when a tensor sharing its storage is in the file.
    """
    own = module.state_dict(keep_vars=True)
    groups: dict[tuple, list[str]] = {}
    for name, t in own.items():
        groups.setdefault(_alias_key(t), []).append(name)
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(n for n, t in own.items() if not any(a in tensors for a in groups[_alias_key(t)]))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    for name in sorted(set(tensors) & set(own)):
        want, got = own[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            problems.append(f"{name}: file has {got.dtype} {tuple(got.shape)}, model has "
                            f"{want.dtype} {tuple(want.shape)}")
    for names in groups.values():
        present = [n for n in names if n in tensors]
        if len(present) > 1 and not all(torch.equal(tensors[present[0]], tensors[n]) for n in present[1:]):
            problems.append(f"{present} are tied in the model but differ in the file")
    if problems:
        raise CheckpointError(f"{source}: weights do not match {type(module).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def _read_safetensors(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name), device="cpu"))
    return tensors


def _load_model(model: torch.nn.Module, folder: Path, model_format: str) -> None:
    model = _unwrap(model)
    if model_format == PEFT_FORMAT:
        if not is_peft(model):
            raise CheckpointError(f"{folder} holds a PEFT adapter, but the model is a plain "
                                  f"{type(model).__name__}; wrap it with the same LoRA config first")
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if len(model.peft_config) != 1:
            raise NotImplementedError(f"load_checkpoint: the PEFT model has {len(model.peft_config)} adapters; "
                                      "checkpoints support exactly one")
        adapter = next(iter(model.peft_config))
        tensors = _read_safetensors(folder, ["adapter_model.safetensors"])
        expected = get_peft_model_state_dict(model, adapter_name=adapter)
        unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        bad_shape = [k for k in set(tensors) & set(expected)
                     if (tensors[k].shape, tensors[k].dtype) != (expected[k].shape, expected[k].dtype)]
        if unexpected or missing or bad_shape:
            raise CheckpointError(f"{folder / 'adapter_model.safetensors'}: adapter does not match the model: "
                                  f"unexpected {unexpected[:3]}, missing {missing[:3]}, "
                                  f"shape/dtype differs {sorted(bad_shape)[:3]}")
        set_peft_model_state_dict(model, tensors, adapter_name=adapter)
        loaded = get_peft_model_state_dict(model, adapter_name=adapter)
        differ = [k for k in tensors if not torch.equal(loaded[k].cpu(), tensors[k])]
        if differ:
            raise CheckpointError(f"{folder}: adapter weights did not load exactly, e.g. {differ[:3]}")
        return
    if is_peft(model):
        raise CheckpointError(f"{folder} holds a full model, but the model is a PEFT model")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing_files = [f for f in files if not (folder / f).is_file()]
    if missing_files:
        raise CheckpointError(f"{folder}: weight files {missing_files} are missing")
    _load_weights_strict(model, _read_safetensors(folder, files), folder)


# ---------------------------------------------------------------------------------------------
# durability


def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and os.name == "nt":      # directories cannot be opened for fsync on Windows
        return
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def _remove_tree(path: Path, parent: Path) -> None:
    """Rename to a temp name first (atomic), so a crash mid-delete leaves no half checkpoint."""
    doomed = parent / f"{TEMP_PREFIX}delete-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    _fsync_path(parent, directory=True)
    shutil.rmtree(doomed)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)


# ---------------------------------------------------------------------------------------------
# public API


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer, scheduler=None, trainer_state: dict, keep_last: int,
                    generators: dict[str, Any] | None = None) -> Path:
    """Write run_dir/checkpoints/step-<8 digits>/ atomically, then prune to `keep_last` checkpoints
    (0: keep all): the one just written plus the highest-step others.

    `generators`: the caller's own named RNGs (random.Random, torch.Generator, numpy Generator),
    saved in rng.pt next to the global ones and restored by load_checkpoint(generators=...).
    Call it from one process only. Returns the checkpoint folder.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"save_checkpoint: keep_last must be an int >= 0 (0 keeps all), got {keep_last!r}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"save_checkpoint: trainer_state must be a dict, got {type(trainer_state).__name__}")
    _check_json_value(trainer_state, "")
    state_text = json.dumps(trainer_state, indent=2)
    rng_state = capture_rng_state(generators)     # before anything below could draw a random number

    run_dir = Path(run_dir)
    parent = run_dir / CHECKPOINTS
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        _fsync_path(run_dir, directory=True)
    for stale in parent.iterdir():
        if stale.name.startswith(TEMP_PREFIX):
            log.info("removing stale checkpoint temp folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

    final = parent / step_dir_name(step)
    temp = parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    temp.mkdir()
    try:
        manifest = {"format_version": FORMAT_VERSION, "step": step,
                    **_save_model(model, tokenizer, temp / MODEL_DIR)}
        _torch_save(optimizer.state_dict(), temp / OPTIMIZER)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), temp / SCHEDULER)
        _torch_save(rng_state, temp / RNG)
        (temp / TRAINER_STATE).write_text(state_text)
        manifest["files"] = {str(p.relative_to(temp).as_posix()): p.stat().st_size
                             for p in sorted(temp.rglob("*")) if p.is_file()}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(temp)
        if final.exists():       # the same step saved again (e.g. the final save after a periodic one)
            _remove_tree(final, parent)
        os.replace(temp, final)
        _fsync_path(parent, directory=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

    if keep_last > 0:
        older = [path for _, path in _complete_checkpoints(parent) if path != final]
        for path in older[:max(0, len(older) - (keep_last - 1))]:
            _remove_tree(path, parent)
    return final


def _incomplete_reason(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save was interrupted, or this is not a checkpoint folder)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        manifest["step"], manifest["model_format"], manifest["format_version"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable: {err!r}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    return None


def _complete_checkpoints(parent: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under `parent`, oldest first."""
    found = []
    if not parent.is_dir():
        return found
    for path in parent.iterdir():
        match = STEP_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        reason = _incomplete_reason(path)
        if reason is None:
            found.append((int(match.group(1)), path))
        else:
            log.warning("ignoring incomplete checkpoint %s: %s", path, reason)
    return sorted(found)


def find_checkpoint(run_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """resume="auto": the newest complete checkpoint of run_dir (None if there is none);
    a path: that checkpoint folder, which must exist and be complete; None: no resume."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = _complete_checkpoints(Path(run_dir) / CHECKPOINTS)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume: checkpoint folder {str(path)!r} does not exist")
    reason = _incomplete_reason(path)
    if reason is not None:
        hint = ""
        if (path / CHECKPOINTS).is_dir():
            hint = (f"; {str(path)!r} looks like a run folder: pass one of its checkpoints "
                    f"({str(path / CHECKPOINTS / 'step-XXXXXXXX')!r}) or resume=auto with this run folder")
        elif path.name == CHECKPOINTS:
            hint = f"; pass one of the step-XXXXXXXX folders inside {str(path)!r}"
        raise CheckpointError(f"resume: {str(path)!r} is not a complete checkpoint: {reason}{hint}")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete checkpoint: step, model_format ('hf_safetensors' | 'peft_adapter'), files."""
    path = Path(path)
    reason = _incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {reason}")
    return json.loads((path / MANIFEST).read_text())


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    generators: dict[str, Any] | None = None) -> dict:
    """Restore a checkpoint in place: weights (bitwise, strict), optimizer and scheduler states if
    given, and every RNG state. Returns the trainer_state dict that was saved."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path / MANIFEST}: format_version {manifest['format_version']}, "
                              f"this ple_fast reads {FORMAT_VERSION}")
    _load_model(model, path / MODEL_DIR, manifest["model_format"])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path / OPTIMIZER}: does not match the optimizer: {err}") from err
    if scheduler is not None:
        if not (path / SCHEDULER).is_file():
            raise CheckpointError(f"{path}: a scheduler was passed but the checkpoint has no {SCHEDULER}")
        scheduler.load_state_dict(torch.load(path / SCHEDULER, map_location="cpu", weights_only=True))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    restore_rng_state(torch.load(path / RNG, map_location="cpu", weights_only=True), generators)
    return trainer_state
