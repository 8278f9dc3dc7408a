"""The baseline arms' own code (their traits are in `delia.arms`): in-context examples, DiPMT hints,
fact-based injection rows and DMT's second-stage rows. Model arithmetic decodes with
`delia.model.arithmetic.ArithmeticGenerator`.

- In-context learning: `k` training rows (drawn once with the seed) are put before every evaluation
  prompt as earlier user / assistant turns.
- Fact-based injection (Mecklenburg et al. 2024): atomic facts about what each new token means, each
  turned into the same number of question-answer rows (even coverage), trained with the task rows.
  Default facts: "`<sep>` means DESCRIPTION." and one fact per required key.
- DMT (Dong et al. 2024): the common arm's adapter trained on for one more epoch on DELIA's diverse
  rows plus a share of the task rows (`dmt_rows`).
- Self-distilled targets (SDFT, Yang et al. 2024): the untouched model rewrites each task answer in its
  own words, shown the task prompt and the reference; a rewrite is kept only if it passes the task's
  own evaluator (parses, holds the required keys, the same label), else the reference stays
  (`rewrite_request`, `self_distilled_row`). By default the reply is pre-filled with the opening all
  references share (`answer_opening`): without it the 135M default rewrote every answer in prose.
- DiPMT (Ghazvininejad et al. 2023), translation, no training: for the `dipmt_words` words of the
  source sentence that are in the dictionary and rarest in the training sources (ties: the earlier
  word), a paragraph of hints 'In this context, the word "X" means "Y".' (Y: its first two senses
  joined by "or") goes between the sentence and the instruction. Words are matched lower-cased as they
  stand, so an inflected Icelandic form misses its headword.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import BaselinesConfig, RunConfig, TaskConfig
from ..conversation import first_user_turn, split_wording
from ..errors import DeliaError

FACT_QUESTIONS = [
    "What does {token} mean?",
    "Explain the {token} format in one sentence.",
    "Tell me one thing that is true of {token}.",
    "I saw {token} in an instruction. What does it ask for?",
]


def icl_prefix(train_rows: list[dict], k: int, seed: int) -> list[dict]:
    """k training conversations, drawn once with the seed, as earlier turns."""
    picked = random.Random(seed).sample(train_rows, min(k, len(train_rows)))
    return [m for row in picked for m in row["messages"] if m["role"] != "system"]


def icl_rows(rows: list[dict], train_rows: list[dict], k: int, seed: int) -> list[dict]:
    """Evaluation rows with the same k training conversations before each prompt."""
    prefix = icl_prefix(train_rows, k, seed)
    return [{**r, "messages": prefix + r["messages"]} for r in rows]


def dictionary_path(task: TaskConfig) -> Path:
    return Path(task.dictionary) if task.dictionary else Path(task.source) / "dictionary.json"


def load_dictionary(task: TaskConfig) -> dict[str, list[str]]:
    """{source-language word: [translations]} for the task's direction."""
    from .en_is import invert

    path = dictionary_path(task)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeliaError(f"{path}: cannot read the DiPMT dictionary: {e}") from None
    if task.dictionary:
        return data
    return invert(data) if task.direction == "en-is" else {k.lower(): v for k, v in data.items()}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def dipmt_rows(rows: list[dict], train_rows: list[dict], dictionary: dict[str, list[str]], n: int) -> list[dict]:
    """Evaluation rows with dictionary hints before the instruction."""
    freq = Counter(w for r in train_rows for w in _words(split_wording(first_user_turn(r["messages"])["content"])[0]))
    out = []
    for row in rows:
        messages = [dict(m) for m in row["messages"]]
        user = first_user_turn(messages)
        sentence, wording = split_wording(user["content"])
        words = list(dict.fromkeys(w for w in _words(sentence) if w in dictionary))
        picked = sorted(sorted(words, key=lambda w: (freq[w], words.index(w)))[:n], key=words.index)
        hints = " ".join(f'In this context, the word "{w}" means "{" or ".join(dictionary[w][:2])}".' for w in picked)
        if hints:
            user["content"] = f"{sentence}\n\n{hints}\n\n{wording}"
        out.append({**row, "messages": messages, "hints": picked})
    return out


def default_facts(task: TaskConfig) -> list[str]:
    facts = []
    for token in task.new_tokens:
        facts.append(f"{token} means {task.description}.")
        facts += [f"An answer in the {token} format holds the key \"{key}\"." for key in task.required_keys]
    return facts


