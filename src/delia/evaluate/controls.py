"""Controls: does the format follow the new token, and only the token? Built from evaluation rows.

Each control rewrites a row's instruction wording (its last paragraph) and keeps the rest:
- `negated`: the wording without its sentences that hold a new token, then an instruction not to use
  the token's format (`controls.negated`, one template per row in turn). Ideal: prose, not the object.
- `token_only`: the new token alone as the instruction (the paper's "condensed instruction"). Ideal:
  the object.
- `token_removed`: the wording without its sentences that hold a new token. Ideal: no object (the
  format should follow the token, not the shape of the input).
- `other_token`: every new token replaced by `controls.other_token`, a token added the same way but
  never trained. Ideal: no object (otherwise the words around the token carry the format).
Every group is scored twice: attempted (an object opened with a required key, malformed or not) and
strict (it parses and holds every required key), with the share of answers cut at the token limit.

Switch consistency (`switch_consistency`, as CondaQA's group consistency): a control row counts only
if every variant of it is right: the row as it is (instruction with the token) and `token_only` give
the object (strict), `negated`, `token_removed` and `other_token` give prose (no object attempted).
"""

from __future__ import annotations

import re

from ..config import ControlsConfig, TaskConfig
from ..conversation import set_wording

CONTROLS = ("negated", "token_only", "token_removed", "other_token")
IDEAL = {"seen": "formatted", "heldout": "formatted", "negated": "prose", "token_only": "formatted",
         "token_removed": "prose", "other_token": "prose"}
"""What a model whose format follows the token, and only the token, answers in each group."""


def without_token_sentences(wording: str, tokens: list[str]) -> str:
    """The wording less each sentence that holds one of `tokens` (and with it the format words)."""
    sentences = re.split(r"(?<=[.!?])\s+", wording.strip())
    return " ".join(s for s in sentences if not any(t in s for t in tokens)).strip()


def control_rows(rows: list[dict], task: TaskConfig, cfg: ControlsConfig) -> list[dict]:
    """The controls of up to `cfg.rows` evaluation rows (held-out wordings first, then seen, half each),
    every control of a row in turn; each row's `group` names its control and `row` the index in `rows`
    of the evaluation row it rewrites."""
    if not cfg.rows or not task.new_tokens:
        return []
    heldout = [i for i, r in enumerate(rows) if r.get("group") == "heldout"]
    seen = [i for i, r in enumerate(rows) if r.get("group") == "seen"]
    picked = heldout[: -(-cfg.rows // 2)] + seen[: cfg.rows // 2]
    picked += [i for i in heldout + seen if i not in picked][: cfg.rows - len(picked)]
    token = task.new_tokens[0]
    out = []
    for n, i in enumerate(picked):
        row = rows[i]
        wording = row["wording"]
        stripped = without_token_sentences(wording, task.new_tokens)
        other = wording
        for t in task.new_tokens:
            other = other.replace(t, cfg.other_token)
        negation = cfg.negated[n % len(cfg.negated)].format(token=token)
        variants = {"negated": f"{stripped} {negation}".strip(), "token_only": token, "token_removed": stripped,
                    "other_token": other}
        for group in CONTROLS:
            out.append({**set_wording(row, variants[group]), "group": group, "source_group": row["group"], "row": i})
    return out


def _right(answer: dict, group: str) -> bool:
    """Whether a scored answer is what a switch gives in its group: the object (strict), or prose."""
    return answer["formatted"] if IDEAL[group] == "formatted" else not answer["attempted"]


def switch_consistency(answers: list[dict], controls: list[dict]) -> dict:
    """Switch consistency over the control rows. `answers`: the scored answers to the evaluation rows, in
    their order; `controls`: the scored control answers, each with `row` (the evaluation row it rewrites)
    and `group`. Every control group present counts (a backend without the never-trained token has no
    `other_token`). Returns n, consistency, the groups counted, and per row whether it was consistent."""
    variants: dict[int, dict[str, dict]] = {}
    for c in controls:
        variants.setdefault(c["row"], {})[c["group"]] = c
    groups = [g for g in CONTROLS if any(g in v for v in variants.values())]
    rows = []
    for i, v in variants.items():
        source = answers[i]
        ok = _right(source, source["group"]) and all(g in v and _right(v[g], g) for g in groups)
        rows.append({"row": i, "group": source["group"], "wording": source["wording"], "consistent": ok})
    n = len(rows)
    return {"n": n, "consistency": sum(r["consistent"] for r in rows) / n if n else None,
            "groups": ["instruction", *groups], "rows": rows}
