"""Typed configuration of both commands: dataclasses, a YAML file, and dotted command-line overrides.

Every key is declared once, on its field: its type (a Literal lists the choices), its default, its
bounds and a line of help. The same code checks every value, from a file or the command line: a
mistyped key is an error that suggests the closest valid one, a value of the wrong type or out of
bounds names its key. `python -m ple_fast.config` prints the reference (docs/config.md) from the
same fields. Values not yet timed on a GPU are accepted only with `experimental=true`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class InputError(ValueError):
    """Bad input from the user (a config value, a file, a data record, a checkpoint): the command lines
    print its one line and exit with status 2."""


class ConfigError(InputError):
    pass


def opt(default: Any, help: str, *, ge=None, gt=None, lt=None, le=None, experimental: tuple = ()) -> Any:
    """A config field: its default, one line of help, bounds, and the values that need experimental=true."""
    return field(default=default, metadata=dict(help=help, ge=ge, gt=gt, lt=lt, le=le, experimental=experimental))


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata=dict(help=help))


Precision = Literal["float32", "bfloat16", "float16"]
LengthPolicy = Literal["truncate", "skip"]
Schedule = Literal["constant", "cosine", "linear"]


@dataclass
class ModelConfig:
    path: str | None = opt(None, "local HF model folder (a causal LM; reward_train: or a one-output classifier); "
                                 "None = the embedded tiny Llama")
    dtype: Precision = opt("float32", "weights' dtype")
    hidden_size: int = opt(64, "embedded model only: hidden size", ge=1)
    layers: int = opt(2, "embedded model only: transformer layers", ge=1)
    heads: int = opt(4, "embedded model only: attention heads (KV heads = heads / 2)", ge=1)


@dataclass
class DataConfig:
    sft_path: str | None = opt(None, "SFT data (HH-RLHF or JSONL); None = the embedded task")
    query_path: str | None = opt(None, "queries for rollouts; defaults to sft_path")
    eval_path: str | None = opt(None, "held-out data; defaults to a split of query_path")
    eval_fraction: float = opt(0.1, "share of the queries held out when eval_path is unset", ge=0.0, lt=1.0)
    max_queries: int | None = opt(None, "cap on training queries (after the held-out split)", ge=1)
    max_prompt_tokens: int = opt(512, "longer prompts keep their last tokens (truncate) or are dropped (skip)", ge=1)
    max_response_tokens: int = opt(256, "longer responses keep their first tokens (truncate) or are dropped (skip)",
                                   ge=1)
    length_policy: LengthPolicy = opt("truncate", "what happens to over-long samples")
    chat_template: Literal["auto", "always", "never"] = opt(
        "auto", "HH dialogues through the tokenizer's chat template (the principle as the system message): auto, "
                "where the tokenizer has one; always; never (raw Human/Assistant text)")


@dataclass
class TaskConfig:
    aligned_share: float = opt(0.4, "embedded task only: share of the unprincipled SFT answers that are aligned "
                                    "(harmful requests refused; benign ones over-refused at half the rest); "
                                    "lower is harder", ge=0.0, le=1.0)


@dataclass
class RewardConfig:
    kind: Literal["builtin", "hf", "python"] = opt("builtin", "builtin (embedded task only), hf (a reward-model "
                                                              "folder) or python (module:function)")
    path: str | None = opt(None, "HF reward-model folder, or 'module:function'")
    normalize: Literal["none", "batch_zscore", "running_zscore"] = opt("none", "standardise rewards before the gate")
    batch_size: int = opt(16, "responses per reward-model forward", ge=1)


@dataclass
class SFTConfig:
    steps: int = opt(400, "warm-up steps; 0 skips the warm-up", ge=0)
    batch_size: int = opt(32, "examples per step (global: split across torchrun processes)", ge=1)
    lr: float | None = opt(None, "AdamW peak learning rate; null: by model kind (resolve_defaults: 3e-3 for the "
                                 "embedded model, 1e-5 with model.path, 2e-4 with LoRA)", gt=0.0)
    grad_accum: int = opt(1, "micro-batches per step (batch_size is split across them)", ge=1)
    warmup_steps: int | None = opt(None, "linear LR warm-up steps; null: 40 for the embedded model, 3% of the "
                                         "steps with model.path", ge=0)
    schedule: Schedule = opt("cosine", "LR schedule after the warm-up")


@dataclass
class PLEConfig:
    algo: Literal["ple", "raft", "distill", "sft"] = opt("ple", "ple, or a baseline under the same sample budget "
                                                                "(docs/method.md)")
    iterations: int = opt(5, "passes over the queries", ge=0)
    batch_size: int = opt(16, "queries per update (global)", ge=1)
    lr: float | None = opt(None, "AdamW peak learning rate of the alignment updates; null: by model kind (1e-4 "
                                 "for the embedded model, 1e-6 with model.path, 1e-4 with LoRA)", gt=0.0)
    tau0: float = opt(0.2, "initial threshold of the gate (delta > tau: ranking branch)")
    alpha: float = opt(0.9, "tau <- alpha * tau after each iteration (or step, see decay)")
    decay: Literal["iteration", "step"] = opt("iteration", "when tau decays")
    rank_loss: Literal["hinge", "logistic"] = opt("hinge", "ranking-branch loss")
    weighting: Literal["softmax", "tanh"] = opt("softmax", "weighted-branch weights of (y, y_p)")
    rank_sft_coef: float = opt(1.0, "weight of the -l(y_p) term in the ranking branch", ge=0.0)
    length_normalize: bool = opt(True, "l(y) is the mean token log-prob (true) or the sum (false)")
    beta: float = opt(1.0, "scale inside the logistic ranking loss", gt=0.0)
    raft_samples: int = opt(2, "responses per query for RAFT (PLE's budget: 2)", ge=1)
    loss_impl: Literal["auto", "torch", "triton", "whole_pairs"] = opt(
        "auto", "log-prob + loss implementation; auto: triton on CUDA, torch elsewhere; whole_pairs: the loss by "
                "chunks of whole pairs (6NHV, docs/performance.md)", experimental=("whole_pairs",))
    layout: Literal["auto", "packed", "padded"] = opt("auto", "packed: each query once for both responses (tree "
                                                              "attention); padded: HF's padded forwards; auto: "
                                                              "packed unless run.gradient_checkpointing")
    attention: Literal["auto", "sdpa", "segments", "triton", "flash"] = opt(
        "auto", "tree attention of the packed layout; auto: triton on CUDA, sdpa elsewhere",
        experimental=("flash",))
    layers: Literal["auto", "stock", "fused", "compiled"] = opt(
        "auto", "decoder layers of the packed forwards; auto: fused on CUDA for Llama, Mistral, Qwen2, Qwen3",
        experimental=("compiled",))
    grad_clip: float = opt(1.0, "max global grad norm (SFT and alignment)", gt=0.0)
    grad_accum: int = opt(1, "micro-batches per update (generation runs on the whole batch)", ge=1)
    warmup_steps: int | None = opt(None, "linear LR warm-up steps; null: none for the embedded model, 3% of the "
                                         "updates with model.path", ge=0)
    schedule: Schedule = opt("constant", "LR schedule after the warm-up")
    max_nonfinite_steps: int = opt(3, "stop after this many non-finite losses in a row", ge=1)
    max_empty_batches: int = opt(0, "stop after this many batches in a row without a pair of finite rewards; "
                                    "0: one iteration's batches", ge=0)


@dataclass
class LoRAConfig:
    enabled: bool = opt(False, "LoRA through PEFT (pip install 'ple_fast[lora]')")
    r: int = opt(8, "rank (the paper's: 8)", ge=1)
    alpha: int = opt(16, "scaling numerator lora_alpha (the paper's: 16)")
    dropout: float = opt(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: str = opt("all-linear", "comma-separated module names, or all-linear")


@dataclass
class RolloutConfig:
    backend: Literal["fast", "hf"] = opt("fast", "fast (ple_fast.engine) or hf (Hugging Face generate)")
    layers: Literal["auto", "stock", "fused"] = opt("auto", "fast backend: decoder layers of decode steps and "
                                                            "prefill; auto: fused wherever the Triton decode "
                                                            "attention runs (CUDA)")
    merged_projections: bool = opt(False, "fast backend, fused layers: q/k/v and gate/up as one matmul each",
                                   experimental=(True,))
    max_new_tokens: int = opt(24, "cap on generated tokens per response", ge=0)
    temperature: float = opt(1.0, "sampling temperature; 0 = greedy", ge=0.0)
    top_p: float = opt(1.0, "nucleus sampling; 1 = off", gt=0.0)
    top_k: int = opt(0, "top-k sampling; 0 = off", ge=0)


@dataclass
class EvalConfig:
    max_queries: int = opt(256, "held-out queries evaluated", ge=0)
    samples: int = opt(8, "responses per held-out query", ge=1)
    temperature: float = opt(1.0, "0 = greedy", ge=0.0)
    max_new_tokens: int = opt(24, "cap on generated tokens", ge=0)
    batch_size: int = opt(64, "prompts per generate / perplexity batch", ge=1)
    warn_length_change: float = opt(0.5, "warn when the mean response length moves by more than this share "
                                         "from the SFT start", ge=0.0)
    warn_kl: float = opt(20.0, "warn when KL(SFT || policy) per response passes this (nats)", ge=0.0)


@dataclass
class RunBasics:
    """The run keys of both commands."""
    out_dir: str = opt("runs/default", "run folder (also --out)")
    seed: int = opt(0, "seeds data order, sampling and the embedded model's init")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default", ge=0)


@dataclass
class RunConfig(RunBasics):
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (then ple.layout=auto is padded)")
    resume: str | None = opt(None, "auto (newest checkpoint in out_dir) or a checkpoint folder")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only at phase ends)", ge=0)
    keep_last: int = opt(2, "checkpoints kept", ge=1)
    progress: bool = opt(True, "progress bars per phase")
    sample_every: int = opt(1, "write rollout samples every N iterations (0: never)", ge=0)
    plots: bool = opt(True, "PNG plots at the end (needs matplotlib)")
    tensorboard: bool = opt(False, "log to out_dir/tensorboard (needs tensorboard)")
    wandb_project: str | None = opt(None, "log to Weights & Biases (needs wandb)")


@dataclass
class Config:
    """`python -m ple_fast.train`."""
    principle: str | None = opt(None, "principle text prepended to each query for y_p; None = the embedded task's "
                                      "(or a generic one with model.path)")
    experimental: bool = opt(False, "accept values not yet timed on a GPU (marked experimental below)")
    model: ModelConfig = section(ModelConfig, "the policy")
    data: DataConfig = section(DataConfig, "SFT data, queries and held-out data")
    task: TaskConfig = section(TaskConfig, "the embedded task (no model.path)")
    reward: RewardConfig = section(RewardConfig, "the reward r(x, y)")
    sft: SFTConfig = section(SFTConfig, "the SFT warm-up")
    ple: PLEConfig = section(PLEConfig, "the alignment phase: PLE or a baseline")
    rollout: RolloutConfig = section(RolloutConfig, "generation of the responses")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation before and after alignment")
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters")
    run: RunConfig = section(RunConfig, "run folder, device, checkpoints, logging")

    def check(self) -> None:
        """Keys the chosen task would ignore are errors: data without a model folder (the embedded task
        brings its own), the embedded model's shape with one, a reward path the built-in reward ignores."""
        changed = [key for key, f, value in leaves(self) if value != f.default]
        if self.model.path is None:
            data = [key for key in changed if key.startswith("data.")]
            if data:
                raise ConfigError(f"{data[0]} is set but model.path is not: the embedded task brings its own data "
                                  "and model; name the policy folder (model.path=...) to train on data files, or "
                                  "drop the data.* keys to train on the embedded task")
        else:
            shape = [key for key in changed if key in ("model.hidden_size", "model.layers", "model.heads")]
            if shape:
                raise ConfigError(f"{shape[0]} sets the embedded model's shape, but model.path names a model "
                                  "folder, which has its own; drop it")
            task = [key for key in changed if key.startswith("task.")]
            if task:
                raise ConfigError(f"{task[0]} shapes the embedded task, but model.path trains on data files; drop it")
        if self.reward.kind == "builtin" and self.reward.path is not None:
            raise ConfigError("reward.path is set but reward.kind=builtin ignores it: set reward.kind=hf (a "
                              "reward-model folder) or reward.kind=python (module:function)")


