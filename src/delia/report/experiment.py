"""An experiment's report (`delia experiment`): one row per run and arm, mean and spread over seeds;
pivots by one setting (`by`); the token analyses and times per run."""

from __future__ import annotations

import statistics

from ..arms import label
from ..runfolder import RunFolder
from .tables import controls_table, drift_table, mean_sd, tradeoff_points, tradeoff_words


def _mean(values: list[float], digits: int = 1) -> str:
    return mean_sd(values, 1, digits)


def _analysis_tables(exp: dict, results: list[dict]) -> list[str]:
    """Token distance (first / middle / last block) and the divergent token per run and model, and the
    time of each run, averaged over seeds."""
    from ..analysis.token_distance import first_middle_last
    if not results:
        return []
    token, kw = results[0]["token"], results[0]["keyword"]
    lines = ["", f"## `{token}` against \u201c{kw}\u201d and the divergent token", "",
             f"| Run | Model | L2 to \u201c{kw}\u201d, first block | middle block | last block | "
             "P(right `{`), held-out wordings | Entropy (nats), held-out wordings |", "|---|---|---|---|---|---|---|"]
    for run in exp["runs"]:
        rows = [r for r in results if r["run"] == run["name"] and r["token_distance"]]
        models = list(dict.fromkeys(m for r in rows for m in r["token_distance"]))
        for model in models:
            fml = [first_middle_last(r["token_distance"][model][kw]["l2"]) for r in rows
                   if kw in r["token_distance"].get(model, {})]
            div = [r["divergent"][model]["heldout"] for r in rows
                   if r["divergent"] and "heldout" in r["divergent"].get(model, {})]
            lines.append(f"| {run['name']} | {label(model)} | "
                         + " | ".join(_mean([f[i] for f in fml]) for i in range(3))
                         + f" | {_mean([d['p_right'] for d in div], 3)} | {_mean([d['entropy'] for d in div], 2)} |")
    lines += ["", "| Run | Seconds per seed (all stages) | Plots (first seed) |", "|---|---|---|"]
    for run in exp["runs"]:
        rows = [r for r in results if r["run"] == run["name"]]
        first = RunFolder(rows[0]["run_dir"]).analysis() if rows else None
        plots = f"`{first / 'token_distance.png'}`, `{first / 'divergent.png'}`" if first else "-"
        lines.append(f"| {run['name']} | {_mean([r['seconds'] for r in rows], 0)} | {plots} |")
    return lines


def _by_tables(by: str, results: list[dict]) -> list[str]:
    """Format accuracy of each arm, and the token's middle-block distance to its keyword for each model,
    with one column per value of the setting `by` (mean over the seeds and runs that share it)."""
    from ..analysis.token_distance import first_middle_last
    values = list(dict.fromkeys(r["by"] for r in results))
    head = " | ".join(f"{by} = {v}" for v in values)
    lines = []
    for group, title in (("heldout", "held-out wordings"), ("seen", "seen wordings")):
        lines += ["", f"## Format accuracy by {by} ({title})", "", f"| Arm | {head} |", "|---|" + "---|" * len(values)]
        for arm in dict.fromkeys(a for r in results for a in r["arms"]):
            cells = [_stat([r["arms"][arm]["metrics"][group]["format_accuracy"] for r in results if r["by"] == v
                            and arm in r["arms"] and r["arms"][arm]["metrics"].get(group)]) for v in values]
            lines.append(f"| {label(arm)} | " + " | ".join(cells) + " |")
    with_distance = [r for r in results if r["token_distance"]]
    if with_distance:
        token, kw = with_distance[0]["token"], with_distance[0]["keyword"]
        lines += ["", f"## L2 distance of `{token}` to “{kw}”, middle block, by {by}", "",
                  f"| Model | {head} |", "|---|" + "---|" * len(values)]
        for model in dict.fromkeys(m for r in with_distance for m in r["token_distance"]):
            cells = [_mean([first_middle_last(r["token_distance"][model][kw]["l2"])[1] for r in with_distance
                            if r["by"] == v and kw in r["token_distance"].get(model, {})]) for v in values]
            lines.append(f"| {label(model)} | " + " | ".join(cells) + " |")
    return lines


