"""The DELIA chain, stage by stage: task -> [diversify] -> sample -> mix -> train -> general -> evaluate ->
analyze -> report.

Each stage reads and writes files in the run folder (layout: `runfolder.RunFolder`) and leaves a
manifest there; a stage whose manifest matches its settings and inputs is skipped, so `delia run` picks
up where it stopped. Stages read an arm's traits (`delia.arms`), never its name. The studies beside the
chain (sweep, tune-ratio, diagnose) are in `delia.studies`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .arms import ARMS, REFERENCE, missing_dependency, trained_arms, training_order
from .config import BUILT_IN, MAGPIE, RunConfig, config_dict, model_key, query_parts, train_settings
from .conversation import first_user_turn
from .data.baselines import PROMPTS
from .data.mix import MIX_DATA, delia_task_rows, diverse_count
from .data.queries import held_out_queries, load_queries
from .data.sample import sample_diverse
from .data.sources import is_saved_dataset, source_files
from .data.task import build_task, check_references
from .errors import DeliaError
from .model.arm import adapter_of, arm_model, base_model, needs_export, placement_of
from .model.backends import generation_placement
from .model.loading import check_target_modules
from .runfolder import RunFolder, Stage, atomic_path, read_jsonl, read_manifest, world, write_json, write_jsonl


def paths(cfg: RunConfig) -> RunFolder:
    return RunFolder(cfg.run_dir)


def up_to_date(stage: Stage) -> dict | None:
    done = stage.done()
    if done:
        print(f"delia: {stage.name}: up to date ({stage.folder})", flush=True)
    elif changed := stage.changed():
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        print(f"delia: {stage.name}: finished before with other {', '.join(changed[:4])}{more}; running it again",
              flush=True)
    return done


def stage_task(cfg: RunConfig) -> dict:
    run = paths(cfg)
    inputs = {}
    for key, spec in (("source", cfg.task.source), ("eval_source", cfg.task.eval_source)):
        path = Path(spec)
        if spec in ("", "demo") or spec.startswith("sacrebleu:"):
            continue  # generated, or named by the settings
        if path.is_dir() and not is_saved_dataset(path):  # a corpus folder (delia data en-is)
            inputs.update({f"{key}:{p.stem}": p for p in sorted(path.glob("*.jsonl")) if p.stem in ("train", "test")})
        else:  # a file, a saved dataset's files, a local folder behind hf: (a Hub dataset: by its name)
            inputs.update(_source_inputs(key, spec))
    stage = Stage(run.stage("task"), "task", {"task": config_dict(cfg)["task"], "seed": cfg.seed}, inputs)
    if done := up_to_date(stage):
        return done
    train, evals = build_task(cfg.task, cfg.seed)
    if cfg.task.kind == "formatted":
        check_references(cfg.task, train + evals)
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


def stage_diversify(cfg: RunConfig) -> dict:
    from .data.diversify import (SentenceEmbedder, apply_wordings, clean_answer, filter_paraphrases,
                                 paraphrase_requests)
    from .data.generation_cache import generate_cached
    from .model.backends import make_generator

    run = paths(cfg)
    folder = run.stage("diversify")
    d = cfg.diversify
    settings = {"diversify": config_dict(cfg)["diversify"], "model": model_key(cfg.model), "backend": cfg.generation.backend,
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


def _source_inputs(key: str, spec: str) -> dict:
    """A stage's inputs for a row source: the file as `key`, or each file of a folder as `key:PATH`
    (none for a Hub dataset, named by the settings)."""
    files = source_files(spec)
    return {key: files[0]} if files == [Path(spec)] else {f"{key}:{p}": p for p in files}


def _query_inputs(cfg: RunConfig) -> dict:
    """The files behind `sample.queries` (none for the built-in sets)."""
    parts = [p for p in query_parts(cfg.sample.queries) if p not in BUILT_IN and p != MAGPIE]
    return {k: v for p in parts for k, v in _source_inputs(f"queries:{p}" if len(parts) > 1 else "queries", p).items()}


def stage_sample(cfg: RunConfig) -> dict:
    if not (rows := delia_task_rows(cfg)).exists():
        raise DeliaError(f"{rows}: missing; run the {rows.parent.name} stage first (`delia {rows.parent.name} CONFIG`)")
    n_task = len(read_jsonl(rows))
    want = cfg.sample.max_queries or diverse_count(cfg.mix.ratio, n_task)
    folder = paths(cfg).stage("sample")
    settings = {"sample": config_dict(cfg)["sample"], "model": model_key(cfg.model), "n": want, "seed": cfg.seed,
                "backend": cfg.generation.backend}
    inputs = _query_inputs(cfg)
    stage = Stage(folder, "sample", settings, inputs)
    if done := up_to_date(stage):
        return done
    if cfg.sample.queries == MAGPIE:
        from .data.magpie import magpie_queries

        conversations, provenance = magpie_queries(cfg, want, folder)
    else:
        conversations, provenance = load_queries(cfg.sample.queries)
        if len(conversations) < want:
            raise DeliaError(f"{cfg.sample.queries}: {len(conversations)} queries, but {want} diverse rows are needed "
                             f"(mix.ratio {cfg.mix.ratio:g} x {n_task} task rows); give a larger query set or lower mix.ratio")
    path, stats = sample_diverse(conversations, cfg.model, cfg.sample, want, folder, cfg.seed, cfg.generation)
    return stage.finish(diverse=str(path), queries=provenance, placement=generation_placement(cfg), **stats)


def stage_general(cfg: RunConfig) -> dict:
    """General queries no arm trains on, and the untouched model's greedy answers to them: what drift and
    leakage are measured on. Up to `controls.general_queries` are taken from the end of the sample's query
    source, skipping every query the sample stage asked (checked by query text)."""
    from .data.generation_cache import generate_cached
    from .model.backends import make_generator
    from .model.generate import Request
    from .runfolder import fingerprint

    run = paths(cfg)
    c = cfg.controls
    sampled = run.diverse if _needs_diverse(cfg) else None
    inputs = {"diverse": sampled} if sampled else {}
    inputs.update(_query_inputs(cfg))
    settings = {"queries": cfg.sample.queries, "n": c.general_queries, "max_new_tokens": c.general_max_new_tokens,
                "model": model_key(cfg.model), "backend": cfg.generation.backend, "seed": cfg.seed}
    stage = Stage(run.stage("general"), "general", settings, inputs)
    if done := up_to_date(stage):
        return done
    if cfg.sample.queries == MAGPIE or not c.general_queries:
        write_jsonl(run.general, [])
        return stage.finish(rows=0, note="no held-out query set (sample.queries: magpie, or general_queries 0)")
    conversations, _ = load_queries(cfg.sample.queries)
    asked = read_manifest(run.stage("sample"))["outputs"]["requested"] if sampled else 0
    used = {first_user_turn(r["messages"])["content"].strip() for r in read_jsonl(sampled)} if sampled else set()
    used |= {first_user_turn(conv)["content"].strip() for conv in conversations[:asked]}
    picked = held_out_queries(conversations[asked:], used, c.general_queries)
    if len(picked) < c.general_queries:
        # e.g. a high mix.ratio asks nearly every query: drift then rests on fewer queries than other runs'
        print(f"delia: general: only {len(picked)} of controls.general_queries {c.general_queries} are left after "
              f"the {len(used)} queries the sample asked; drift and leakage are measured on those", flush=True)
    requests = [Request(key=fingerprint({"model": model_key(cfg.model), "query": q, "max_new_tokens": c.general_max_new_tokens}),
                        messages=[{"role": "user", "content": q}]) for q, _ in picked]
    run.stage("general").mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, run.stage("general") / "cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, c.batch_size),
                                 c.general_max_new_tokens, 0.0, 1.0, cfg.seed, desc="general queries")
    rows = [{"messages": r.messages, "reference": ref, "answer": answers[r.key]["answer"],
             "tokens": answers[r.key]["tokens"]} for r, (_, ref) in zip(requests, picked)]
    write_jsonl(run.general, rows)
    return stage.finish(rows=len(rows), placement=generation_placement(cfg), with_reference=sum(r["reference"] is not None for r in rows),
                        skipped_sampled=len(used), untouched_mean_tokens=_mean([r["tokens"] for r in rows]),
                        untouched_cut=_mean([r["tokens"] >= c.general_max_new_tokens for r in rows]))


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _needs_diverse(cfg: RunConfig) -> bool:
    return any(ARMS[a].needs_diverse for a in cfg.arms)


def stage_mix(cfg: RunConfig) -> dict:
    run = paths(cfg)
    inputs = {"task": run.task_train}
    if _needs_diverse(cfg):
        inputs.update(delia_task=delia_task_rows(cfg), diverse=run.diverse)
    needed = list(dict.fromkeys(ARMS[a].data for a in ARMS if a in cfg.arms and ARMS[a].trained))
    settings = {"ratio": cfg.mix.ratio, "seed": cfg.seed, "data": needed}  # an arm that needs new rows remixes
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
    traits, options = _training_traits(cfg, arm)
    settings = {"train": train_settings(cfg), "task": config_dict(cfg)["task"], "model": model_key(cfg.model),
                "max_steps": max_steps, "seed": cfg.seed, **traits}
    inputs = {"data": data}
    if a.continues_from:  # a second stage goes on from the first stage's adapter
        inputs["stage1"] = adapter_of(cfg, a.continues_from) / "adapter_model.safetensors"
    stage = Stage(run.train(arm), f"train:{arm}", settings, inputs)
    if done := up_to_date(stage):
        return done
    budget = " (1 epoch)" if not max_steps else \
        f" ({max_steps} steps{', stage 2' if a.continues_from else ''}, as {REFERENCE})"
    if not a.token_only:
        check_target_modules(cfg.model, cfg.train.target_modules)
    rows = read_jsonl(data)  # a changed file is one line before the model loads
    print(f"delia: train {arm}{budget}", flush=True)
    model, tokenizer = base_model(cfg)
    train_cfg = dataclasses.replace(cfg.train, learning_rate=traits["learning_rate"]) if "learning_rate" in traits else cfg.train
    stats = train_lora(model, tokenizer, rows, train_cfg, cfg.task, run.train(arm), cfg.seed, max_steps,
                       run_key=stage.key, **options)
    if a.continues_from:  # count both stages
        first = _trained(cfg, a.continues_from)
        stats.update(stage2_steps=stats["steps"], seconds=round(stats["seconds"] + first["seconds"], 1),
                     **{k: stats[k] + first.get(k, 0) for k in ("steps", "trained_tokens", "loss_tokens", "padded_tokens")})
    if world()[0] != 0:  # under accelerate launch the main process writes the manifest
        return {"outputs": stats}
    return stage.finish(adapter=str(run.adapter(arm)), placement=placement_of(cfg), **stats)


def _training_traits(cfg: RunConfig, arm: str) -> tuple[dict, dict]:
    """(what an arm's training traits add to its train stage's key, the keyword arguments they give
    `train_lora`)."""
    a, b = ARMS[arm], cfg.baselines
    key, options = {}, {}
    if a.neftune:
        key["neftune_alpha"] = options["neftune_alpha"] = b.neftune_alpha
    if a.distill:
        beta = {"anchor": b.kl_anchor_beta, "token": b.token_distill_beta, "description": b.token_distill_beta}[a.distill]
        key["distill"] = {"mode": a.distill, "beta": beta}
        options.update(distill=a.distill, beta=beta)
    if a.decoys:
        key["untrained_tokens"] = options["untrained_tokens"] = cfg.counterfactual.decoys
    for trait in ("gist", "token_only"):
        if getattr(a, trait):
            key[trait] = options[trait] = True
    if a.token_only and b.token_row_lr:
        key["learning_rate"] = b.token_row_lr
    if a.continues_from:
        first = adapter_of(cfg, a.continues_from)
        if a.continue_as == "tokens":
            key["continue_as"], options["tokens_from"] = "tokens", first
        else:
            options["resume_adapter"] = first
    return key, options


def check_arm(verb: str, arm: str, known) -> None:
    """Arms name folders of the run: only the known names, so none reaches outside it."""
    if arm not in known:
        raise DeliaError(f"{verb}: unknown arm {arm!r} (known: {', '.join(known)})")


def _trained(cfg: RunConfig, arm: str) -> dict:
    """The figures a trained arm's manifest records (steps, tokens, seconds)."""
    return read_manifest(paths(cfg).train(arm))["outputs"]


