"""The `report` stage: the untouched model, common instruction tuning and DELIA side by side.

Two comparisons, both always shown: the paper's (one epoch for every trained arm) and equal optimizer
steps (common instruction tuning repeats its rows until it has taken as many steps as DELIA).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..arms import ARMS, COMPARISONS, EPOCH, comparison, label
from ..config import RunConfig, config_dict
from ..errors import DeliaError
from ..runfolder import RunFolder, atomic_path, read_manifest, write_json, write_text


def _placement(outputs: dict) -> dict:
    """Where a stage ran its model (device and dtype, or the remote backend), when its manifest says."""
    return {"placement": outputs["placement"]} if "placement" in outputs else {}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def collect(cfg: RunConfig) -> dict:
    run = RunFolder(cfg.run_dir)
    arms = {}
    for arm in cfg.arms:
        ev = read_manifest(run.eval(arm))
        tr = read_manifest(run.train(arm))
        if ev is None:
            continue
        arms[arm] = {"metrics": ev["outputs"], "eval_seconds": ev["seconds"],
                     "train": tr["outputs"] if tr else None, "train_seconds": tr["seconds"] if tr else None}
    stages = {}
    for sub in ("task", "sample", "mix", "general"):
        m = read_manifest(run.stage(sub))
        if m:
            stages[sub] = {"seconds": m["seconds"], **{k: v for k, v in m["outputs"].items() if not isinstance(v, dict)}}
            if sub == "sample":
                stages[sub]["queries"] = m["outputs"].get("queries", {}).get("source")
    for arm, row in arms.items():
        if row["train_seconds"] is not None:
            stages[f"train:{arm}"] = {"seconds": row["train_seconds"], **_placement(row["train"])}
        stages[f"evaluate:{arm}"] = {"seconds": row["eval_seconds"], **_placement(row["metrics"])}
    analysis = run.analysis("token_distance.json")
    an = read_manifest(run.analysis())
    if an:
        stages["analyze"] = {"seconds": an["seconds"], **_placement(an["outputs"])}
    divergent = run.analysis("divergent.json")
    return {"arms": arms, "stages": stages, "config": config_dict(cfg),
            "token_distance": _these_arms(analysis, cfg), "divergent": _these_arms(divergent, cfg)}


def _these_arms(path, cfg) -> dict | None:
    """An analysis file's models, less the arms this config does not run (a run folder analysed before
    with more arms keeps their entries; the untouched model's init variants are always there)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ARMS or k in cfg.arms} if path.exists() else None


def _row(arm: str, r: dict) -> str:
    m, t = r["metrics"], r["train"] or {}
    seen, held = m.get("seen", {}), m.get("heldout", {})
    steps = t.get("steps", 0)
    cells = [
        label(arm), _pct(seen.get("format_accuracy")), _pct(held.get("format_accuracy")),
        "-" if m.get("format_gap") is None else f"{100 * m['format_gap']:+.1f}",
        _pct(seen.get("label_accuracy")), _pct(held.get("label_accuracy")),
        str(steps), f"{t['epochs']:.2f}" if t else "-", f"{t.get('trained_tokens', 0):,}" if t else "-",
        f"{t['seconds']:.0f} s" if t else "-",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| Arm | Format acc. (seen wordings) | Format acc. (held-out wordings) | Gap (points) | "
          "Label acc. (seen) | Label acc. (held-out) | Optimizer steps | Epochs (passes over task rows) | "
          "Trained tokens | Train time |\n|---|---|---|---|---|---|---|---|---|---|")


