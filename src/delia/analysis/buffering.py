"""The buffering diagnostic: the paper's Eq. 10-11 measured on the user's model.

Four gradients of the token-mean answer loss, taken at the same weights (the base model, or an arm's
merged adapter), with respect to the weights of the LoRA target modules and the input embedding:
- `task`: the task's training rows alone (common instruction tuning's gradient);
- `mixed`: the same task rows plus `ratio` x diverse rows in one batch (DELIA's gradient);
- `diverse`: the diverse rows alone (the paper: they "largely cancel", so this norm is small);
- `ideal`: the evaluation rows with held-out wordings, the stand-in for the ideal features.
(With tied embeddings the embedding's gradient includes its use as the output head.)
Per layer group (the embedding, then the first, middle and last third of the blocks) the table gives
the cosine of `task` and of `mixed` with `ideal` (Eq. 11: DELIA's should be closer to 1) and the norm
ratios |task| / |ideal|, |mixed| / |ideal| (Eq. 10: DELIA's should be closer to 1) and |diverse| / |task|.
"""

from __future__ import annotations

import re

import torch

from ..model.chat import IGNORE, tokenize_chat

GROUPS = ("embedding", "blocks: first third", "blocks: middle third", "blocks: last third")


def parameter_groups(model, target_modules: list[str]) -> dict[str, list[torch.nn.Parameter]]:
    """The input embedding and the target modules' weights of each third of the blocks."""
    n_layers = model.config.num_hidden_layers
    groups: dict[str, list] = {g: [] for g in GROUPS}
    groups["embedding"].append(model.get_input_embeddings().weight)
    for name, param in model.named_parameters():
        found = re.search(r"layers\.(\d+)\.", name)
        if found and any(f".{t}." in name for t in target_modules) and name.endswith("weight"):
            third = min(3 * int(found.group(1)) // n_layers, 2)
            groups[GROUPS[1 + third]].append(param)
    return groups


def gradient(model, tokenizer, rows: list[dict], groups: dict[str, list], max_length: int,
             micro_batch: int = 4) -> dict[str, torch.Tensor]:
    """Flattened gradient per group of the token-mean answer loss over all `rows`."""
    examples = [tokenize_chat(tokenizer, r["messages"], max_length) for r in rows]
    examples = [e for e in examples if any(l != IGNORE for l in e["labels"][1:])]
    total = sum(sum(l != IGNORE for l in e["labels"][1:]) for e in examples)
    params = [p for ps in groups.values() for p in ps]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    pad = tokenizer.pad_token_id
    model.eval()  # no dropout: the gradient of the loss itself
    for start in range(0, len(examples), micro_batch):
        chunk = examples[start : start + micro_batch]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in chunk])
        labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in chunk])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 labels[:, 1:].flatten().to(model.device),
                                                 ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
    out = {g: torch.cat([p.grad.flatten().float() for p in ps]) for g, ps in groups.items() if ps}
    for p in params:
        p.grad = None
    return out


def compare(grads: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per group: cosines with `ideal` and norm ratios (see the module's docstring)."""
    cos = torch.nn.functional.cosine_similarity
    table = {}
    for g in grads["ideal"]:
        t, m, d, i = (grads[k][g] for k in ("task", "mixed", "diverse", "ideal"))
        table[g] = {
            "cos_task_ideal": round(float(cos(t, i, dim=0)), 4),
            "cos_mixed_ideal": round(float(cos(m, i, dim=0)), 4),
            "norm_task_over_ideal": round(float(t.norm() / i.norm()), 4),
            "norm_mixed_over_ideal": round(float(m.norm() / i.norm()), 4),
            "norm_diverse_over_task": round(float(d.norm() / t.norm()), 4),
        }
    return table


def render(table: dict[str, dict[str, float]]) -> str:
    lines = ["| Layer group | cos(task, ideal) | cos(mixed, ideal) | |task|/|ideal| | |mixed|/|ideal| | |diverse|/|task| |",
             "|---|---|---|---|---|---|"]
    for g, r in table.items():
        lines.append(f"| {g} | {r['cos_task_ideal']:.3f} | {r['cos_mixed_ideal']:.3f} | {r['norm_task_over_ideal']:.3f} | "
                     f"{r['norm_mixed_over_ideal']:.3f} | {r['norm_diverse_over_task']:.3f} |")
    return "\n".join(lines)


def plot_buffering(table: dict[str, dict[str, float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table)
    xs = range(len(groups))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], ("cos_task_ideal", "cos_mixed_ideal"), "cosine with the ideal gradient (Eq. 11)"),
                            (axes[1], ("norm_task_over_ideal", "norm_mixed_over_ideal"), "norm / ideal norm (Eq. 10)")):
        for k, (key, label) in enumerate(zip(keys, ("task rows only", "task + diverse rows"))):
            ax.bar([x + 0.4 * k for x in xs], [table[g][key] for g in groups], 0.4, label=label)
        ax.set_xticks([x + 0.2 for x in xs], groups, rotation=15, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
