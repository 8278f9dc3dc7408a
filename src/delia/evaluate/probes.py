"""What an evaluation measures, as a table of probes (Inspect AI's dataset / solver / scorer, at our size).

A probe builds its prompts from the run (`Evaluation`: the arm's generator, the evaluation, training and
general rows), asks the arm's generator, and scores what comes back. It returns its figures, merged into
the arm's `metrics.json`, and rows for the files it writes in the arm's evaluation folder (the rows of one
file from several probes are joined row by row). `PROBES` holds every probe in the order they run;
`evaluate_arm` runs those that apply to the task kind and the backend; a probe may read what the probes
before it returned (the switch figure reads the format and controls answers). Adding a probe is one entry here
plus its own code: "How to add a probe" in docs/arms.md.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ..arms import ALL_BACKENDS, ARMS
from ..config import RunConfig, model_key
from ..model.arm import WEIGHTS_HERE, add_control_tokens, arm_generator, arm_model, base_model
from ..runfolder import RunFolder, read_jsonl, write_json, write_jsonl

Files = dict[str, list[dict]]
"""Rows a probe writes, by file name in the arm's evaluation folder."""


@dataclass
class Evaluation:
    """What every probe of one arm's evaluation reads."""

    cfg: RunConfig
    arm: str
    generator: object
    """The arm's generator (`delia.model.arm.arm_generator`), greedy."""
    eval_rows: list[dict]
    """The evaluation rows as the task stage wrote them (groups seen and heldout)."""
    train_rows: list[dict]
    budget: int
    """New tokens allowed per task answer (`evaluate.formatted.answer_budget`)."""
    prompted: Callable[[list[dict]], list[dict]] = lambda rows: rows
    """Rows as the arm is prompted (its prompt rewrite: in-context examples, dictionary hints)."""
    prompted_general: bool = False
    """The rewrite applies to general queries too (the arm is deployed so)."""
    results: dict[str, tuple[dict, Files]] = field(default_factory=dict)
    """What each probe run so far returned, by name (a probe reads those it `needs`)."""
    general_starts: list | None = None
    """Per general query, the start of the arm's greedy answer its drift pass showed (`delia.analysis.drift.
    greedy_prefix`), or None: the leakage probe goes on from there instead of generating it all again."""

    @cached_property
    def rows(self) -> list[dict]:
        """The evaluation rows as the arm is prompted."""
        return self.prompted(self.eval_rows)

    @cached_property
    def general(self) -> list[dict]:
        """Held-out general queries with the untouched model's answers (stage `general`); none if not run."""
        path = RunFolder(self.cfg.run_dir).general
        return read_jsonl(path) if path.exists() else []

    @cached_property
    def general_prompts(self) -> list[list[dict]]:
        """The general queries as the arm is deployed (an in-context arm puts its examples first)."""
        rows = [{"messages": g["messages"]} for g in self.general]
        return [r["messages"] for r in (self.prompted(rows) if self.prompted_general else rows)]


@dataclass(frozen=True)
class Probe:
    run: Callable[[Evaluation], tuple[dict, Files]]
    """(figures merged into metrics.json, rows of the files it writes)."""
    kinds: tuple[str, ...] = ("formatted",)
    """Task kinds it applies to."""
    backends: tuple[str, ...] = ALL_BACKENDS
    """Generation backends it applies to."""
    settings: tuple[str, ...] = ()
    """Config sections it reads beyond `evaluate`, `task` and the model (part of the evaluate stage's key)."""
    inputs: Callable[[RunFolder], dict] = field(default=lambda run: {})
    """Run files it reads beyond the task rows and the adapter (part of the evaluate stage's key)."""
    needs: tuple[str, ...] = ()
    """Probes whose results it reads (`Evaluation.results`): listed before it, and it applies only with them."""
    changes_model: bool = False
    """It changes the arm's model in place (the controls add their token): it runs after every probe that
    does not, with those that read its results."""


def _format(ev: Evaluation) -> tuple[dict, Files]:
    """Formatted-text and label accuracy by wording group (`delia.evaluate.formatted`)."""
    from .formatted import evaluate_formatted

    metrics, generations = evaluate_formatted(ev.generator, ev.rows, ev.cfg.task, ev.budget, ev.cfg.seed)
    return metrics, {"generations.jsonl": generations}


def _translation(ev: Evaluation) -> tuple[dict, Files]:
    """chrF++ and BLEU by wording group (`delia.evaluate.translation`)."""
    from .translation import evaluate_translation

    metrics, generations = evaluate_translation(ev.generator, ev.rows, ev.budget, ev.cfg.seed)
    return metrics, {"generations.jsonl": generations}


