"""The `ctranslate2` backend: CTranslate2's generator over a model converted once into the cache.

A model folder (the embedded model's cache folder, a Hub model's, or a trained arm's merged export) is
converted with CTranslate2's own Transformers converter into `$DELIA_CACHE/ct2/KEY-COMPUTE_TYPE`, KEY
being a hash of the folder's weights, config and tokenizer files and of the CTranslate2 version: the
same weights are converted once, whatever their path. A model held in memory (an arm with a control
token added) is saved to a temporary folder first and keyed the same way.

Prompts are made with the Hugging Face chat template and tokenizer, so every backend sees the same
token ids; requests are batched as the local backend batches them (sorted by prompt length), and each
batch draws from its own seed (`batch_seed`), so the generation cache resumes as it does locally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DeliaError
from ..runfolder import atomic_dir
from .generate import Request, batch_seed, length_sorted_chunks, request_ids
from .loading import cache_dir, load_tokenizer

KEYED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise DeliaError("generation.backend 'ctranslate2': ctranslate2 is not installed "
                         "(pip install 'ctranslate2>=4.5,<5')") from None
    return ctranslate2


def content_key(folder: Path) -> str:
    """A hash of what the conversion reads: weights, config and tokenizer files (names and bytes)."""
    digest = hashlib.sha256(_ctranslate2().__version__.encode())
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + \
        [folder / n for n in KEYED_FILES if (folder / n).exists()]
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:20]


def converted(folder: str | Path, compute_type: str, trust_remote_code: bool = False) -> Path:
    """The CTranslate2 model of a Hugging Face model folder, converted on first use (whole or not at all)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise DeliaError(f"generation.backend 'ctranslate2': {folder} is not a local model folder with a "
                         "config.json (download the model first, or point model.name at its folder)")
    target = cache_dir() / "ct2" / f"{content_key(folder)}-{compute_type}"
    if (target / "model.bin").exists():
        return target
    from ctranslate2.converters import TransformersConverter

    print(f"delia: converting {folder} to CTranslate2 {compute_type} in {target} (once)", flush=True)
    with atomic_dir(target) as tmp:
        try:
            TransformersConverter(str(folder), low_cpu_mem_usage=True, trust_remote_code=trust_remote_code).convert(
                str(tmp), quantization=compute_type, force=True)
        except ValueError as e:  # an architecture CTranslate2 does not convert
            raise DeliaError(f"generation.backend 'ctranslate2': cannot convert {folder}: {e}") from None
    return target


