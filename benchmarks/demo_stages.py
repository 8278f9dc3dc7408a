"""Wall time of each stage of the main job (`delia run configs/demo.yaml`, the embedded model), from a
fresh run folder, read back from the stages' manifests.

    .venv/bin/python benchmarks/demo_stages.py [--config configs/demo.yaml] [--run-dir runs/bench-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--run-dir", default="runs/bench-demo")
    args = p.parse_args()
    run = Path(args.run_dir)
    shutil.rmtree(run, ignore_errors=True)  # fresh: every stage runs, no cache is reused
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "delia.cli", "run", args.config, "--set", f"run_dir={run}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"delia run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    stages = sorted((json.loads(m.read_text()) for m in run.rglob("manifest.json")), key=lambda m: m["started"])
    print("| stage | seconds |\n|---|---|")
    for m in stages:
        print(f"| {m['stage']} | {m['seconds']:.1f} |")
    print(f"| all stages | {sum(m['seconds'] for m in stages):.1f} |\n| wall, with start-up and the report | {wall:.1f} |")
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