def _controls(ev: Evaluation) -> tuple[dict, Files]:
    """Each control group's figures (`delia.evaluate.controls`), prompted as the arm is. With the weights on
    this machine all four go through the arm's model with the never-trained `controls.other_token` added
    (locally to the loaded model, in place: `changes_model`);
    elsewhere that control is left out (the served model has no such token)."""
    from .controls import CONTROLS, control_rows
    from .formatted import evaluate_formatted

    cfg = ev.cfg
    here = cfg.generation.backend in WEIGHTS_HERE
    rows = [r for r in ev.prompted(control_rows(ev.eval_rows, cfg.task, cfg.controls))
            if here or r["group"] != "other_token"]
    if not rows:
        return {}, {"controls.jsonl": []}
    other, token = ev.generator, (cfg.controls.other_token,)
    if cfg.generation.backend == "local":
        add_control_tokens(cfg, other.model, other.tokenizer, token)
    elif here:
        other = arm_generator(cfg, ev.arm, cfg.evaluate.batch_size, extra_tokens=token)
    metrics, generations = evaluate_formatted(other, rows, cfg.task, ev.budget, cfg.seed, desc="controls")
    return {g: m for g, m in metrics.items() if g in CONTROLS}, {"controls.jsonl": generations}


def _switch(ev: Evaluation) -> tuple[dict, Files]:
    """Switch consistency (`delia.evaluate.controls.switch_consistency`): of the rows the controls rewrote,
    the share whose every variant is right, from the answers the format and controls probes scored."""
    from .controls import switch_consistency

    controls = ev.results["controls"][1].get("controls.jsonl", [])
    if not controls:
        return {}, {}
    found = switch_consistency(ev.results["format"][1]["generations.jsonl"], controls)
    rows = found.pop("rows")
    return {"switch": found}, {"switch.jsonl": rows}


def _general_input(run: RunFolder) -> dict:
    return {"general": run.general} if run.general.exists() else {}


def _leakage(ev: Evaluation) -> tuple[dict, Files]:
    """How much of the task's format leaks into the arm's answers to the held-out general queries; the
    untouched model's answers are its own (stage `general`). After the drift probe, each answer goes on
    from where the arm's pass over the untouched model's answer showed its greedy answer leaving it (the
    same greedy answers, fewer decoding steps)."""
    from .formatted import generate_answers, leakage

    if not ev.general:
        return {}, {}
    budget = ev.cfg.controls.general_max_new_tokens
    if ARMS[ev.arm].is_base_model:
        answers = [(g["answer"], g["tokens"]) for g in ev.general]
    else:
        answers = generate_answers(ev.generator, ev.general_prompts, budget, ev.cfg.seed, desc="general queries",
                                   starts=ev.general_starts)
    figures = leakage(answers, [g["tokens"] for g in ev.general], ev.cfg.task, budget)
    rows = [{"query": g["messages"][-1]["content"], "answer": text, "tokens": n}
            for g, (text, n) in zip(ev.general, answers)]
    return {"leakage": figures}, {"general.jsonl": rows}


_UNTOUCHED: dict[str, list] = {}
"""The untouched model's answer log-probabilities on the last run's general rows (`_untouched_logprobs`)."""


def _untouched_logprobs(cfg: RunConfig, general: list[dict]) -> list:
    """`delia.analysis.drift.answer_logprobs` of the untouched model on its own general answers, computed
    once a process for the same model, placement, rows and lengths (every arm of a run compares with it)."""
    from ..analysis.drift import answer_logprobs

    rows = [(g["messages"], g["answer"]) for g in general]
    key = json.dumps([model_key(cfg.model), cfg.model.dtype, cfg.model.device, cfg.train.max_length,
                      cfg.controls.batch_size, rows])
    if key not in _UNTOUCHED:
        _UNTOUCHED.clear()  # one run's at a time: they are [tokens, vocabulary] a row
        _UNTOUCHED[key] = answer_logprobs(*base_model(cfg), rows, cfg.train.max_length, cfg.controls.batch_size)
    return _UNTOUCHED[key]


def _drift(ev: Evaluation) -> tuple[dict, Files]:
    """Mean per-token KL from the untouched model to the arm on the untouched model's answers, and the
    arm's NLL of the first `controls.general_max_new_tokens` tokens of the reference answers
    (`delia.analysis.drift`), and per query its (summed KL, tokens); with the weights on this machine
    (model arithmetic is measured on its plain model: it changes nothing on prompts without the token)."""
    from ..analysis.drift import arm_costs

    if not ev.general:
        return {}, {}
    cfg, general, prompts = ev.cfg, ev.general, ev.general_prompts
    gen, budget = ev.generator, cfg.controls.general_max_new_tokens
    here = cfg.generation.backend == "local"
    lm = (gen.model, gen.tokenizer) if here else arm_model(cfg, ev.arm)
    greedy = (set(gen._stop_ids()), budget) if here and gen.continues_prefixes else None
    kl, nll = arm_costs(_untouched_logprobs(cfg, general), lm, prompts, [g["answer"] for g in general],
                        [g.get("reference") or None for g in general], cfg.train.max_length, cfg.controls.batch_size,
                        budget, untouched=ARMS[ev.arm].is_base_model, greedy=greedy)
    ev.general_starts = kl["greedy"] if greedy else None
    return ({"drift": {"kl": kl["kl"], "kl_tokens": kl["tokens"], "nll": nll["nll"], "nll_tokens": nll["tokens"]}},
            {"general.jsonl": [{"kl_sum": s, "kl_tokens": n} for s, n in kl["per_row"]]})


