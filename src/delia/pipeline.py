"""The DELIA chain, stage by stage: task -> [diversify] -> sample -> mix -> train -> evaluate -> analyze -> report.

Each stage reads and writes files in the run folder and leaves a manifest there; a stage whose
manifest matches its settings and inputs is skipped, so `delia run` picks up where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import DeliaError
from .config import RunConfig, config_dict
from .data.mix import mix_with_diverse
from .data.queries import ALPACA_DEMO, load_queries
from .data.sample import sample_diverse
from .data.task import build_task
from .runfolder import Stage, read_jsonl, write_json, write_jsonl

TRAINED_ARMS = ("common", "delia", "common_equal_steps")
MAGPIE = "magpie"


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
                                      "keywords": cfg.task.keywords, "required_keys": cfg.task.required_keys,
                                      "label_key": cfg.task.label_key})
    wordings = {r["wording"] for r in train}
    return stage.finish(train_rows=len(train), eval_rows=len(evals), train_wordings=len(wordings),
                        eval_seen=sum(r["group"] == "seen" for r in evals),
                        eval_heldout=sum(r["group"] == "heldout" for r in evals))


def task_rows_path(cfg: RunConfig) -> Path:
    """The training rows DELIA mixes: diversified if that stage is on, else the task's own."""
    sub = "diversify" if cfg.diversify.paraphrases > 0 else "task"
    return _run_dir(cfg) / sub / "train.jsonl"


def stage_diversify(cfg: RunConfig) -> dict:
    from .data.diversify import (SentenceEmbedder, apply_wordings, clean_answer, filter_paraphrases,
                                 paraphrase_requests)
    from .data.generation_cache import generate_cached
    from .model.generate import make_generator

    task_train = _run_dir(cfg) / "task" / "train.jsonl"
    folder = _run_dir(cfg) / "diversify"
    d = cfg.diversify
    settings = {"diversify": config_dict(cfg)["diversify"], "model": cfg.model.name, "backend": cfg.generation.backend,
                "server_model": cfg.generation.server_model, "seed": cfg.seed}
    stage = Stage(folder, "diversify", settings, {"task": task_train})
    if done := _skip(stage):
        return done
    rows = read_jsonl(task_train)
    wordings = sorted({r["wording"] for r in rows})
    gen_settings = {"temperature": d.temperature, "top_p": d.top_p, "max_new_tokens": d.max_new_tokens,
                    "seed": cfg.seed}
    pairs = paraphrase_requests(wordings, d.paraphrases, cfg.task.new_tokens,
                                cfg.generation.server_model or cfg.model.name, gen_settings)
    folder.mkdir(parents=True, exist_ok=True)
    answers, cached = generate_cached(
        [r for _, r in pairs], folder / "cache.jsonl", lambda: make_generator(cfg.model, cfg.generation, d.batch_size),
        d.max_new_tokens, d.temperature, d.top_p, cfg.seed, desc="diversify")
    candidates = [(w, clean_answer(answers[r.key]["answer"])) for w, r in pairs]
    records = filter_paraphrases(candidates, cfg.task.new_tokens, SentenceEmbedder(),
                                 (d.min_similarity, d.max_similarity))
    for rec in records:
        rec.update(backend=cfg.generation.backend, model=cfg.generation.server_model or cfg.model.name, seed=cfg.seed)
    write_jsonl(folder / "wordings.jsonl", records)
    write_jsonl(folder / "train.jsonl", apply_wordings(rows, records, cfg.seed))
    kept = sum(r["kept"] for r in records)
    return stage.finish(wordings=len(wordings), asked=len(records), kept=kept, resumed_from_cache=cached,
                        train_wordings=len({r["paraphrase"] for r in records if r["kept"]} | set(wordings)))


def diverse_rows_needed(cfg: RunConfig, n_task: int) -> int:
    return math.floor(cfg.mix.ratio * n_task + 0.5)


def stage_sample(cfg: RunConfig) -> dict:
    task_train = task_rows_path(cfg)
    n_task = len(read_jsonl(task_train))
    want = cfg.sample.max_queries or diverse_rows_needed(cfg, n_task)
    folder = _run_dir(cfg) / "sample"
    settings = {"sample": config_dict(cfg)["sample"], "model": cfg.model.name, "n": want, "seed": cfg.seed,
                "backend": cfg.generation.backend}
    inputs = {} if cfg.sample.queries in (ALPACA_DEMO, MAGPIE) else {"queries": cfg.sample.queries}
    stage = Stage(folder, "sample", settings, inputs)
    if done := _skip(stage):
        return done
    if cfg.sample.queries == MAGPIE:
        conversations, provenance = magpie_queries(cfg, want, folder)
    else:
        conversations, provenance = load_queries(cfg.sample.queries)
    path, stats = sample_diverse(conversations, cfg.model, cfg.sample, want, folder, cfg.seed, cfg.generation)
    return stage.finish(diverse=str(path), queries=provenance, **stats)


