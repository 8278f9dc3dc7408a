"""The DELIA chain, stage by stage: task -> [diversify] -> sample -> mix -> train -> general -> evaluate ->
analyze -> report.

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
from .config import RunConfig, config_dict, model_key, train_settings
from .data.mix import diverse_count, mix_files, mix_with_diverse
from .data.queries import BUILT_IN, MAGPIE, load_queries, query_parts
from .data.sample import sample_diverse
from .data.sources import is_saved_dataset, source_files
from .data.task import build_task
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


def base_model(cfg: RunConfig):
    """The base model on `model.device` in `model.dtype` (training: the Trainer places it under accelerate)."""
    from .model.loading import load_model, model_source

    return load_model(model_source(cfg.model), cfg.model.dtype, cfg.model.trust_remote_code,
                      "cpu" if world()[1] > 1 else cfg.model.device)


WEIGHTS_HERE = ("local", "ctranslate2")
"""Backends that run the weights on this machine: an arm's model can be changed (a control token added)."""


def placement_of(cfg: RunConfig) -> str:
    """Where this machine puts the model, for the manifests: e.g. `cpu float32`."""
    from .model.loading import placement

    return " ".join(placement(cfg.model.device, cfg.model.dtype))


def generation_placement(cfg: RunConfig) -> str:
    """Where generation runs, for the manifests: `cpu float32`, `ctranslate2 cpu int8`, or the backend."""
    gen = cfg.generation
    if gen.backend == "ctranslate2":
        from .model.generate import ct2_device

        return f"ctranslate2 {ct2_device(cfg.model.device)} {gen.compute_type}"
    return placement_of(cfg) if gen.backend == "local" else gen.backend


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
        _check_references(cfg, train + evals)
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


def _check_references(cfg: RunConfig, rows: list[dict]) -> None:
    """Before an hour of compute: the task's own reference answers must pass its evaluator (else every
    arm scores 0 without a word)."""
    from .evaluate.formatted import score
    from .evaluate.parse import extract_object

    t = cfg.task
    for row in rows:
        ref = row["messages"][-1]["content"]
        s = score(ref, ref, t)
        if s["formatted"] and s["label"] is not False:
            continue
        where = row.get("where", f"{t.source} ({row.get('group', 'train')} row)")
        if t.metric == "regex":
            why = f"does not match task.answer_pattern {t.answer_pattern!r}"
        elif (obj := extract_object(ref)) is None:
            why = "holds no JSON object (task.metric object; for plain answers use task.metric exact or regex)"
        elif missing := [k for k in t.required_keys if k not in obj]:
            why = (f"lacks the key(s) {', '.join(map(repr, missing))} of task.required_keys (it has "
                   f"{', '.join(map(repr, obj)) or 'none'}); set task.required_keys and task.label_key to your task's")
        else:
            why = f"lacks task.label_key {t.label_key!r} (set it to a key your answers hold, or '' for none)"
        raise DeliaError(f"{where}: the reference answer {why}: {ref[:80]!r}")


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


def diverse_rows_needed(cfg: RunConfig, n_task: int) -> int:
    return diverse_count(cfg.mix.ratio, n_task)


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
    n_task = len(read_jsonl(task_rows_path(cfg)))
    want = cfg.sample.max_queries or diverse_rows_needed(cfg, n_task)
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
    from .model.generate import Request, make_generator
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
    used = {r["messages"][0]["content"].strip() for r in read_jsonl(sampled)} if sampled else set()
    used |= {next(m["content"] for m in c_ if m["role"] == "user").strip() for c_ in conversations[:asked]}
    picked, seen = [], set()
    for conv in reversed(conversations[asked:]):
        query = next(m["content"] for m in conv if m["role"] == "user").strip()
        if query not in used and query not in seen:
            seen.add(query)
            picked.append((query, next((m["content"] for m in conv if m["role"] == "assistant"), None)))
        if len(picked) == c.general_queries:
            break
    picked.reverse()
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


