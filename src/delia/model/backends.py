"""The generator factory: the configured backend (`generation.backend`) over a model, above the
backends themselves (`delia.model.generate`: local, vLLM, OpenAI-compatible; `delia.model.ct2`)."""

from __future__ import annotations

from ..errors import DeliaError
from .generate import Generator, LocalGenerator, OpenAIGenerator, VLLMGenerator


def make_generator(model_cfg, gen_cfg, batch_size: int, path: str = "", served_name: str = "") -> Generator:
    """The configured backend over the base model, or over `path` (a model folder: local and vllm) or
    `served_name` (the name a server knows: openai)."""
    if gen_cfg.backend == "openai":
        return OpenAIGenerator(gen_cfg.base_url, served_name or gen_cfg.server_model or model_cfg.name, batch_size,
                               gen_cfg.concurrency, gen_cfg.max_retries, gen_cfg.timeout, gen_cfg.api_key_env)
    if gen_cfg.backend == "vllm":
        from .loading import model_source, resolve_model

        return VLLMGenerator(path or resolve_model(model_source(model_cfg)), max(batch_size, gen_cfg.vllm_batch_size),
                             gen_cfg.tensor_parallel_size, gen_cfg.gpu_memory_utilization,
                             "auto" if model_cfg.dtype in ("auto", "float32") else model_cfg.dtype, model_cfg.trust_remote_code)
    from .loading import load_model, model_source, resolve_model

    if gen_cfg.backend == "ctranslate2":
        from .ct2 import CT2Generator

        return CT2Generator(path or resolve_model(model_source(model_cfg)), batch_size, gen_cfg.compute_type,
                            ct2_device(model_cfg.device), gen_cfg.threads, model_cfg.trust_remote_code, gen_cfg.workers)
    model, tokenizer = load_model(path or model_source(model_cfg), model_cfg.dtype, model_cfg.trust_remote_code, model_cfg.device)
    return LocalGenerator(model, tokenizer, batch_size)


def ct2_device(device: str) -> str:
    """`model.device` for CTranslate2: `auto` is CUDA when CTranslate2 sees a GPU, else the CPU."""
    if device == "cpu":
        return device
    import ctranslate2

    cuda = ctranslate2.get_cuda_device_count() > 0
    if device == "cuda" and not cuda:
        raise DeliaError("model.device: cuda, but CTranslate2 sees no CUDA GPU on this machine (use auto or cpu)")
    return "cuda" if cuda else "cpu"


def generation_placement(cfg) -> str:
    """Where generation runs, for the manifests: `cpu float32`, `ctranslate2 cpu int8`, or the backend."""
    from .loading import placement

    gen = cfg.generation
    if gen.backend == "ctranslate2":
        return f"ctranslate2 {ct2_device(cfg.model.device)} {gen.compute_type}"
    return " ".join(placement(cfg.model.device, cfg.model.dtype)) if gen.backend == "local" else gen.backend
