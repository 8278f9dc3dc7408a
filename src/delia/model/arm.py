"""An arm's model and generator: the base model, the new tokens of an untrained arm, a trained arm's
adapter, and the configured backend over them (`delia.arms` says which arm is which)."""

from __future__ import annotations

from pathlib import Path

from ..arms import ARMS
from ..config import RunConfig
from ..errors import DeliaError
from ..runfolder import RunFolder, world

WEIGHTS_HERE = ("local", "ctranslate2")
"""Backends that run the weights on this machine: an arm's model can be changed (a control token added)."""


def base_model(cfg: RunConfig):
    """The base model on `model.device` in `model.dtype` (training: the Trainer places it under accelerate)."""
    from .loading import load_model, model_source

    return load_model(model_source(cfg.model), cfg.model.dtype, cfg.model.trust_remote_code,
                      "cpu" if world()[1] > 1 else cfg.model.device)


def placement_of(cfg: RunConfig) -> str:
    """Where this machine puts the model, for the manifests: e.g. `cpu float32`."""
    from .loading import placement

    return " ".join(placement(cfg.model.device, cfg.model.dtype))


def adapter_of(cfg: RunConfig, arm: str) -> Path:
    """A trained arm's adapter folder; one line if it was not trained yet."""
    adapter = RunFolder(cfg.run_dir).adapter(arm)
    if not (adapter / "adapter_config.json").exists():
        raise DeliaError(f"{adapter}: no adapter; run `delia train` for arm '{arm}' first")
    return adapter


def arm_model(cfg: RunConfig, arm: str, extra_tokens: tuple[str, ...] = ()):
    """(model, tokenizer) of an arm on this machine, for inference: the base model, its new tokens
    initialised for a `token_init` arm, a trained arm's adapter merged in (one matrix a layer, and PEFT's
    trainable-token layer no longer rebuilds the embedding matrix at every forward pass: about a fifth
    of a decoding step). `extra_tokens`: see `add_control_tokens`."""
    from .tokens import add_new_tokens

    a = ARMS[arm]
    model, tokenizer = base_model(cfg)
    if a.trained:
        from .adapter import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, adapter_of(cfg, arm))
        model = model.merge_and_unload()
    elif a.token_init:  # the new token added, its row initialised, nothing trained
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, a.token_init, cfg.task.description, cfg.seed)
    add_control_tokens(cfg, model, tokenizer, extra_tokens)
    return model, tokenizer


def add_control_tokens(cfg: RunConfig, model, tokenizer, tokens: tuple[str, ...]) -> None:
    """Add never-trained `tokens` to an arm's model in place, last, with `train.token_init` and the seed."""
    from .tokens import add_new_tokens

    if tokens:
        add_new_tokens(model, tokenizer, list(tokens), cfg.train.token_init, cfg.task.description, cfg.seed)


def needs_export(cfg: RunConfig, arm: str) -> bool:
    """Whether the arm's generator reads it as a merged model folder (`delia export`): a trained arm on
    vLLM or CTranslate2 (with a control token added, CTranslate2 converts the model in memory instead)."""
    return ARMS[arm].trained and cfg.generation.backend in ("vllm", "ctranslate2")


def arm_generator(cfg: RunConfig, arm: str, batch_size: int, extra_tokens: tuple[str, ...] = (),
                  export: Path | None = None):
    """The configured backend over an arm's model: the base model for an untrained arm, else base +
    adapter (local), the merged `export` folder (vllm, ctranslate2; see `needs_export`), or the server
    model named by `generation.server_model` with `{arm}` filled in (openai). `extra_tokens` (weights on
    this machine only): see `arm_model`."""
    from .backends import make_generator
    from .generate import LocalGenerator

    a = ARMS[arm]
    if cfg.generation.backend not in a.backends or (extra_tokens and cfg.generation.backend not in WEIGHTS_HERE):
        raise DeliaError(f"arm '{arm}': evaluated with the local backend only (generation.backend is "
                         f"{cfg.generation.backend!r})")
    if cfg.generation.backend == "openai":
        name = cfg.generation.server_model or cfg.model.name
        if a.trained and "{arm}" not in name:
            raise DeliaError(f"generation.server_model: evaluating arm '{arm}' over HTTP needs '{{arm}}' in the name, "
                             f"so each arm reaches its own model (e.g. `delia serve CONFIG --name {arm} --adapter "
                             f"{RunFolder(cfg.run_dir).adapter(arm)}`)")
        return make_generator(cfg.model, cfg.generation, batch_size, served_name=name.replace("{arm}", arm))
    if cfg.generation.backend == "vllm" or (cfg.generation.backend == "ctranslate2" and not extra_tokens):
        if a.trained and export is None:
            raise ValueError(f"arm '{arm}' on {cfg.generation.backend}: pass its merged export folder")
        return make_generator(cfg.model, cfg.generation, batch_size, path=str(export) if a.trained else "")
    model, tokenizer = arm_model(cfg, arm, extra_tokens)
    if cfg.generation.backend == "ctranslate2":  # with a control token: the model as it is in memory
        from .backends import ct2_device
        from .ct2 import CT2Generator

        return CT2Generator.from_model(model, tokenizer, batch_size=batch_size, compute_type=cfg.generation.compute_type,
                                       device=ct2_device(cfg.model.device), threads=cfg.generation.threads,
                                       workers=cfg.generation.workers)
    if a.decoding == "arithmetic":
        from .arithmetic import ArithmeticGenerator

        return ArithmeticGenerator(model, tokenizer, cfg.task, cfg.baselines.arithmetic_lambda, batch_size)
    if a.decoding == "gist":
        from .gist import GistGenerator

        return GistGenerator(model, tokenizer, cfg.task.new_tokens, batch_size)
    if a.decoding == "steering":  # the vector from 16 training rows, at the middle block
        from ..runfolder import read_jsonl
        from .steering import SteeringGenerator, decoder_layers, steering_vector

        layer = len(decoder_layers(model)) // 2
        rows = read_jsonl(RunFolder(cfg.run_dir).task_train)[:16]
        vector = steering_vector(model, tokenizer, rows, cfg.task, layer)
        return SteeringGenerator(model, tokenizer, vector, layer, tokenizer.convert_tokens_to_ids(cfg.task.new_tokens),
                                 batch_size)
    return LocalGenerator(model, tokenizer, batch_size)
