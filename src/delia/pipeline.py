"""The DELIA chain, stage by stage: task -> sample -> mix -> train -> evaluate -> report.

Each stage reads and writes files in the run folder and leaves a manifest there; a stage whose
manifest matches its settings and inputs is skipped, so `delia run` picks up where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import DeliaError
from .config import RunConfig, config_dict
from .data.mix import mix_with_diverse
from .data.queries import load_queries
from .data.sample import sample_diverse
from .data.task import build_task
from .runfolder import Stage, read_jsonl, write_json, write_jsonl

TRAINED_ARMS = ("common", "delia", "common_equal_steps")


def _run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir)


def _skip(stage: Stage) -> dict | None:
    done = stage.done()
    if done:
        print(f"delia: {stage.name}: up to date ({stage.folder})", flush=True)
    return done


def _model(cfg: RunConfig):
    from .model.loading import load_model

    return load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)


def stage_task(cfg: RunConfig) -> dict:
    folder = _run_dir(cfg) / "task"
    inputs = {} if cfg.task.source == "demo" else {"source": cfg.task.source}
    stage = Stage(folder, "task", {"task": config_dict(cfg)["task"], "seed": cfg.seed}, inputs)
    if done := _skip(stage):
        return done
    train, evals = build_task(cfg.task, cfg.seed)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", evals)
    # what the new tokens stand for, kept with the task for the token analyses
    write_json(folder / "task.json", {"new_tokens": cfg.task.new_tokens, "description": cfg.task.description,
                                      "required_keys": cfg.task.required_keys, "label_key": cfg.task.label_key})
    wordings = {r["wording"] for r in train}
    return stage.finish(train_rows=len(train), eval_rows=len(evals), train_wordings=len(wordings),
                        eval_seen=sum(r["group"] == "seen" for r in evals),
                        eval_heldout=sum(r["group"] == "heldout" for r in evals))


def diverse_rows_needed(cfg: RunConfig, n_task: int) -> int:
    return math.floor(cfg.mix.ratio * n_task + 0.5)


def stage_sample(cfg: RunConfig) -> dict:
    task_train = _run_dir(cfg) / "task" / "train.jsonl"
    n_task = len(read_jsonl(task_train))
    want = cfg.sample.max_queries or diverse_rows_needed(cfg, n_task)
    folder = _run_dir(cfg) / "sample"
    settings = {"sample": config_dict(cfg)["sample"], "model": cfg.model.name, "n": want, "seed": cfg.seed}
    stage = Stage(folder, "sample", settings)
    if done := _skip(stage):
        return done
    conversations, provenance = load_queries(cfg.sample.queries)
    path, stats = sample_diverse(conversations, cfg.model, cfg.sample, want, folder, cfg.seed)
    return stage.finish(diverse=str(path), queries=provenance, **stats)


def stage_mix(cfg: RunConfig) -> dict:
    folder = _run_dir(cfg) / "mix"
    task_train = _run_dir(cfg) / "task" / "train.jsonl"
    inputs = {"task": task_train}
    diverse = _run_dir(cfg) / "sample" / "diverse.jsonl"
    if "delia" in cfg.arms:
        inputs["diverse"] = diverse
    stage = Stage(folder, "mix", {"ratio": cfg.mix.ratio, "seed": cfg.seed}, inputs)
    if done := _skip(stage):
        return done
    task_rows = read_jsonl(task_train)
    write_jsonl(folder / "common.jsonl", mix_with_diverse(task_rows, [], 0, cfg.seed))
    outputs = {"common_rows": len(task_rows)}
    if "delia" in cfg.arms:
        rows = mix_with_diverse(task_rows, read_jsonl(diverse), cfg.mix.ratio, cfg.seed)
        write_jsonl(folder / "delia.jsonl", rows)
        outputs["delia_rows"] = len(rows)
        outputs["delia_diverse_rows"] = sum(r["source"] == "diverse" for r in rows)
    return stage.finish(**outputs)


def stage_train(cfg: RunConfig, arm: str) -> dict:
    from .train.sft import train_lora

    if arm not in TRAINED_ARMS:
        raise DeliaError(f"train: unknown arm '{arm}' (trained arms: {', '.join(TRAINED_ARMS)})")
    data = _run_dir(cfg) / "mix" / ("delia.jsonl" if arm == "delia" else "common.jsonl")
    if not data.exists():
        raise DeliaError(f"{data}: missing; run the mix stage first")
    max_steps = 0
    if arm == "common_equal_steps":
        delia = _run_dir(cfg) / "train" / "delia" / "manifest.json"
        if not delia.exists():
            raise DeliaError("train: the common_equal_steps arm takes its step count from the delia arm; train delia first")
        import json

        max_steps = json.loads(delia.read_text())["outputs"]["steps"]
    folder = _run_dir(cfg) / "train" / arm
    settings = {"train": config_dict(cfg)["train"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "max_steps": max_steps, "seed": cfg.seed}
    stage = Stage(folder, f"train:{arm}", settings, {"data": data})
    if done := _skip(stage):
        return done
    print(f"delia: train {arm}" + (f" ({max_steps} steps, as delia)" if max_steps else " (1 epoch)"), flush=True)
    model, tokenizer = _model(cfg)
    stats = train_lora(model, tokenizer, read_jsonl(data), cfg.train, cfg.task, folder, cfg.seed, max_steps)
    return stage.finish(adapter=str(folder / "adapter"), **stats)


def stage_evaluate(cfg: RunConfig, arm: str) -> dict:
    from .evaluate.formatted import evaluate_formatted
    from .train.sft import load_adapter

    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    inputs = {"eval": eval_path}
    adapter = _run_dir(cfg) / "train" / arm / "adapter"
    if arm != "untouched":
        if not (adapter / "adapter_config.json").exists():
            raise DeliaError(f"{adapter}: no adapter; run `delia train` for arm '{arm}' first")
        inputs["adapter"] = adapter / "adapter_model.safetensors"
    folder = _run_dir(cfg) / "eval" / arm
    stage = Stage(folder, f"evaluate:{arm}", {"evaluate": config_dict(cfg)["evaluate"], "task": config_dict(cfg)["task"],
                                             "model": cfg.model.name}, inputs)
    if done := _skip(stage):
        return done
    print(f"delia: evaluate {arm}", flush=True)
    model, tokenizer = _model(cfg)
    if arm != "untouched":
        model, tokenizer = load_adapter(model, tokenizer, adapter)
    metrics, generations = evaluate_formatted(model, tokenizer, read_jsonl(eval_path), cfg.task, cfg.evaluate, cfg.seed)
    write_jsonl(folder / "generations.jsonl", generations)
    write_json(folder / "metrics.json", metrics)
    return stage.finish(**metrics)


def stage_report(cfg: RunConfig) -> Path:
    from .report.tables import write_report

    return write_report(cfg)


def run_all(cfg: RunConfig) -> Path:
    """The whole chain for the configured arms; returns the report's path."""
    stage_task(cfg)
    if "delia" in cfg.arms:
        stage_sample(cfg)
    stage_mix(cfg)
    order = [a for a in ("delia", "common", "common_equal_steps") if a in cfg.arms]
    if "common_equal_steps" in order and "delia" not in order:
        raise DeliaError("arms: common_equal_steps needs the delia arm (it matches delia's optimizer steps)")
    for arm in order:
        stage_train(cfg, arm)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    return stage_report(cfg)
