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
    every control of a row in turn; each row's `group` names its control."""
    if not cfg.rows or not task.new_tokens:
        return []
    heldout = [r for r in rows if r.get("group") == "heldout"]
    seen = [r for r in rows if r.get("group") == "seen"]
    picked = heldout[: -(-cfg.rows // 2)] + seen[: cfg.rows // 2]
    picked += [r for r in heldout + seen if r not in picked][: cfg.rows - len(picked)]
    token = task.new_tokens[0]
    out = []
    for i, row in enumerate(picked):
        wording = row["wording"]
        stripped = without_token_sentences(wording, task.new_tokens)
        other = wording
        for t in task.new_tokens:
            other = other.replace(t, cfg.other_token)
        negation = cfg.negated[i % len(cfg.negated)].format(token=token)
        variants = {"negated": f"{stripped} {negation}".strip(), "token_only": token, "token_removed": stripped,
                    "other_token": other}
        for group in CONTROLS:
            out.append({**set_wording(row, variants[group]), "group": group, "source_group": row["group"]})
    return out
