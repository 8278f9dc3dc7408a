"""The DELIA chain, stage by stage: task -> [diversify] -> sample -> mix -> train -> evaluate -> analyze -> report.

Each stage reads and writes files in the run folder and leaves a manifest there; a stage whose
manifest matches its settings and inputs is skipped, so `delia run` picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from . import DeliaError
from .config import ARMS, EQUAL_STEPS, TRAINED_ARMS, RunConfig, config_dict
from .data.mix import diverse_count, mix_files, mix_with_diverse
from .data.queries import ALPACA_DEMO, load_queries
from .data.sample import sample_diverse
from .data.task import build_task
from .runfolder import Stage, atomic_path, read_jsonl, world, write_json, write_jsonl

DATA = {"delia": "delia.jsonl", "facts": "facts.jsonl", "dmt": "dmt.jsonl"}
"""Each trained arm's rows in mix/ (common.jsonl for the rest)."""
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
    inputs = {}
    for key, spec in (("source", cfg.task.source), ("eval_source", cfg.task.eval_source)):
        path = Path(spec)
        if spec in ("", "demo") or spec.startswith(("hf:", "sacrebleu:")):
            continue  # generated, or named by the settings
        if path.is_dir():  # a corpus folder (delia data en-is)
            inputs.update({f"{key}:{p.stem}": p for p in sorted(path.glob("*.jsonl")) if p.stem in ("train", "test")})
        else:
            inputs[key] = path
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
    return diverse_count(cfg.mix.ratio, n_task)


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

    if cfg.generation.backend == "openai":
        raise DeliaError("sample.queries 'magpie' needs the local or vllm backend (it prompts with the raw template prefix)")
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


def _needs_diverse(cfg: RunConfig) -> bool:
    return "delia" in cfg.arms or _has_dmt(cfg)


def _has_dmt(cfg: RunConfig) -> bool:
    return "dmt" in cfg.arms or "dmt" + EQUAL_STEPS in cfg.arms


def stage_mix(cfg: RunConfig) -> dict:
    folder = _run_dir(cfg) / "mix"
    task_train = _run_dir(cfg) / "task" / "train.jsonl"
    delia_task = task_rows_path(cfg)
    diverse = _run_dir(cfg) / "sample" / "diverse.jsonl"
    inputs = {"task": task_train}
    if _needs_diverse(cfg):
        inputs.update(delia_task=delia_task, diverse=diverse)
    settings = {"ratio": cfg.mix.ratio, "seed": cfg.seed}
    if "facts" in cfg.arms:
        settings["facts"] = {k: v for k, v in config_dict(cfg)["baselines"].items() if k in ("facts", "rows_per_fact")}
    if _has_dmt(cfg):
        settings["dmt_task_fraction"] = cfg.baselines.dmt_task_fraction
    stage = Stage(folder, "mix", settings, inputs)
    if done := _skip(stage):
        return done
    task_rows = read_jsonl(task_train)
    write_jsonl(folder / "common.jsonl", mix_with_diverse(task_rows, [], 0, cfg.seed))
    outputs = {"common_rows": len(task_rows)}
    if "facts" in cfg.arms:
        from .baselines import default_facts, fact_rows

        facts = fact_rows(cfg.baselines.facts or default_facts(cfg.task), cfg.task, cfg.baselines.rows_per_fact)
        rows = [{"messages": r["messages"], "source": "task"} for r in task_rows] + facts
        random.Random(cfg.seed).shuffle(rows)
        write_jsonl(folder / "facts.jsonl", rows)
        outputs["facts_rows"] = len(facts)
    if _has_dmt(cfg):  # DMT's second stage: the diverse rows DELIA gets, and a share of the task rows
        keep = random.Random(cfg.seed).sample(task_rows, math.ceil(cfg.baselines.dmt_task_fraction * len(task_rows)))
        rows = [{"messages": r["messages"], "source": "task"} for r in keep]
        rows += [{"messages": r["messages"], "source": "diverse"}
                 for r in read_jsonl(diverse)[: diverse_rows_needed(cfg, len(task_rows))]]
        random.Random(cfg.seed).shuffle(rows)
        write_jsonl(folder / "dmt.jsonl", rows)
        outputs["dmt_rows"] = len(rows)
    if "delia" in cfg.arms:
        rows = read_jsonl(delia_task)
        n_diverse = mix_files(rows, diverse, cfg.mix.ratio, cfg.seed, folder / "delia.jsonl")
        outputs.update(delia_rows=len(rows) + n_diverse, delia_diverse_rows=n_diverse)
    return stage.finish(**outputs)


