"""The DELIA chain, stage by stage: task -> [diversify] -> sample -> mix -> train -> evaluate -> analyze -> report.

Each stage reads and writes files in the run folder (layout: `runfolder.RunFolder`) and leaves a
manifest there; a stage whose manifest matches its settings and inputs is skipped, so `delia run` picks
up where it stopped. Stages read an arm's traits (`delia.arms`), never its name. The studies beside the
chain (sweep, tune-ratio, diagnose) are in `delia.studies`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import DeliaError, baselines
from .arms import ARMS, REFERENCE, missing_dependency, trained_arms, training_order
from .config import RunConfig, config_dict
from .data.mix import diverse_count, mix_files, mix_with_diverse
from .data.queries import ALPACA_DEMO, load_queries
from .data.sample import sample_diverse
from .data.task import build_task
from .runfolder import RunFolder, Stage, atomic_path, read_jsonl, read_manifest, world, write_json, write_jsonl

MAGPIE = "magpie"


def paths(cfg: RunConfig) -> RunFolder:
    return RunFolder(cfg.run_dir)


def up_to_date(stage: Stage) -> dict | None:
    done = stage.done()
    if done:
        print(f"delia: {stage.name}: up to date ({stage.folder})", flush=True)
    return done


def base_model(cfg: RunConfig):
    from .model.loading import load_model

    return load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)


def stage_task(cfg: RunConfig) -> dict:
    run = paths(cfg)
    inputs = {}
    for key, spec in (("source", cfg.task.source), ("eval_source", cfg.task.eval_source)):
        path = Path(spec)
        if spec in ("", "demo") or spec.startswith(("hf:", "sacrebleu:")):
            continue  # generated, or named by the settings
        if path.is_dir():  # a corpus folder (delia data en-is)
            inputs.update({f"{key}:{p.stem}": p for p in sorted(path.glob("*.jsonl")) if p.stem in ("train", "test")})
        else:
            inputs[key] = path
    stage = Stage(run.stage("task"), "task", {"task": config_dict(cfg)["task"], "seed": cfg.seed}, inputs)
    if done := up_to_date(stage):
        return done
    train, evals = build_task(cfg.task, cfg.seed)
    write_jsonl(run.task_train, train)
    write_jsonl(run.task_eval, evals)
    # what the new tokens stand for, kept with the task for the token analyses
    write_json(run.task_meta, {"new_tokens": cfg.task.new_tokens, "description": cfg.task.description,
                               "keywords": cfg.task.keywords, "required_keys": cfg.task.required_keys,
                               "label_key": cfg.task.label_key})
    wordings = {r["wording"] for r in train}
    return stage.finish(train_rows=len(train), eval_rows=len(evals), train_wordings=len(wordings),
                        eval_seen=sum(r["group"] == "seen" for r in evals),
                        eval_heldout=sum(r["group"] == "heldout" for r in evals))


def task_rows_path(cfg: RunConfig) -> Path:
    """The training rows DELIA mixes: diversified if that stage is on, else the task's own."""
    return paths(cfg).diversified_train if cfg.diversify.paraphrases > 0 else paths(cfg).task_train


def stage_diversify(cfg: RunConfig) -> dict:
    from .data.diversify import (SentenceEmbedder, apply_wordings, clean_answer, filter_paraphrases,
                                 paraphrase_requests)
    from .data.generation_cache import generate_cached
    from .model.generate import make_generator

    run = paths(cfg)
    folder = run.stage("diversify")
    d = cfg.diversify
    settings = {"diversify": config_dict(cfg)["diversify"], "model": cfg.model.name, "backend": cfg.generation.backend,
                "server_model": cfg.generation.server_model, "seed": cfg.seed}
    stage = Stage(folder, "diversify", settings, {"task": run.task_train})
    if done := up_to_date(stage):
        return done
    rows = read_jsonl(run.task_train)
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
    write_jsonl(run.diversified_train, apply_wordings(rows, records, cfg.seed))
    kept = sum(r["kept"] for r in records)
    return stage.finish(wordings=len(wordings), asked=len(records), kept=kept, resumed_from_cache=cached,
                        train_wordings=len({r["paraphrase"] for r in records if r["kept"]} | set(wordings)))


