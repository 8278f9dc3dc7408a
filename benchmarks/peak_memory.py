"""Peak memory (RSS) of delia's `train` on one model with the demo's batch settings (4 rows a step), for
the plain cross-entropy arms and for the KL anchor (the untouched model's logits beside the arm's): on the
demo's own rows, and on rows as long as `train.max_length` (the worst case a run's rows reach). A 262k-token
vocabulary (Gemma 3) makes one 512-token row's logits about 0.5 GB in fp32; this says whether that fits.
Each case runs in its own process, two optimizer steps.

    .venv/bin/python benchmarks/peak_memory.py [--model gemma3-270m] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def case(model: str, long_rows: bool, distill: str, max_length: int) -> dict:
    from delia.config import TaskConfig, TrainConfig
    from delia.data.task import build_task
    from delia.model.loading import load_model
    from delia.train.sft import train_lora

    task = TaskConfig(train_rows=8, eval_rows=1)
    rows, _ = build_task(task, 0)
    if long_rows:  # answers long enough that every row is cut at max_length
        rows = [{"messages": [r["messages"][0], {"role": "assistant", "content": "word " * (2 * max_length)}]} for r in rows]
    rows = [{**r, "source": "diverse" if i % 2 else "task"} for i, r in enumerate(rows)]
    cfg = TrainConfig(batch_size=4, micro_batch_size=4, learning_rate=1e-3, max_length=max_length, save_steps=0)
    m, tok = load_model(model)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train_lora(m, tok, rows, cfg, task, Path(out), 0, max_steps=2, distill=distill, beta=1.0 if distill else 0.0)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        long_rows, distill = json.loads(args.one)
        print(json.dumps(case(args.model, long_rows, distill, args.max_length)))
        return
    for long_rows in (False, True):
        for distill in ("", "anchor"):
            done = subprocess.run([sys.executable, __file__, "--model", args.model, "--max-length", str(args.max_length),
                                   "--one", json.dumps([long_rows, distill])], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(done.returncode)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows = f"rows cut at {args.max_length} tokens" if long_rows else "the demo's rows"
            arm = "KL anchor" if distill else "cross-entropy"
            print(f"{args.model}, {arm}, {rows}, 4 rows a step: peak RSS {figures['peak_rss_mib']:,} MiB, "
                  f"2 steps in {figures['seconds']} s")
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"command: python benchmarks/peak_memory.py --model {args.model} --max-length {args.max_length}")


if __name__ == "__main__":
    main()
