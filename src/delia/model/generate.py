"""One generation interface (`Generator`), four backends: local transformers (batched), CTranslate2
(`delia.model.ct2`), vLLM offline (`vllm.LLM`, tensor parallel on GPUs) and any OpenAI-compatible server; model arithmetic decodes
through the same interface (`delia.model.arithmetic`).

Local requests are sorted by prompt length and left-padded, so a batch wastes little compute on padding;
each batch draws from its own seed, derived from the run seed and the keys of its requests, so a
resumed run produces the same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..errors import DeliaError


@dataclass
class Request:
    key: str
    """A stable identity of the request (used for caching and for the batch seed)."""
    messages: list[dict]
    text: str = ""
    """A raw prompt, already in the model's template (Magpie-style query generation); local backend only."""
    prefix: tuple[int, ...] = ()
    """Answer tokens already decided (greedy tokens found by teacher forcing, `delia.analysis.drift`): the
    answer goes on from them, they count toward `max_new_tokens` and are part of the text and count
    returned; only for generators whose `continues_prefixes` is true."""


class Generator(Protocol):
    """What every backend does: answer requests batch by batch."""

    batch_size: int

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        """Yield, batch by batch, (request, generated text, generated token count); temperature 0 is
        greedy; each batch (or request) draws from a seed derived from `seed` and its requests' keys."""
        ...


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{seed}|{'|'.join(keys)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def length_sorted_chunks(encoded: list[tuple[list[int], Request]], batch_size: int):
    """(prompt ids, request) pairs in batches of similar prompt length (ties in request order): little
    padding, and the same batches again for the requests a resumed run still has to answer."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start : start + batch_size]]


def request_ids(tokenizer, request: Request) -> list[int]:
    """A request's prompt as token ids: its raw text as it is, else its messages through the chat template."""
    if request.text:
        return tokenizer(request.text, add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
         k: int = 64) -> torch.Tensor:
    """The next token of each row of float32 `logits` [rows, vocabulary]: the argmax at temperature 0, else
    what transformers' sampling draws, op for op (the logits over the temperature, those outside the
    top-p `nucleus` at -inf, softmax, `torch.multinomial`): the same tokens from the same random state, so
    the same sampled rows as before this function, only the nucleus is found without sorting the vocabulary."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_p < 1:
        scores = scores.masked_fill(~nucleus(scores, top_p, k), float("-inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]


def draw_live(logits: torch.Tensor, live: list[int], rows: int, temperature: float, top_p: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """`draw` for the `live` rows of a batch of `rows`, given their logits alone: sampling draws for every
    row, an ended one from a one-token distribution, since `torch.multinomial` then takes the same random
    numbers for the live rows as when every row's logits are there (the same tokens as transformers'
    `generate`, which computes every row to the end)."""
    if temperature <= 0:
        return logits.argmax(-1)
    index = torch.tensor(live, device=logits.device)
    every = logits.new_full((rows, logits.shape[-1]), float("-inf"))
    every[:, 0] = 0.0
    return draw(every.index_copy_(0, index, logits), temperature, top_p, generator)[index]


def nucleus(scores: torch.Tensor, top_p: float, k: int = 64) -> torch.Tensor:
    """Which tokens transformers' top-p warper keeps ([rows, vocabulary], bool): a token stays while the
    mass ranked above it is under `top_p`. Looked for among the `k` most probable tokens, and in the
    full ranking only for rows whose nucleus is larger (a sort of the vocabulary was a fifth of a
    sampling step)."""
    def kept(probs, ranked, order):  # over the vocabulary: the ranked tokens whose mass above is under top_p
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, (ranked.cumsum(-1) - ranked) < top_p)

    probs = torch.softmax(scores, -1)
    ranked, order = probs.topk(min(k, probs.shape[-1]), -1)
    keep = kept(probs, ranked, order)
    wide = ranked.sum(-1) < top_p  # the nucleus goes beyond the k-th token
    if wide.any():
        keep[wide] = kept(probs[wide], *probs[wide].sort(-1, descending=True))
    return keep


class _Sampler:
    """Sampling (`draw`) as the last logits processor of transformers' greedy search: every token but the
    drawn one is set to -inf, so the argmax takes it."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        token = draw(scores, self.temperature, self.top_p)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


