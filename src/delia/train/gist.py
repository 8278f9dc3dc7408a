"""Gist masking (Mu, Li and Goodman 2023, "Learning to Compress Prompts with Gist Tokens"), with the new token
as the gist: in a training row whose instruction holds the token, every position after the token may
attend to the context and to the token but not to the instruction words before it, so what the instruction
says has to pass through the token. Rows without the token (self-sampled, counterfactual) train with the
plain causal mask. The mask is applied in training only; generation attends as usual.

The instruction is the first user turn's last paragraph (`delia.conversation`); its words before the
first new token in it are the ones blocked.
"""

from __future__ import annotations

import torch

from ..conversation import first_user_turn, split_wording

FIELD = "gist"
"""A tokenized row's gist: [the token's position, the positions it hides from what follows], or []."""


def gist_positions(tokenizer, messages: list[dict], tokens: list[str], max_length: int) -> list[int]:
    """[position of the first new token in the instruction, positions of the instruction's tokens before it]
    in the row's input ids (as `delia.model.chat.tokenize_chat` makes them), or [] when the instruction
    holds no new token (or it is cut off by `max_length`)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
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
