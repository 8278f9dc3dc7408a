"""The one place that adds new special tokens (such as `<sep>`) and initialises their embedding rows."""

from __future__ import annotations

import torch

from ..errors import DeliaError

INITS = ("random", "mean", "description")


def add_new_tokens(model, tokenizer, tokens: list[str], init: str, description: str = "", seed: int = 0) -> list[int]:
    """Add `tokens` as special tokens, resize the embeddings and initialise the new rows.

    `random`: normal(0, initializer_range) with a fixed seed, as the paper's random baseline;
    `mean`: the mean of all existing rows (Hewitt); `description`: the mean of the rows of the
    description's tokens (LLaMA-Factory's `desc_init`). The init is deterministic, so a saved adapter
    re-creates the same rows when it is loaded again. Returns the new tokens' ids.
    """
    if init not in INITS:
        raise DeliaError(f"token init: expected one of {', '.join(INITS)}, got {init!r}")
    old_size = len(tokenizer)
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if len(tokenizer) == old_size:
        return ids  # already present
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = [i for i in ids if i >= old_size]
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is None or output.weight.data_ptr() == embed.data_ptr()
    matrices = [embed] if tied else [embed, output.weight]
    if init == "description":
        desc_ids = tokenizer(description, add_special_tokens=False)["input_ids"]
        if not desc_ids:
            raise DeliaError("token init 'description' needs a non-empty task.description")
    with torch.no_grad():
        for w in matrices:
            if init == "random":
                gen = torch.Generator().manual_seed(seed)
                std = getattr(model.config, "initializer_range", 0.02)
                rows = torch.randn(len(new), w.shape[1], generator=gen) * std
            elif init == "mean":
                rows = w[:old_size].float().mean(0, keepdim=True).expand(len(new), -1)
            else:
                rows = w[desc_ids].float().mean(0, keepdim=True).expand(len(new), -1)
            w[new] = rows.to(device=w.device, dtype=w.dtype)  # drawn on the CPU: the same rows on any device
    return ids