def stage_export(cfg: RunConfig, arm: str) -> Path:
    """A trained arm as a plain Hugging Face model folder (adapter merged, new tokens in the vocabulary):
    what vLLM, TGI, SGLang or llama.cpp's converter load. Returns the folder."""
    from .model.adapter import save_merged
    from .model.loading import placement

    check_arm("export", arm, trained_arms())
    adapter = adapter_of(cfg, arm)
    folder = paths(cfg).export(arm)
    stage = Stage(folder, f"export:{arm}", {"model": model_key(cfg.model), "dtype": placement(cfg.model.device, cfg.model.dtype)[1]},
                  {"adapter": adapter / "adapter_model.safetensors"})
    if not up_to_date(stage):
        save_merged(*base_model(cfg), adapter, folder / "model")
        stage.finish(model=str(folder / "model"))
    return folder / "model"


def stage_evaluate(cfg: RunConfig, arm: str) -> dict:
    """The arm's answers to the evaluation rows, scored by every probe that applies to the task kind and
    the backend (`delia.evaluate.probes`: format accuracy, controls, leakage, drift)."""
    from .evaluate.probes import PROBES, applicable, evaluate_arm

    check_arm("evaluate", arm, ARMS)
    a = ARMS[arm]
    run = paths(cfg)
    probes = applicable(cfg)
    inputs = {"eval": run.task_eval, "task": run.task_train}
    if a.trained:
        inputs["adapter"] = adapter_of(cfg, arm) / "adapter_model.safetensors"
    prompt = PROMPTS[a.prompt] if a.prompt else None
    if prompt:
        inputs.update(prompt.inputs(cfg))
    gen = cfg.generation
    settings = {"evaluate": config_dict(cfg)["evaluate"], "task": config_dict(cfg)["task"], "model": model_key(cfg.model),
                "backend": gen.backend, "server_model": gen.server_model if gen.backend == "openai" else ""}
    for name in probes:
        inputs.update(PROBES[name].inputs(run))
        settings.update({section: config_dict(cfg)[section] for section in PROBES[name].settings})
    if a.uses_baseline_settings:
        settings["baselines"] = config_dict(cfg)["baselines"]
    stage = Stage(run.eval(arm), f"evaluate:{arm}", settings, inputs)
    if done := up_to_date(stage):
        return done
    print(f"delia: evaluate {arm} ({gen.backend} backend)", flush=True)
    metrics = evaluate_arm(cfg, arm, probes, run.eval(arm), export=stage_export(cfg, arm) if needs_export(cfg, arm) else None,
                           rewrite=prompt.rewrite if prompt else None, rewrite_general=bool(prompt and prompt.general))
    return stage.finish(placement=generation_placement(cfg), **metrics)


