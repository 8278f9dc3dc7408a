"""What to do with self-sampled answers cut at `sample.max_new_tokens`, measured on the demo: DELIA
trained with each `sample.cut_answers` (keep: trained as whole, the old behaviour; mask; drop) at the
demo's 128 tokens, and with mask at a longer budget (sample longer). For each: the share of cut rows,
DELIA's format accuracy (seen / held-out wordings), drift and leakage (the evaluate stage), and how the
tuned model ends its answers to general queries it never saw: greedy (CTranslate2 float32, which
decodes greedily as the local backend does), up to --budget tokens, the share
that ended by themselves and the share of those whose last character is not a sentence end (it
stopped mid-sentence). The untouched model is measured the same way.

    .venv/bin/python benchmarks/cut_answers.py [--dir runs/cut-answers] [--seed 0] [--longer 384] [--budget 192]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from delia.config import load_config
from delia.data.generation_cache import generate_cached
from delia.model.arm import arm_model
from delia.model.generate import Request
from delia.pipeline import stage_evaluate, stage_general, stage_mix, stage_sample, stage_task, stage_train
from delia.runfolder import RunFolder, read_jsonl, read_manifest

ENDS = tuple('.!?:;)]}"\'`*')


def endings(cfg, arm: str, budget: int) -> dict:
    """How the arm ends greedy answers to the run's held-out general queries (cached in the run folder)."""
    from delia.model.ct2 import CT2Generator

    general = read_jsonl(RunFolder(cfg.run_dir).general)
    requests = [Request(key=f"{arm}-{budget}-{i}", messages=g["messages"]) for i, g in enumerate(general)]

    def generator():
        model, tokenizer = arm_model(cfg, arm)
        if hasattr(model, "merge_and_unload"):  # a trained arm: its adapter merged
            model = model.merge_and_unload()
        return CT2Generator.from_model(model, tokenizer, batch_size=32, compute_type="float32", workers=1)

    answers, _ = generate_cached(requests, Path(cfg.run_dir) / f"endings-{arm}.jsonl", generator,
                                 budget, 0.0, 1.0, cfg.seed, desc=f"endings {arm}")
    rows = [answers[r.key] for r in requests]
    ended = [a for a in rows if a["tokens"] < budget]
    mid = [a for a in ended if not a["answer"].rstrip().endswith(ENDS)]
    return {"queries": len(rows), "ended": len(ended) / len(rows), "mid_sentence": len(mid) / max(1, len(ended)),
            "mean_tokens": sum(a["tokens"] for a in rows) / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="runs/cut-answers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--longer", type=int, default=384)
    ap.add_argument("--budget", type=int, default=192)
    args = ap.parse_args()
    variants = {"keep": ["sample.cut_answers=keep"], "mask": ["sample.cut_answers=mask"],
                "drop": ["sample.cut_answers=drop"],
                f"mask, {args.longer} tokens": ["sample.cut_answers=mask", f"sample.max_new_tokens={args.longer}"]}
    results = {}
    for name, sets in variants.items():
        folder = Path(args.dir) / name.replace(", ", "-").replace(" ", "")
        cfg = load_config("configs/demo.yaml", sets + [f"seed={args.seed}", "arms=[untouched, delia]"])
        cfg = dataclasses.replace(cfg, run_dir=str(folder))
        keep_cache = Path(args.dir) / "keep" / "sample" / "cache.jsonl"
        if name in ("mask", "drop") and keep_cache.exists() and not RunFolder(cfg.run_dir).sample_cache.exists():
            RunFolder(cfg.run_dir).sample_cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(keep_cache, RunFolder(cfg.run_dir).sample_cache)  # the same answers: asked once
        t = time.time()
        stage_task(cfg)
        stage_sample(cfg)
        stage_mix(cfg)
        stage_train(cfg, "delia")
        stage_general(cfg)
        stage_evaluate(cfg, "delia")
        sample = read_manifest(RunFolder(cfg.run_dir).stage("sample"))["outputs"]
        metrics = json.loads((RunFolder(cfg.run_dir).eval("delia") / "metrics.json").read_text())
        results[name] = {"cut_rows": sample["cut_rows"], "rows": sample["rows"], "asked": sample["requested"],
                         "seen": metrics["seen"]["format_accuracy"], "heldout": metrics["heldout"]["format_accuracy"],
                         "kl": metrics["drift"]["kl"], "nll": metrics["drift"]["nll"],
                         "leakage": metrics["leakage"]["attempted"], "endings": endings(cfg, "delia", args.budget),
                         "seconds": round(time.time() - t)}
        if name == "keep":
            results["untouched"] = {"endings": endings(cfg, "untouched", args.budget)}
        print(name, json.dumps(results[name]), flush=True)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    (Path(args.dir) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| sample.cut_answers | cut rows trained | format seen / held-out | KL | NLL refs | leakage | "
          f"ended by itself (<= {args.budget} tokens) | of those, mid-sentence | mean tokens |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        e = r["endings"]
        cells = ["-"] * 5 if name == "untouched" else [
            f"{r['cut_rows']} of {r['rows']}" + (f" ({r['asked']} asked)" if name == "drop" else ""),
            f"{100 * r['seen']:.1f} / {100 * r['heldout']:.1f} %", f"{r['kl']:.3f}", f"{r['nll']:.3f}", f"{100 * r['leakage']:.1f} %"]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * e['ended']:.1f} % | {100 * e['mid_sentence']:.1f} % | "
              f"{e['mean_tokens']:.0f} |")
    print(f"\ncommand: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")


if __name__ == "__main__":
    main()
