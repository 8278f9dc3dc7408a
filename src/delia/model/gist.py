"""Gist masking (Mu, Li and Goodman 2023, "Learning to Compress Prompts with Gist Tokens"), with the new token
as the gist: in a training row whose instruction holds the token, every position after the token may
attend to the context and to the token but not to the instruction words before it, so what the instruction
says has to pass through the token. Rows without the token (self-sampled, counterfactual) train with the
plain causal mask. `GistGenerator` applies the same mask at generation, as gisting does: the answer reads
the instruction through the token alone.

The instruction is the first user turn's last paragraph (`delia.conversation`); its words before the
first new token in it are the ones blocked.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..conversation import first_user_turn, split_wording
from .generate import (LocalGenerator, Request, answer_of, batch_seed, draw_live, length_sorted_chunks, request_ids,
                       step_rows)

FIELD = "gist"
"""A tokenized row's gist: [the token's position, the positions it hides from what follows], or []."""


def gist_positions(tokenizer, messages: list[dict], tokens: list[str], max_length: int, prompt: bool = False) -> list[int]:
    """[position of the first new token in the instruction, positions of the instruction's tokens before it]
    in the row's input ids (as `delia.model.chat.tokenize_chat` makes them; `prompt`: in the generation
    prompt, as `delia.model.generate.request_ids` makes it), or [] when the instruction holds no new token
    (or it is cut off by `max_length`)."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    content = first_user_turn(messages)["content"]
    _, wording = split_wording(content)
    at = full.find(content)
    if at < 0 or not wording:
        return []
    start = at + content.rstrip().rfind(wording)
    found = [p for p in (full.find(t, start, start + len(wording)) for t in tokens) if p >= 0]
    if not found:
        return []
    token_at = min(found)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    position = next((i for i, (a, _) in enumerate(offsets) if a == token_at), None)
    if position is None or position >= max_length:
        return []
    return [position] + [i for i, (a, _) in enumerate(offsets[:max_length]) if start <= a < token_at]


def gist_attention(mask: torch.Tensor, gists: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    """The 4D additive attention mask ([batch, 1, width, width]: 0 where a query may attend, the dtype's
    minimum where not) of a right-padded batch (`mask`: [batch, width], 1 on real tokens): causal, no padded
    key, and for each row with a gist, no position after the token attending to the words it hides."""
    batch, width = mask.shape
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None].repeat(batch, 1, 1)
    allowed &= mask.bool()[:, None, :]
    for b, gist in enumerate(gists):
        if len(gist) > 1:  # a token with words before it
            allowed[b, gist[0] + 1:, torch.tensor(gist[1:])] = False
    out = torch.zeros(batch, 1, width, width, dtype=dtype)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class GistGenerator(LocalGenerator):
    """Decoding with the gist mask: in a prompt whose instruction holds a new token, the positions after the
    token (the rest of the prompt and every generated token) do not attend to the instruction words before
    it. Prompts without the token decode as `LocalGenerator` does (greedy or sampled, with a key cache)."""

    def __init__(self, model, tokenizer, tokens: list[str], batch_size: int = 16):
        super().__init__(model, tokenizer, batch_size)
        self.tokens = list(tokens)

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        from .cache import decoding_cache

        encoded = [(request_ids(self.tokenizer, r) + list(r.prefix), r) for r in requests]
        pad = self.tokenizer.pad_token_id
        eos = set(self._stop_ids())
        dtype = self.model.get_input_embeddings().weight.dtype
        device = self.model.device
        self.model.eval()
        for chunk in length_sorted_chunks(encoded, self.batch_size):
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
            # right-aligned rows: a gist's positions move by the row's padding
            gists = [[width - len(p) + i for i in gist_positions(self.tokenizer, r.messages, self.tokens, len(p), prompt=True)]
                     if not r.text else [] for p, r in chunk]
            attend = gist_attention(mask, gists, dtype) == 0  # [batch, 1, width, width]; then one query row a step
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            generator = torch.Generator().manual_seed(batch_seed(seed, [r.key for _, r in chunk]))
            steps = [max_new_tokens - len(r.prefix) for _, r in chunk]
            out: list[list[int]] = [[] for _ in chunk]
            live = [i for i, n in enumerate(steps) if n > 0]  # a finished row leaves the batch
            ids, attend, positions, past = ids[live], attend[live], positions[live], decoding_cache(self.model)
            ended: set[int] = set()
            with torch.inference_mode():
                while live:
                    additive = torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, torch.finfo(dtype).min)
                    result = self.model(input_ids=ids.to(device), attention_mask=additive.to(device),
                                        position_ids=positions.to(device), past_key_values=past, use_cache=True,
                                        logits_to_keep=1)
                    past = result.past_key_values
                    nxt = draw_live(result.logits[:, -1].float().cpu(), live, len(chunk), temperature, top_p, generator)
                    going = step_rows(out, live, nxt.tolist(), steps, eos, ended)
                    if not going:
                        break
                    if len(going) < len(live):
                        index = torch.tensor(going)
                        past.batch_select_indices(index.to(device))
                        nxt, attend, positions = nxt[index], attend[index], positions[index]
                        live = [live[j] for j in going]
                    ids, positions = nxt[:, None], positions[:, -1:] + 1
                    last = attend[:, :, -1:, :]  # the next token reads what the last position read, and it
                    attend = torch.cat([last, torch.ones_like(last[..., :1])], -1)
            yield [(r, *answer_of(self.tokenizer, r, o, eos, max_new_tokens)) for (_, r), o in zip(chunk, out)]
