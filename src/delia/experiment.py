"""`delia experiment EXP.yaml`: many runs (baselines, ablations, ratios, seeds) and one report.

    base: ../configs/demo.yaml       # the run config every run starts from (relative to this file)
    dir: runs/ablations              # where the runs go: DIR/NAME/seed-N
    seeds: [0, 1]
    set: ["arms=[untouched, delia]"] # overrides for every run
    runs:
      - name: all
      - name: no-diverse-data
        set: ["mix.ratio=0"]
    by: task.train_rows              # optional: tables with one column per value of this setting

Each run is `delia run` with the base config, the experiment's overrides, the run's and the seed. A
finished run is not redone (its stages are up to date); a killed experiment resumes where it stopped.
Runs of one seed share their self-sampled answers: a run's sample cache starts from the largest one
already written by another run of that seed, so a query is answered once whatever the ratio.
The report (DIR/report.md, report.json) has one row per run and arm, mean and spread over the seeds.
With `by`, it also pivots the runs on that setting: format accuracy of each arm by, say, task size (the
shape of the paper's Table 2) and the new token's distance to its keyword by it (Table 1).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from . import DeliaError
from .runfolder import write_json, write_text

KEYS = {"base", "dir", "seeds", "set", "runs", "by"}


def load_experiment(path: str | Path) -> dict:
    """The experiment file, checked; an error names the line of the key it is about."""
    from .config import locate, read_yaml

    path = Path(path)
    data, lines = read_yaml(path, "experiment")
    try:
        return _check_experiment(path, data)
    except DeliaError as e:
        raise DeliaError(locate(str(e), str(path), lines)) from None


def _check_experiment(path: Path, data) -> dict:
    if not isinstance(data, dict):
        raise DeliaError(f"{path}: expected a mapping with {', '.join(sorted(KEYS))}")
    if unknown := set(data) - KEYS:
        raise DeliaError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(KEYS))})")
    for key in ("base", "dir", "runs"):
        if key not in data:
            raise DeliaError(f"{path}: '{key}' is missing")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise DeliaError(f"{path}: 'seeds': expected a list of integers, got {seeds!r}")
    runs = data["runs"]
    if not isinstance(runs, list) or not runs:
        raise DeliaError(f"{path}: 'runs': expected a non-empty list")
    names = set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or set(run) - {"name", "set"}:
            raise DeliaError(f"{path}: 'runs[{i}]': expected a mapping with a name and an optional set list")
        name = run["name"]
        if not name or "/" in name or name.startswith(".") or name in names:
            raise DeliaError(f"{path}: 'runs[{i}].name': {name!r} must be unique, non-empty, without '/' or a leading dot")
        names.add(name)
    for where, sets in [("set", data.get("set", []))] + [(f"runs[{i}].set", r.get("set", [])) for i, r in enumerate(runs)]:
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise DeliaError(f"{path}: '{where}': expected a list of KEY=VALUE strings")
    by = data.get("by")
    if by is not None:
        from .config import RunConfig, config_dict

        try:
            setting(config_dict(RunConfig()), by)
        except (KeyError, TypeError, AttributeError):
            raise DeliaError(f"{path}: 'by': {by!r} is not a setting (e.g. task.train_rows)") from None
    base = (path.parent / data["base"]).resolve()
    return {"base": str(base), "dir": data["dir"], "seeds": seeds, "set": data.get("set", []), "runs": runs, "by": by}


def setting(cfg: dict, key: str):
    """`task.train_rows` looked up in a config dict; KeyError when there is no such setting."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def run_configs(exp: dict):
    """(run name, seed, RunConfig) for every run and seed, in order."""
    from .config import load_config

    for run in exp["runs"]:
        for seed in exp["seeds"]:
            sets = exp["set"] + run.get("set", []) + [f"run_dir={Path(exp['dir']) / run['name'] / f'seed-{seed}'}",
                                                       f"seed={seed}"]
            yield run["name"], seed, load_config(exp["base"], sets)


