"""Drift: how far an arm's next-token distribution moved from the untouched model on general queries.

On held-out general queries (none trained on by any arm) and the untouched model's own answers to
them, teacher-forced: at every answer token, KL(P_untouched || P_arm) over the untouched model's
vocabulary (an arm's added tokens have no mass under the untouched model, so they only enter through
the arm's normalisation); the mean over all answer tokens, in nats per token. And, where the query
source has reference answers (Alpaca), the arm's mean negative log-likelihood of their tokens (nats
per token). The arm reads each prompt once, its KV cache kept for both answers; the untouched model's
pass is made once a process for a run's rows (`delia.evaluate.probes`).

Answer tokens are the assistant turn and its end-of-turn token (`delia.model.chat.tokenize_chat`); the
untouched model and the arm may be prompted differently (an in-context arm puts its examples first),
and their answer tokens are aligned from the end.
"""

from __future__ import annotations

import torch

from ..model.chat import IGNORE, tokenize_chat


def _encode(tokenizer, messages: list[dict], answer: str, max_length: int, limit: int) -> tuple[list[int], list[int]]:
    """(ids up to the answer's last target, the positions of its answer tokens: the first `limit` when set)."""
    e = tokenize_chat(tokenizer, messages + [{"role": "assistant", "content": answer}], max_length)
    targets = [i for i, label in enumerate(e["labels"]) if label != IGNORE and i > 0]
    if limit:
        targets = targets[:limit]
    return e["input_ids"][: targets[-1] + 1 if targets else len(e["input_ids"])], targets


def _batches(model, tokenizer, rows: list[tuple[list[dict], tuple]], max_length: int, batch_size: int,
             limits: tuple[int, ...] = ()):
    """For each batch of rows (prompt messages, answers): per row, per answer, the logits that predict its
    answer tokens ([answer tokens, vocabulary], float32), those tokens and the ids before them (None if the
    answer tokens are not one run), or None where the answer is None; of answer j only the first
    `limits[j]` tokens when set. A row's prompt runs once, with its KV cache kept for each of its answers
    (rows left-padded so the prompts end together; the output layer on the prompt's last position only)."""
    import copy

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    for start in range(0, len(rows), batch_size):
        chunk = [[None if a is None else _encode(tokenizer, msgs, a, max_length, limits[j] if j < len(limits) else 0)
                  for j, a in enumerate(answers)] for msgs, answers in rows[start : start + batch_size]]
        prefixes = []
        for row in chunk:  # what every answer of the row shares before its first answer token
            found = [e for e in row if e is not None]
            ids = found[0][0] if found else [pad]
            n = min([len(ids)] + [t[0] for _, t in found if t])
            for other, _ in found[1:]:
                n = next((i for i, (a, b) in enumerate(zip(ids[:n], other)) if a != b), min(n, len(other)))
            prefixes.append(ids[: max(n, 1)])
        width = max(len(p) for p in prefixes)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
        last, cache = out.logits[:, -1], out.past_key_values
        batch = [[None] * len(row) for row in chunk]
        for j in range(len(chunk[0])):
            rest = [[] if row[j] is None else row[j][0][len(p):] for row, p in zip(chunk, prefixes)]
            span = max(len(r) for r in rest)
            logits = None
            if span:
                cont = torch.tensor([r + [pad] * (span - len(r)) for r in rest], device=device)
                full = torch.cat([mask, torch.tensor([[1] * len(r) + [0] * (span - len(r)) for r in rest], device=device)], 1)
                positions = torch.tensor([[len(p) + k for k in range(span)] for p in prefixes], device=device)
                with torch.inference_mode():
                    last_answer = j == len(chunk[0]) - 1  # it may extend the prompt's cache itself
                    logits = model(input_ids=cont, attention_mask=full, position_ids=positions,
                                   past_key_values=cache if last_answer else copy.deepcopy(cache)).logits
            for i, (row, p) in enumerate(zip(chunk, prefixes)):
                if row[j] is None:
                    continue
                seq, targets = row[j]
                # the logits at position t - 1 predict token t: the prompt's last one, or the continuation's
                picked = [last[i] if t - 1 < len(p) else logits[i, t - 1 - len(p)] for t in targets]
                batch[i][j] = (torch.stack(picked).float() if picked else last[i][:0].float(),
                               torch.tensor([seq[t] for t in targets], device=device, dtype=torch.long),
                               seq[: targets[0]] if targets == list(range(targets[0], targets[-1] + 1)) else None)
        yield batch


def _by_length(rows: list[tuple[list[dict], tuple]]) -> list[int]:
    """Row indices by text length (prompt and answers), a cheap stand-in for token counts."""
    return sorted(range(len(rows)), key=lambda i: sum(len(m["content"]) for m in rows[i][0])
                  + sum(len(a) for a in rows[i][1] if a))


def _in_order(model, tokenizer, rows, max_length, batch_size, limits=()):
    """(row index, its `_batches` entry) for every row, in batches of similar lengths: little padding."""
    order = _by_length(rows)
    indices = iter(order)
    for batch in _batches(model, tokenizer, [rows[i] for i in order], max_length, batch_size, limits):
        for entry in batch:
            yield next(indices), entry


