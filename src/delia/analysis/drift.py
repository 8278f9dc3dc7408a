"""Drift: how far an arm's next-token distribution moved from the untouched model on general queries.

On held-out general queries (none trained on by any arm) and the untouched model's own answers to
them, teacher-forced: at every answer token, KL(P_untouched || P_arm) over the untouched model's
vocabulary (an arm's added tokens have no mass under the untouched model, so they only enter through
the arm's normalisation); the mean over all answer tokens, in nats per token. One forward pass per
answer per model (the untouched model's once per process for a run's rows). And, where the query source has reference answers (Alpaca), the arm's mean
negative log-likelihood of their tokens (nats per token).

Answer tokens are the assistant turn and its end-of-turn token (`delia.model.chat.tokenize_chat`); the
untouched model and the arm may be prompted differently (an in-context arm puts its examples first),
and their answer tokens are aligned from the end.
"""

from __future__ import annotations

import torch

from ..model.chat import IGNORE, tokenize_chat


def _batches(model, tokenizer, rows: list[tuple[list[dict], str]], max_length: int, batch_size: int,
             max_answer_tokens: int = 0):
    """For each batch of (prompt messages, answer): per row, the logits that predict its answer tokens
    ([answer tokens, vocabulary], float32) and those tokens; only the first `max_answer_tokens` of an
    answer when set. Rows are left-padded so every answer ends the batch, and the output layer runs
    on the answer positions only (`logits_to_keep`)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = []
        for msgs, answer in rows[start : start + batch_size]:
            e = tokenize_chat(tokenizer, msgs + [{"role": "assistant", "content": answer}], max_length)
            targets = [i for i, label in enumerate(e["labels"]) if label != IGNORE and i > 0]
            if max_answer_tokens:
                targets = targets[:max_answer_tokens]
            end = targets[-1] + 1 if targets else len(e["input_ids"])
            chunk.append((e["input_ids"][:end], targets))
        width = max(len(ids) for ids, _ in chunk)
        keep = max([len(i) - t[0] + 1 for i, t in chunk if t] + [1])  # from the position before the first target
        ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in chunk])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in chunk])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(model.device),
                           logits_to_keep=keep).logits
        batch = []
        for row, (seq, targets) in zip(logits, chunk):
            shift = width - len(seq) - (width - keep)  # a position in `seq` -> its index among the kept logits
            # the logits at position i - 1 predict token i
            batch.append((row[[i - 1 + shift for i in targets]].float(),
                          torch.tensor([seq[i] for i in targets], device=row.device)))
        yield batch


def _by_length(rows: list[tuple[list[dict], str]]) -> list[int]:
    """Row indices by text length (prompt and answer), a cheap stand-in for token counts."""
    return sorted(range(len(rows)), key=lambda i: sum(len(m["content"]) for m in rows[i][0]) + len(rows[i][1]))


def answer_logprobs(model, tokenizer, rows: list[tuple[list[dict], str]], max_length: int,
                    batch_size: int = 8) -> list[torch.Tensor]:
    """Per row (prompt messages, answer), in the rows' order: the log-probabilities over the vocabulary
    at each of its answer tokens ([answer tokens, vocabulary], float32)."""
    out: list = [None] * len(rows)
    order = iter(_by_length(rows))  # batches of similar lengths: little padding
    for batch in _batches(model, tokenizer, [rows[i] for i in _by_length(rows)], max_length, batch_size):
        for logits, _ in batch:
            out[next(order)] = torch.log_softmax(logits, -1)
    return out


def kl_per_token(reference: list[torch.Tensor], arm, arm_rows: list[tuple[list[dict], str]], max_length: int,
                 batch_size: int = 8) -> dict:
    """Mean KL(untouched || arm) per answer token over all rows, and per row its (KL summed over its
    tokens, tokens), in the rows' order (for paired comparisons). `reference`: the untouched model's
    `answer_logprobs` on the rows; `arm`: (model, tokenizer), or None for the untouched model itself
    (zero by identity, not computed again); row i of `arm_rows` holds the same answer as the reference's,
    prompted as the arm is."""
    if arm is None:
        per_row = [(0.0, len(ref)) for ref in reference]
    else:
        per_row = [(0.0, 0)] * len(arm_rows)
        order = _by_length(arm_rows)
        rows = iter(order)
        for batch in _batches(*arm, [arm_rows[i] for i in order], max_length, batch_size):
            for other, _ in batch:
                i = next(rows)
                n = min(len(reference[i]), len(other))  # the same answer: align its tokens from the end
                if not n:
                    continue
                vocab = min(reference[i].shape[-1], other.shape[-1])  # the untouched vocabulary (an arm only adds tokens)
                ref_logp = reference[i][-n:, :vocab]
                arm_logp = torch.log_softmax(other[-n:], -1)[:, :vocab]
                per_row[i] = (float((ref_logp.exp() * (ref_logp - arm_logp)).sum()), n)
    total, tokens = sum(k for k, _ in per_row), sum(n for _, n in per_row)
    return {"kl": total / tokens if tokens else None, "tokens": tokens, "per_row": per_row}


def nll_per_token(model, tokenizer, rows: list[tuple[list[dict], str]], max_length: int, batch_size: int = 8,
                  max_answer_tokens: int = 0) -> dict:
    """Mean negative log-likelihood of the answers' tokens (each row: prompt messages, answer), of the
    first `max_answer_tokens` of each when set."""
    total, tokens = 0.0, 0
    for batch in _batches(model, tokenizer, [rows[i] for i in _by_length(rows)], max_length, batch_size,
                          max_answer_tokens):
        for logits, targets in batch:
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            tokens += len(targets)
    return {"nll": total / tokens if tokens else None, "tokens": tokens}


MARKERS = {"untrained": "x", "one epoch": "o", "equal steps": "s", "both": "*"}


def plot_tradeoff(points: list[dict], path, title: str) -> None:
    """Held-out-wording format accuracy against drift, one point per arm (error bars: sd over seeds),
    the marker saying the arm's budget rule; where the points carry switch consistency, a second panel
    of it against the same drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "format accuracy, held-out wordings (%)")]
    if any("switch" in p for p in points):
        panels.append(("switch", "switch consistency (%): every control variant right"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        if len(points) > 10:  # the default cycle has 10 colours: more arms would share them
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for p in points:
            if key not in p:
                ax.plot([], [])  # keep each arm's colour the same in both panels
                continue
            ax.errorbar(p["kl"], 100 * p[key], xerr=p["kl_sd"] or None, yerr=100 * p[f"{key}_sd"] or None,
                        fmt=MARKERS[p["budget"]], markersize=8, capsize=3, label=f"{p['label']} [{p['budget']}]")
        ax.set_xlabel("drift: KL(untouched || arm), nats per token on general queries (lower is better)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_title(title)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.14))  # below the axes: never over a point
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
