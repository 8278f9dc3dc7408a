"""Wall time of the evaluate stage of some arms of a finished run, alone: the run's folder is copied without
its evaluations and `stage_evaluate` runs on the copy for each arm, in one process (the first arm also pays
the untouched model's half of the drift); then each arm's answers and figures are compared with the run's.

    .venv/bin/python benchmarks/eval_stage.py RUN_DIR CONFIG --set KEY=VALUE ... --arms delia gist
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], help="the run's own overrides (seed, ratio, ...)")
    p.add_argument("--arms", nargs="+", required=True)
    p.add_argument("--copy", type=Path, default=Path("runs/bench-eval"))
    args = p.parse_args()
    from delia.config import load_config
    from delia.pipeline import stage_evaluate
    from delia.runfolder import read_jsonl

    shutil.rmtree(args.copy, ignore_errors=True)
    shutil.copytree(args.run_dir, args.copy, ignore=lambda d, names: ["eval"] if Path(d) == args.run_dir else [])
    arms = "[" + ", ".join(args.arms) + "]"
    cfg = load_config(args.config, [*args.set, f"run_dir={args.copy}", f"arms={arms}"])
    print("| arm | the run's evaluation (s) | now (s) | answers identical | metrics identical |\n|---|---|---|---|---|")
    for arm in args.arms:
        start = time.perf_counter()
        stage_evaluate(cfg, arm)
        now = time.perf_counter() - start
        old, new = args.run_dir / "eval" / arm, args.copy / "eval" / arm
        same = total = 0
        for f in ("generations.jsonl", "controls.jsonl", "general.jsonl"):
            if (old / f).exists():
                pairs = list(zip(read_jsonl(old / f), read_jsonl(new / f), strict=True))
                total += len(pairs)
                same += sum(a.get("answer") == b.get("answer") and a.get("tokens") == b.get("tokens") for a, b in pairs)
        before = json.loads((old / "manifest.json").read_text())["seconds"]
        metrics = json.loads((old / "metrics.json").read_text()) == json.loads((new / "metrics.json").read_text())
        print(f"| {arm} | {before:.1f} | {now:.1f} | {same}/{total} | {'yes' if metrics else 'no'} |", flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
