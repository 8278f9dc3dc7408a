"""How much diverse data: the loss-against-ratio sweep (the paper's Figure 3) and `tune-ratio`.

A trial trains one adapter on the task rows mixed with `ratio` x diverse rows for a `fraction` of an
epoch (1 = the paper's one epoch), then measures the task loss on the evaluation rows: the mean
cross-entropy of the reference answer's tokens, per row, averaged over the rows of each wording group
(`seen`: training wordings; `heldout`: wordings never trained on, the stand-in for the ideal features).

`tune-ratio` runs successive halving: every candidate ratio is trained for the shortest fraction, the
better half (by held-out-wording loss) goes on to twice the training, and so on up to one epoch. Each
rung's trials see the same share of the task rows, whatever the ratio, because the mix is shuffled
evenly. How sure the pick is: the share of paired bootstrap resamples of the held-out rows in which the
winner's loss stays below the runner-up's (one seed; the bootstrap covers row noise, not seed noise).
"""

from __future__ import annotations

import math
import random
import statistics

import torch

from ..model.chat import IGNORE, tokenize_chat


def task_loss(model, tokenizer, rows: list[dict], max_length: int) -> dict:
    """{group: {"n", "loss", "per_row"}}: the answer's mean token cross-entropy, per row and averaged."""
    model.eval()
    per_group: dict[str, list[float]] = {}
    for row in rows:
        ex = tokenize_chat(tokenizer, row["messages"], max_length)
        labels = torch.tensor([ex["labels"]], device=model.device)
        if not (labels != IGNORE).any():
            continue
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ex["input_ids"]], device=model.device), labels=labels)
        per_group.setdefault(row.get("group", "all"), []).append(round(float(out.loss), 5))
    return {g: {"n": len(v), "loss": round(statistics.fmean(v), 5), "per_row": v} for g, v in per_group.items()}


def rung_fractions(rungs: int, eta: int) -> list[float]:
    """Training fractions of an epoch per rung, ending at one epoch: rungs=3, eta=2 -> [0.25, 0.5, 1.0]."""
    return [float(eta) ** (k - rungs + 1) for k in range(rungs)]


def survivors(losses: dict[float, float], eta: int) -> list[float]:
    """The better 1/eta of the candidates (lowest loss first), at least two while two are left."""
    ranked = sorted(losses, key=lambda r: (losses[r], r))
    keep = max(math.ceil(len(ranked) / eta), min(2, len(ranked)))
    return ranked[:keep]


def bootstrap_confidence(winner: list[float], other: list[float], samples: int = 1000, seed: int = 0) -> float:
    """Share of paired resamples of the rows in which the winner's mean loss is below the other's."""
    if len(winner) != len(other) or not winner:
        raise ValueError("paired bootstrap needs the same, non-empty rows for both")
    rng = random.Random(seed)
    n = len(winner)
    wins = 0
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        wins += sum(winner[i] - other[i] for i in idx) < 0
    return wins / samples


def plot_sweep(points: list[dict], path, budget: str = "1 epoch each") -> None:
    """Task loss against the diverse ratio, one line per wording group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for group, label in (("seen", "seen wordings"), ("heldout", "held-out wordings")):
        xs = [p["ratio"] for p in points if group in p["loss"]]
        ax.plot(xs, [p["loss"][group]["loss"] for p in points if group in p["loss"]], marker="o", label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("diverse rows per task row (symlog)")
    ax.set_ylabel("task loss (mean token cross-entropy)")
    ax.set_title(f"Task loss against the amount of diverse data ({budget})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
