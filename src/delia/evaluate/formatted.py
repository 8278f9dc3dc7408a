"""The `evaluate` stage: formatted-text accuracy and label accuracy, by wording group.

A hit (format accuracy, "strict") is an answer whose earliest `{...}` parses and holds every required
key; "attempted" counts answers that open an object with a required key, parsed or not (`task.metric`
object; `exact` and `regex` score the whole answer, see `score`). Label accuracy
counts answers whose `label_key` value equals the reference's. All are reported for the training
wordings (`seen`), for the held-out wordings (`heldout`), their gap, and for every control group
(`delia.evaluate.controls`), with the share of answers cut at the token limit. Decoding is greedy,
through any generation backend (local, vLLM or an OpenAI-compatible server).
"""

from __future__ import annotations

import math
import re

from tqdm import tqdm

from ..config import EvaluateConfig, TaskConfig
from ..model.generate import Request
from .parse import extract_object, normalise_label, opens_object


def answer_budget(tokenizer, rows: list[dict], cfg: EvaluateConfig) -> int:
    """New tokens allowed per answer: as set, else 1.5x the longest reference answer in `rows`
    (pass every task row, training rows too, so the budget does not depend on the split)."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    longest = max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows)
    return math.ceil(1.5 * longest)


def score(answer: str, reference: str, task: TaskConfig) -> dict:
    """formatted (strict), attempted and label (None when the metric has no label) of one answer."""
    if task.metric == "exact":
        same = answer.strip() == reference.strip()
        return {"formatted": same, "attempted": same, "label": None}
    if task.metric == "regex":
        pattern = re.compile(task.answer_pattern, re.DOTALL)
        match, ref = pattern.fullmatch(answer.strip()), pattern.fullmatch(reference.strip())
        label = None
        if "label" in pattern.groupindex:
            label = bool(match and ref) and match.group("label") == ref.group("label")
        return {"formatted": match is not None, "attempted": pattern.search(answer) is not None, "label": label}
    obj = extract_object(answer)
    formatted = obj is not None and all(k in obj for k in task.required_keys)
    label = None
    if task.label_key:
        ref = extract_object(reference) or {}
        label = bool(obj) and task.label_key in obj and task.label_key in ref and (
            normalise_label(obj[task.label_key]) == normalise_label(ref[task.label_key]))
    return {"formatted": formatted, "attempted": formatted or opens_object(answer, task.required_keys), "label": label}


def summarise(scored: list[dict], budget: int) -> dict:
    """Per group (seen, heldout, then any control group in order of appearance): n, format accuracy
    (strict), attempted, label accuracy and the share cut at `budget` tokens; and the seen - held-out gap."""
    out = {}
    for group in dict.fromkeys(["seen", "heldout"] + [s["group"] for s in scored]):
        rows = [s for s in scored if s["group"] == group]
        if not rows:
            continue
        out[group] = {
            "n": len(rows),
            "format_accuracy": sum(s["formatted"] for s in rows) / len(rows),
            "attempted": sum(s["attempted"] for s in rows) / len(rows),
            "label_accuracy": sum(bool(s["label"]) for s in rows) / len(rows) if rows[0]["label"] is not None else None,
            "cut": sum(s["tokens"] >= budget for s in rows) / len(rows),
        }
    if "seen" in out and "heldout" in out:
        out["format_gap"] = out["seen"]["format_accuracy"] - out["heldout"]["format_accuracy"]
    return out


def generate_answers(generator, prompts: list[list[dict]], budget: int, seed: int = 0,
                     desc: str = "evaluate", starts: list | None = None) -> list[tuple[str, int]]:
    """Greedy (text, generated tokens) for each prompt, in order, with a progress bar. `starts`: per prompt,
    the start of its greedy answer found by teacher forcing (`delia.analysis.drift.greedy_prefix`: tokens,
    finished) or None, for a generator that `continues_prefixes`: a finished one is not generated, the
    others go on from their tokens."""
    from ..model.generate import answer_of

    starts = starts or [None] * len(prompts)
    requests = [Request(key=str(i), messages=m, prefix=s[0] if s else ()) for i, (m, s) in enumerate(zip(prompts, starts))]
    answers: dict[str, tuple[str, int]] = {r.key: answer_of(generator.tokenizer, r, [], (), budget)
                                           for r, s in zip(requests, starts) if s and s[1]}
    pending = [r for r in requests if r.key not in answers]
    with tqdm(total=len(requests), initial=len(answers), desc=desc, unit="row") as bar:
        for batch in generator.batches(pending, budget, temperature=0.0, seed=seed) if pending else ():
            for request, text, n in batch:
                answers[request.key] = (text, n)
            bar.update(len(batch))
    return [answers[r.key] for r in requests]


def evaluate_formatted(generator, rows: list[dict], task: TaskConfig, budget: int, seed: int = 0,
                       desc: str = "evaluate"):
    """(metrics, per-row generations) for the evaluation rows (each with `group`: seen, heldout or a
    control); answers get `budget` new tokens."""
    answers = generate_answers(generator, [r["messages"][:-1] for r in rows], budget, seed, desc)
    generations = []
    for row, (text, n) in zip(rows, answers):
        generations.append({"group": row["group"], "wording": row.get("wording"), "answer": text, "tokens": n,
                            "reference": row["messages"][-1]["content"], **score(text, row["messages"][-1]["content"], task),
                            **({"row": row["row"]} if "row" in row else {})})
    metrics = summarise(generations, budget)
    metrics["max_new_tokens"] = budget
    metrics["hit_token_limit"] = sum(g["tokens"] >= budget for g in generations)
    return metrics, generations


def leakage(answers: list[tuple[str, int]], untouched_tokens: list[int], task: TaskConfig, budget: int) -> dict:
    """How much of the task's format leaks into answers to general queries: the share that opens the
    object (attempted) and that parses with the required keys (strict), ideal 0; their mean length
    beside the untouched model's; the share cut at `budget` tokens."""
    n = len(answers)
    scored = [score(text, "", task) for text, _ in answers]
    return {"n": n, "attempted": sum(s["attempted"] for s in scored) / n, "strict": sum(s["formatted"] for s in scored) / n,
            "mean_tokens": sum(t for _, t in answers) / n, "untouched_mean_tokens": sum(untouched_tokens) / n,
            "cut": sum(t >= budget for _, t in answers) / n}