def answer_of(tokenizer, request: Request, generated: list[int], eos, max_new_tokens: int) -> tuple[str, int]:
    """(text, token count) of a request's answer: its prefix and the generated tokens up to the first in
    `eos` and to `max_new_tokens` in all."""
    row = list(request.prefix) + generated
    n = next((j for j, tok in enumerate(row) if tok in eos), len(row))
    n = min(n, max_new_tokens)
    return tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n


def step_rows(out: list[list[int]], live: list[int], tokens: list[int], steps: list[int], eos, ended: set[int]) -> list[int]:
    """One decoding step's bookkeeping: row `live[j]` gets `tokens[j]` unless it is a stop token or the row
    has `ended`; a row ends at a stop token or at its `steps` tokens. The positions j of the rows going on."""
    going = []
    for j, (i, tok) in enumerate(zip(live, tokens)):
        if i not in ended and tok not in eos:
            out[i].append(tok)
        if i in ended or tok in eos or len(out[i]) >= steps[i]:
            ended.add(i)
        else:
            going.append(j)
    return going


class LocalGenerator:
    continues_prefixes = True
    """It goes on from a request's `prefix` (the subclasses that change the logits do not)."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return request_ids(self.tokenizer, Request(key="", messages=messages))

    def batches(
        self,
        requests: Sequence[Request],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        should_stop: Callable[[], bool] | None = None,
        streamer=None,
    ) -> Iterator[list[tuple[Request, str, int]]]:
        """Yield, batch by batch, (request, generated text, generated token count); `should_stop()` true
        (checked every step) ends a batch early with what it has (a server whose client went away); a
        `streamer` (transformers' streamers, one request per batch) gets the tokens as they are made."""
        encoded = [(request_ids(self.tokenizer, r) + list(r.prefix), r) for r in requests]
        pad = self.tokenizer.pad_token_id
        eos = self._stop_ids()
        self.model.eval()
        for chunk in length_sorted_chunks(encoded, self.batch_size):
            width = max(len(ids) for ids, _ in chunk)
            steps = [max_new_tokens - len(r.prefix) for _, r in chunk]
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in chunk])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in chunk])
            if temperature > 0:
                torch.manual_seed(batch_seed(seed, [r.key for _, r in chunk]))
            if should_stop is None and streamer is None:
                rows = self._decode(input_ids, attention, steps, eos, temperature, top_p)
                yield [(request, *answer_of(self.tokenizer, request, row, eos, max_new_tokens))
                       for row, (_, request) in zip(rows, chunk)]
                continue
            from .cache import decoding_cache

            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=attention.to(self.model.device),
                    max_new_tokens=max(max(steps), 1),
                    do_sample=False,  # sampling is the last logits processor's (`draw`)
                    logits_processor=[_Sampler(temperature, top_p)] if temperature > 0 else None,
                    past_key_values=decoding_cache(self.model),
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    stopping_criteria=_stop_when(should_stop) if should_stop else None,
                    streamer=streamer,
                )
            yield [(request, *answer_of(self.tokenizer, request, row, eos, max_new_tokens))
                   for row, (_, request) in zip(out[:, width:].tolist(), chunk)]

    def _decode(self, input_ids: torch.Tensor, attention: torch.Tensor, steps: list[int], eos,
                temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
        """Answers of left-padded prompts, each up to its `steps` tokens, as transformers' `generate` decodes
        them (greedy, or sampled by `draw` from the global random state), except that a row that has ended
        leaves the batch (its key cache rows are dropped): no step computes a finished row. Sampling still
        draws for every row of the batch, an ended one from a one-token distribution: `torch.multinomial`
        takes the same random numbers for the others as when every row is computed, so they draw the same
        tokens as `generate` does."""
        from .cache import decoding_cache

        device = self.model.device
        mask = attention.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out: list[list[int]] = [[] for _ in steps]
        live = [i for i, n in enumerate(steps) if n > 0]
        ids, past, ended = input_ids.to(device)[live], decoding_cache(self.model), set()
        mask, positions = mask[live], positions[live]
        with torch.inference_mode():
            while live:
                result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                                    use_cache=True, logits_to_keep=1)
                past = result.past_key_values
                logits = result.logits[:, -1].float()
                picks = draw_live(logits, live, len(steps), temperature, top_p)
                keep = step_rows(out, live, picks.tolist(), steps, eos, ended)
                if not keep:
                    break
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=device)
                    past.batch_select_indices(index)
                    picks, mask, positions = picks[index], mask[index], positions[index]
                    live = [live[j] for j in keep]
                ids = picks[:, None]
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], -1)
                positions = positions[:, -1:] + 1
        return out

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)