def _mix_self_distilled(cfg: RunConfig, task_rows: list[dict]) -> dict:
    """SDFT's rows: each task answer rewritten by the untouched model (its reply pre-filled with the opening
    the answers share, unless `baselines.self_distill_prefill` is off), kept if the evaluator accepts it
    (`baselines.self_distilled_row`); greedy, through the generation cache (`mix/self_distilled_cache.jsonl`)."""
    from .data.generation_cache import generate_cached
    from .evaluate.formatted import answer_budget
    from .model.generate import Request, make_generator
    from .model.loading import load_tokenizer, model_source
    from .runfolder import fingerprint

    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model.trust_remote_code)
    budget = answer_budget(tokenizer, task_rows, cfg.evaluate)
    opening, gap = baselines.answer_opening(task_rows) if cfg.baselines.self_distill_prefill else ("", "")

    def request(row: dict) -> Request:
        messages = baselines.rewrite_request(row)
        text = baselines.prefilled_rewrite(tokenizer, row, opening) if opening else ""
        return Request(key=fingerprint({"model": model_key(cfg.model), "prompt": messages, "prefill": opening,
                                        "max_new_tokens": budget}), messages=messages, text=text)

    requests = [request(r) for r in task_rows]
    paths(cfg).stage("mix").mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, paths(cfg).stage("mix") / "self_distilled_cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, cfg.evaluate.batch_size),
                                 budget, 0.0, 1.0, cfg.seed, desc="self-distilled rewrites")
    lead = opening + gap if opening else ""
    rows = [baselines.self_distilled_row(r, lead + answers[q.key]["answer"], cfg.task) for r, q in zip(task_rows, requests)]
    write_jsonl(paths(cfg).mix("self_distilled"), rows)
    kept = sum(r["rewritten"] for r in rows)
    if kept < len(rows):
        print(f"delia: self_distilled: {kept} of {len(rows)} rewrites passed the task's evaluator; the others train on "
              "their reference answers" + (" (with none kept the arm is common tuning)" if not kept else ""), flush=True)
    return {"self_distilled_rows": len(rows), "self_distilled_kept": kept}


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
    "self_distilled": MixData(_mix_self_distilled, lambda cfg: {"self_distilled": {
        "model": model_key(cfg.model), "backend": cfg.generation.backend, "evaluate": config_dict(cfg)["evaluate"],
        "prefill": cfg.baselines.self_distill_prefill,
        "task": config_dict(cfg)["task"]}}),
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
    settings = {"train": train_settings(cfg), "task": config_dict(cfg)["task"], "model": model_key(cfg.model),
                "max_steps": max_steps, "seed": cfg.seed}
    if a.neftune:
        settings["neftune_alpha"] = cfg.baselines.neftune_alpha
    beta = {"anchor": cfg.baselines.kl_anchor_beta, "token": cfg.baselines.token_distill_beta}.get(a.distill, 0.0)
    if a.distill:
        settings["distill"] = {"mode": a.distill, "beta": beta}
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
                       resume_adapter=adapter_of(cfg, a.continues_from) if a.continues_from else None, run_key=stage.key,
                       distill=a.distill, beta=beta)
    if a.continues_from:  # count both stages
        first = _trained(cfg, a.continues_from)
        stats.update(stage2_steps=stats["steps"], seconds=round(stats["seconds"] + first["seconds"], 1),
                     **{k: stats[k] + first.get(k, 0) for k in ("steps", "trained_tokens", "loss_tokens", "padded_tokens")})
    if world()[0] != 0:  # under accelerate launch the main process writes the manifest
        return {"outputs": stats}
    return stage.finish(adapter=str(run.adapter(arm)), placement=placement_of(cfg), **stats)


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
    from .model.loading import placement
    from .runfolder import atomic_dir

    check_arm("export", arm, trained_arms())
    adapter = adapter_of(cfg, arm)
    folder = paths(cfg).export(arm)
    stage = Stage(folder, f"export:{arm}", {"model": model_key(cfg.model), "dtype": placement(cfg.model.device, cfg.model.dtype)[1]},
                  {"adapter": adapter / "adapter_model.safetensors"})
    if not up_to_date(stage):
        model, tokenizer = load_adapter(*base_model(cfg), adapter)
        with atomic_dir(folder / "model") as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stage.finish(model=str(folder / "model"))
    return folder / "model"


def arm_model(cfg: RunConfig, arm: str, extra_tokens: tuple[str, ...] = ()):
    """(model, tokenizer) of an arm on this machine: the base model, its new tokens initialised for a
    `token_init` arm, the adapter attached for a trained one. `extra_tokens` are added last, with
    `train.token_init` and the seed, never trained (a trained arm is merged first so its vocabulary can grow)."""
    from .model.tokens import add_new_tokens

    a = ARMS[arm]
    model, tokenizer = base_model(cfg)
    if a.trained:
        from .model.adapter import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, adapter_of(cfg, arm))
        if extra_tokens:
            model = model.merge_and_unload()
    elif a.token_init:  # the new token added, its row initialised, nothing trained
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, a.token_init, cfg.task.description, cfg.seed)
    if extra_tokens:
        add_new_tokens(model, tokenizer, list(extra_tokens), cfg.train.token_init, cfg.task.description, cfg.seed)
    return model, tokenizer


