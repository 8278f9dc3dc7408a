"""Studies beside the chain, on a run folder: how much diverse data (`delia sweep`, the paper's Figure 3,
and `delia tune-ratio`) and whether diverse rows buffer the task gradient (`delia diagnose`, Eq. 10-11).
They reuse the chain's task and sample stages and leave the chain's own files as they are.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

from .arms import trained_arms
from .config import RunConfig, config_dict, model_key, train_settings
from .data.mix import delia_task_rows, diverse_count, mix_with_diverse
from .errors import DeliaError
from .model.arm import adapter_of, arm_model, base_model
from .pipeline import check_arm, paths, stage_sample, stage_task, up_to_date
from .runfolder import Stage, atomic_path, read_jsonl, write_json


def _sweep_diverse(cfg: RunConfig) -> Path:
    """Diverse rows for the largest swept ratio, sampled in `sweep/sample` so the main run's own sample
    stays as it is; its answers seed this cache, so no query is answered twice."""
    from .data.generation_cache import seed_cache

    sub = dataclasses.replace(cfg, run_dir=str(paths(cfg).stage("sweep")),
                              mix=dataclasses.replace(cfg.mix, ratio=max(cfg.sweep.ratios)))
    seed_cache(paths(sub).sample_cache, [paths(cfg).sample_cache])
    target = delia_task_rows(sub)  # sample sizes itself by the task rows
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(delia_task_rows(cfg), tmp)
    stage_sample(sub)
    return paths(sub).diverse


def ratio_trial(cfg: RunConfig, ratio: float, fraction: float, diverse: Path) -> dict:
    """Train on the task rows + ratio x diverse rows for `fraction` of an epoch (`sweep.budget: epoch`) or
    of the largest ratio's epoch, the same number of steps for every ratio (`steps`); the task loss
    after. A finished trial is kept in `trials/` and reused by both `sweep` and `tune-ratio`."""
    from .analysis.ratio import task_loss
    from .config import effective_batch
    from .train.sft import train_lora

    eval_path = paths(cfg).task_eval
    equal = cfg.sweep.budget == "steps"
    folder = paths(cfg).stage("trials") / f"ratio-{ratio:g}-fraction-{fraction:g}{'-equal-steps' if equal else ''}"
    settings = {"train": train_settings(cfg), "task": config_dict(cfg)["task"], "model": model_key(cfg.model),
                "ratio": ratio, "fraction": fraction, "seed": cfg.seed}
    if equal:
        settings["budget"] = {"steps_of_ratio": max(cfg.sweep.ratios)}
    stage = Stage(folder, f"trial:ratio={ratio:g}:fraction={fraction:g}", settings,
                  {"task": delia_task_rows(cfg), "diverse": diverse, "eval": eval_path})
    if done := up_to_date(stage):
        return done["outputs"]
    task_rows = read_jsonl(delia_task_rows(cfg))
    rows = mix_with_diverse(task_rows, read_jsonl(diverse), ratio, cfg.seed)
    n_budget = len(task_rows) + diverse_count(max(cfg.sweep.ratios), len(task_rows)) if equal else len(rows)
    epoch_steps = math.ceil(n_budget / effective_batch(cfg.train, n_budget))
    max_steps = 0 if fraction >= 1 and not equal else max(1, round(fraction * epoch_steps))
    whose = "the largest ratio's" if equal else "its"
    print(f"delia: trial ratio {ratio:g}, {fraction:g} of {whose} epoch ({max_steps or epoch_steps} steps)", flush=True)
    model, tokenizer = base_model(cfg)
    stats = train_lora(model, tokenizer, rows, cfg.train, cfg.task, folder, cfg.seed, max_steps, run_key=stage.key)
    loss = task_loss(model, tokenizer, read_jsonl(eval_path), cfg.train.max_length)
    return stage.finish(ratio=ratio, fraction=fraction, steps=stats["steps"], rows=stats["rows"],
                        train_seconds=stats["seconds"], loss=loss)["outputs"]


def stage_sweep(cfg: RunConfig) -> Path:
    """Task loss on seen and held-out wordings for every ratio in `sweep.ratios`, one epoch each
    (Figure 3), or at equal steps (`sweep.budget: steps`). Writes sweep/sweep[-equal-steps].json and
    sweep/loss_vs_ratio[-equal-steps].png; returns the plot's path."""
    from .analysis.ratio import plot_sweep

    stage_task(cfg)
    diverse = _sweep_diverse(cfg)
    points = [ratio_trial(cfg, r, 1.0, diverse) for r in sorted(cfg.sweep.ratios)]
    folder = paths(cfg).stage("sweep")
    suffix = "-equal-steps" if cfg.sweep.budget == "steps" else ""
    write_json(folder / f"sweep{suffix}.json", points)
    with atomic_path(folder / f"loss_vs_ratio{suffix}.png") as tmp:
        plot_sweep(points, tmp, "equal steps" if cfg.sweep.budget == "steps" else "1 epoch each")
    print("| ratio | steps | loss (seen wordings) | loss (held-out wordings) |\n|---|---|---|---|")
    for p in points:
        print(f"| {p['ratio']:g} | {p['steps']} | {p['loss'].get('seen', {}).get('loss', float('nan')):.4f} | "
              f"{p['loss'].get('heldout', {}).get('loss', float('nan')):.4f} |")
    return folder / f"loss_vs_ratio{suffix}.png"


