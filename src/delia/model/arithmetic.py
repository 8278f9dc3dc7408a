"""Model arithmetic (Dekoninck et al. 2023) as a decoder, no training: at every step the next-token
log-probabilities of the model prompted with the description (`M_desc`: each new token in the prompt
followed by "(DESCRIPTION)") and without it (`M_plain`: the prompt as is) are combined as
`M_desc + lambda (M_desc - M_plain)`, normalised, and decoded greedily (or sampled).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..config import TaskConfig
from ..conversation import replace_in_user_turns
from .generate import LocalGenerator, Request, batch_seed


def describe_tokens(messages: list[dict], task: TaskConfig) -> list[dict]:
    """The prompt of M_desc: each new token in the user turns followed by "(DESCRIPTION)"."""
    return replace_in_user_turns(messages, {t: f"{t} ({task.description})" for t in task.new_tokens})


class ArithmeticGenerator(LocalGenerator):
    """Decoding by model arithmetic over one model: M_desc + lam * (M_desc - M_plain)."""

    continues_prefixes = False

    def __init__(self, model, tokenizer, task: TaskConfig, lam: float = 1.0, batch_size: int = 8):
        super().__init__(model, tokenizer, batch_size)
        self.task = task
        self.lam = lam

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        pad = self.tokenizer.pad_token_id
        eos = set(self._stop_ids())
        self.model.eval()
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            n = len(chunk)
            prompts = [self.prompt_ids(describe_tokens(r.messages, self.task)) for r in chunk]
            prompts += [self.prompt_ids(r.messages) for r in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            generator = torch.Generator().manual_seed(batch_seed(seed, [r.key for r in chunk]))
            out: list[list[int]] = [[] for _ in range(n)]
            done = [False] * n
            past = None
            with torch.inference_mode():
                for _ in range(max_new_tokens):
                    result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        past_key_values=past, use_cache=True)
                    past = result.past_key_values
                    logp = torch.log_softmax(result.logits[:, -1].float(), -1)
                    combined = torch.log_softmax((1 + self.lam) * logp[:n] - self.lam * logp[n:], -1)
                    if temperature > 0:
                        probs = torch.softmax(combined / temperature, -1).cpu()
                        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
                    else:
                        nxt = combined.argmax(-1).cpu()
                    for i, tok in enumerate(nxt.tolist()):
                        if not done[i]:
                            if tok in eos:
                                done[i] = True
                            else:
                                out[i].append(tok)
                    if all(done):
                        break
                    step = torch.cat([nxt, nxt]).to(self.model.device)[:, None]
                    ids = step
                    mask = torch.cat([mask, torch.ones_like(step)], -1)
                    positions = positions[:, -1:] + 1
            yield [(r, self.tokenizer.decode(o, skip_special_tokens=True).strip(), len(o)) for r, o in zip(chunk, out)]
