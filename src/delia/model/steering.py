"""An untrained ceiling for the token as a switch: a steering vector (after Stolfo et al. 2025, "Improving
Instruction-Following in Language Models through Activation Steering") added where the token stands.

The vector is the mean, over training rows, of the residual stream after the middle block at the last
token of the description (the prompt with each new token replaced by `task.description`) minus the same
at the token (the prompt as it is). Generation adds it to the residual stream after that block at every
position that holds a new token, while the prompt is read; prompts without the token are the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..config import TaskConfig
from ..conversation import replace_in_user_turns
from .generate import LocalGenerator, Request, length_sorted_chunks, request_ids


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder blocks (`model.model.layers` for Llama- and Gemma-shaped models)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "layers", None) or inner.model.layers


def steering_vector(model, tokenizer, rows: list[dict], task: TaskConfig, layer: int) -> torch.Tensor:
    """The mean difference, after block `layer`, between the last description token (description in the
    token's place) and the token (the prompt as it is), over `rows` (their prompts, answers left out)."""
    ids = set(tokenizer.convert_tokens_to_ids(task.new_tokens))
    gen = LocalGenerator(model, tokenizer)
    diffs = []
    model.eval()
    with torch.inference_mode():
        for row in rows:
            prompt = row["messages"][:-1]
            plain = gen.prompt_ids(prompt)
            at = max(i for i, t in enumerate(plain) if t in ids)
            described = gen.prompt_ids(replace_in_user_turns(prompt, dict.fromkeys(task.new_tokens, task.description)))
            # the description ends where the text after the token begins (both prompts end the same way)
            end = len(described) - (len(plain) - at)
            states = [model(input_ids=torch.tensor([p], device=model.device), output_hidden_states=True)
                      .hidden_states[layer + 1][0] for p in (plain, described)]
            diffs.append(states[1][end].float() - states[0][at].float())
    return torch.stack(diffs).mean(0)


class SteeringGenerator(LocalGenerator):
    """Plain generation with `vector` added after block `layer` at every prompt position holding a token of
    `token_ids`."""

    continues_prefixes = False

    def __init__(self, model, tokenizer, vector: torch.Tensor, layer: int, token_ids: list[int], batch_size: int = 16):
        super().__init__(model, tokenizer, batch_size)
        self.vector, self.layer, self.token_ids = vector, layer, list(token_ids)

    @contextmanager
    def _steered(self, where: torch.Tensor):
        """Add the vector at `where` (a [batch, width] mask of the prompt) when block `layer` reads the prompt."""
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != where.shape[1]:  # a decoding step, not the prompt
                return output
            hidden = hidden + where[..., None].to(hidden.dtype) * self.vector.to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = decoder_layers(self.model)[self.layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0, should_stop=None) -> Iterator[list[tuple[Request, str, int]]]:
        """LocalGenerator's batches (the same, sorted by prompt length), each steered where its prompts
        (left-padded to the batch's width) hold a new token."""
        encoded = [(request_ids(self.tokenizer, r), r) for r in requests]
        for chunk in length_sorted_chunks(encoded, self.batch_size):
            width = max(len(ids) for ids, _ in chunk)
            where = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, (ids, _) in enumerate(chunk):
                where[i, width - len(ids):] = torch.isin(torch.tensor(ids), torch.tensor(self.token_ids))
            with self._steered(where.to(self.model.device)):
                yield from super().batches([r for _, r in chunk], max_new_tokens, temperature, top_p, seed, should_stop)
