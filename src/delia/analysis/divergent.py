"""The divergent token (the paper's Figure 4): where a formatted answer parts from free text.

Definition. For each evaluation row, the reference answer is tokenized after the prompt (chat template,
generation prompt); the divergent position is the answer token that holds the first `{` of the object.
The model reads the prompt plus the reference tokens before that position (usually none), and its
next-token distribution there gives:
- `p_right`: the probability of the reference's token;
- `rank`: that token's rank (1 = the model's first choice);
- `entropy`: the distribution's entropy in nats (the paper's "state space": lower = more certain);
- `p_brace`: the total probability of every token whose text starts with `{` (any way to open the object).
Figures are averaged (rank: median) over the rows of each wording group, seen and held-out.
"""

from __future__ import annotations

import statistics

import torch


def _brace_ids(tokenizer) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    ids = [i for i in vocab.values() if tokenizer.decode([i]).lstrip().startswith("{")]
    return torch.tensor(sorted(ids), dtype=torch.long)


def divergent_inputs(tokenizer, messages: list[dict]) -> tuple[list[int], int] | None:
    """(ids the model reads, the reference token at the divergent position), or None when the answer
    holds no `{`."""
    answer = messages[-1]["content"]
    brace = answer.find("{")
    if brace < 0:
        return None
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        if start <= brace < end:
            return prompt_ids + enc["input_ids"][:j], enc["input_ids"][j]
    return None


def divergent_stats(model, tokenizer, rows: list[dict]) -> dict:
    """{group: {"n", "p_right", "rank_median", "entropy", "p_brace", "per_row": [...]}} for seen and held-out."""
    model.eval()
    brace_ids = _brace_ids(tokenizer).to(model.device)
    per_group: dict[str, list[dict]] = {}
    for row in rows:
        found = divergent_inputs(tokenizer, row["messages"])
        if found is None:
            continue
        ids, right = found
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        per_group.setdefault(row.get("group", "all"), []).append({
            "p_right": float(p[right]),
            "rank": int((logits > logits[right]).sum()) + 1,
            "entropy": float(-(p * logp).sum()),
            "p_brace": float(p[brace_ids].sum()),
        })
    out = {}
    for group, items in per_group.items():
        out[group] = {"n": len(items), "rank_median": statistics.median(i["rank"] for i in items),
                      **{k: round(statistics.fmean(i[k] for i in items), 4) for k in ("p_right", "entropy", "p_brace")},
                      "per_row": items}
    return out


def plot_divergent(results: dict[str, dict], path) -> None:
    """Per model: probability of the right token and entropy at the divergent position, by wording group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    groups = sorted({g for r in results.values() for g in r})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(groups), 1)
    for k, (metric, title) in enumerate([("p_right", "probability of the right token"),
                                         ("entropy", "entropy of the next-token distribution (nats)")]):
        ax = axes[k]
        for g_i, group in enumerate(groups):
            ys = [results[n].get(group, {}).get(metric, float("nan")) for n in names]
            ax.bar([i + g_i * width for i in range(len(names))], ys, width, label=f"{group} wordings")
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(names))], names, rotation=20,
                      ha="right", fontsize=8)
        ax.set_title(f"Divergent token `{{`: {title}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