def _stop_when(should_stop: Callable[[], bool]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stop()])


class OpenAIGenerator:
    """Chat completions from any OpenAI-compatible server (vLLM serve, TGI, SGLang, llama.cpp server,
    `delia serve`, a hosted API), with bounded concurrency and retries with exponential backoff and
    jitter on 429, 5xx, timeouts and dropped connections. The API key is read from the environment
    variable named `api_key_env` and is only ever put in the request header."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, batch_size: int = 16, concurrency: int = 8,
                 max_retries: int = 6, timeout: float = 120.0, api_key_env: str = "", backoff: float = 0.5):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIGenerator(url={self.url!r}, model={self.model!r})"

    def _one(self, request: Request, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        body = json.dumps({"model": self.model, "messages": request.messages, "max_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p,
                           "seed": batch_seed(seed, [request.key]) % (2**31)}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        jitter = random.Random(request.key)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0) * (0.5 + jitter.random()))
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                choice = data["choices"][0]
                tokens = (data.get("usage") or {}).get("completion_tokens", 0)
                return (choice["message"]["content"] or "").strip(), tokens
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY_STATUS:
                    raise DeliaError(f"{self.url}: HTTP {e.code} {e.reason} (not retried)") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError, KeyError) as e:
                last = type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:120]}"
        raise DeliaError(f"{self.url}: gave up after {self.max_retries} retries (last error: {last}); "
                         f"finished rows are kept, rerun to continue")

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        """Same contract as LocalGenerator.batches. A batch whose request failed for good first yields
        the rows that did arrive, then raises."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                futures = [pool.submit(self._one, r, max_new_tokens, temperature, top_p, seed) for r in chunk]
                done, error = [], None
                for r, f in zip(chunk, futures):
                    try:
                        text, n = f.result()
                        done.append((r, text, n))
                    except Exception as e:  # noqa: BLE001 - re-raised after the good rows are out
                        error = error or e
                if done:
                    yield done
                if error:
                    raise error


class VLLMGenerator:
    """vLLM's offline engine over a model folder (a Hub id, the embedded model's cache folder, or a run's
    `delia export` of a trained arm). Prompts go in as token ids made with the Hugging Face chat template,
    so the three backends see the same prompts; every request carries its own seed, derived as the
    HTTP backend's. `batch_size` is how many requests go to the engine at once (and are cached together)."""

    def __init__(self, path: str, batch_size: int = 256, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", trust_remote_code: bool = False,
                 seed: int = 0):
        try:
            from vllm import LLM
        except ImportError:
            raise DeliaError("generation.backend 'vllm': vllm is not installed (pip install 'delia[vllm]' "
                             "on a machine with a GPU)") from None
        from .loading import load_tokenizer

        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.batch_size = batch_size
        self.llm = LLM(model=path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        from vllm import SamplingParams

        tok = self.tokenizer
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            prompts = [{"prompt_token_ids": tok(r.text, add_special_tokens=False)["input_ids"] if r.text else
                        tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]} for r in chunk]
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p if temperature > 0 else 1.0,
                                     seed=batch_seed(seed, [r.key]) % (2**31)) for r in chunk]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            yield [(r, out.outputs[0].text.strip(), len(out.outputs[0].token_ids)) for r, out in zip(chunk, outputs)]