def stage_train(cfg: RunConfig, arm: str) -> dict:
    from .train.sft import train_lora

    _check_arm("train", arm, TRAINED_ARMS)
    base = arm.removesuffix(EQUAL_STEPS)
    data = _run_dir(cfg) / "mix" / DATA.get(base, "common.jsonl")
    if not data.exists():
        raise DeliaError(f"{data}: missing; run the mix stage first")
    max_steps = 0
    if arm.endswith(EQUAL_STEPS):
        if not (_run_dir(cfg) / "train" / "delia" / "manifest.json").exists():
            raise DeliaError(f"train: the {arm} arm takes its step count from the delia arm; train delia first")
        max_steps = _trained(cfg, "delia")["steps"]
        if base == "dmt":  # stage 2 takes what stage 1 (the common arm) left of delia's steps
            max_steps = max(1, max_steps - _trained(cfg, "common")["steps"])
    folder = _run_dir(cfg) / "train" / arm
    settings = {"train": config_dict(cfg)["train"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "max_steps": max_steps, "seed": cfg.seed}
    if base == "neftune":
        settings["neftune_alpha"] = cfg.baselines.neftune_alpha
    inputs = {"data": data}
    if base == "dmt":  # stage 1 is the common arm: stage 2 goes on from its adapter
        inputs["stage1"] = _adapter(cfg, "common") / "adapter_model.safetensors"
    stage = Stage(folder, f"train:{arm}", settings, inputs)
    if done := _skip(stage):
        return done
    budget = " (1 epoch)" if not max_steps else f" ({max_steps} steps{', stage 2' if base == 'dmt' else ''}, as delia)"
    print(f"delia: train {arm}{budget}", flush=True)
    model, tokenizer = _model(cfg)
    stats = train_lora(model, tokenizer, read_jsonl(data), cfg.train, cfg.task, folder, cfg.seed, max_steps,
                       neftune_alpha=cfg.baselines.neftune_alpha if base == "neftune" else 0.0,
                       resume_adapter=_adapter(cfg, "common") if base == "dmt" else None, run_key=stage.key)
    if base == "dmt":  # count both stages
        first = _trained(cfg, "common")
        stats.update(stage2_steps=stats["steps"], seconds=round(stats["seconds"] + first["seconds"], 1),
                     **{k: stats[k] + first.get(k, 0) for k in ("steps", "trained_tokens", "loss_tokens", "padded_tokens")})
    if world()[0] != 0:  # under accelerate launch the main process writes the manifest
        return {"outputs": stats}
    return stage.finish(adapter=str(folder / "adapter"), **stats)


def _check_arm(verb: str, arm: str, known: tuple[str, ...]) -> None:
    """Arms name folders of the run: only the known names, so none reaches outside it."""
    if arm not in known:
        raise DeliaError(f"{verb}: unknown arm {arm!r} (known: {', '.join(known)})")


def _trained(cfg: RunConfig, arm: str) -> dict:
    """The figures a trained arm's manifest records (steps, tokens, seconds)."""
    return json.loads((_run_dir(cfg) / "train" / arm / "manifest.json").read_text())["outputs"]


def _adapter(cfg: RunConfig, arm: str) -> Path:
    adapter = _run_dir(cfg) / "train" / arm / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise DeliaError(f"{adapter}: no adapter; run `delia train` for arm '{arm}' first")
    return adapter


def stage_export(cfg: RunConfig, arm: str) -> Path:
    """A trained arm as a plain Hugging Face model folder (adapter merged, new tokens in the vocabulary):
    what vLLM, TGI, SGLang or llama.cpp's converter load. Returns the folder."""
    from .runfolder import atomic_dir
    from .train.sft import load_adapter

    _check_arm("export", arm, TRAINED_ARMS)
    adapter = _adapter(cfg, arm)
    folder = _run_dir(cfg) / "export" / arm
    stage = Stage(folder, f"export:{arm}", {"model": cfg.model.name, "dtype": cfg.model.dtype},
                  {"adapter": adapter / "adapter_model.safetensors"})
    if not _skip(stage):
        model, tokenizer = load_adapter(*_model(cfg), adapter)
        with atomic_dir(folder / "model") as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stage.finish(model=str(folder / "model"))
    return folder / "model"


def arm_generator(cfg: RunConfig, arm: str, batch_size: int):
    """The configured backend over an arm's model: the base model for `untouched`, else base + adapter
    (local), the merged export (vllm), or the server model named by `generation.server_model` with
    `{arm}` filled in (openai)."""
    from .model.generate import LocalGenerator, make_generator

    trained = arm in TRAINED_ARMS
    if arm not in ("untouched", *TRAINED_ARMS) and cfg.generation.backend != "local":
        raise DeliaError(f"arm '{arm}': evaluated with the local backend only (generation.backend is "
                         f"{cfg.generation.backend!r})")
    if cfg.generation.backend == "openai":
        name = cfg.generation.server_model or cfg.model.name
        if trained and "{arm}" not in name:
            raise DeliaError(f"generation.server_model: evaluating arm '{arm}' over HTTP needs '{{arm}}' in the name, "
                             f"so each arm reaches its own model (e.g. `delia serve CONFIG --name {arm} --adapter "
                             f"{_run_dir(cfg) / 'train' / arm / 'adapter'}`)")
        return make_generator(cfg.model, cfg.generation, batch_size, served_name=name.replace("{arm}", arm))
    if cfg.generation.backend == "vllm":
        return make_generator(cfg.model, cfg.generation, batch_size, path=str(stage_export(cfg, arm)) if trained else "")
    model, tokenizer = _model(cfg)
    if trained:
        from .train.sft import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, _adapter(cfg, arm))
    elif arm.startswith("init_"):  # the new token added, its row initialised, nothing trained
        from .model.tokens import add_new_tokens

        add_new_tokens(model, tokenizer, cfg.task.new_tokens, arm[len("init_"):], cfg.task.description, cfg.seed)
    elif arm == "arithmetic":
        from .baselines import ArithmeticGenerator

        return ArithmeticGenerator(model, tokenizer, cfg.task, cfg.baselines.arithmetic_lambda, batch_size)
    return LocalGenerator(model, tokenizer, batch_size)