def stage_tune_ratio(cfg: RunConfig) -> dict:
    """Successive halving over `sweep.ratios` on the held-out-wording loss (see delia.analysis.ratio).
    Writes tune/tune.json and returns it."""
    from .analysis.ratio import bootstrap_confidence, rung_fractions, survivors

    stage_task(cfg)
    diverse = _sweep_diverse(cfg)
    alive = sorted(cfg.sweep.ratios)
    rungs = []
    for k, fraction in enumerate(rung_fractions(cfg.sweep.rungs, cfg.sweep.eta)):
        trials = {r: ratio_trial(cfg, r, fraction, diverse) for r in alive}
        missing = [r for r, t in trials.items() if "heldout" not in t["loss"]]
        if missing:
            raise DeliaError("tune-ratio: the evaluation rows have no held-out wordings to score the ratios on")
        losses = {r: t["loss"]["heldout"]["loss"] for r, t in trials.items()}
        rungs.append({"fraction": fraction, "heldout_loss": {f"{r:g}": v for r, v in losses.items()},
                      "steps": {f"{r:g}": t["steps"] for r, t in trials.items()}})
        print(f"delia: rung {k + 1}: {fraction:g} epoch: " + ", ".join(f"ratio {r:g} -> {v:.4f}" for r, v in
                                                                       sorted(losses.items())), flush=True)
        if k < cfg.sweep.rungs - 1:
            alive = survivors(losses, cfg.sweep.eta)
    ranked = sorted(trials, key=lambda r: (losses[r], r))
    result = {"best_ratio": ranked[0], "heldout_loss": losses[ranked[0]], "rungs": rungs}
    if len(ranked) > 1:
        win, other = (trials[r]["loss"]["heldout"]["per_row"] for r in ranked[:2])
        conf = bootstrap_confidence(win, other, cfg.sweep.bootstrap, cfg.seed)
        result.update(runner_up=ranked[1], runner_up_loss=losses[ranked[1]], confidence=conf)
        print(f"delia: best ratio {ranked[0]:g} (held-out loss {losses[ranked[0]]:.4f}); it beats ratio "
              f"{ranked[1]:g} ({losses[ranked[1]]:.4f}) in {100 * conf:.0f} % of {cfg.sweep.bootstrap} paired "
              f"bootstrap resamples of the held-out rows (one seed)")
    write_json(paths(cfg).stage("tune") / "tune.json", result)
    return result


def stage_diagnose(cfg: RunConfig, arm: str = "untouched", max_task_rows: int = 16) -> dict:
    """The buffering diagnostic (delia.analysis.buffering) at the weights of `arm`: up to
    `max_task_rows` training task rows, mix.ratio x as many diverse rows, the held-out-wording rows.
    Writes diagnose/ARM/buffering.json and buffering.png, prints the table."""
    from .analysis import buffering

    check_arm("diagnose", arm, ("untouched", *trained_arms()))
    run = paths(cfg)
    inputs = {"task": delia_task_rows(cfg), "diverse": run.diverse, "eval": run.task_eval}
    if arm != "untouched":
        inputs["adapter"] = adapter_of(cfg, arm) / "adapter_model.safetensors"
    folder = run.diagnose(arm)
    stage = Stage(folder, f"diagnose:{arm}", {"model": model_key(cfg.model), "ratio": cfg.mix.ratio, "seed": cfg.seed,
                                              "rows": max_task_rows, "train": train_settings(cfg)}, inputs)
    if done := up_to_date(stage):
        print(buffering.render(done["outputs"]["table"]))
        return done
    task = read_jsonl(delia_task_rows(cfg))[:max_task_rows]
    n_diverse = diverse_count(cfg.mix.ratio, len(task))
    div = read_jsonl(run.diverse)[:n_diverse]
    if len(div) < n_diverse:
        raise DeliaError(f"{run.diverse}: {len(div)} diverse rows, the diagnostic needs {n_diverse}; run `delia sample` first")
    ideal = [r for r in read_jsonl(run.task_eval) if r.get("group") == "heldout"]
    if not ideal:
        raise DeliaError(f"{run.task_eval}: no rows with held-out wordings to stand in for the ideal features")
    # the untouched model with its new token as training starts it, or the trained arm merged
    model, tokenizer = arm_model(cfg, f"init_{cfg.train.token_init}" if arm == "untouched" else arm)
    groups = buffering.parameter_groups(model, cfg.train.target_modules)
    length = cfg.train.max_length
    grads = {name: buffering.gradient(model, tokenizer, rows, groups, length, cfg.train.micro_batch_size)
             for name, rows in (("task", task), ("mixed", task + div), ("diverse", div), ("ideal", ideal))}
    table = buffering.compare(grads)
    print(buffering.render(table))
    with atomic_path(folder / "buffering.png") as tmp:
        buffering.plot_buffering(table, tmp)
    return stage.finish(table=table, task_rows=len(task), diverse_rows=len(div), ideal_rows=len(ideal),
                        plot=str(folder / "buffering.png"))