PROBES: dict[str, Probe] = {
    "format": Probe(_format),
    "translation": Probe(_translation, kinds=("translation",)),
    "controls": Probe(_controls, settings=("controls",), changes_model=True),
    "switch": Probe(_switch, settings=("controls",), needs=("format", "controls")),
    "drift": Probe(_drift, settings=("controls",), inputs=_general_input),
    "leakage": Probe(_leakage, settings=("controls",), inputs=_general_input),  # goes on from drift's greedy starts
}
"""Every probe (`applicable` gives the order they run in)."""


def applicable(cfg: RunConfig) -> list[str]:
    """The probes that apply to the run's task kind and generation backend (and whose `needs` do), in the
    order they run: PROBES' order, those that change the model and what reads their results last."""
    names: list[str] = []
    for name, p in PROBES.items():
        if cfg.task.kind in p.kinds and cfg.generation.backend in p.backends and all(n in names for n in p.needs):
            names.append(name)
    late: set[str] = set()  # after the model changed: the probes that change it and those reading their results
    for name in names:
        if PROBES[name].changes_model or late & set(PROBES[name].needs):
            late.add(name)
    return [n for n in names if n not in late] + [n for n in names if n in late]


def tune_arithmetic(ev: Evaluation) -> dict:
    """Model arithmetic's lambda, picked by format accuracy on 16 training rows (ties: the smallest) and
    set on the generator before any probe runs; the figures of every candidate."""
    from .formatted import evaluate_formatted

    cfg = ev.cfg
    dev = [{**r, "group": "seen"} for r in random.Random(cfg.seed).sample(ev.train_rows, min(16, len(ev.train_rows)))]
    tuning = {}
    for lam in cfg.baselines.arithmetic_lambdas:
        print(f"delia: arithmetic lambda {lam:g} on {len(dev)} training rows", flush=True)
        ev.generator.lam = lam
        tuning[lam] = evaluate_formatted(ev.generator, dev, cfg.task, ev.budget, cfg.seed)[0]["seen"]["format_accuracy"]
    ev.generator.lam = max(tuning, key=lambda k: (tuning[k], -k))
    return {"arithmetic_lambda": ev.generator.lam, "arithmetic_tuning": {f"{k:g}": v for k, v in tuning.items()}}


def evaluate_arm(cfg: RunConfig, arm: str, probes: list[str], folder: Path, export: Path | None = None,
                 rewrite: Callable[[RunConfig, list[dict], list[dict]], list[dict]] | None = None,
                 rewrite_general: bool = False) -> dict:
    """Run `probes` on one arm and write their files and `metrics.json` into `folder`; returns the metrics.
    `export`: the arm's merged model folder where its backend reads one (`delia.model.arm.needs_export`);
    `rewrite(cfg, rows, training rows)`: the arm's prompt rewrite, on general queries too if `rewrite_general`."""
    from ..model.loading import load_tokenizer, model_source
    from .formatted import answer_budget

    run = RunFolder(cfg.run_dir)
    eval_rows, train_rows = read_jsonl(run.task_eval), read_jsonl(run.task_train)
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model.trust_remote_code)
    prompted = (lambda rows: rewrite(cfg, rows, train_rows)) if rewrite else (lambda rows: rows)
    ev = Evaluation(cfg, arm, arm_generator(cfg, arm, cfg.evaluate.batch_size, export=export), eval_rows, train_rows,
                    answer_budget(tokenizer, eval_rows + train_rows, cfg.evaluate), prompted, bool(rewrite) and rewrite_general)
    tuning = tune_arithmetic(ev) if ARMS[arm].decoding == "arithmetic" and cfg.baselines.arithmetic_lambdas else {}
    metrics, files = {}, {}
    for name in probes:
        figures, written = ev.results[name] = PROBES[name].run(ev)
        metrics.update(figures)
        for file, rows in written.items():
            files[file] = [{**a, **b} for a, b in zip(files[file], rows, strict=True)] if file in files else rows
    metrics.update(tuning)
    for file, rows in files.items():
        write_jsonl(folder / file, rows)
    write_json(folder / "metrics.json", metrics)
    return metrics
