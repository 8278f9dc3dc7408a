"""Batched chat generation with the local transformers backend.

Requests are sorted by prompt length and left-padded, so a batch wastes little compute on padding;
each batch draws from its own seed, derived from the run seed and the keys of its requests, so a
resumed run produces the same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class Request:
    key: str
    """A stable identity of the request (used for caching and for the batch seed)."""
    messages: list[dict]


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{seed}|{'|'.join(keys)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class LocalGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batches(
        self,
        requests: Sequence[Request],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[list[tuple[Request, str, int]]]:
        """Yield, batch by batch, (request, generated text, generated token count)."""
        encoded = [(self.prompt_ids(r.messages), r) for r in requests]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
        pad = self.tokenizer.pad_token_id
        eos = self._stop_ids()
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            chunk = [encoded[i] for i in order[start : start + self.batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in chunk])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in chunk])
            sampling = temperature > 0
            torch.manual_seed(batch_seed(seed, [r.key for _, r in chunk]))
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=attention.to(self.model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=sampling,
                    temperature=temperature if sampling else None,
                    top_p=top_p if sampling else None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            results = []
            for row, (_, request) in zip(out[:, width:].tolist(), chunk):
                n = len(row)
                for j, tok in enumerate(row):
                    if tok in eos:
                        n = j
                        break
                results.append((request, self.tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
            yield results

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)