# ---- the reward-model trainer (`python -m ple_fast.reward_train`) ----------------------------------

@dataclass
class PreferenceDataConfig:
    path: str | None = opt(None, "preference pairs: HH-RLHF or prompt/chosen/rejected JSONL")
    eval_path: str | None = opt(None, "held-out pairs; defaults to an eval_fraction split of path")
    eval_fraction: float = opt(0.1, "share of path held out when eval_path is unset", ge=0.0, lt=1.0)
    max_pairs: int | None = opt(None, "cap on training pairs (after the split)", ge=1)
    max_eval_pairs: int | None = opt(1000, "cap on held-out pairs", ge=1)
    max_prompt_tokens: int = opt(512, "the prompt's END is kept", ge=1)
    max_response_tokens: int = opt(256, "the response's START is kept", ge=1)
    length_policy: LengthPolicy = opt("truncate", "skip drops a pair when either side is too long")


@dataclass
class RewardTrainingConfig:
    lr: float | None = opt(None, "None: 1e-3 for the embedded model, 1e-5 with model.path", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay of matrices", ge=0.0)
    batch_size: int = opt(16, "pairs per optimizer step", ge=1)
    epochs: int | None = opt(None, "None: 5 for the embedded model, 1 with model.path", ge=1)
    steps: int = opt(0, "> 0: exactly this many steps, overriding epochs", ge=0)
    warmup_steps: int = opt(0, "linear warm-up from 0", ge=0)
    decay: Schedule = opt("constant", "LR after the warm-up (to 0 at the last step)")
    grad_clip: float = opt(1.0, "max grad norm; 0 = off", ge=0.0)
    eval_batch_size: int = opt(32, "pairs per forward at evaluation", ge=1)
    log_every: int = opt(10, "steps per logged line", ge=1)


@dataclass
class RewardRunConfig(RunBasics):
    out_dir: str = opt("runs/reward", "run folder (also --out)")


@dataclass
class RewardTrainConfig:
    """`python -m ple_fast.reward_train`."""
    model: ModelConfig = section(ModelConfig, "the base model of the reward model")
    data: PreferenceDataConfig = section(PreferenceDataConfig, "preference pairs")
    train: RewardTrainingConfig = section(RewardTrainingConfig, "the Bradley-Terry training")
    run: RewardRunConfig = section(RewardRunConfig, "run folder and device")

    def check(self) -> None:
        """The rules between keys (each key's own choices and bounds are checked as it is set)."""
        if self.model.hidden_size % self.model.heads:
            raise ConfigError(f"model.hidden_size={self.model.hidden_size} must be a multiple of "
                              f"model.heads={self.model.heads}")
        if self.model.path is None and (self.data.path or self.data.eval_path):
            raise ConfigError("data.path is set but model.path is not: name the local HF model folder to "
                              "train from (model.path=...), or drop data.* to train on the embedded task")
        if self.model.path is not None and not self.data.path:
            raise ConfigError("model.path is set, so data.path must name preference data "
                              "(HH-RLHF or prompt/chosen/rejected JSONL)")


# ---- defaults by model kind -------------------------------------------------------------------------

# The embedded tiny model trains from scratch and wants large steps; a pretrained policy is wrecked by
# them (a 135M model collapsed to one-line answers in eight updates at 1e-4). With model.path, full
# fine-tuning takes TRL's and OpenRLHF's order of magnitude: SFT 1e-5 (TRL SFTConfig 2e-5, OpenRLHF
# SFT 5e-6), online alignment 1e-6 (TRL GRPOConfig 1e-6, OpenRLHF actor 5e-7 to 1e-6); LoRA moves
# fewer weights and takes ~100x larger steps (2e-4 for SFT as the QLoRA paper, 1e-4 for alignment).
# Warm-ups: OpenRLHF's default lr_warmup_ratio, 3% of the phase's steps.
LEARNING_RATES = {"embedded": (3e-3, 1e-4), "full": (1e-5, 1e-6), "lora": (2e-4, 1e-4)}   # (sft, alignment)
WARMUP_RATIO = 0.03


def model_kind(config: "Config") -> str:
    return "embedded" if config.model.path is None else "lora" if config.lora.enabled else "full"


def resolve_defaults(config: "Config", align_steps: int) -> dict[str, Any]:
    """Fill the learning rates and warm-ups left null by the model kind, so the saved config says what ran;
    returns what was filled (key -> value). Explicit values are kept."""
    kind = model_kind(config)
    sft_lr, align_lr = LEARNING_RATES[kind]
    embedded = kind == "embedded"
    wanted = {("sft", "lr"): sft_lr, ("ple", "lr"): align_lr,
              ("sft", "warmup_steps"): 40 if embedded else math.ceil(WARMUP_RATIO * config.sft.steps),
              ("ple", "warmup_steps"): 0 if embedded else math.ceil(WARMUP_RATIO * align_steps)}
    filled = {}
    for (section, key), value in wanted.items():
        if getattr(getattr(config, section), key) is None:
            setattr(getattr(config, section), key, value)
            filled[f"{section}.{key}"] = value
    return filled


# ---- checking and setting ---------------------------------------------------------------------------

def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check or convert a value (from YAML or a command-line string) to the field's type."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
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
    if origin is Literal:
        text = str(value) if not isinstance(value, (dict, list)) else None
        if text not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(args)}")
        return text
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


