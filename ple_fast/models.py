"""Policy models: load a local Hugging Face folder, or build the embedded tiny Llama.

Nothing here downloads: every load is `local_files_only`, and the embedded model and its
word-level tokenizer are built from the task's own text.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from ple_fast.config import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def build_word_tokenizer(texts: list[str]):
    """A whitespace word-level tokenizer covering `texts`, saved and loaded like any HF one."""
    specials = ["<pad>", "<unk>", "<eos>"]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", padding_side="left")


def build_tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, max_positions: int = 128, seed: int = 0,
                     pad_token_id: int = 0, eos_token_id: int = 2):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=hidden_size * 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = None
    return model


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model_dir(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} has no config.json: "
                                "expected a Hugging Face model folder (config, safetensors, tokenizer)")
    return folder


def load_tokenizer(path: str | os.PathLike):
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(f"tokenizer in {str(path)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """A local HF causal-LM folder -> (model, tokenizer). Fails fast on a wrong model type."""
    folder = check_model_dir(path, "policy model")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        raise InputError(f"{str(folder)!r} is not a causal language model: its architectures are "
                         f"{architectures} (expected e.g. LlamaForCausalLM)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except ValueError as err:
        raise InputError(f"{str(folder)!r} is not a causal language model "
                         f"(model_type={config.model_type!r}): {err}") from err
    missing = [k for k in info.get("missing_keys", ()) if "lm_head" not in k or not config.tie_word_embeddings]
    if missing:
        raise InputError(f"{str(folder)!r}: the checkpoint lacks {len(missing)} weights of "
                         f"{type(model).__name__}, e.g. {sorted(missing)[:3]}")
    tokenizer = load_tokenizer(folder)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def save_policy(model: nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """An HF folder that AutoModelForCausalLM.from_pretrained loads back (safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer trunk whose output is the final (normed) hidden state."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    trunk = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if trunk is None:
        raise TypeError(f"cannot find the decoder trunk of {type(model).__name__}")
    return trunk


def head_dim(config) -> int:
    """Attention head size: the config's head_dim where it has one (Qwen3, Gemma), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def output_head(model: nn.Module) -> tuple[torch.Tensor, float | None]:
    """(lm_head weight, final-logit softcap or None). Biased heads are not supported."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"{type(model).__name__} has a biased lm_head, which the fused loss "
                                  "does not support")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head.weight, softcap


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP / torch.compile / PEFT wrappers (LoRA layers stay in place)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):             # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module                                                   # DDP / FSDP
    if not hasattr(model, "config") or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM (no config or no output embeddings)")
    return model