def render(data: dict) -> str:
    cfg = data["config"]
    arms = data["arms"]
    any_arm = next(iter(arms.values()), None)
    lines = [f"# DELIA report: {cfg['run_dir']}", ""]
    lines.append(f"Model `{cfg['model']['name']}`, task `{cfg['task']['source']}`, new tokens "
                 f"{', '.join(f'`{t}`' for t in cfg['task']['new_tokens']) or 'none'}, diverse ratio {cfg['mix']['ratio']:g}x, "
                 f"seed {cfg['seed']}.")
    if any_arm:
        m = any_arm["metrics"]
        lines.append(f"Evaluation: {m.get('seen', {}).get('n', 0)} rows with training wordings (seen), "
                     f"{m.get('heldout', {}).get('n', 0)} with held-out wordings; greedy decoding, up to "
                     f"{m['max_new_tokens']} new tokens.")
    lines.append("")
    for title in COMPARISONS:
        present = comparison(title, arms)
        if len(present) < 2:
            continue
        if cfg["task"]["kind"] == "translation":
            lines += [f"## {title}", ""] + _translation_table(present, arms) + [""]
        else:
            lines += [f"## {title}", "", HEADER] + [_row(a, arms[a]) for a in present] + [""]
    if data.get("token_distance"):
        lines += _distance_table(data["token_distance"], cfg) + [""]
    if data.get("divergent"):
        lines += _divergent_table(data["divergent"]) + [""]
    if cfg["task"]["kind"] == "formatted":
        lines += controls_table(arms) + drift_table(arms, data["stages"].get("general", {}))
        if points := tradeoff_points({a: [r] for a, r in arms.items()}):
            lines += [tradeoff_words(points), "", "![format accuracy against drift](tradeoff.png)", ""]
    for name, r in arms.items():
        if tuned := r["metrics"].get("arithmetic_tuning"):
            tried = ", ".join(f"{k} {_pct(v)}" for k, v in tuned.items())
            lines += [f"Model arithmetic ({label(name)}): lambda {r['metrics']['arithmetic_lambda']:g}, the best "
                      f"format accuracy on 16 training rows among: {tried}.", ""]
    cut = [f"{label(a)} {r['metrics'].get('hit_token_limit', 0)}" for a, r in arms.items()]
    if cut:
        lines += [f"Answers cut at the token limit: {', '.join(cut)}.", ""]
    if (sampled := data["stages"].get("sample", {})).get("cut_answers"):
        lines += [f"Self-sampled answers that did not end by themselves (cut at sample.max_new_tokens "
                  f"{cfg['sample']['max_new_tokens']}): {sampled['cut_rows']} of {sampled['rows']} rows "
                  f"({100 * sampled['cut_share']:.1f} %); handled by `{sampled['cut_answers']}` "
                  + {"mask": "(their end-of-turn carries no loss).", "drop": f"({sampled['cut_asked']} dropped, "
                     "further queries asked).", "keep": "(trained as if whole)."}[sampled["cut_answers"]], ""]
    if (mixed := data["stages"].get("mix", {})).get("self_distilled_rows"):
        kept = mixed["self_distilled_kept"]
        lines += [f"Self-distilled rewrites that passed the task's evaluator: {kept} of {mixed['self_distilled_rows']} "
                  "(the others train on their reference answers"
                  + (", so this arm is common tuning in another order)." if not kept else ")."), ""]
    tr = cfg["train"]
    lines += ["## Settings", "",
              f"LoRA r {tr['lora_r']}, alpha {tr['lora_alpha']}, dropout {tr['lora_dropout']} on "
              f"{', '.join(tr['target_modules'])}; lr {tr['learning_rate']:g} ({tr['lr_scheduler']}, warm-up "
              f"{tr['warmup_ratio']:g}); effective batch {tr['batch_size'] or 'paper rule (64, 16 under 256 rows)'} "
              f"(micro-batch {tr['micro_batch_size']}); new-token init `{tr['token_init']}`, new-token rows "
              f"{'trained' if tr['train_new_tokens'] else 'frozen'}; loss on assistant tokens only.",
              f"trust_remote_code: {'ON' if cfg['model']['trust_remote_code'] else 'off'}.",
              "The untouched model is evaluated with its own tokenizer (the new token is plain text to it).", "",
              "## Stage times", "", "| Stage | Seconds | Notes |", "|---|---|---|"]
    for name, info in data["stages"].items():
        notes = ", ".join(f"{k}={v}" for k, v in info.items() if k != "seconds")
        lines.append(f"| {name} | {info['seconds']:.1f} | {notes} |")
    lines.append(f"| total | {sum(i['seconds'] for i in data['stages'].values()):.1f} | |")
    return "\n".join(lines) + "\n"


GROUPS = (("seen", "Seen wordings"), ("heldout", "Held-out wordings"), ("negated", "Negated"),
          ("token_only", "Token only"), ("token_removed", "Token removed"), ("other_token", "Other token"))
IDEAL_CELLS = ("100 / 100", "100 / 100", "0 / 0", "100 / 100", "0 / 0", "0 / 0")


def mean_sd(values: list[float], scale: float = 100, digits: int = 1) -> str:
    """A figure, or its mean ± sample standard deviation over seeds; '-' when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _cut_share(groups: list[dict]) -> float:
    """The share of answers cut at the token limit over all of a run's groups."""
    return sum(m.get("cut", 0) * m["n"] for m in groups) / max(1, sum(m["n"] for m in groups))