def _check_bounds(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    for name, ok, words in (("ge", lambda b: value >= b, "at least"), ("gt", lambda b: value > b, "greater than"),
                            ("lt", lambda b: value < b, "less than"), ("le", lambda b: value <= b, "at most")):
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ConfigError(f"{key}: must be {words} {bound}, got {value!r}")


def set_key(config, dotted: str, value: Any) -> None:
    """config.<a>.<b> = value, with checking and 'did you mean' suggestions."""
    parts = dotted.split(".")
    node, path = config, []
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            prefix = ".".join(path)
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise ConfigError(f"unknown config key {dotted!r}" + _suggest(".".join(path + [part]), valid))
        path.append(part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: is a section; set its keys, e.g. {dotted}.<key>=...")
                for sub, sub_value in value.items():
                    set_key(config, f"{dotted}.{sub}", sub_value)
                return
            coerced = _coerce(value, typing.get_type_hints(type(node))[part], dotted)
            _check_bounds(coerced, fields[part].metadata, dotted)
            setattr(node, part, coerced)
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{'.'.join(path)} is a value, not a section (in {dotted!r})")


def leaves(config, prefix: str = ""):
    """(dotted key, field, value) of every value in the tree, sections in order."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def check_experimental(config) -> None:
    """Values not yet timed on a GPU need experimental=true."""
    if getattr(config, "experimental", False):
        return
    for key, f, value in leaves(config):
        if value in f.metadata.get("experimental", ()):
            raise ConfigError(f"{key}={str(value).lower() if isinstance(value, bool) else value} is experimental "
                              "(not yet timed on a GPU); set experimental=true to use it")


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


def apply_mapping(config, data: dict, source: str) -> None:
    for key, value in data.items():
        try:
            set_key(config, str(key), value)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'ple.tau0=0.5' -> ('ple.tau0', 0.5); the value is read as YAML (numbers, true, null)."""
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


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def build_config(yaml_path: str | None = None, overrides: typing.Sequence[str] = (), *, base=None,
                 values: typing.Mapping[str, Any] | None = None, source: str = "grid"):
    """Defaults (a Config, or `base`: e.g. a RewardTrainConfig), the YAML file, the key=value overrides,
    then `values` (dotted key -> value, e.g. a sweep cell's; errors name `source`)."""
    config = Config() if base is None else base
    if yaml_path:
        apply_mapping(config, load_yaml(yaml_path), str(yaml_path))
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_key(config, key, value)
        except ConfigError as err:
            raise ConfigError(f"command line: {err}") from None
    if values:
        apply_mapping(config, values, source)
    check_experimental(config)
    config.check()
    return config


# ---- the reference, generated from the fields ------------------------------------------------------

def _type_words(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    name = getattr(base, "__name__", str(base))
    return name + (" or null" if args else "")


def _show(value: Any) -> str:
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _row(name: str, f: dataclasses.Field, annotation: Any) -> str:
    meta = f.metadata
    bounds = ", ".join(f"{sym} {meta[b]}" for b, sym in (("ge", ">="), ("gt", ">"), ("lt", "<"), ("le", "<="))
                       if meta.get(b) is not None)
    marked = "; experimental: " + ", ".join(map(_show, meta["experimental"])) if meta.get("experimental") else ""
    return (f"| `{name}` | {_type_words(annotation)}{f' ({bounds})' if bounds else ''} | {_show(f.default)} | "
            f"{meta.get('help', '')}{marked} |")


def reference(config_type: type) -> str:
    """A markdown table per section of `config_type`: key, type or choices, default, meaning."""
    head = ["| key | values | default | meaning |", "|---|---|---|---|"]
    hints, top, sections = typing.get_type_hints(config_type), [], []
    for f in dataclasses.fields(config_type):
        if f.default_factory is dataclasses.MISSING:
            top.append(_row(f.name, f, hints[f.name]))
            continue
        inner = typing.get_type_hints(f.default_factory)
        sections += [f"### `{f.name}`: {f.metadata.get('help', '')}", "", *head,
                     *(_row(f"{f.name}.{g.name}", g, inner[g.name]) for g in dataclasses.fields(f.default_factory)), ""]
    return "\n".join((["### top level", "", *head, *top, ""] if top else []) + sections)


def help_epilog(config_type: type, example: str) -> str:
    """The --help text after the options: the sections, the shipped configs, where every key is listed."""
    sections = "\n".join(f"  {f.name:<10} {f.metadata.get('help', '')}" for f in dataclasses.fields(config_type)
                         if f.default_factory is not dataclasses.MISSING)
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    return (f"Any config key can be set as key=value, e.g. {example}. Sections:\n{sections}\n"
            + (f"Shipped configs (--config NAME): {shipped}.\n" if config_type is Config else "")
            + "Every key, its choices, bounds and default: docs/config.md (python -m ple_fast.config).")


def reference_document() -> str:
    """docs/config.md: both commands' keys."""
    return "\n".join([
        "# Configuration reference", "",
        "Generated from the fields of `ple_fast/config.py` by `python -m ple_fast.config > docs/config.md`;",
        "a test fails when this file and the fields disagree. Set keys in a YAML file (`--config`), as",
        "dotted `key=value` arguments (applied on top), or both.", "",
        "## `python -m ple_fast.train`", "", reference(Config),
        "## `python -m ple_fast.reward_train`", "", reference(RewardTrainConfig)])


if __name__ == "__main__":
    sys.stdout.write(reference_document())