def run_experiment(path: str | Path) -> Path:
    from .data.generation_cache import seed_cache
    from .pipeline import run_all
    from .report.tables import collect

    exp = load_experiment(path)
    exp_dir = Path(exp["dir"])
    results = []
    configs = list(run_configs(exp))  # every config checked before the first run starts
    for i, (name, seed, cfg) in enumerate(configs, 1):
        print(f"delia: experiment run {i}/{len(configs)}: {name}, seed {seed}", flush=True)
        seed_cache(Path(cfg.run_dir) / "sample" / "cache.jsonl", list(exp_dir.glob(f"*/seed-{seed}/sample/cache.jsonl")))
        run_all(cfg)
        data = collect(cfg)
        results.append({"run": name, "seed": seed, "run_dir": cfg.run_dir, "arms": data["arms"],
                        "by": setting(data["config"], exp["by"]) if exp["by"] else None,
                        "token": cfg.task.new_tokens[0], "keyword": (cfg.task.keywords or [""])[0],
                        "token_distance": data["token_distance"], "divergent": data["divergent"],
                        "seconds": round(sum(v["seconds"] for v in data["stages"].values()), 1)})
    write_json(exp_dir / "report.json", {"experiment": str(path), "base": exp["base"], "results": results})
    report = exp_dir / "report.md"
    write_text(report, render(exp, results))
    return report


def _mean(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _analysis_tables(exp: dict, results: list[dict]) -> list[str]:
    """Token distance (first / middle / last block) and the divergent token per run and model, and the
    time of each run, averaged over seeds."""
    from .analysis.token_distance import first_middle_last
    from .report.tables import LABELS

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
            lines.append(f"| {run['name']} | {LABELS.get(model, model)} | "
                         + " | ".join(_mean([f[i] for f in fml]) for i in range(3))
                         + f" | {_mean([d['p_right'] for d in div], 3)} | {_mean([d['entropy'] for d in div], 2)} |")
    lines += ["", "| Run | Seconds per seed (all stages) | Plots (first seed) |", "|---|---|---|"]
    for run in exp["runs"]:
        rows = [r for r in results if r["run"] == run["name"]]
        first = Path(rows[0]["run_dir"]) / "analysis" if rows else None
        plots = f"`{first / 'token_distance.png'}`, `{first / 'divergent.png'}`" if first else "-"
        lines.append(f"| {run['name']} | {_mean([r['seconds'] for r in rows], 0)} | {plots} |")
    return lines


def _by_tables(by: str, results: list[dict]) -> list[str]:
    """Format accuracy of each arm, and the token's middle-block distance to its keyword for each model,
    with one column per value of the setting `by` (mean over the seeds and runs that share it)."""
    from .analysis.token_distance import first_middle_last
    from .report.tables import LABELS

    values = list(dict.fromkeys(r["by"] for r in results))
    head = " | ".join(f"{by} = {v}" for v in values)
    lines = []
    for group, title in (("heldout", "held-out wordings"), ("seen", "seen wordings")):
        lines += ["", f"## Format accuracy by {by} ({title})", "", f"| Arm | {head} |", "|---|" + "---|" * len(values)]
        for arm in dict.fromkeys(a for r in results for a in r["arms"]):
            cells = [_stat([r["arms"][arm]["metrics"][group]["format_accuracy"] for r in results if r["by"] == v
                            and arm in r["arms"] and r["arms"][arm]["metrics"].get(group)]) for v in values]
            lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    with_distance = [r for r in results if r["token_distance"]]
    if with_distance:
        token, kw = with_distance[0]["token"], with_distance[0]["keyword"]
        lines += ["", f"## L2 distance of `{token}` to “{kw}”, middle block, by {by}", "",
                  f"| Model | {head} |", "|---|" + "---|" * len(values)]
        for model in dict.fromkeys(m for r in with_distance for m in r["token_distance"]):
            cells = [_mean([first_middle_last(r["token_distance"][model][kw]["l2"])[1] for r in with_distance
                            if r["by"] == v and kw in r["token_distance"].get(model, {})]) for v in values]
            lines.append(f"| {LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    return lines


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} %"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} %"


def render(exp: dict, results: list[dict]) -> str:
    from .report.tables import LABELS

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
            lines.append(f"| {run['name']} | {LABELS.get(arm, arm)} | {_stat(values('seen', 'format_accuracy'))} | "
                         f"{_stat(values('heldout', 'format_accuracy'))} | {_stat(values('seen', 'label_accuracy'))} | "
                         f"{_stat(values('heldout', 'label_accuracy'))} | {', '.join(map(str, steps))} | "
                         f"{f'{statistics.fmean(tokens):,.0f}' if tokens else '-'} |")
    if exp["by"]:
        lines += _by_tables(exp["by"], results)
    lines += _analysis_tables(exp, results)
    lines += ["", "Overrides per run: " + "; ".join(f"{r['name']}: {', '.join(f'`{s}`' for s in r.get('set', [])) or 'none'}"
                                                for r in exp["runs"]),
              "", "Each run's own report (both budget comparisons, token distances, stage times): "
              f"`{exp['dir']}/RUN/seed-N/report.md`."]
    return "\n".join(lines) + "\n"