def diverse_rows_needed(cfg: RunConfig, n_task: int) -> int:
    return diverse_count(cfg.mix.ratio, n_task)


def stage_sample(cfg: RunConfig) -> dict:
    n_task = len(read_jsonl(task_rows_path(cfg)))
    want = cfg.sample.max_queries or diverse_rows_needed(cfg, n_task)
    folder = paths(cfg).stage("sample")
    settings = {"sample": config_dict(cfg)["sample"], "model": cfg.model.name, "n": want, "seed": cfg.seed,
                "backend": cfg.generation.backend}
    inputs = {} if cfg.sample.queries in (ALPACA_DEMO, MAGPIE) else {"queries": cfg.sample.queries}
    stage = Stage(folder, "sample", settings, inputs)
    if done := up_to_date(stage):
        return done
    if cfg.sample.queries == MAGPIE:
        from .data.magpie import magpie_queries

        conversations, provenance = magpie_queries(cfg, want, folder)
    else:
        conversations, provenance = load_queries(cfg.sample.queries)
    path, stats = sample_diverse(conversations, cfg.model, cfg.sample, want, folder, cfg.seed, cfg.generation)
    return stage.finish(diverse=str(path), queries=provenance, **stats)


def _needs_diverse(cfg: RunConfig) -> bool:
    return any(ARMS[a].needs_diverse for a in cfg.arms)


def _mix_common(cfg: RunConfig, task_rows: list[dict]) -> dict:
    write_jsonl(paths(cfg).mix("common"), mix_with_diverse(task_rows, [], 0, cfg.seed))
    return {"common_rows": len(task_rows)}


def _mix_delia(cfg: RunConfig, task_rows: list[dict]) -> dict:
    rows = read_jsonl(task_rows_path(cfg))  # the diversified wordings when that stage is on
    n_diverse = mix_files(rows, paths(cfg).diverse, cfg.mix.ratio, cfg.seed, paths(cfg).mix("delia"))
    return {"delia_rows": len(rows) + n_diverse, "delia_diverse_rows": n_diverse}


def _mix_facts(cfg: RunConfig, task_rows: list[dict]) -> dict:
    rows, n_facts = baselines.facts_mix(task_rows, cfg.baselines, cfg.task, cfg.seed)
    write_jsonl(paths(cfg).mix("facts"), rows)
    return {"facts_rows": n_facts}


def _mix_dmt(cfg: RunConfig, task_rows: list[dict]) -> dict:
    diverse = read_jsonl(paths(cfg).diverse)[: diverse_rows_needed(cfg, len(task_rows))]
    rows = baselines.dmt_rows(task_rows, diverse, cfg.baselines.dmt_task_fraction, cfg.seed)
    write_jsonl(paths(cfg).mix("dmt"), rows)
    return {"dmt_rows": len(rows)}


@dataclass(frozen=True)
class MixData:
    build: Callable[[RunConfig, list[dict]], dict]
    """Writes mix/NAME.jsonl from the task rows; returns its figures for the manifest."""
    settings: Callable[[RunConfig], dict] = field(default=lambda cfg: {})
    """The settings it depends on beyond the ratio and the seed (part of the mix stage's key)."""


MIX_DATA = {
    "common": MixData(_mix_common),
    "facts": MixData(_mix_facts, lambda cfg: {"facts": {k: v for k, v in config_dict(cfg)["baselines"].items()
                                                        if k in ("facts", "rows_per_fact")}}),
    "dmt": MixData(_mix_dmt, lambda cfg: {"dmt_task_fraction": cfg.baselines.dmt_task_fraction}),
    "delia": MixData(_mix_delia),
}
"""What each kind of trained arm trains on (`Arm.data`), built by the mix stage."""


