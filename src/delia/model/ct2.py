"""The `ctranslate2` backend: CTranslate2's generator over a model converted once into the cache.

A model folder (the embedded model's cache folder, a Hub model's, or a trained arm's merged export) is
converted with CTranslate2's own Transformers converter into `$DELIA_CACHE/ct2/KEY-COMPUTE_TYPE`, KEY
being a hash of the folder's weights, config and tokenizer files and of the CTranslate2 version: the
same weights are converted once, whatever their path. A model held in memory (an arm with a control
token added) is saved to a temporary folder first and keyed the same way.

Prompts are made with the Hugging Face chat template and tokenizer, so every backend sees the same
token ids; requests are batched as the local backend batches them (sorted by prompt length), and each
batch draws from its own seed (`batch_seed`), so the generation cache resumes as it does locally (a sampling batch reloads the model to
take its seed: about half a second for a 135M model).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .. import DeliaError
from ..runfolder import atomic_dir
from .generate import Request, batch_seed, length_sorted_chunks
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
    """Same contract as `LocalGenerator.batches`. `threads` 0 is CTranslate2's default (every core)."""

    def __init__(self, folder: str | Path, batch_size: int = 16, compute_type: str = "int8", device: str = "cpu",
                 threads: int = 0, trust_remote_code: bool = False):
        ct2 = _ctranslate2()
        self.tokenizer = load_tokenizer(str(folder), trust_remote_code)
        self.batch_size = batch_size
        self.compute_type = compute_type
        self.path = converted(folder, compute_type, trust_remote_code)
        self._load = lambda: ct2.Generator(str(self.path), device=device, compute_type=compute_type,
                                           intra_threads=threads)
        self.generator = self._load()
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

    def prompt_ids(self, request: Request) -> list[int]:
        if request.text:
            return self.tokenizer(request.text, add_special_tokens=False)["input_ids"]
        text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        ct2 = _ctranslate2()
        sampling = temperature > 0
        for chunk in length_sorted_chunks([(self.prompt_ids(r), r) for r in requests], self.batch_size):
            if sampling:
                # CTranslate2 seeds a worker thread's random generator once, when the thread first
                # samples (OpenNMT/CTranslate2#1757): the batch's seed takes effect in a fresh generator
                ct2.set_random_seed(batch_seed(seed, [r.key for _, r in chunk]) % (2**31))
                del self.generator
                self.generator = self._load()
            results = self.generator.generate_batch(
                [self.tokenizer.convert_ids_to_tokens(ids) for ids, _ in chunk],
                max_length=max_new_tokens, include_prompt_in_result=False, end_token=self._stop,
                sampling_topk=0 if sampling else 1, sampling_topp=top_p if sampling else 1.0,
                sampling_temperature=temperature if sampling else 1.0)
            yield [(request, self.tokenizer.decode(res.sequences_ids[0], skip_special_tokens=True).strip(),
                    len(res.sequences_ids[0])) for (_, request), res in zip(chunk, results)]


def _generation_eos(folder: Path) -> list[int]:
    """The end-of-turn ids in the folder's generation config (the local backend stops on them too)."""
    import json

    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos]