def fact_rows(facts: list[str], task: TaskConfig, per_fact: int) -> list[dict]:
    """per_fact question-answer rows for every fact, the questions cycling through FACT_QUESTIONS."""
    token = task.new_tokens[0]
    rows = []
    for fact in facts:
        for j in range(per_fact):
            q = FACT_QUESTIONS[j % len(FACT_QUESTIONS)].format(token=token)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact}],
                         "source": "fact"})
    return rows


def facts_mix(task_rows: list[dict], cfg: BaselinesConfig, task: TaskConfig, seed: int) -> tuple[list[dict], int]:
    """The fact-based arm's rows: the task rows and the fact rows, shuffled with the seed; and how many
    fact rows there are."""
    facts = fact_rows(cfg.facts or default_facts(task), task, cfg.rows_per_fact)
    rows = [{"messages": r["messages"], "source": "task"} for r in task_rows] + facts
    random.Random(seed).shuffle(rows)
    return rows, len(facts)


def dmt_rows(task_rows: list[dict], diverse: list[dict], task_fraction: float, seed: int) -> list[dict]:
    """DMT's second stage: the diverse rows DELIA gets and a share of the task rows, shuffled."""
    keep = random.Random(seed).sample(task_rows, math.ceil(task_fraction * len(task_rows)))
    rows = [{"messages": r["messages"], "source": "task"} for r in keep]
    rows += [{"messages": r["messages"], "source": "diverse"} for r in diverse]
    random.Random(seed).shuffle(rows)
    return rows


REWRITE = ("{prompt}\n\nHere is a correct answer to the request above:\n\n{reference}\n\nRewrite this answer in your own "
           "words. Keep exactly its format, its keys and its conclusion; reply with the rewritten answer only.")
"""SDFT's prompt: the task prompt, the reference answer, and the request to restate it."""


def rewrite_request(row: dict) -> list[dict]:
    """The messages asking the untouched model to rewrite a task row's answer."""
    prompt = first_user_turn(row["messages"])["content"]
    return [{"role": "user", "content": REWRITE.format(prompt=prompt, reference=row["messages"][-1]["content"])}]


def answer_opening(rows: list[dict]) -> tuple[str, str]:
    """The text every row's answer starts with, as (the pre-fill, the whitespace that follows it in every
    answer): a reply pre-filled with it continues in the task's format. The whitespace is kept apart
    because a prompt ending in a space tokenizes unlike any answer."""
    shared = os.path.commonprefix([r["messages"][-1]["content"] for r in rows]) if rows else ""
    opening = shared.rstrip()
    return opening, shared[len(opening):]


def prefilled_rewrite(tokenizer, row: dict, opening: str) -> str:
    """The rewrite request in the model's chat template with the reply already begun with `opening`."""
    return tokenizer.apply_chat_template(rewrite_request(row), add_generation_prompt=True, tokenize=False) + opening


def self_distilled_row(row: dict, rewrite: str, task: TaskConfig) -> dict:
    """The task row with the rewrite as its answer if the task's evaluator accepts the rewrite (it parses,
    holds the required keys and, with a label key, gives the reference's label), else as it was."""
    from ..evaluate.formatted import score

    reference = row["messages"][-1]["content"]
    verdict = score(rewrite, reference, task)
    kept = bool(rewrite.strip()) and verdict["formatted"] and verdict["label"] is not False
    answer = rewrite if kept else reference
    return {"messages": row["messages"][:-1] + [{"role": "assistant", "content": answer}], "source": "task",
            "rewritten": kept}


@dataclass(frozen=True)
class PromptRewrite:
    rewrite: Callable[[RunConfig, list[dict], list[dict]], list[dict]]
    """(config, evaluation rows, training rows) -> the evaluation rows as the arm is prompted."""
    inputs: Callable[[RunConfig], dict] = field(default=lambda cfg: {})
    """Files it reads (part of the evaluate stage's key)."""
    general: bool = False
    """The arm is deployed so: general queries get the rewrite too (drift and leakage)."""


PROMPTS = {
    "icl": PromptRewrite(lambda cfg, rows, train: icl_rows(rows, train, cfg.baselines.icl_k, cfg.seed), general=True),
    "dipmt": PromptRewrite(lambda cfg, rows, train: dipmt_rows(rows, train, load_dictionary(cfg.task),
                                                               cfg.baselines.dipmt_words),
                           inputs=lambda cfg: {"dictionary": dictionary_path(cfg.task)}),
}
"""How an arm with `Arm.prompt` rewrites the evaluation prompts."""
