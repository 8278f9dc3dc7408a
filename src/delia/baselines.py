"""Baselines that need more than a data file: in-context examples, fact-based injection rows and
controlled generation by model arithmetic. (DMT, Dong et al. 2024, is the common arm's adapter trained
on for one more epoch on DELIA's diverse rows plus a share of the task rows: see `pipeline.stage_train`.)

- In-context learning: `k` training rows (drawn once with the seed) are put before every evaluation
  prompt as earlier user / assistant turns.
- Fact-based injection (Mecklenburg et al. 2024): atomic facts about what each new token means, each
  turned into the same number of question-answer rows (even coverage), trained with the task rows.
  Default facts: "`<sep>` means DESCRIPTION." and one fact per required key.
- DiPMT (Ghazvininejad et al. 2023), translation, no training: for the `dipmt_words` words of the
  source sentence that are in the dictionary and rarest in the training sources (ties: the earlier
  word), a paragraph of hints 'In this context, the word "X" means "Y".' (Y: its first two senses
  joined by "or") goes between the sentence and the instruction. Words are matched lower-cased as they
  stand, so an inflected Icelandic form misses its headword.
- Model arithmetic (Dekoninck et al. 2023), no training: at every step the next-token log-probabilities
  of the model prompted with the description (`M_desc`: each new token in the prompt followed by
  "(DESCRIPTION)") and without it (`M_plain`: the prompt as is) are combined as
  `M_desc + lambda (M_desc - M_plain)`, normalised, and decoded greedily (or sampled).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import DeliaError
from .config import TaskConfig
from .model.generate import LocalGenerator, Request, batch_seed

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


def dictionary_path(task: TaskConfig) -> Path:
    return Path(task.dictionary) if task.dictionary else Path(task.source) / "dictionary.json"


def load_dictionary(task: TaskConfig) -> dict[str, list[str]]:
    """{source-language word: [translations]} for the task's direction."""
    from .data.en_is import invert

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
    freq = Counter(w for r in train_rows for w in _words(r["messages"][0]["content"].rsplit("\n\n", 1)[0]))
    out = []
    for row in rows:
        user = row["messages"][0]["content"]
        sentence, _, wording = user.rpartition("\n\n")
        words = list(dict.fromkeys(w for w in _words(sentence) if w in dictionary))
        picked = sorted(sorted(words, key=lambda w: (freq[w], words.index(w)))[:n], key=words.index)
        hints = " ".join(f'In this context, the word "{w}" means "{" or ".join(dictionary[w][:2])}".' for w in picked)
        content = f"{sentence}\n\n{hints}\n\n{wording}" if hints else user
        out.append({**row, "messages": [{**row["messages"][0], "content": content}] + row["messages"][1:],
                    "hints": picked})
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


def describe_tokens(messages: list[dict], task: TaskConfig) -> list[dict]:
    """The prompt of M_desc: each new token in the user turns followed by "(DESCRIPTION)"."""
    out = []
    for m in messages:
        text = m["content"]
        if m["role"] == "user":
            for token in task.new_tokens:
                text = text.replace(token, f"{token} ({task.description})")
        out.append({**m, "content": text})
    return out


class ArithmeticGenerator(LocalGenerator):
    """Decoding by model arithmetic over one model: M_desc + lam * (M_desc - M_plain)."""

    def __init__(self, model, tokenizer, task: TaskConfig, lam: float = 1.0, batch_size: int = 8):
        super().__init__(model, tokenizer, batch_size)
        self.task = task
        self.lam = lam

    def batches(self, requests: Sequence[Request], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0) -> Iterator[list[tuple[Request, str, int]]]:
        pad = self.tokenizer.pad_token_id
        eos = set(self._stop_ids())
        self.model.eval()
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            n = len(chunk)
            prompts = [self.prompt_ids(describe_tokens(r.messages, self.task)) for r in chunk]
            prompts += [self.prompt_ids(r.messages) for r in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            generator = torch.Generator().manual_seed(batch_seed(seed, [r.key for r in chunk]))
            out: list[list[int]] = [[] for _ in range(n)]
            done = [False] * n
            past = None
            with torch.inference_mode():
                for _ in range(max_new_tokens):
                    result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        past_key_values=past, use_cache=True)
                    past = result.past_key_values
                    logp = torch.log_softmax(result.logits[:, -1].float(), -1)
                    combined = torch.log_softmax((1 + self.lam) * logp[:n] - self.lam * logp[n:], -1)
                    if temperature > 0:
                        probs = torch.softmax(combined / temperature, -1).cpu()
                        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
                    else:
                        nxt = combined.argmax(-1).cpu()
                    for i, tok in enumerate(nxt.tolist()):
                        if not done[i]:
                            if tok in eos:
                                done[i] = True
                            else:
                                out[i].append(tok)
                    if all(done):
                        break
                    step = torch.cat([nxt, nxt]).to(self.model.device)[:, None]
                    ids = step
                    mask = torch.cat([mask, torch.ones_like(step)], -1)
                    positions = positions[:, -1:] + 1
            yield [(r, self.tokenizer.decode(o, skip_special_tokens=True).strip(), len(o)) for r, o in zip(chunk, out)]