def answer_logprobs(model, tokenizer, rows: list[tuple[list[dict], str]], max_length: int,
                    batch_size: int = 8) -> list[torch.Tensor]:
    """Per row (prompt messages, answer), in the rows' order: the log-probabilities over the vocabulary
    at each of its answer tokens ([answer tokens, vocabulary], float32)."""
    out: list = [None] * len(rows)
    for i, ((logits, *_),) in _in_order(model, tokenizer, [(m, (a,)) for m, a in rows], max_length, batch_size):
        out[i] = torch.log_softmax(logits, -1)
    return out


def greedy_prefix(logits: torch.Tensor, tokens: torch.Tensor, stop, budget: int) -> tuple[tuple[int, ...], bool]:
    """How far the arm's greedy answer is known from one teacher-forced pass over another answer's `tokens`
    (`logits` predicting each): while its argmax is the token it was fed, the greedy answer is that answer;
    at the first other argmax it is that token (and what comes after is unknown). (The tokens known,
    whether the answer is finished: a token in `stop` chosen, or `budget` tokens known.)"""
    known: list[int] = []
    for pick, fed in zip(logits.argmax(-1).tolist(), tokens.tolist()):
        if pick in stop:
            return tuple(known), True
        known.append(pick)
        if len(known) >= budget:
            return tuple(known), True
        if pick != fed:
            break
    return tuple(known), False


def arm_costs(reference: list[torch.Tensor] | None, arm, prompts: list[list[dict]], answers: list[str | None],
              references: list[str | None], max_length: int, batch_size: int = 8, max_reference_tokens: int = 0,
              untouched: bool = False, greedy: tuple[set[int], int] | None = None) -> tuple[dict, dict]:
    """(KL, NLL) of an arm, (model, tokenizer), in one pass over the prompts: for each prompt, its KL
    from the untouched model on `answers[i]` (the untouched model's answer, its log-probabilities
    `reference[i]`; `untouched`: the arm is that model, zero by identity, not computed again) and the
    NLL of `references[i]` (its first `max_reference_tokens`); a None answer or reference is left out.
    KL: mean per answer token, and per row (KL summed over its tokens, tokens) in the rows' order (for
    paired comparisons); NLL: mean per reference token. `greedy` (stop tokens, budget): the KL also gives,
    per row, the start of the arm's greedy answer its pass shows (`greedy_prefix`: tokens, finished), or
    None where the pass read the prompt otherwise than generation does."""
    from ..model.generate import Request, request_ids

    n = len(prompts)
    kl_rows, nll, nll_tokens = [(0.0, 0)] * n, 0.0, 0
    starts: list = [None] * n
    if untouched:
        kl_rows = [(0.0, len(r)) if a is not None else (0.0, 0) for r, a in zip(reference, answers)]
        answers = [None] * n
    rows = [(p, (a, r)) for p, a, r in zip(prompts, answers, references)]
    if any(a is not None or r is not None for _, (a, r) in rows):
        for i, (own, ref) in _in_order(*arm, rows, max_length, batch_size, (0, max_reference_tokens)):
            k = min(len(reference[i]), len(own[0])) if own is not None else 0  # the same answer: aligned from the end
            if k:
                vocab = min(reference[i].shape[-1], own[0].shape[-1])  # the untouched vocabulary (an arm only adds tokens)
                ref_logp = reference[i][-k:, :vocab]
                arm_logp = torch.log_softmax(own[0][-k:], -1)[:, :vocab]
                kl_rows[i] = (float((ref_logp.exp() * (ref_logp - arm_logp)).sum()), k)
            if greedy and own is not None and own[2] == request_ids(arm[1], Request("", prompts[i])):
                starts[i] = greedy_prefix(own[0], own[1], *greedy)
            if ref is not None:
                nll += float(torch.nn.functional.cross_entropy(ref[0], ref[1], reduction="sum"))
                nll_tokens += len(ref[1])
    total, tokens = sum(k for k, _ in kl_rows), sum(t for _, t in kl_rows)
    return ({"kl": total / tokens if tokens else None, "tokens": tokens, "per_row": kl_rows, "greedy": starts},
            {"nll": nll / nll_tokens if nll_tokens else None, "tokens": nll_tokens})


def kl_per_token(reference: list[torch.Tensor], arm, arm_rows: list[tuple[list[dict], str]], max_length: int,
                 batch_size: int = 8) -> dict:
    """Mean KL(untouched || arm) per answer token over all rows, and per row its (KL summed over its
    tokens, tokens), in the rows' order. `reference`: the untouched model's `answer_logprobs` on the rows;
    `arm`: (model, tokenizer), or None for the untouched model itself; row i of `arm_rows` holds the
    same answer as the reference's, prompted as the arm is."""
    prompts, answers = [m for m, _ in arm_rows], [a for _, a in arm_rows]
    return arm_costs(reference, arm, prompts, answers, [None] * len(arm_rows), max_length, batch_size,
                     untouched=arm is None)[0]


def nll_per_token(model, tokenizer, rows: list[tuple[list[dict], str]], max_length: int, batch_size: int = 8,
                  max_answer_tokens: int = 0) -> dict:
    """Mean negative log-likelihood of the answers' tokens (each row: prompt messages, answer), of the
    first `max_answer_tokens` of each when set."""
    return arm_costs(None, (model, tokenizer), [m for m, _ in rows], [None] * len(rows), [a for _, a in rows],
                     max_length, batch_size, max_answer_tokens)[1]


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