def per_arm(results: list[dict], run: str) -> dict[str, list[dict]]:
    """One run's collected figures per arm, a list over its seeds."""
    rows = [r for r in results if r["run"] == run]
    return {arm: [r["arms"][arm] for r in rows if arm in r["arms"]] for arm in dict.fromkeys(a for r in rows for a in r["arms"])}


def tradeoff(exp: dict, results: list[dict]) -> list[dict]:
    """Trade-off points of every run and arm (mean and sd over seeds), labelled with the run when there are several."""
    points = []
    for run in exp["runs"]:
        for p in tradeoff_points(per_arm(results, run["name"])):
            points.append({**p, "label": f"{run['name']}: {p['label']}" if len(exp["runs"]) > 1 else p["label"]})
    return points


def paired_table(results: list[dict], run: str, reference: str = "delia") -> list[str]:
    """Each arm against `reference` (DELIA, or the KL anchor) in the same run: held-out-wording format
    accuracy, drift and switch consistency, the difference and its paired bootstrap interval over seeds
    and rows (`delia.report.bootstrap`)."""
    from .bootstrap import CONFIDENCE, RESAMPLES, paired

    rows = [r for r in results if r["run"] == run]
    if not rows or not all(reference in r["arms"] for r in rows):
        return []
    found = paired([r["run_dir"] for r in rows], list(rows[0]["arms"]), reference)
    if not found:
        return []
    pct = f"{100 * CONFIDENCE:.0f} %"
    name, short = {"delia": ("DELIA", "DELIA"), "kl_anchor": ("the KL anchor", "anchor")}[reference]
    header, separator, cells = _differences(list(found.values()), f"arm − {short}", pct)
    return [f"### Against {name}: paired bootstrap over {len(rows)} seed(s) and their rows ({RESAMPLES:,} "
            f"resamples, {pct} interval)", "", f"| Arm | {header}", f"|---|{separator}"] + [
        "| " + " | ".join([label(arm)] + cells(d)) + " |" for arm, d in found.items()]


def _differences(found: list[dict], what: str, pct: str):
    """(header, separator, cells of one comparison) of the bootstrap difference columns: held-out format,
    KL and, where any comparison measured it, switch consistency; `what` names the difference."""
    switch = any("switch" in d for d in found)
    header = (f"Held-out format, {what} (points) [{pct}] | Beyond noise | KL, {what} (nats/token) [{pct}] | Beyond noise |"
              + (f" Switch, {what} (points) [{pct}] | Beyond noise |" if switch else ""))
    separator = "---|---|---|---|" + ("---|---|" if switch else "")
    return header, separator, lambda d: (_cell(d.get("heldout"), 100, 1) + _cell(d.get("kl"), 1, 3)
                                         + (_cell(d.get("switch"), 100, 1) if switch else []))


def _cell(d: dict | None, scale: float, digits: int) -> list[str]:
    """A bootstrap difference as 'diff [low, high]' and whether it is beyond noise."""
    if not d:
        return ["-", "-"]
    f = f"{{:+.{digits}f}}"
    return [f"{f.format(scale * d['diff'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]",
            "**yes**" if d["beyond_noise"] else "no"]