def arm_generator(cfg: RunConfig, arm: str, batch_size: int, extra_tokens: tuple[str, ...] = ()):
    """The configured backend over an arm's model: the base model for an untrained arm, else base +
    adapter (local), the merged export (vllm), or the server model named by `generation.server_model`
    with `{arm}` filled in (openai). `extra_tokens` (local backend only): see `arm_model`."""
    from .model.generate import LocalGenerator, make_generator

    a = ARMS[arm]
    if cfg.generation.backend not in a.backends or (extra_tokens and cfg.generation.backend not in WEIGHTS_HERE):
        raise DeliaError(f"arm '{arm}': evaluated with the local backend only (generation.backend is "
                         f"{cfg.generation.backend!r})")
    if cfg.generation.backend == "openai":
        name = cfg.generation.server_model or cfg.model.name
        if a.trained and "{arm}" not in name:
            raise DeliaError(f"generation.server_model: evaluating arm '{arm}' over HTTP needs '{{arm}}' in the name, "
                             f"so each arm reaches its own model (e.g. `delia serve CONFIG --name {arm} --adapter "
                             f"{paths(cfg).adapter(arm)}`)")
        return make_generator(cfg.model, cfg.generation, batch_size, served_name=name.replace("{arm}", arm))
    if cfg.generation.backend == "vllm" or (cfg.generation.backend == "ctranslate2" and not extra_tokens):
        return make_generator(cfg.model, cfg.generation, batch_size, path=str(stage_export(cfg, arm)) if a.trained else "")
    model, tokenizer = arm_model(cfg, arm, extra_tokens)
    if cfg.generation.backend == "ctranslate2":  # with a control token: the model as it is in memory
        from .model.ct2 import CT2Generator
        from .model.generate import ct2_device

        return CT2Generator.from_model(model, tokenizer, batch_size=batch_size, compute_type=cfg.generation.compute_type,
                                       device=ct2_device(cfg.model.device), threads=cfg.generation.threads,
                                       workers=cfg.generation.workers)
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
    general: bool = False
    """The arm is deployed so: general queries get the rewrite too (drift and leakage)."""


PROMPTS = {
    "icl": PromptRewrite(lambda cfg, rows, train: baselines.icl_rows(rows, train, cfg.baselines.icl_k, cfg.seed),
                         general=True),
    "dipmt": PromptRewrite(lambda cfg, rows, train: baselines.dipmt_rows(
        rows, train, baselines.load_dictionary(cfg.task), cfg.baselines.dipmt_words),
        inputs=lambda cfg: {"dictionary": baselines.dictionary_path(cfg.task)}),
}
"""How an arm with `Arm.prompt` rewrites the evaluation prompts."""


def stage_evaluate(cfg: RunConfig, arm: str) -> dict:
    from .evaluate.formatted import answer_budget
    from .model.loading import load_tokenizer, model_source

    check_arm("evaluate", arm, ARMS)
    a = ARMS[arm]
    run = paths(cfg)
    inputs = {"eval": run.task_eval, "task": run.task_train}
    if a.trained:
        inputs["adapter"] = adapter_of(cfg, arm) / "adapter_model.safetensors"
    if a.prompt:
        inputs.update(PROMPTS[a.prompt].inputs(cfg))
    costs = cfg.task.kind == "formatted"  # controls, drift and leakage
    if costs and run.general.exists():
        inputs["general"] = run.general
    gen = cfg.generation
    settings = {"evaluate": config_dict(cfg)["evaluate"], "task": config_dict(cfg)["task"], "model": model_key(cfg.model),
                "backend": gen.backend, "server_model": gen.server_model if gen.backend == "openai" else ""}
    if costs:
        settings["controls"] = config_dict(cfg)["controls"]
    if a.uses_baseline_settings:
        settings["baselines"] = config_dict(cfg)["baselines"]
    stage = Stage(run.eval(arm), f"evaluate:{arm}", settings, inputs)
    if done := up_to_date(stage):
        return done
    print(f"delia: evaluate {arm} ({gen.backend} backend)", flush=True)
    rows = eval_rows = read_jsonl(run.task_eval)
    train_rows = read_jsonl(run.task_train)
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model.trust_remote_code)
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
    if costs:
        control_metrics, control_generations = _controls(cfg, arm, generator, eval_rows, train_rows, budget)
        metrics.update(control_metrics)
        write_jsonl(run.eval(arm) / "controls.jsonl", control_generations)
        general = read_jsonl(run.general) if run.general.exists() else []
        if general:
            prompts = _general_prompts(cfg, arm, general, train_rows)  # as the arm is deployed: both use them
            metrics["leakage"], answers = _leakage(cfg, arm, generator, general, prompts)
            metrics["drift"], kl_rows = _drift(cfg, arm, generator, general, prompts)
            write_jsonl(run.eval(arm) / "general.jsonl", [
                {"query": g["messages"][-1]["content"], "answer": text, "tokens": n, "kl_sum": kl, "kl_tokens": m}
                for g, (text, n), (kl, m) in zip(general, answers, kl_rows)])
    write_jsonl(run.eval(arm) / "generations.jsonl", generations)
    write_json(run.eval(arm) / "metrics.json", metrics)
    return stage.finish(placement=generation_placement(cfg), **metrics)


