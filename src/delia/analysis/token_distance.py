"""Token-to-meaning distance (the paper's Table 1 and Figure 2).

Definition. Each carrier sentence below has one slot. For the new token (e.g. `<sep>`) and for each
keyword of its prior description (e.g. `json`, `thought`), the slot is filled with " " + the text,
the sentence is run through the model without a chat template, and the hidden state at the slot's
last token (the token itself, or a keyword's last piece, which has read the whole word) is taken at
every transformer block.
The distance at a block is the L2 norm of the difference between the token's and the keyword's slot
states, averaged over the carriers; the cosine similarity is averaged the same way. The input-embedding
distance compares the token's embedding row with the mean of the keyword's rows (whitespace-only
pieces left out).
"""

from __future__ import annotations

import torch

CARRIERS = [
    "Reply in the{} format.",
    "The answer must follow{}.",
    "Format your output as{}.",
    "Check the answer and use{}.",
    "Write the result as{}.",
    "Here is the required format:{}.",
]


def _slot_states(model, tokenizer, text: str) -> torch.Tensor:
    """[blocks, carriers, hidden]: the hidden state at the slot's last token, per block and carrier."""
    out = []
    for carrier in CARRIERS:
        prefix = carrier[: carrier.index("{}")]
        before = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = tokenizer(carrier.format(" " + text), add_special_tokens=False)["input_ids"]
        slot = tokenizer(prefix + " " + text, add_special_tokens=False)["input_ids"]
        if slot[: len(before)] != before:
            raise ValueError(f"tokenization of {text!r} in {carrier!r} merges with its context")
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
        blocks = torch.stack(hidden[1:])[:, 0]  # [blocks, seq, hidden]; hidden[0] is the embedding output
        out.append(blocks[:, len(slot) - 1].float())
    return torch.stack(out, 1)


def token_keyword_distances(model, tokenizer, token: str, keywords: list[str]) -> dict:
    """{keyword: {"l2": [per block], "cosine": [per block], "embedding_l2": float}}."""
    model.eval()
    tok_states = _slot_states(model, tokenizer, token)
    emb = model.get_input_embeddings().weight.detach()
    tok_row = emb[tokenizer.convert_tokens_to_ids(token)].float()
    result = {}
    for kw in keywords:
        kw_states = _slot_states(model, tokenizer, kw)
        l2 = (tok_states - kw_states).norm(dim=-1).mean(1)
        cos = torch.nn.functional.cosine_similarity(tok_states, kw_states, dim=-1).mean(1)
        pieces = [i for i in tokenizer(" " + kw, add_special_tokens=False)["input_ids"] if tokenizer.decode([i]).strip()]
        kw_rows = emb[pieces].float().mean(0)
        result[kw] = {"l2": [round(x, 4) for x in l2.tolist()], "cosine": [round(x, 4) for x in cos.tolist()],
                      "embedding_l2": round(float((tok_row - kw_rows).norm()), 4)}
    return result


def first_middle_last(values: list[float]) -> tuple[float, float, float]:
    return values[0], values[len(values) // 2], values[-1]


def plot_distances(results: dict[str, dict], keywords: list[str], path) -> None:
    """One panel per keyword: L2 distance across blocks, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keywords), figsize=(5.5 * len(keywords), 4), squeeze=False)
    for ax, kw in zip(axes[0], keywords):
        for name, res in results.items():
            ys = res[kw]["l2"]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name)
        ax.set_title(f"L2 distance: new token vs \u201c{kw}\u201d")
        ax.set_xlabel("transformer block")
        ax.set_ylabel("L2 distance (log scale; lower = closer)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