def controls_table(arms: dict[str, list[dict] | dict]) -> list[str]:
    """Attempted / strict format rates (%) per group, one row per arm; `arms` maps an arm to its
    collected figures, or to a list of them (one per seed: mean ± sd)."""
    runs = {a: r if isinstance(r, list) else [r] for a, r in arms.items()}
    if not any("negated" in r["metrics"] for rs in runs.values() for r in rs):
        return []
    lines = ["## Does the format follow the token, and only the token?", "",
             "Each cell: attempted / strict (%): the answer opens the object with a required key / it parses and "
             "holds every required key. Controls rewrite the instruction of evaluation rows "
             "(`delia.evaluate.controls`): *negated* asks not to use the format, *token only* is the token alone, "
             "*token removed* drops the sentences with the token, *other token* puts a never-trained token in its place. "
             "*Switch*: the share of the rewritten rows whose every variant is right (the row itself and token only: "
             "the object, strict; the other three: prose, no object attempted).",
             "", "| Arm | " + " | ".join(t for _, t in GROUPS) + " | Switch | Cut at the limit |",
             "|---|" + "---|" * (len(GROUPS) + 2), "| Ideal | " + " | ".join(IDEAL_CELLS) + " | 100 | 0 |"]
    for arm, rs in runs.items():
        cells = []
        for group, _ in GROUPS:
            present = [r["metrics"][group] for r in rs if group in r["metrics"]]
            cells.append("-" if not present else f"{mean_sd([m['attempted'] for m in present])} / "
                                                 f"{mean_sd([m['format_accuracy'] for m in present])}")
        cut = [_cut_share([r["metrics"][g] for g, _ in GROUPS if g in r["metrics"]]) for r in rs]
        switch = mean_sd([r["metrics"]["switch"]["consistency"] for r in rs if "switch" in r["metrics"]])
        lines.append(f"| {label(arm)} | " + " | ".join(cells) + f" | {switch} | {mean_sd(cut)} % |")
    return lines + [""]


def drift_table(arms: dict[str, list[dict] | dict], general: dict) -> list[str]:
    """Drift (KL, NLL) and leakage on held-out general queries, one row per arm."""
    runs = {a: r if isinstance(r, list) else [r] for a, r in arms.items()}
    if not any("drift" in r["metrics"] for rs in runs.values() for r in rs):
        return []
    lines = ["## What tuning costs on general queries", "",
             f"{general.get('rows', 'The')} general queries held out of the sample (no arm trained on them), "
             "answered greedily. Drift: mean KL(untouched || arm) per token on the untouched model's answers, "
             "teacher-forced, and the arm's NLL of the query set's reference answers (their first tokens, as many as an "
             "answer may have; nats per token; "
             "`delia.analysis.drift`). Leakage: answers that open the task's object (attempted) and that parse "
             "with its keys (strict); ideal 0.", "",
             "| Arm | KL from untouched | NLL of references | Leakage attempted | Leakage strict | Mean answer tokens "
             "(untouched) | Cut at the limit |", "|---|---|---|---|---|---|---|"]
    for arm, rs in runs.items():
        d = [r["metrics"]["drift"] for r in rs if "drift" in r["metrics"]]
        k = [r["metrics"]["leakage"] for r in rs if "leakage" in r["metrics"]]
        if not d:
            continue
        lines.append(f"| {label(arm)} | {mean_sd([x['kl'] for x in d], 1, 4)} | {mean_sd([x['nll'] for x in d], 1, 3)} | "
                     f"{mean_sd([x['attempted'] for x in k])} % | {mean_sd([x['strict'] for x in k])} % | "
                     f"{mean_sd([x['mean_tokens'] for x in k], 1)} ({mean_sd([x['untouched_mean_tokens'] for x in k], 1)}) | "
                     f"{mean_sd([x['cut'] for x in k])} % |")
    return lines + [""]


def _budget_rule(arm: str) -> str:
    a = ARMS.get(arm)
    if a is None or not a.trained:
        return "untrained"
    return "both" if len(a.comparisons) > 1 else "one epoch" if EPOCH in a.comparisons else "equal steps"


