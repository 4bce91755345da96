"""Typed run configuration: dataclasses, a YAML file, and dotted command-line overrides.

Every key is checked: a mistyped key is an error that suggests the closest valid one, and a
value of the wrong type names the key. The resolved config is what the run folder records.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: str | None = None          # local HF causal-LM folder; None = the embedded tiny Llama
    dtype: str = "float32"           # float32 | bfloat16 | float16 (weights of the policy)
    hidden_size: int = 64            # embedded model only
    layers: int = 2
    heads: int = 4


@dataclass
class DataConfig:
    sft_path: str | None = None      # SFT data (HH-RLHF or JSONL); None = the embedded task
    query_path: str | None = None    # queries for rollouts; defaults to sft_path
    eval_path: str | None = None     # held-out data; defaults to a split of query_path
    eval_fraction: float = 0.1
    max_queries: int | None = None   # cap on training queries (after the held-out split)
    max_prompt_tokens: int = 512
    max_response_tokens: int = 256
    length_policy: str = "truncate"  # truncate | skip


@dataclass
class RewardConfig:
    kind: str = "builtin"            # builtin | hf | python
    path: str | None = None          # HF reward-model folder, or 'module:function'
    normalize: str = "none"          # none | batch_zscore | running_zscore
    batch_size: int = 16


@dataclass
class SFTConfig:
    steps: int = 400                 # warm-up steps; 0 skips the warm-up
    batch_size: int = 32
    lr: float = 3e-3
    grad_accum: int = 1              # micro-batches per step (batch_size is split across them)
    warmup_steps: int = 40           # linear LR warm-up
    schedule: str = "cosine"         # constant | cosine | linear (after the warm-up)


@dataclass
class PLEConfig:
    algo: str = "ple"                # ple | raft | distill | sft
    iterations: int = 5
    batch_size: int = 16             # queries per update
    lr: float = 1e-4
    tau0: float = 0.2
    alpha: float = 0.9
    decay: str = "iteration"         # iteration | step
    rank_loss: str = "hinge"         # hinge | logistic
    weighting: str = "softmax"       # softmax | tanh
    rank_sft_coef: float = 1.0
    length_normalize: bool = True
    beta: float = 1.0
    raft_samples: int = 2            # responses per query for RAFT (same sample budget as PLE)
    loss_impl: str = "auto"          # auto | torch | reference | triton | pairs
    packed: bool = True              # score responses in the packed prefix-tree layout (each query once)
    attention: str = "auto"          # packed attention backend: auto | sdpa | segments | flex | flash
    compile: bool = False            # packed forwards: torch.compile the decoder layers (opt-in, not yet measured on a GPU)
    layer_impl: str = "auto"         # packed forwards: fused (ple_fast.fused_layers) | stock (HF's) | auto (fused on CUDA where supported)
    grad_clip: float = 1.0
    grad_accum: int = 1              # micro-batches per update (generation still runs on the whole batch)
    warmup_steps: int = 0            # linear LR warm-up
    schedule: str = "constant"       # constant | cosine | linear (after the warm-up)
    max_nonfinite_steps: int = 3     # stop after this many non-finite losses in a row


@dataclass
class LoRAConfig:
    enabled: bool = False            # LoRA through PEFT (pip install ple_fast[lora])
    r: int = 8                       # the paper's setting: r = 8, alpha = 16, all linear layers
    alpha: int = 16                  # LoRA scaling numerator (lora_alpha)
    dropout: float = 0.0             # LoRA dropout
    target_modules: str = "all-linear"   # comma-separated module names, or all-linear


@dataclass
class RolloutConfig:
    backend: str = "fast"            # fast (ple_fast.engine) | hf (Hugging Face generate)
    compile_decode: bool = False     # fast: torch.compile the decode step (opt-in: slower than fused layers, H200)
    layer_impl: str = "auto"         # fast: fused (ple_fast.fused_layers) | stock (HF's) | auto (fused where supported)
    merged_projections: bool = False  # fast, fused layers: q/k/v and gate/up as one matmul each (opt-in: not yet timed)
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class EvalConfig:
    max_queries: int = 256
    samples: int = 8                 # responses per held-out query
    temperature: float = 1.0         # 0 = greedy
    max_new_tokens: int = 24
    batch_size: int = 64


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    precision: str = "auto"          # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute activations in backward (scores with padded forwards)
    resume: str | None = None        # auto (newest checkpoint in out_dir) | a checkpoint folder
    save_every: int = 0              # checkpoint every N optimizer steps (0: only at phase ends)
    keep_last: int = 2               # checkpoints kept
    progress: bool = True            # progress bars (tqdm) per phase
    sample_every: int = 1            # write rollout samples every N iterations (0: never)
    plots: bool = True               # PNG plots at the end (needs matplotlib)
    tensorboard: bool = False        # log to out_dir/tensorboard (needs tensorboard)
    wandb_project: str | None = None # log to Weights & Biases (needs wandb)


@dataclass
class Config:
    principle: str | None = None     # None = the embedded task's principle
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ple: PLEConfig = field(default_factory=PLEConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.length_policy": ("truncate", "skip"),
    "reward.kind": ("builtin", "hf", "python"),
    "reward.normalize": ("none", "batch_zscore", "running_zscore"),
    "ple.algo": ("ple", "raft", "distill", "sft"),
    "ple.decay": ("iteration", "step"),
    "ple.rank_loss": ("hinge", "logistic"),
    "ple.weighting": ("softmax", "tanh"),
    "ple.loss_impl": ("auto", "torch", "reference", "triton", "pairs"),
    "ple.attention": ("auto", "sdpa", "segments", "flex", "flash", "triton"),
    "rollout.backend": ("hf", "fast"),
    "rollout.layer_impl": ("auto", "fused", "stock"),
    "ple.layer_impl": ("auto", "fused", "stock"),
    "sft.schedule": ("constant", "cosine", "linear"),
    "ple.schedule": ("constant", "cosine", "linear"),
    "run.precision": ("auto", "fp32", "bf16"),
}
POSITIVE = ("sft.batch_size", "sft.grad_accum", "ple.batch_size", "ple.grad_accum", "ple.raft_samples",
            "eval.samples", "eval.batch_size", "reward.batch_size", "run.keep_last", "lora.r",
            "ple.max_nonfinite_steps")


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check or convert a value (from YAML or a command-line string) to the field's type."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def set_key(config: Config, dotted: str, value: Any) -> None:
    """config.<a>.<b> = value, with checking and 'did you mean' suggestions."""
    parts = dotted.split(".")
    node, path = config, []
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            prefix = ".".join(path)
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise ConfigError(f"unknown config key {dotted!r}"
                              + _suggest(".".join(path + [part]), valid))
        path.append(part)
        hints = typing.get_type_hints(type(node))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: is a section; set its keys, e.g. {dotted}.<key>=...")
                for sub, sub_value in value.items():
                    set_key(config, f"{dotted}.{sub}", sub_value)
                return
            coerced = _coerce(value, hints[part], dotted)
            choices = CHOICES.get(dotted)
            if choices and coerced not in choices:
                raise ConfigError(f"{dotted}: {coerced!r} is not one of {', '.join(choices)}")
            if dotted in POSITIVE and coerced < 1:
                raise ConfigError(f"{dotted}: must be at least 1, got {coerced!r}")
            setattr(node, part, coerced)
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{'.'.join(path)} is a value, not a section (in {dotted!r})")


PACKAGED = Path(__file__).parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a config shipped in ple_fast/configs (e.g. `lora`)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    raise ConfigError(f"config file {str(name)!r} does not exist (shipped configs: {shipped})")


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def apply_mapping(config: Config, data: dict, source: str) -> None:
    for key, value in data.items():
        try:
            set_key(config, str(key), value)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'ple.tau0=0.5' -> ('ple.tau0', 0.5); the value is read as YAML (numbers, true, null)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. ple.iterations=3")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return key.strip(), value


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_yaml(config: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def build_config(yaml_path: str | None = None, overrides: list[str] = (), *, base=None):
    """Defaults (a Config, or the `base` tree of another command), the YAML file, then overrides."""
    config = Config() if base is None else base
    if yaml_path:
        apply_mapping(config, load_yaml(yaml_path), str(yaml_path))
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_key(config, key, value)
        except ConfigError as err:
            raise ConfigError(f"command line: {err}") from None
    return config