def _controls(cfg: RunConfig, arm: str, generator, eval_rows: list[dict], train_rows: list[dict],
              budget: int) -> tuple[dict, list[dict]]:
    """Each control group's figures (`delia.evaluate.controls`), prompted as the arm is. On the local
    backend all four go through the arm's model with the never-trained `controls.other_token` added;
    elsewhere that control is left out (the served model has no such token)."""
    from .evaluate.controls import control_rows
    from .evaluate.formatted import evaluate_formatted

    a = ARMS[arm]
    rows = control_rows(eval_rows, cfg.task, cfg.controls)
    if a.prompt:
        rows = PROMPTS[a.prompt].rewrite(cfg, rows, train_rows)
    if cfg.generation.backend in WEIGHTS_HERE:
        other = arm_generator(cfg, arm, cfg.evaluate.batch_size, extra_tokens=(cfg.controls.other_token,))
        if a.decoding == "arithmetic":
            other.lam = generator.lam  # the lambda the evaluation used
    else:
        other, rows = generator, [r for r in rows if r["group"] != "other_token"]
    if not rows:
        return {}, []
    metrics, generations = evaluate_formatted(other, rows, cfg.task, budget, cfg.seed, desc="controls")
    return {g: m for g, m in metrics.items() if g not in ("seen", "heldout", "format_gap", "max_new_tokens",
                                                          "hit_token_limit")}, generations


def _general_prompts(cfg: RunConfig, arm: str, general: list[dict], train_rows: list[dict]) -> list[list[dict]]:
    """The general queries as the arm is deployed (an in-context arm puts its examples first)."""
    a = ARMS[arm]
    rows = [{"messages": g["messages"]} for g in general]
    if a.prompt and PROMPTS[a.prompt].general:
        rows = PROMPTS[a.prompt].rewrite(cfg, rows, train_rows)
    return [r["messages"] for r in rows]


def _leakage(cfg: RunConfig, arm: str, generator, general: list[dict], prompts: list[list[dict]]):
    """(leakage figures, the arm's answers) on the held-out general queries; the untouched model's answers
    are its own (stage `general`)."""
    from .evaluate.formatted import generate_answers, leakage

    budget = cfg.controls.general_max_new_tokens
    if ARMS[arm].is_base_model:
        answers = [(g["answer"], g["tokens"]) for g in general]
    else:
        answers = generate_answers(generator, prompts, budget, cfg.seed,
                                   desc="general queries")
    return leakage(answers, [g["tokens"] for g in general], cfg.task, budget), answers


def _drift(cfg: RunConfig, arm: str, generator, general: list[dict],
           prompts: list[list[dict]]) -> tuple[dict, list[tuple[float, int]]]:
    """Mean per-token KL from the untouched model to the arm on the untouched model's answers, and the
    arm's NLL of the first `controls.general_max_new_tokens` tokens of the reference answers
    (`delia.analysis.drift`), and per query its (summed KL, tokens); with the weights on this machine
    (model arithmetic is measured on its plain model: it changes nothing on prompts without the token)."""
    from .analysis.drift import kl_per_token, nll_per_token

    lm = (generator.model, generator.tokenizer) if cfg.generation.backend == "local" else arm_model(cfg, arm)
    length, batch = cfg.train.max_length, cfg.controls.batch_size
    kl = kl_per_token(base_model(cfg), [(g["messages"], g["answer"]) for g in general],
                      lm, [(p, g["answer"]) for p, g in zip(prompts, general)], length, batch)
    refs = [(p, g["reference"]) for p, g in zip(prompts, general) if g.get("reference")]
    nll = nll_per_token(*lm, refs, length, batch, max_answer_tokens=cfg.controls.general_max_new_tokens)
    return {"kl": kl["kl"], "kl_tokens": kl["tokens"], "nll": nll["nll"], "nll_tokens": nll["tokens"]}, kl["per_row"]


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

    def untouched(init: str):  # the untouched model, the new token initialised so
        model, tokenizer = base_model(cfg)
        add_new_tokens(model, tokenizer, cfg.task.new_tokens, init, cfg.task.description, cfg.seed)
        return model, tokenizer

    models = [(f"untouched ({init} init)", lambda init=init: untouched(init)) for init in ("random", "mean", "description")]
    models += [(arm, lambda adapter=adapter: load_adapter(*base_model(cfg), adapter)) for arm, adapter in adapters.items()]
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
    if cfg.task.kind == "formatted":
        stage_general(cfg)
    for arm in cfg.arms:
        stage_evaluate(cfg, arm)
    if cfg.task.new_tokens and cfg.task.kind == "formatted":
        stage_analyze(cfg)
    return stage_report(cfg)