def stage_evaluate(cfg: RunConfig, arm: str) -> dict:
    from .evaluate.formatted import answer_budget
    from .model.loading import load_tokenizer

    _check_arm("evaluate", arm, ARMS)
    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    train_path = _run_dir(cfg) / "task" / "train.jsonl"
    inputs = {"eval": eval_path, "task": train_path}
    if arm in TRAINED_ARMS:
        inputs["adapter"] = _adapter(cfg, arm) / "adapter_model.safetensors"
    if arm == "dipmt":
        from .baselines import dictionary_path

        inputs["dictionary"] = dictionary_path(cfg.task)
    folder = _run_dir(cfg) / "eval" / arm
    gen = cfg.generation
    settings = {"evaluate": config_dict(cfg)["evaluate"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "backend": gen.backend, "server_model": gen.server_model if gen.backend == "openai" else ""}
    if arm in ("icl", "arithmetic", "dipmt"):
        settings["baselines"] = config_dict(cfg)["baselines"]
    stage = Stage(folder, f"evaluate:{arm}", settings, inputs)
    if done := _skip(stage):
        return done
    print(f"delia: evaluate {arm} ({gen.backend} backend)", flush=True)
    rows, train_rows = read_jsonl(eval_path), read_jsonl(train_path)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    budget = answer_budget(tokenizer, rows + train_rows, cfg.evaluate)
    if arm == "icl":
        from .baselines import icl_prefix

        prefix = icl_prefix(train_rows, cfg.baselines.icl_k, cfg.seed)
        rows = [{**r, "messages": prefix + r["messages"]} for r in rows]
    if arm == "dipmt":
        from .baselines import dipmt_rows, load_dictionary

        rows = dipmt_rows(rows, train_rows, load_dictionary(cfg.task), cfg.baselines.dipmt_words)
    generator = arm_generator(cfg, arm, cfg.evaluate.batch_size)
    tuning = {}
    if arm == "arithmetic" and cfg.baselines.arithmetic_lambdas:  # one model, its lambda set per candidate
        dev = [{**r, "group": "seen"} for r in random.Random(cfg.seed).sample(train_rows, min(16, len(train_rows)))]
        for lam in cfg.baselines.arithmetic_lambdas:
            print(f"delia: arithmetic lambda {lam:g} on {len(dev)} training rows", flush=True)
            generator.lam = lam
            tuning[lam] = _score(cfg, generator, dev, budget)[0]["seen"]["format_accuracy"]
        generator.lam = max(tuning, key=lambda k: (tuning[k], -k))  # ties: the smallest lambda
    metrics, generations = _score(cfg, generator, rows, budget)
    if tuning:
        metrics["arithmetic_lambda"] = generator.lam
        metrics["arithmetic_tuning"] = {f"{k:g}": v for k, v in tuning.items()}
    write_jsonl(folder / "generations.jsonl", generations)
    write_json(folder / "metrics.json", metrics)
    return stage.finish(**metrics)


def _score(cfg: RunConfig, generator, rows: list[dict], budget: int) -> tuple[dict, list[dict]]:
    from .evaluate.formatted import evaluate_formatted

    if cfg.task.kind == "translation":
        from .evaluate.translation import evaluate_translation

        return evaluate_translation(generator, rows, budget, cfg.seed)
    return evaluate_formatted(generator, rows, cfg.task, budget, cfg.seed)


def stage_analyze(cfg: RunConfig) -> dict:
    """For the untouched model (random and mean init) and every trained arm: token-to-meaning distances
    (Table 1, Figure 2) and the divergent token over the evaluation rows (Figure 4)."""
    from .analysis.divergent import divergent_stats, plot_divergent
    from .analysis.token_distance import plot_distances, token_keyword_distances
    from .model.tokens import add_new_tokens
    from .train.sft import load_adapter

    folder = _run_dir(cfg) / "analysis"
    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    arms = [a for a in TRAINED_ARMS if a in cfg.arms]
    adapters = {a: _adapter(cfg, a) for a in arms}
    inputs = {a: p / "adapter_model.safetensors" for a, p in adapters.items()} | {"eval": eval_path}
    settings = {"task": config_dict(cfg)["task"], "model": cfg.model.name, "seed": cfg.seed}
    stage = Stage(folder, "analyze", settings, inputs)
    if done := _skip(stage):
        return done
    token, keywords = cfg.task.new_tokens[0], cfg.task.keywords
    rows = read_jsonl(eval_path)
    distances, divergent = {}, {}

    def measure(name, model, tokenizer):
        distances[name] = token_keyword_distances(model, tokenizer, token, keywords)
        divergent[name] = divergent_stats(model, tokenizer, rows)

    for init in ("random", "mean", "description"):
        model, tokenizer = _model(cfg)
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, init, cfg.task.description, cfg.seed)
        measure(f"untouched ({init} init)", model, tokenizer)
    for arm, adapter in adapters.items():
        measure(arm, *load_adapter(*_model(cfg), adapter))
    write_json(folder / "token_distance.json", distances)
    write_json(folder / "divergent.json", divergent)
    with atomic_path(folder / "token_distance.png") as tmp:
        plot_distances(distances, keywords, tmp)
    with atomic_path(folder / "divergent.png") as tmp:
        plot_divergent(divergent, tmp)
    return stage.finish(token=token, keywords=keywords, plots=[str(folder / "token_distance.png"),
                                                               str(folder / "divergent.png")])


