"""The `task` stage: task rows for training and evaluation, split by instruction wording.

Evaluation rows come in two groups: `seen` (wordings that also occur in training, new content) and
`heldout` (wordings never in training). For a file, a row's wording is the last paragraph of its first
user turn (the text after the last blank line), as in the paper's data.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from ..config import DEMO_TRAIN_ROWS, TaskConfig
from ..conversation import set_wording, wording_of
from ..errors import DeliaError
from . import demo_task
from .formats import load_located


def build_task(cfg: TaskConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows); each evaluation row carries `group`: seen or heldout."""
    if cfg.kind == "translation":
        from .translation import build_translation_task

        train, seen, heldout = build_translation_task(cfg.source, cfg.direction, cfg.train_rows, cfg.eval_rows, seed,
                                                      cfg.eval_source)
    elif cfg.source == "demo":
        train = demo_task.make_rows(cfg.train_rows or DEMO_TRAIN_ROWS, demo_task.TRAIN_WORDINGS, seed)
        used = {r["question"] for r in train}
        seen = demo_task.make_rows(cfg.eval_rows, demo_task.TRAIN_WORDINGS, seed + 1, avoid=used)
        used |= {r["question"] for r in seen}
        heldout = demo_task.make_rows(cfg.eval_rows, demo_task.HELDOUT_WORDINGS, seed + 2, avoid=used)
    else:
        train, seen, heldout = _split_file(cfg, seed)
    for token in cfg.new_tokens:
        for row in train:
            if not _has_token(row["messages"], token):
                raise DeliaError(f"{cfg.source}: a training row lacks the new token {token!r}: {row['wording'][:80]!r}")
    if not cfg.diversify:
        fixed = train[0]["wording"]
        train = [set_wording(r, fixed) for r in train]
    evals = [{**r, "group": "seen"} for r in seen] + [{**r, "group": "heldout"} for r in heldout]
    return train, evals


def check_references(task: TaskConfig, rows: list[dict]) -> None:
    """Before an hour of compute: the task's own reference answers must pass its evaluator (else every
    arm scores 0 without a word). The first that fails is named in one line."""
    from ..evaluate.formatted import score
    from ..evaluate.parse import extract_object

    for row in rows:
        ref = row["messages"][-1]["content"]
        s = score(ref, ref, task)
        if s["formatted"] and s["label"] is not False:
            continue
        where = row.get("where", f"{task.source} ({row.get('group', 'train')} row)")
        if task.metric == "regex":
            why = f"does not match task.answer_pattern {task.answer_pattern!r}"
        elif (obj := extract_object(ref)) is None:
            why = "holds no JSON object (task.metric object; for plain answers use task.metric exact or regex)"
        elif missing := [k for k in task.required_keys if k not in obj]:
            why = (f"lacks the key(s) {', '.join(map(repr, missing))} of task.required_keys (it has "
                   f"{', '.join(map(repr, obj)) or 'none'}); set task.required_keys and task.label_key to your task's")
        else:
            why = f"lacks task.label_key {task.label_key!r} (set it to a key your answers hold, or '' for none)"
        raise DeliaError(f"{where}: the reference answer {why}: {ref[:80]!r}")


def _has_token(messages: list[dict], token: str) -> bool:
    return any(token in m["content"] for m in messages if m["role"] == "user")


def _split_file(cfg: TaskConfig, seed: int):
    path = cfg.source
    located = load_located(path)
    for token in cfg.new_tokens:  # every instruction of the task should hold its new tokens
        for where, messages in located:
            if not _has_token(messages, token):
                raise DeliaError(f"{where}: field 'messages': no user turn holds the new token {token!r} "
                                 f"(task.new_tokens); add it to the instruction or change task.new_tokens")
    rows = [{"messages": m, "wording": wording_of(m), "where": where} for where, m in located]
    by_wording: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_wording[row["wording"]].append(row)
    if len(rows) >= 10 and len(by_wording) >= 0.9 * len(rows):  # the last-paragraph rule probably does not fit
        print(f"delia: warning: {path}: {len(by_wording)} instruction wordings for {len(rows)} rows; the wording is "
              "the last paragraph of the first user turn (after the last blank line), so put the instruction "
              "there, after the row's content, or the seen / held-out split means little", flush=True)
    wordings = sorted(by_wording)
    rng = random.Random(seed)
    rng.shuffle(wordings)
    n_heldout = math.ceil(cfg.heldout_wording_fraction * len(wordings)) if cfg.heldout_wording_fraction > 0 else 0
    if n_heldout >= len(wordings):
        raise DeliaError(f"{path}: only {len(wordings)} distinct wordings; lower task.heldout_wording_fraction")
    heldout = [r for w in wordings[:n_heldout] for r in by_wording[w]][: cfg.eval_rows]
    train, seen = [], []
    for w in wordings[n_heldout:]:
        group = by_wording[w]
        # a wording with two or more rows lends one to the seen-wording evaluation, keeps the rest
        if len(group) > 1 and len(seen) < cfg.eval_rows:
            seen.append(group[-1])
            group = group[:-1]
        train.extend(group)
    rng.shuffle(train)
    if cfg.train_rows:
        train = train[: cfg.train_rows]
    if not train:
        raise DeliaError(f"{path}: no training rows left after holding out evaluation rows")
    return train, seen, heldout