class CT2Generator:
    """Same contract as `LocalGenerator.batches`. A batch is split into `workers` parts decoded at once,
    each on `threads` threads (0: the cores shared out); on a 2-core CPU two one-thread workers give
    about 1.3x the tokens/s of one two-thread worker (benchmarks/RESULTS.md). Greedy batches go to one
    generator whose workers share the weights. A sampling part gets a generator of its own, loaded
    after its seed is set: CTranslate2 seeds a worker thread's random generator once, when that thread
    first samples (OpenNMT/CTranslate2#1757), so each part's seed (from its requests' keys) takes effect
    only in a fresh generator (about half a second per part for a 135M model)."""

    def __init__(self, folder: str | Path, batch_size: int = 16, compute_type: str = "int8", device: str = "cpu",
                 threads: int = 0, trust_remote_code: bool = False, workers: int = 0):
        ct2 = _ctranslate2()
        self.tokenizer = load_tokenizer(str(folder), trust_remote_code)
        self.batch_size = batch_size
        self.compute_type = compute_type
        self.window = _faithful_window(Path(folder))  # before the conversion: a model it cannot decode is refused
        self.path = converted(folder, compute_type, trust_remote_code)
        cores = os.cpu_count() or 1
        self.workers = workers or (1 if device == "cuda" else min(2, cores))
        intra = threads or max(1, cores // self.workers)
        self._load = lambda inter: ct2.Generator(str(self.path), device=device, compute_type=compute_type,
                                                 intra_threads=intra, inter_threads=inter)
        self.generator = self._load(self.workers)
        self._stop = sorted({i for i in (self.tokenizer.eos_token_id, *_generation_eos(Path(folder))) if i is not None})

    @classmethod
    def from_model(cls, model, tokenizer, **kw) -> "CT2Generator":
        """Over a model held in memory (merged, no adapter): saved to a temporary folder, converted once."""
        cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ct2-src.", dir=cache_dir()))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return cls(tmp, **kw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _seeded(self, seed: int):
        """A one-worker generator whose worker thread has drawn its random generator from `seed`."""
        ct2 = _ctranslate2()
        ct2.set_random_seed(seed)
        generator = self._load(1)
        generator.generate_batch([[self.tokenizer.convert_ids_to_tokens(self._stop[0])]], max_length=1,
                                 sampling_topk=0, include_prompt_in_result=False)  # the worker's first draw: seeded now
        return generator

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        sampling = temperature > 0
        options = dict(max_length=max_new_tokens, include_prompt_in_result=False, end_token=self._stop,
                       sampling_topk=0 if sampling else 1, sampling_topp=top_p if sampling else 1.0,
                       sampling_temperature=temperature if sampling else 1.0)
        with ThreadPoolExecutor(self.workers) as pool:
            for chunk in length_sorted_chunks([(request_ids(self.tokenizer, r), r) for r in requests], self.batch_size):
                if self.window and (longest := max(len(ids) for ids, _ in chunk)) + max_new_tokens > self.window:
                    raise DeliaError(f"generation.backend 'ctranslate2': a prompt of {longest} tokens and "
                                     f"{max_new_tokens} new ones pass this model's sliding window of {self.window}, "
                                     "which CTranslate2 does not apply; use the local backend")
                tokens = [self.tokenizer.convert_ids_to_tokens(ids) for ids, _ in chunk]
                if sampling:
                    size = -(-len(chunk) // self.workers)
                    parts = [(start, start + size) for start in range(0, len(chunk), size)]
                    generators = [self._seeded(batch_seed(seed, [r.key for _, r in chunk[a:b]]) % (2**31))
                                  for a, b in parts]
                    results = [res for done in pool.map(lambda g, ab: g.generate_batch(tokens[ab[0]:ab[1]], **options),
                                                        generators, parts) for res in done]
                    del generators
                else:
                    results = self.generator.generate_batch(tokens, max_batch_size=-(-len(chunk) // self.workers),
                                                            **options)
                yield [(request, self.tokenizer.decode(res.sequences_ids[0], skip_special_tokens=True).strip(),
                        len(res.sequences_ids[0])) for (_, request), res in zip(chunk, results)]


def _faithful_window(folder: Path) -> int:
    """Tokens a sequence may span for CTranslate2 to decode the model as transformers does: CTranslate2
    attends over the whole sequence and scales attention by the head size, so a model with sliding-window
    layers (Gemma 3) is decoded faithfully only within its window, and one whose attention scale is another
    (Gemma's `query_pre_attn_scalar`) not at all; 0 = no limit."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    config = config.get("text_config", config)
    scalar, head = config.get("query_pre_attn_scalar"), config.get("head_dim")
    if scalar is not None and head is not None and scalar != head:
        raise DeliaError(f"generation.backend 'ctranslate2': {folder} scales attention by query_pre_attn_scalar "
                         f"{scalar}, not its head size {head}, which CTranslate2 does not; use the local backend")
    sliding = "sliding_attention" in (config.get("layer_types") or []) or config.get("use_sliding_window")
    return int(config.get("sliding_window") or 0) if sliding else 0


def _generation_eos(folder: Path) -> list[int]:
    """The end-of-turn ids of the folder's generation config (the local backend stops on them too)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        return []
    return eos if isinstance(eos, list) else [eos]