def _sweep_diverse(cfg: RunConfig) -> Path:
    """Diverse rows for the largest swept ratio, sampled in `sweep/sample` so the main run's own sample
    stays as it is; its answers seed this cache, so no query is answered twice."""
    import dataclasses
    import shutil

    from .data.generation_cache import seed_cache

    sub = dataclasses.replace(cfg, run_dir=str(_run_dir(cfg) / "sweep"),
                              mix=dataclasses.replace(cfg.mix, ratio=max(cfg.sweep.ratios)))
    seed_cache(_run_dir(sub) / "sample" / "cache.jsonl", [_run_dir(cfg) / "sample" / "cache.jsonl"])
    task_dir = _run_dir(sub) / ("diversify" if cfg.diversify.paraphrases > 0 else "task")
    task_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(task_dir / "train.jsonl") as tmp:  # sample sizes itself by the task rows
        shutil.copyfile(task_rows_path(cfg), tmp)
    stage_sample(sub)
    return _run_dir(sub) / "sample" / "diverse.jsonl"


def ratio_trial(cfg: RunConfig, ratio: float, fraction: float, diverse: Path) -> dict:
    """Train on the task rows + ratio x diverse rows for `fraction` of an epoch (`sweep.budget: epoch`) or
    of the largest ratio's epoch, the same number of steps for every ratio (`steps`); the task loss
    after. A finished trial is kept in `trials/` and reused by both `sweep` and `tune-ratio`."""
    from .analysis.ratio import task_loss
    from .train.sft import effective_batch, train_lora

    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    equal = cfg.sweep.budget == "steps"
    folder = _run_dir(cfg) / "trials" / f"ratio-{ratio:g}-fraction-{fraction:g}{'-equal-steps' if equal else ''}"
    settings = {"train": config_dict(cfg)["train"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "ratio": ratio, "fraction": fraction, "seed": cfg.seed}
    if equal:
        settings["budget"] = {"steps_of_ratio": max(cfg.sweep.ratios)}
    stage = Stage(folder, f"trial:ratio={ratio:g}:fraction={fraction:g}", settings,
                  {"task": task_rows_path(cfg), "diverse": diverse, "eval": eval_path})
    if done := _skip(stage):
        return done["outputs"]
    task_rows = read_jsonl(task_rows_path(cfg))
    rows = mix_with_diverse(task_rows, read_jsonl(diverse), ratio, cfg.seed)
    n_budget = len(task_rows) + diverse_count(max(cfg.sweep.ratios), len(task_rows)) if equal else len(rows)
    epoch_steps = math.ceil(n_budget / effective_batch(cfg.train, n_budget))
    max_steps = 0 if fraction >= 1 and not equal else max(1, round(fraction * epoch_steps))
    whose = "the largest ratio's" if equal else "its"
    print(f"delia: trial ratio {ratio:g}, {fraction:g} of {whose} epoch ({max_steps or epoch_steps} steps)", flush=True)
    model, tokenizer = _model(cfg)
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
    folder = _run_dir(cfg) / "sweep"
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
    write_json(_run_dir(cfg) / "tune" / "tune.json", result)
    return result


def stage_diagnose(cfg: RunConfig, arm: str = "untouched", max_task_rows: int = 16) -> dict:
    """The buffering diagnostic (delia.analysis.buffering) at the weights of `arm`: up to
    `max_task_rows` training task rows, mix.ratio x as many diverse rows, the held-out-wording rows.
    Writes diagnose/ARM/buffering.json and buffering.png, prints the table."""
    from .analysis import buffering
    from .model.tokens import add_new_tokens

    _check_arm("diagnose", arm, ("untouched", *TRAINED_ARMS))
    diverse = _run_dir(cfg) / "sample" / "diverse.jsonl"
    eval_path = _run_dir(cfg) / "task" / "eval.jsonl"
    inputs = {"task": task_rows_path(cfg), "diverse": diverse, "eval": eval_path}
    if arm != "untouched":
        inputs["adapter"] = _adapter(cfg, arm) / "adapter_model.safetensors"
    folder = _run_dir(cfg) / "diagnose" / arm
    stage = Stage(folder, f"diagnose:{arm}", {"model": cfg.model.name, "ratio": cfg.mix.ratio, "seed": cfg.seed,
                                              "rows": max_task_rows, "train": config_dict(cfg)["train"]}, inputs)
    if done := _skip(stage):
        print(buffering.render(done["outputs"]["table"]))
        return done
    task = read_jsonl(task_rows_path(cfg))[:max_task_rows]
    n_diverse = diverse_rows_needed(cfg, len(task))
    div = read_jsonl(diverse)[:n_diverse]
    if len(div) < n_diverse:
        raise DeliaError(f"{diverse}: {len(div)} diverse rows, the diagnostic needs {n_diverse}; run `delia sample` first")
    ideal = [r for r in read_jsonl(eval_path) if r.get("group") == "heldout"]
    if not ideal:
        raise DeliaError(f"{eval_path}: no rows with held-out wordings to stand in for the ideal features")
    model, tokenizer = _model(cfg)
    if arm == "untouched":
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, cfg.train.token_init, cfg.task.description, cfg.seed)
    else:
        from .train.sft import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, _adapter(cfg, arm))
        model = model.merge_and_unload()
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


def stage_report(cfg: RunConfig) -> Path:
    from .report.tables import write_report

    return write_report(cfg)


def run_all(cfg: RunConfig) -> Path:
    """The whole chain for the configured arms; returns the report's path."""
    stage_task(cfg)
    if _needs_diverse(cfg):
        if cfg.diversify.paraphrases > 0:
            stage_diversify(cfg)
        stage_sample(cfg)
    stage_mix(cfg)
    order = [a for a in ("delia", *TRAINED_ARMS) if a in cfg.arms]
    order = list(dict.fromkeys(order))
    if _has_dmt(cfg) and "common" not in order:
        raise DeliaError("arms: dmt needs the common arm (its first stage)")
    if any(a.endswith(EQUAL_STEPS) for a in order) and "delia" not in order:
        raise DeliaError(f"arms: the *{EQUAL_STEPS} arms need the delia arm (they match delia's optimizer steps)")
    for arm in order:
        stage_train(cfg, arm)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    if cfg.task.new_tokens and cfg.task.kind == "formatted":
        stage_analyze(cfg)
    return stage_report(cfg)