def stage_mix(cfg: RunConfig) -> dict:
    run = paths(cfg)
    inputs = {"task": run.task_train}
    if _needs_diverse(cfg):
        inputs.update(delia_task=task_rows_path(cfg), diverse=run.diverse)
    needed = list(dict.fromkeys(ARMS[a].data for a in ARMS if a in cfg.arms and ARMS[a].trained))
    settings = {"ratio": cfg.mix.ratio, "seed": cfg.seed}
    for data in needed:
        settings.update(MIX_DATA[data].settings(cfg))
    stage = Stage(run.stage("mix"), "mix", settings, inputs)
    if done := up_to_date(stage):
        return done
    task_rows = read_jsonl(run.task_train)
    outputs = {}
    for data in needed:
        outputs.update(MIX_DATA[data].build(cfg, task_rows))
    return stage.finish(**outputs)


def _max_steps(cfg: RunConfig, arm: str) -> int:
    """0 for one epoch; the REFERENCE arm's steps for `reference_steps`, less what the arm it continues
    from already took."""
    a = ARMS[arm]
    if a.budget != "reference_steps":
        return 0
    if read_manifest(paths(cfg).train(REFERENCE)) is None:
        raise DeliaError(f"train: the {arm} arm takes its step count from the {REFERENCE} arm; train {REFERENCE} first")
    steps = _trained(cfg, REFERENCE)["steps"]
    return max(1, steps - _trained(cfg, a.continues_from)["steps"]) if a.continues_from else steps