def magpie_queries(cfg: RunConfig, n: int, folder: Path) -> tuple[list[list[dict]], dict]:
    """n self-generated queries (Magpie): 1.5x as many are generated at temperature 1.0, then
    deduplicated; their diversity is measured beside the Alpaca demo queries'."""
    from .data import magpie
    from .data.diversify import SentenceEmbedder
    from .data.generation_cache import generate_cached
    from .model.generate import make_generator
    from .model.loading import load_tokenizer

    if cfg.generation.backend != "local":
        raise DeliaError("sample.queries 'magpie' needs the local backend (it prompts with the raw template prefix)")
    settings = {"temperature": 1.0, "top_p": 0.99, "max_new_tokens": 64, "seed": cfg.seed}
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    requests = magpie.query_requests(tokenizer, -(-3 * n // 2), cfg.model.name, settings)
    folder.mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, folder / "magpie_cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, cfg.sample.batch_size),
                                 settings["max_new_tokens"], settings["temperature"], settings["top_p"], cfg.seed,
                                 desc="magpie queries")
    embed = SentenceEmbedder()
    kept = magpie.deduplicate([answers[r.key]["answer"] for r in requests], embed)[:n]
    write_jsonl(folder / "magpie_queries.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in kept])
    stats = {"source": f"magpie: {len(requests)} self-generated queries, {len(kept)} kept after deduplication",
             "diversity": {"magpie": magpie.diversity(kept, embed)}}
    try:
        alpaca, _ = load_queries(ALPACA_DEMO)
        stats["diversity"]["alpaca_en_demo"] = magpie.diversity([c[0]["content"] for c in alpaca[: len(kept)]], embed)
    except DeliaError:
        pass  # no PyPI here: report the magpie figures alone
    return [[{"role": "user", "content": q}] for q in kept], stats


def stage_mix(cfg: RunConfig) -> dict:
    folder = _run_dir(cfg) / "mix"
    task_train = _run_dir(cfg) / "task" / "train.jsonl"
    delia_task = task_rows_path(cfg)
    diverse = _run_dir(cfg) / "sample" / "diverse.jsonl"
    inputs = {"task": task_train}
    if "delia" in cfg.arms:
        inputs.update(delia_task=delia_task, diverse=diverse)
    stage = Stage(folder, "mix", {"ratio": cfg.mix.ratio, "seed": cfg.seed}, inputs)
    if done := _skip(stage):
        return done
    task_rows = read_jsonl(task_train)
    write_jsonl(folder / "common.jsonl", mix_with_diverse(task_rows, [], 0, cfg.seed))
    outputs = {"common_rows": len(task_rows)}
    if "delia" in cfg.arms:
        rows = mix_with_diverse(read_jsonl(delia_task), read_jsonl(diverse), cfg.mix.ratio, cfg.seed)
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
    from .evaluate.formatted import answer_budget, evaluate_formatted
    from .train.sft import load_adapter

    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    train_path = _run_dir(cfg) / "task" / "train.jsonl"
    inputs = {"eval": eval_path, "task": train_path}
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
    rows = read_jsonl(eval_path)
    budget = answer_budget(tokenizer, rows + read_jsonl(train_path), cfg.evaluate)
    metrics, generations = evaluate_formatted(model, tokenizer, rows, cfg.task, cfg.evaluate, cfg.seed, budget)
    write_jsonl(folder / "generations.jsonl", generations)
    write_json(folder / "metrics.json", metrics)
    return stage.finish(**metrics)


def stage_analyze(cfg: RunConfig) -> dict:
    """Token-to-meaning distances for the untouched model (random and mean init) and every trained arm."""
    from .analysis.token_distance import plot_distances, token_keyword_distances
    from .model.tokens import add_new_tokens
    from .runfolder import atomic_path
    from .train.sft import load_adapter

    folder = _run_dir(cfg) / "analysis"
    arms = [a for a in TRAINED_ARMS if a in cfg.arms]
    adapters = {a: _run_dir(cfg) / "train" / a / "adapter" for a in arms}
    inputs = {a: p / "adapter_model.safetensors" for a, p in adapters.items()}
    settings = {"task": config_dict(cfg)["task"], "model": cfg.model.name, "seed": cfg.seed}
    stage = Stage(folder, "analyze", settings, inputs)
    if done := _skip(stage):
        return done
    token, keywords = cfg.task.new_tokens[0], cfg.task.keywords
    results = {}
    for init in ("random", "mean"):
        model, tokenizer = _model(cfg)
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, init, cfg.task.description, cfg.seed)
        results[f"untouched ({init} init)"] = token_keyword_distances(model, tokenizer, token, keywords)
    for arm, adapter in adapters.items():
        model, tokenizer = load_adapter(*_model(cfg), adapter)
        results[arm] = token_keyword_distances(model, tokenizer, token, keywords)
    write_json(folder / "token_distance.json", results)
    with atomic_path(folder / "token_distance.png") as tmp:
        plot_distances(results, keywords, tmp)
    return stage.finish(token=token, keywords=keywords, plot=str(folder / "token_distance.png"))


def stage_report(cfg: RunConfig) -> Path:
    from .report.tables import write_report

    return write_report(cfg)


def run_all(cfg: RunConfig) -> Path:
    """The whole chain for the configured arms; returns the report's path."""
    stage_task(cfg)
    if "delia" in cfg.arms:
        if cfg.diversify.paraphrases > 0:
            stage_diversify(cfg)
        stage_sample(cfg)
    stage_mix(cfg)
    order = [a for a in ("delia", "common", "common_equal_steps") if a in cfg.arms]
    if "common_equal_steps" in order and "delia" not in order:
        raise DeliaError("arms: common_equal_steps needs the delia arm (it matches delia's optimizer steps)")
    for arm in order:
        stage_train(cfg, arm)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    stage_analyze(cfg)
    return stage_report(cfg)
