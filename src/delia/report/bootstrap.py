"""Is an arm's difference from DELIA beyond noise? A paired, two-level bootstrap over seeds and rows.

Every arm of a seed is scored on the same evaluation rows and the same general queries, so the arms
are compared row by row. One resample draws seeds with replacement and, within each drawn seed, its
rows with replacement (a fresh draw for each time a seed is drawn); the statistic is the arm's figure
minus DELIA's on the pooled drawn rows:
- held-out-wording format accuracy: the mean of the per-row difference (formatted or not);
- drift: per-token KL, summed KL over summed tokens, for each arm, on the same drawn queries;
- switch consistency: the mean of the per-row difference (consistent or not) over the rows the controls
  rewrote.
The interval is the percentile interval of the resamples; a difference is beyond noise when the
interval leaves out 0. With few seeds the seed level is coarse: the interval is stated, not a p-value.
"""

from __future__ import annotations

import numpy as np

from ..runfolder import RunFolder, read_jsonl

CONFIDENCE = 0.95
RESAMPLES = 4000


def heldout_formatted(run_dir: str, arm: str) -> list[tuple[str, str, bool]] | None:
    """(wording, reference, formatted) of each held-out-wording evaluation row of an arm, in order."""
    path = RunFolder(run_dir).eval(arm) / "generations.jsonl"
    if not path.exists():
        return None
    return [(r["wording"], r["reference"], bool(r["formatted"])) for r in read_jsonl(path) if r["group"] == "heldout"]


def general_kl(run_dir: str, arm: str) -> list[tuple[str, float, int]] | None:
    """(query, summed KL, tokens) of each general query for an arm, in order; None when not measured per query."""
    path = RunFolder(run_dir).eval(arm) / "general.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    if not rows or "kl_sum" not in rows[0]:
        return None
    return [(r["query"], r["kl_sum"], r["kl_tokens"]) for r in rows]


def switch_rows(run_dir: str, arm: str) -> list[tuple[int, str, bool]] | None:
    """(evaluation row, wording, consistent) of each row the controls rewrote, in order; None when not measured."""
    path = RunFolder(run_dir).eval(arm) / "switch.jsonl"
    if not path.exists():
        return None
    return [(r["row"], r["wording"], bool(r["consistent"])) for r in read_jsonl(path)]


def _draws(sizes: list[int], rng: np.random.Generator, resamples: int):
    """For each resample, the drawn (seed index, row indices) pairs."""
    for _ in range(resamples):
        yield [(s, rng.integers(sizes[s], size=sizes[s])) for s in rng.integers(len(sizes), size=len(sizes))]


def _interval(values: list[float], point: float) -> dict:
    low, high = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {"diff": point, "low": float(low), "high": float(high), "beyond_noise": bool(low > 0 or high < 0)}


def accuracy_difference(arm: list[list[bool]], reference: list[list[bool]], seed: int = 0,
                        resamples: int = RESAMPLES) -> dict:
    """Arm minus reference in format accuracy; per seed, the two lists hold the same rows in the same order."""
    diffs = [np.asarray(a, float) - np.asarray(r, float) for a, r in zip(arm, reference)]
    point = float(np.concatenate(diffs).mean())
    rng = np.random.default_rng(seed)
    values = [float(np.concatenate([diffs[s][i] for s, i in draw]).mean())
              for draw in _draws([len(d) for d in diffs], rng, resamples)]
    return _interval(values, point)


def kl_difference(arm: list[list[tuple[float, int]]], reference: list[list[tuple[float, int]]], seed: int = 0,
                  resamples: int = RESAMPLES) -> dict:
    """Arm minus reference in per-token KL; per seed, (summed KL, tokens) of the same queries in order."""
    a = [np.asarray(x, float).reshape(-1, 2) for x in arm]
    r = [np.asarray(x, float).reshape(-1, 2) for x in reference]

    def per_token(parts):
        total = np.sum([p.sum(0) for p in parts], 0)
        return total[0] / total[1]

    point = float(per_token(a) - per_token(r))
    rng = np.random.default_rng(seed)
    values = [float(per_token([a[s][i] for s, i in draw]) - per_token([r[s][i] for s, i in draw]))
              for draw in _draws([len(x) for x in a], rng, resamples)]
    return _interval(values, point)


def arm_rows(run_dir: str, arm: str) -> tuple:
    """An arm's held-out-wording rows, general queries and switch rows in one run folder (`heldout_formatted`,
    `general_kl`, `switch_rows`)."""
    return heldout_formatted(run_dir, arm), general_kl(run_dir, arm), switch_rows(run_dir, arm)


def compare(arm: list[tuple], reference: list[tuple]) -> dict:
    """Arm minus reference, each a list over seeds of `arm_rows`; a figure is compared only where every
    seed scored the same rows (same wordings and references, same general queries, same control rows) for both."""
    acc_a, acc_r, kl_a, kl_r, sw_a, sw_r = [], [], [], [], [], []
    for (a, ka, sa), (r, kr, sr) in zip(arm, reference):
        if a and r and [x[:2] for x in a] == [x[:2] for x in r]:
            acc_a.append([x[2] for x in a])
            acc_r.append([x[2] for x in r])
        if ka and kr and [x[0] for x in ka] == [x[0] for x in kr]:
            kl_a.append([x[1:] for x in ka])
            kl_r.append([x[1:] for x in kr])
        if sa and sr and [x[:2] for x in sa] == [x[:2] for x in sr]:
            sw_a.append([x[2] for x in sa])
            sw_r.append([x[2] for x in sr])
    result = {"seeds": len(arm)}
    if arm and len(acc_a) == len(arm):
        result["heldout"] = accuracy_difference(acc_a, acc_r)
    if arm and len(kl_a) == len(arm):
        result["kl"] = kl_difference(kl_a, kl_r)
    if arm and len(sw_a) == len(arm):
        result["switch"] = accuracy_difference(sw_a, sw_r)
    return result


def paired(run_dirs: list[str], arms: list[str], reference: str = "delia") -> dict[str, dict]:
    """For each arm but the reference: its held-out format accuracy and drift against the reference's,
    paired over the seeds' run folders (each seed's figures from its own folder). An arm missing from
    a seed, or rows that do not match, leave that comparison out."""
    ref = [arm_rows(d, reference) for d in run_dirs]
    found = {arm: compare([arm_rows(d, arm) for d in run_dirs], ref) for arm in arms if arm != reference}
    return {arm: d for arm, d in found.items() if len(d) > 1}