def tradeoff_points(runs: dict[str, list[dict]]) -> list[dict]:
    """Per arm with drift figures: held-out-wording format accuracy and KL, mean and sd over the runs."""
    points = []
    for arm, rs in runs.items():
        pairs = [(r["metrics"]["heldout"]["format_accuracy"], r["metrics"]["drift"]["kl"]) for r in rs
                 if "drift" in r["metrics"] and r["metrics"]["drift"]["kl"] is not None and "heldout" in r["metrics"]]
        if not pairs:
            continue
        acc, kl = [p[0] for p in pairs], [p[1] for p in pairs]
        switch = [r["metrics"]["switch"]["consistency"] for r in rs
                  if "drift" in r["metrics"] and (r["metrics"].get("switch") or {}).get("consistency") is not None]
        points.append({"arm": arm, "label": label(arm), "budget": _budget_rule(arm),
                       "accuracy": statistics.fmean(acc), "accuracy_sd": _sd(acc),
                       "kl": statistics.fmean(kl), "kl_sd": _sd(kl)}
                      | ({"switch": statistics.fmean(switch), "switch_sd": _sd(switch)} if switch else {}))
    return points


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def tradeoff_words(points: list[dict]) -> str:
    """Which arms are on the front: no other arm has at least their held-out format accuracy at no more
    drift, and one of the two strictly better."""
    front = [p for p in points if not any(q["accuracy"] >= p["accuracy"] and q["kl"] <= p["kl"]
                                          and (q["accuracy"] > p["accuracy"] or q["kl"] < p["kl"]) for q in points)]
    names = "; ".join(f"{p['label']} ({100 * p['accuracy']:.1f} % held-out format, KL {p['kl']:.4f})"
                      for p in sorted(front, key=lambda p: p["kl"]))
    return (f"On the front of held-out-wording format accuracy against drift (no other arm is as accurate "
            f"with less drift): {names}.")


def _distance_table(results: dict, cfg: dict) -> list[str]:
    from ..analysis.token_distance import first_middle_last

    token = cfg["task"]["new_tokens"][0]
    keywords = cfg["task"]["keywords"]
    head = " | ".join(f"\u201c{k}\u201d {b}" for k in keywords for b in ("first", "middle", "last"))
    lines = [f"## Distance of `{token}` to its meaning (hidden-state L2 by block; lower is closer)", "",
             f"| Model | {head} | input-embedding L2 ({', '.join(keywords)}) |",
             "|---|" + "---|" * (3 * len(keywords) + 1)]
    for name, res in results.items():
        cells = [f"{v:.1f}" for k in keywords for v in first_middle_last(res[k]["l2"])]
        emb = ", ".join(f"{res[k]['embedding_l2']:.2f}" for k in keywords)
        lines.append(f"| {label(name)} | {' | '.join(cells)} | {emb} |")
    lines += ["", "![token distance by block](analysis/token_distance.png)",
              "Definition: `delia.analysis.token_distance` (carrier sentences, slot states, averaged)."]
    return lines


def _translation_table(present: list[str], arms: dict) -> list[str]:
    """The paper's Table 3 shape: chrF++ and BLEU, and the change over the untouched model in percent."""
    base = arms.get("untouched", {}).get("metrics", {})
    lines = ["| Arm | chrF++ (seen) | chrF++ (held-out) | vs untouched (held-out) | BLEU (seen) | BLEU (held-out) | "
             "Optimizer steps |", "|---|---|---|---|---|---|---|"]
    for arm in present:
        m, t = arms[arm]["metrics"], arms[arm]["train"] or {}
        ref = base.get("heldout", {}).get("chrf++")
        held = m.get("heldout", {}).get("chrf++")
        change = f"{100 * (held - ref) / ref:+.1f} %" if ref and held is not None and arm != "untouched" else "-"
        cells = [label(arm), *(str(m.get(g, {}).get("chrf++", "-")) for g in ("seen", "heldout")), change,
                 *(str(m.get(g, {}).get("bleu", "-")) for g in ("seen", "heldout")), str(t.get("steps", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _divergent_table(results: dict) -> list[str]:
    lines = ["## The divergent token (the `{` that opens the object)", "",
             "| Model | Wordings | Rows | P(right token) | Median rank | Entropy (nats) | P(any `{` token) |",
             "|---|---|---|---|---|---|---|"]
    for name, groups in results.items():
        for group, g in groups.items():
            lines.append(f"| {label(name)} | {group} | {g['n']} | {g['p_right']:.3f} | "
                         f"{g['rank_median']:g} | {g['entropy']:.2f} | {g['p_brace']:.3f} |")
    lines += ["", "![divergent token](analysis/divergent.png)",
              "Definition: `delia.analysis.divergent` (next-token distribution where the answer opens its object)."]
    return lines


def write_report(cfg: RunConfig) -> Path:
    from ..analysis.drift import plot_tradeoff

    data = collect(cfg)
    run = RunFolder(cfg.run_dir)
    if not data["arms"] and not data["stages"]:
        raise DeliaError(f"{cfg.run_dir}: nothing to report: no stage has finished in this run folder "
                         "(run `delia run CONFIG` first)")
    if points := tradeoff_points({a: [r] for a, r in data["arms"].items()}):
        with atomic_path(run.root / "tradeoff.png") as tmp:
            plot_tradeoff(points, tmp, f"{cfg.run_dir}: one seed")
    write_json(run.report_json, data)
    write_text(run.report_md, render(data))
    return run.report_md