def stage_analyze(cfg: RunConfig) -> dict:
    """For the untouched model (random and mean init) and every trained arm: token-to-meaning distances
    (Table 1, Figure 2) and the divergent token over the evaluation rows (Figure 4)."""
    from .analysis.divergent import divergent_stats, plot_divergent
    from .analysis.token_distance import plot_distances, token_keyword_distances

    run = paths(cfg)
    folder = run.analysis()
    adapters = {a: adapter_of(cfg, a) for a in trained_arms() if a in cfg.arms}
    inputs = {a: p / "adapter_model.safetensors" for a, p in adapters.items()} | {"eval": run.task_eval}
    settings = {"task": config_dict(cfg)["task"], "model": model_key(cfg.model), "seed": cfg.seed}
    stage = Stage(folder, "analyze", settings, inputs)
    if done := up_to_date(stage):
        return done
    token, keywords = cfg.task.new_tokens[0], cfg.task.keywords
    rows = read_jsonl(run.task_eval)
    distances, divergent = {}, {}

    def measure(name, model, tokenizer):
        distances[name] = token_keyword_distances(model, tokenizer, token, keywords)
        divergent[name] = divergent_stats(model, tokenizer, rows)

    from tqdm import tqdm

    models = [(f"untouched ({init} init)", lambda init=init: arm_model(cfg, f"init_{init}"))
              for init in ("random", "mean", "description")]  # the new token initialised so, nothing trained
    models += [(arm, lambda arm=arm: arm_model(cfg, arm)) for arm in adapters]  # merged: one matrix a layer
    for name, load in tqdm(models, desc="analyze", unit="model"):
        measure(name, *load())
    write_json(run.analysis("token_distance.json"), distances)
    write_json(run.analysis("divergent.json"), divergent)
    with atomic_path(run.analysis("token_distance.png")) as tmp:
        plot_distances(distances, keywords, tmp)
    with atomic_path(run.analysis("divergent.png")) as tmp:
        plot_divergent(divergent, tmp)
    return stage.finish(token=token, keywords=keywords, placement=placement_of(cfg), plots=[str(run.analysis("token_distance.png")),
                                                               str(run.analysis("divergent.png"))])


def stage_report(cfg: RunConfig) -> Path:
    from .report.tables import write_report

    return write_report(cfg)


def run_all(cfg: RunConfig, before_sample=None) -> Path:
    """The whole chain for the configured arms; returns the report's path. `before_sample()` runs once the
    task stage has passed (an experiment starts the run's sample cache from another run's there)."""
    if why := missing_dependency(cfg.arms):
        raise DeliaError(f"arms: {why}")
    if any(ARMS[a].trained and not ARMS[a].token_only for a in cfg.arms):  # before any stage works
        check_target_modules(cfg.model, cfg.train.target_modules)
    stage_task(cfg)
    if before_sample:
        before_sample()
    if _needs_diverse(cfg):
        if cfg.diversify.paraphrases > 0:
            stage_diversify(cfg)
        stage_sample(cfg)
    stage_mix(cfg)
    for arm in training_order(cfg.arms):
        stage_train(cfg, arm)
    if cfg.task.kind == "formatted":
        stage_general(cfg)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    if cfg.task.new_tokens and cfg.task.kind == "formatted":
        stage_analyze(cfg)
    return stage_report(cfg)