def stage_train(cfg: RunConfig, arm: str) -> dict:
    from .train.sft import train_lora

    check_arm("train", arm, trained_arms())
    a = ARMS[arm]
    run = paths(cfg)
    data = run.mix(a.data)
    if not data.exists():
        raise DeliaError(f"{data}: missing; run the mix stage first")
    max_steps = _max_steps(cfg, arm)
    settings = {"train": config_dict(cfg)["train"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "max_steps": max_steps, "seed": cfg.seed}
    if a.neftune:
        settings["neftune_alpha"] = cfg.baselines.neftune_alpha
    inputs = {"data": data}
    if a.continues_from:  # a second stage goes on from the first stage's adapter
        inputs["stage1"] = adapter_of(cfg, a.continues_from) / "adapter_model.safetensors"
    stage = Stage(run.train(arm), f"train:{arm}", settings, inputs)
    if done := up_to_date(stage):
        return done
    budget = " (1 epoch)" if not max_steps else \
        f" ({max_steps} steps{', stage 2' if a.continues_from else ''}, as {REFERENCE})"
    print(f"delia: train {arm}{budget}", flush=True)
    model, tokenizer = base_model(cfg)
    stats = train_lora(model, tokenizer, read_jsonl(data), cfg.train, cfg.task, run.train(arm), cfg.seed, max_steps,
                       neftune_alpha=cfg.baselines.neftune_alpha if a.neftune else 0.0,
                       resume_adapter=adapter_of(cfg, a.continues_from) if a.continues_from else None, run_key=stage.key)
    if a.continues_from:  # count both stages
        first = _trained(cfg, a.continues_from)
        stats.update(stage2_steps=stats["steps"], seconds=round(stats["seconds"] + first["seconds"], 1),
                     **{k: stats[k] + first.get(k, 0) for k in ("steps", "trained_tokens", "loss_tokens", "padded_tokens")})
    if world()[0] != 0:  # under accelerate launch the main process writes the manifest
        return {"outputs": stats}
    return stage.finish(adapter=str(run.adapter(arm)), **stats)


def check_arm(verb: str, arm: str, known) -> None:
    """Arms name folders of the run: only the known names, so none reaches outside it."""
    if arm not in known:
        raise DeliaError(f"{verb}: unknown arm {arm!r} (known: {', '.join(known)})")


def _trained(cfg: RunConfig, arm: str) -> dict:
    """The figures a trained arm's manifest records (steps, tokens, seconds)."""
    return read_manifest(paths(cfg).train(arm))["outputs"]


def adapter_of(cfg: RunConfig, arm: str) -> Path:
    adapter = paths(cfg).adapter(arm)
    if not (adapter / "adapter_config.json").exists():
        raise DeliaError(f"{adapter}: no adapter; run `delia train` for arm '{arm}' first")
    return adapter


def stage_export(cfg: RunConfig, arm: str) -> Path:
    """A trained arm as a plain Hugging Face model folder (adapter merged, new tokens in the vocabulary):
    what vLLM, TGI, SGLang or llama.cpp's converter load. Returns the folder."""
    from .model.adapter import load_adapter
    from .runfolder import atomic_dir

    check_arm("export", arm, trained_arms())
    adapter = adapter_of(cfg, arm)
    folder = paths(cfg).export(arm)
    stage = Stage(folder, f"export:{arm}", {"model": cfg.model.name, "dtype": cfg.model.dtype},
                  {"adapter": adapter / "adapter_model.safetensors"})
    if not up_to_date(stage):
        model, tokenizer = load_adapter(*base_model(cfg), adapter)
        with atomic_dir(folder / "model") as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stage.finish(model=str(folder / "model"))
    return folder / "model"


def arm_generator(cfg: RunConfig, arm: str, batch_size: int):
    """The configured backend over an arm's model: the base model for an untrained arm, else base +
    adapter (local), the merged export (vllm), or the server model named by `generation.server_model`
    with `{arm}` filled in (openai)."""
    from .model.generate import LocalGenerator, make_generator

    a = ARMS[arm]
    if cfg.generation.backend not in a.backends:
        raise DeliaError(f"arm '{arm}': evaluated with the local backend only (generation.backend is "
                         f"{cfg.generation.backend!r})")
    if cfg.generation.backend == "openai":
        name = cfg.generation.server_model or cfg.model.name
        if a.trained and "{arm}" not in name:
            raise DeliaError(f"generation.server_model: evaluating arm '{arm}' over HTTP needs '{{arm}}' in the name, "
                             f"so each arm reaches its own model (e.g. `delia serve CONFIG --name {arm} --adapter "
                             f"{paths(cfg).adapter(arm)}`)")
        return make_generator(cfg.model, cfg.generation, batch_size, served_name=name.replace("{arm}", arm))
    if cfg.generation.backend == "vllm":
        return make_generator(cfg.model, cfg.generation, batch_size, path=str(stage_export(cfg, arm)) if a.trained else "")
    model, tokenizer = base_model(cfg)
    if a.trained:
        from .model.adapter import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, adapter_of(cfg, arm))
    elif a.token_init:  # the new token added, its row initialised, nothing trained
        from .model.tokens import add_new_tokens

        add_new_tokens(model, tokenizer, cfg.task.new_tokens, a.token_init, cfg.task.description, cfg.seed)
    if a.decoding == "arithmetic":
        from .model.arithmetic import ArithmeticGenerator

        return ArithmeticGenerator(model, tokenizer, cfg.task, cfg.baselines.arithmetic_lambda, batch_size)
    return LocalGenerator(model, tokenizer, batch_size)


@dataclass(frozen=True)
class PromptRewrite:
    rewrite: Callable[[RunConfig, list[dict], list[dict]], list[dict]]
    """(config, evaluation rows, training rows) -> the evaluation rows as the arm is prompted."""
    inputs: Callable[[RunConfig], dict] = field(default=lambda cfg: {})
    """Files it reads (part of the evaluate stage's key)."""


PROMPTS = {
    "icl": PromptRewrite(lambda cfg, rows, train: baselines.icl_rows(rows, train, cfg.baselines.icl_k, cfg.seed)),
    "dipmt": PromptRewrite(lambda cfg, rows, train: baselines.dipmt_rows(
        rows, train, baselines.load_dictionary(cfg.task), cfg.baselines.dipmt_words),
        inputs=lambda cfg: {"dictionary": baselines.dictionary_path(cfg.task)}),
}
"""How an arm with `Arm.prompt` rewrites the evaluation prompts."""