def across_runs_table(exp: dict, results: list[dict]) -> list[str]:
    """Each trained arm of every later run against the same arm in the first run (a higher mix.ratio
    against the lowest, say), paired over the seeds both finished and their rows; a run that scores
    other rows (another task split) is left out by the pairing."""
    from .bootstrap import CONFIDENCE, RESAMPLES, arm_rows, compare

    first = exp["runs"][0]["name"]
    base = {(r["seed"], a): r["run_dir"] for r in results if r["run"] == first for a, m in r["arms"].items() if m["train"]}
    found = []
    for run in exp["runs"][1:]:
        rows = [r for r in results if r["run"] == run["name"]]
        for arm in dict.fromkeys(a for r in rows for a in r["arms"]):
            pairs = [(r["run_dir"], base[r["seed"], arm]) for r in rows if (r["seed"], arm) in base]
            if not pairs:
                continue
            d = compare([arm_rows(mine, arm) for mine, _ in pairs], [arm_rows(theirs, arm) for _, theirs in pairs])
            if len(d) > 1:
                found.append((run["name"], arm, len(pairs), d))
    if not found:
        return []
    pct = f"{100 * CONFIDENCE:.0f} %"
    header, separator, cells = _differences([d for *_, d in found], f"run − {first}", pct)
    return ["", f"## Each arm against itself in run {first}", "",
            f"Paired bootstrap over the seeds both runs finished and their rows ({RESAMPLES:,} resamples, {pct} interval).", "",
            f"| Run | Arm | Seeds | {header}", f"|---|---|---|{separator}"] + [
        "| " + " | ".join([name, label(arm), str(seeds)] + cells(d)) + " |" for name, arm, seeds, d in found]


def costs_tables(exp: dict, results: list[dict]) -> list[str]:
    """Controls, drift and leakage per run (mean ± sd over seeds), each arm against DELIA, and the arms
    on the trade-off front."""
    lines = []
    for run in exp["runs"]:
        arms = per_arm(results, run["name"])
        tables = controls_table(arms) + drift_table(arms, {})
        if tables:
            lines += ["", f"## Costs and controls: {run['name']}", ""] + [t.replace("## ", "### ", 1) for t in tables]
        for reference in ("delia", "kl_anchor"):
            if paired_lines := paired_table(results, run["name"], reference):
                lines += [""] + paired_lines
    lines += across_runs_table(exp, results)
    if points := tradeoff(exp, results):
        lines += ["", tradeoff_words(points), "", f"![format accuracy against drift]({exp['dir']}/tradeoff.png)"]
    return lines


def _stat(values: list[float]) -> str:
    """Percent, mean ± sd over seeds."""
    return "-" if not values else f"{mean_sd(values)} %"


def render(exp: dict, results: list[dict]) -> str:
    lines = [f"# Experiment: {exp['dir']}", "",
             f"Base config `{exp['base']}`; seeds {', '.join(map(str, exp['seeds']))} (mean ± sample standard "
             f"deviation over seeds); overrides for every run: {', '.join(f'`{s}`' for s in exp['set']) or 'none'}.", "",
             "| Run | Arm | Format acc. (seen) | Format acc. (held-out) | Label acc. (seen) | Label acc. (held-out) | "
             "Optimizer steps | Trained tokens |", "|---|---|---|---|---|---|---|---|"]
    for run in exp["runs"]:
        rows = [r for r in results if r["run"] == run["name"]]
        arms = list(dict.fromkeys(a for r in rows for a in r["arms"]))
        for arm in arms:
            per_seed = [r["arms"][arm] for r in rows if arm in r["arms"]]

            def values(group, key):
                return [m["metrics"][group][key] for m in per_seed
                        if m["metrics"].get(group, {}).get(key) is not None]

            steps = sorted({(m["train"] or {}).get("steps", 0) for m in per_seed})
            tokens = [m["train"]["trained_tokens"] for m in per_seed if m["train"]]
            lines.append(f"| {run['name']} | {label(arm)} | {_stat(values('seen', 'format_accuracy'))} | "
                         f"{_stat(values('heldout', 'format_accuracy'))} | {_stat(values('seen', 'label_accuracy'))} | "
                         f"{_stat(values('heldout', 'label_accuracy'))} | {', '.join(map(str, steps))} | "
                         f"{f'{statistics.fmean(tokens):,.0f}' if tokens else '-'} |")
    lines += costs_tables(exp, results)
    if exp["by"]:
        lines += _by_tables(exp["by"], results)
    lines += _analysis_tables(exp, results)
    lines += ["", "Overrides per run: " + "; ".join(f"{r['name']}: {', '.join(f'`{s}`' for s in r.get('set', [])) or 'none'}"
                                                for r in exp["runs"]),
              "", "Each run's own report (both budget comparisons, token distances, stage times): "
              f"`{exp['dir']}/RUN/seed-N/report.md`."]
    return "\n".join(lines) + "\n"
