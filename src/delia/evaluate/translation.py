"""Translation quality: chrF++ and BLEU (sacrebleu, corpus level) by wording group.

`Scorer` is the interface: a name and `score(hypotheses, references) -> float`. chrF++ and BLEU are
built in; a learned metric (BLEURT, COMET) plugs in as a scorer when its checkpoint is on the machine
(`learned_scorer`), since its weights cannot be fetched here.
"""

from __future__ import annotations

from typing import Callable, Protocol

from tqdm import tqdm

from ..errors import DeliaError
from ..model.generate import Request


class Scorer(Protocol):
    name: str

    def score(self, hypotheses: list[str], references: list[str]) -> float: ...


class SacreScorer:
    def __init__(self, name: str):
        import sacrebleu

        self.name = name
        self.metric = sacrebleu.CHRF(word_order=2) if name == "chrf++" else sacrebleu.BLEU()

    def score(self, hypotheses: list[str], references: list[str]) -> float:
        return round(self.metric.corpus_score(hypotheses, [references]).score, 2)


def learned_scorer(kind: str, checkpoint: str) -> Scorer:
    """BLEURT (`bleurt` package) or COMET (`unbabel-comet`) from a local checkpoint."""
    class _Learned:
        name = kind

        def __init__(self, fn: Callable[[list[str], list[str]], list[float]]):
            self.fn = fn

        def score(self, hypotheses, references):
            values = self.fn(hypotheses, references)
            return round(100 * sum(values) / len(values), 2)

    try:
        if kind == "bleurt":
            from bleurt import score as bleurt_score

            scorer = bleurt_score.BleurtScorer(checkpoint)
            return _Learned(lambda h, r: scorer.score(references=r, candidates=h))
        if kind == "comet":
            from comet import load_from_checkpoint

            model = load_from_checkpoint(checkpoint)
            return _Learned(lambda h, r: model.predict([{"src": "", "mt": a, "ref": b} for a, b in zip(h, r)],
                                                       progress_bar=False).scores)
    except ImportError as e:
        raise DeliaError(f"evaluate: the {kind} scorer needs its package ({e.name}); pip install it") from None
    raise DeliaError(f"evaluate: unknown learned scorer {kind!r} (bleurt or comet)")


def evaluate_translation(generator, rows: list[dict], budget: int, seed: int = 0,
                         scorers: list[Scorer] | None = None):
    """(metrics by wording group, per-row generations) for rows whose reference is the last turn."""
    scorers = scorers or [SacreScorer("chrf++"), SacreScorer("bleu")]
    requests = [Request(key=str(i), messages=r["messages"][:-1]) for i, r in enumerate(rows)]
    answers: dict[str, tuple[str, int]] = {}
    with tqdm(total=len(requests), desc="evaluate", unit="row") as bar:
        for batch in generator.batches(requests, budget, temperature=0.0, seed=seed):
            for request, text, n in batch:
                answers[request.key] = (text.split("\n")[0].strip(), n)  # the first line is the translation
            bar.update(len(batch))
    generations = [{"group": r["group"], "wording": r.get("wording"), "answer": answers[str(i)][0],
                    "tokens": answers[str(i)][1], "reference": r["messages"][-1]["content"],
                    **({"hints": r["hints"]} if "hints" in r else {})}
                   for i, r in enumerate(rows)]
    metrics = {}
    for group in ("seen", "heldout"):
        part = [g for g in generations if g["group"] == group]
        if part:
            metrics[group] = {"n": len(part), **{s.name: s.score([g["answer"] for g in part],
                                                                 [g["reference"] for g in part]) for s in scorers}}
    metrics["max_new_tokens"] = budget
    metrics["hit_token_limit"] = sum(g["tokens"] >= budget for g in generations)
    return metrics, generations
