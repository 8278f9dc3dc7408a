"""The counterfactual arms' rows: the task's own inputs without the token, and what the untouched model
answers to them (the paper's buffering idea aimed at the task's inputs), so the format can only follow
the token.

For every training row (never an evaluation row), variants of its instruction (its last paragraph):
- `plain`: the instruction without its sentences that hold a new token;
- `negated`: that, then a training negation (`counterfactual.negations`, in turn row by row);
- `decoy`: every new token replaced by a decoy token (`counterfactual.decoys`, in turn), which training
  adds like the new tokens and never trains;
each answered by the untouched model as `sample` answers general queries (its settings, seed, cache and
resume; an empty answer gives no row, a cut one is handled by `sample.cut_answers`), so these rows say
"without the token, answer as you always did"; and
- `bare`: the new token alone as the instruction, answered with the row's reference.
Each row carries `source` (`counterfactual`, or `task` for the bare rows), `kind` and `of`, the key of
the training row it rewrites (`row_key`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..conversation import set_wording
from ..evaluate.controls import without_token_sentences
from ..runfolder import fingerprint

ANSWERED = ("plain", "negated", "decoy")
"""The variants the untouched model answers (the bare token is answered with the reference)."""


def row_key(row: dict) -> str:
    """A training row's identity: its conversation."""
    return fingerprint(row["messages"])


def variants(rows: list[dict], cfg: RunConfig) -> list[dict]:
    """The `counterfactual.kinds` variants of each training row, in row order (see the module's docstring);
    answered variants end with the user turn, bare ones keep the reference answer."""
    task, c = cfg.task, cfg.counterfactual
    token = task.new_tokens[0]
    out = []
    for n, row in enumerate(rows):
        stripped = without_token_sentences(row["wording"], task.new_tokens)
        decoyed = row["wording"]
        for t in task.new_tokens:
            decoyed = decoyed.replace(t, c.decoys[n % len(c.decoys)])
        negation = c.negations[n % len(c.negations)].format(token=token)
        wordings = {"plain": stripped, "negated": f"{stripped} {negation}".strip(), "decoy": decoyed, "bare": token}
        for kind in c.kinds:
            new = set_wording(row, wordings[kind])
            out.append({"messages": new["messages"] if kind == "bare" else new["messages"][:-1],
                        "wording": new["wording"], "kind": kind, "of": row_key(row)})
    return out


def counterfactual_rows(rows: list[dict], cfg: RunConfig, folder: Path) -> list[dict]:
    """The counterfactual rows of the training `rows`, the untouched model's answers cached in
    `folder/counterfactual_cache.jsonl` (a killed run resumes without asking a prompt twice)."""
    from ..model.backends import make_generator
    from ..model.generate import Request
    from .generation_cache import generate_cached
    from .sample import cut_fields, request_key, usable

    s = cfg.sample
    found = variants(rows, cfg)
    requests = [Request(key=request_key(cfg.model, s, cfg.seed, v["messages"], "plain"), messages=v["messages"])
                for v in found if v["kind"] in ANSWERED]
    folder.mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, folder / "counterfactual_cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, s.batch_size),
                                 s.max_new_tokens, s.temperature, s.top_p, cfg.seed, desc="counterfactual")
    answered = (answers[r.key] for r in requests)  # in the order of the answered variants
    out = []
    for v in found:
        if v["kind"] == "bare":
            out.append({"messages": v["messages"], "source": "task", "kind": "bare", "of": v["of"]})
        elif usable(answer := next(answered), s):
            out.append({"messages": v["messages"] + [{"role": "assistant", "content": answer["answer"]}],
                        "source": "counterfactual", "kind": v["kind"], "of": v["of"], **cut_fields(answer, s)})
    return out
