"""The `evaluate` stage: formatted-text accuracy and label accuracy, by wording group.

A hit is an answer whose earliest `{...}` parses and holds every required key. Label accuracy counts
answers whose `label_key` value equals the reference's. Both are reported for the training wordings
(`seen`), for the held-out wordings (`heldout`) and for their gap. Decoding is greedy, through any
generation backend (local, vLLM or an OpenAI-compatible server).
"""

from __future__ import annotations

import math

from tqdm import tqdm

from ..config import EvaluateConfig, TaskConfig
from ..model.generate import Request
from .parse import extract_object, normalise_label


def answer_budget(tokenizer, rows: list[dict], cfg: EvaluateConfig) -> int:
    """New tokens allowed per answer: as set, else 1.5x the longest reference answer in `rows`
    (pass every task row, training rows too, so the budget does not depend on the split)."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    longest = max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows)
    return math.ceil(1.5 * longest)


def score(answer: str, reference: str, task: TaskConfig) -> dict:
    obj = extract_object(answer)
    formatted = obj is not None and all(k in obj for k in task.required_keys)
    label = None
    if task.label_key:
        ref = extract_object(reference) or {}
        label = bool(obj) and task.label_key in obj and task.label_key in ref and (
            normalise_label(obj[task.label_key]) == normalise_label(ref[task.label_key]))
    return {"formatted": formatted, "label": label}


def summarise(scored: list[dict]) -> dict:
    out = {}
    for group in ("seen", "heldout"):
        rows = [s for s in scored if s["group"] == group]
        if not rows:
            continue
        out[group] = {
            "n": len(rows),
            "format_accuracy": sum(s["formatted"] for s in rows) / len(rows),
            "label_accuracy": sum(bool(s["label"]) for s in rows) / len(rows) if rows[0]["label"] is not None else None,
        }
    if "seen" in out and "heldout" in out:
        out["format_gap"] = out["seen"]["format_accuracy"] - out["heldout"]["format_accuracy"]
    return out


def evaluate_formatted(generator, rows: list[dict], task: TaskConfig, budget: int, seed: int = 0):
    """(metrics, per-row generations) for the evaluation rows (each with `group`: seen or heldout);
    answers get `budget` new tokens."""
    requests = [Request(key=str(i), messages=r["messages"][:-1]) for i, r in enumerate(rows)]
    answers: dict[str, tuple[str, int]] = {}
    with tqdm(total=len(requests), desc="evaluate", unit="row") as bar:
        for batch in generator.batches(requests, budget, temperature=0.0, seed=seed):
            for request, text, n in batch:
                answers[request.key] = (text, n)
            bar.update(len(batch))
    generations = []
    for i, row in enumerate(rows):
        text, n = answers[str(i)]
        generations.append({"group": row["group"], "wording": row.get("wording"), "answer": text, "tokens": n,
                            "reference": row["messages"][-1]["content"], **score(text, row["messages"][-1]["content"], task)})
    metrics = summarise(generations)
    metrics["max_new_tokens"] = budget
    metrics["hit_token_limit"] = sum(g["tokens"] >= budget for g in generations)
    return metrics, generations