def stage_evaluate(cfg: RunConfig, arm: str) -> dict:
    from .evaluate.formatted import answer_budget
    from .model.loading import load_tokenizer

    check_arm("evaluate", arm, ARMS)
    a = ARMS[arm]
    run = paths(cfg)
    inputs = {"eval": run.task_eval, "task": run.task_train}
    if a.trained:
        inputs["adapter"] = adapter_of(cfg, arm) / "adapter_model.safetensors"
    if a.prompt:
        inputs.update(PROMPTS[a.prompt].inputs(cfg))
    gen = cfg.generation
    settings = {"evaluate": config_dict(cfg)["evaluate"], "task": config_dict(cfg)["task"], "model": cfg.model.name,
                "backend": gen.backend, "server_model": gen.server_model if gen.backend == "openai" else ""}
    if a.uses_baseline_settings:
        settings["baselines"] = config_dict(cfg)["baselines"]
    stage = Stage(run.eval(arm), f"evaluate:{arm}", settings, inputs)
    if done := up_to_date(stage):
        return done
    print(f"delia: evaluate {arm} ({gen.backend} backend)", flush=True)
    rows, train_rows = read_jsonl(run.task_eval), read_jsonl(run.task_train)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    budget = answer_budget(tokenizer, rows + train_rows, cfg.evaluate)
    if a.prompt:
        rows = PROMPTS[a.prompt].rewrite(cfg, rows, train_rows)
    generator = arm_generator(cfg, arm, cfg.evaluate.batch_size)
    tuning = {}
    if a.decoding == "arithmetic" and cfg.baselines.arithmetic_lambdas:  # one model, its lambda set per candidate
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
    write_jsonl(run.eval(arm) / "generations.jsonl", generations)
    write_json(run.eval(arm) / "metrics.json", metrics)
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
    from .model.adapter import load_adapter
    from .model.tokens import add_new_tokens

    run = paths(cfg)
    folder = run.analysis()
    adapters = {a: adapter_of(cfg, a) for a in trained_arms() if a in cfg.arms}
    inputs = {a: p / "adapter_model.safetensors" for a, p in adapters.items()} | {"eval": run.task_eval}
    settings = {"task": config_dict(cfg)["task"], "model": cfg.model.name, "seed": cfg.seed}
    stage = Stage(folder, "analyze", settings, inputs)
    if done := up_to_date(stage):
        return done
    token, keywords = cfg.task.new_tokens[0], cfg.task.keywords
    rows = read_jsonl(run.task_eval)
    distances, divergent = {}, {}

    def measure(name, model, tokenizer):
        distances[name] = token_keyword_distances(model, tokenizer, token, keywords)
        divergent[name] = divergent_stats(model, tokenizer, rows)

    for init in ("random", "mean", "description"):
        model, tokenizer = base_model(cfg)
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, init, cfg.task.description, cfg.seed)
        measure(f"untouched ({init} init)", model, tokenizer)
    for arm, adapter in adapters.items():
        measure(arm, *load_adapter(*base_model(cfg), adapter))
    write_json(run.analysis("token_distance.json"), distances)
    write_json(run.analysis("divergent.json"), divergent)
    with atomic_path(run.analysis("token_distance.png")) as tmp:
        plot_distances(distances, keywords, tmp)
    with atomic_path(run.analysis("divergent.png")) as tmp:
        plot_divergent(divergent, tmp)
    return stage.finish(token=token, keywords=keywords, plots=[str(run.analysis("token_distance.png")),
                                                               str(run.analysis("divergent.png"))])


def stage_report(cfg: RunConfig) -> Path:
    from .report.tables import write_report

    return write_report(cfg)


def run_all(cfg: RunConfig) -> Path:
    """The whole chain for the configured arms; returns the report's path."""
    if why := missing_dependency(cfg.arms):
        raise DeliaError(f"arms: {why}")
    stage_task(cfg)
    if _needs_diverse(cfg):
        if cfg.diversify.paraphrases > 0:
            stage_diversify(cfg)
        stage_sample(cfg)
    stage_mix(cfg)
    for arm in training_order(cfg.arms):
        stage_train(cfg, arm)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    if cfg.task.new_tokens and cfg.task.kind == "formatted":
        stage_analyze(cfg)
    return stage_report(cfg)
