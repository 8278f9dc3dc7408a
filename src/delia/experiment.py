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

from pathlib import Path

from .errors import DeliaError
from .runfolder import RunFolder, write_json, write_text

KEYS = {"base", "dir", "seeds", "set", "runs", "by"}
NAME_LIMIT = 100
"""Characters a run's name (a folder's) may have."""


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
        if key != "runs" and not (isinstance(data[key], str) and data[key].strip()):
            raise DeliaError(f"{path}: '{key}': expected a path, got {data[key]!r}")
    from .config import check_run_dir, check_text

    check_text(data["dir"], "dir", str(path))
    check_run_dir(data["dir"], str(path), "dir", "an experiment's runs")  # the same rules as a run folder's
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise DeliaError(f"{path}: 'base': {data['base']!r} is not a config file (read from {base})")
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
        if not name or "/" in name or name.startswith(".") or name in names or not name.isprintable() or len(name) > NAME_LIMIT:
            raise DeliaError(f"{path}: 'runs[{i}].name': {name[:40]!r}{'...' if len(name) > 40 else ''} must be unique, "
                             f"non-empty, printable, at most {NAME_LIMIT} characters, without '/' or a leading dot")
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
    return {"base": str(base), "dir": data["dir"], "seeds": seeds, "set": data.get("set", []), "runs": runs, "by": by}


def _unfinished(report: Path) -> str | None:
    """None for a run whose report is whole, else why it is not counted ('' when it has none)."""
    import json

    try:
        json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):
        return " (its report.json is cut short or unreadable: run it again)"
    return None


def setting(cfg: dict, key: str):
    """`task.train_rows` looked up in a config dict; KeyError when there is no such setting."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def run_configs(exp: dict):
    """(run name, seed, RunConfig) for every run and seed, in order. A run's folder is DIR/NAME/seed-N,
    the name taken as it is written (never read as YAML); two runs that would share a folder are an error."""
    import dataclasses

    from .config import load_config

    folders: dict[str, str] = {}
    for run in exp["runs"]:
        for seed in exp["seeds"]:
            folder = Path(exp["dir"]) / run["name"] / f"seed-{seed}"
            if (key := str(folder.resolve())) in folders:
                raise DeliaError(f"runs '{folders[key]}' and '{run['name']}' would share the folder {folder}")
            folders[key] = run["name"]
            cfg = load_config(exp["base"], exp["set"] + run.get("set", []) + [f"seed={seed}"])
            yield run["name"], seed, dataclasses.replace(cfg, run_dir=str(folder))


def run_experiment(path: str | Path, report_only: bool = False) -> Path:
    """Every run and seed (each resumes), then the report; `report_only`: nothing runs, the report
    covers the runs whose run folder has its report, and names the others."""
    from .data.generation_cache import seed_cache
    from .pipeline import run_all
    from .report.experiment import render, tradeoff
    from .report.tables import collect

    exp = load_experiment(path)
    exp_dir = Path(exp["dir"])
    results = []
    configs = list(run_configs(exp))  # every config checked before the first run starts
    missing = []
    for i, (name, seed, cfg) in enumerate(configs, 1):
        if report_only:
            if (why := _unfinished(Path(cfg.run_dir) / "report.json")) is not None:
                missing.append(f"{name} seed {seed}{why}")
                continue
        else:
            print(f"delia: experiment run {i}/{len(configs)}: {name}, seed {seed}", flush=True)
            shared = [RunFolder(d).sample_cache for d in exp_dir.glob(f"*/seed-{seed}")]
            run_all(cfg, before_sample=lambda c=cfg, s=shared: seed_cache(RunFolder(c.run_dir).sample_cache, s))
        data = collect(cfg)
        results.append({"run": name, "seed": seed, "run_dir": cfg.run_dir, "arms": data["arms"],
                        "by": setting(data["config"], exp["by"]) if exp["by"] else None,
                        "token": cfg.task.new_tokens[0], "keyword": (cfg.task.keywords or [""])[0],
                        "token_distance": data["token_distance"], "divergent": data["divergent"],
                        "seconds": round(sum(v["seconds"] for v in data["stages"].values()), 1)})
    write_json(exp_dir / "report.json", {"experiment": str(path), "base": exp["base"], "results": results})
    finished = sorted({r["seed"] for r in results})
    if points := tradeoff(exp, results):
        from .analysis.drift import plot_tradeoff
        from .runfolder import atomic_path

        with atomic_path(exp_dir / "tradeoff.png") as tmp:
            plot_tradeoff(points, tmp, f"{exp['dir']}: mean and sd over seeds {', '.join(map(str, finished))}"
                          + (" (some runs fewer)" if missing else ""))
    report = exp_dir / "report.md"
    text = render({**exp, "seeds": finished} if missing else exp, results)
    if missing:
        text += f"\nNot finished when this report was made (`--report-only`): {', '.join(missing)}.\n"
    write_text(report, text)
    return report
