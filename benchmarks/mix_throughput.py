"""Rows per second and peak memory of delia's `mix` (streamed: byte offsets, lines copied) against the
way a Hugging Face user mixes (datasets: load both JSONL files, concatenate, shuffle with a seed,
write JSONL) and against the plain in-memory Python mix (json.loads every row, shuffle, json.dumps), on
the same synthetic diverse file. Each runs in its own process, so its peak RSS is its own.

    .venv/bin/python benchmarks/mix_throughput.py [--rows 1000000] [--task-rows 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model answers every query in its own words so that the diverse rows barely move it and "
         "buffer the gradients of the task rows while the new token learns its meaning").split()


def make_files(folder: Path, rows: int, task_rows: int) -> tuple[Path, Path]:
    """Alpaca-shaped rows: a query of ~12 words and an answer of ~90 (about 600 bytes a row)."""
    rng = random.Random(0)
    diverse, task = folder / "diverse.jsonl", folder / "task.jsonl"
    with open(diverse, "w") as f:
        for i in range(rows):
            q = " ".join(rng.choices(WORDS, k=12))
            a = " ".join(rng.choices(WORDS, k=90))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i} {q}"},
                                             {"role": "assistant", "content": a}],
                                "source": "diverse", "prompt_style": "plain"}) + "\n")
    with open(task, "w") as f:
        for i in range(task_rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"task {i} <sep>"},
                                             {"role": "assistant", "content": '{"thought": "t"}'}]}) + "\n")
    return diverse, task


def run_delia(diverse: Path, task: Path, ratio: float, out: Path) -> int:
    from delia.data.mix import mix_files
    from delia.runfolder import read_jsonl

    return mix_files(read_jsonl(task), diverse, ratio, 0, out)


def run_datasets(diverse: Path, task: Path, ratio: float, out: Path) -> int:
    from datasets import concatenate_datasets, disable_progress_bars, load_dataset

    disable_progress_bars()
    t = load_dataset("json", data_files=str(task), split="train", cache_dir=str(out.parent / "hf-cache"))
    n = round(ratio * len(t))
    d = load_dataset("json", data_files=str(diverse), split="train", cache_dir=str(out.parent / "hf-cache"))
    d = d.select(range(n)).select_columns(["messages"]).map(lambda r: {"source": "diverse"})
    t = t.map(lambda r: {"source": "task"})
    concatenate_datasets([t, d]).shuffle(seed=0).to_json(str(out), lines=True, force_ascii=False)
    return n


def run_python(diverse: Path, task: Path, ratio: float, out: Path) -> int:
    from delia.data.mix import mix_with_diverse
    from delia.runfolder import read_jsonl, write_jsonl

    task_rows = read_jsonl(task)
    rows = mix_with_diverse(task_rows, read_jsonl(diverse), ratio, 0)
    write_jsonl(out, rows)
    return len(rows) - len(task_rows)


def child(name: str, diverse: str, task: str, ratio: float, out: str) -> None:
    start = time.perf_counter()
    n = globals()[f"run_{name}"](Path(diverse), Path(task), ratio, Path(out))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    print(json.dumps({"name": name, "diverse_rows": n, "seconds": seconds, "peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="diverse rows in the file (all are mixed)")
    p.add_argument("--task-rows", type=int, default=100)
    p.add_argument("--skip", nargs="*", default=[], choices=["datasets", "python"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        diverse, task = make_files(folder, args.rows, args.task_rows)
        size = diverse.stat().st_size
        print(f"made {args.rows:,} diverse rows ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s", flush=True)
        ratio = args.rows / args.task_rows
        results = {}
        for name in ("delia", "datasets", "python"):
            if name in args.skip:
                continue
            out = folder / f"{name}.jsonl"
            proc = subprocess.run([sys.executable, __file__, "--child", name, str(diverse), str(task), str(ratio),
                                   str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows = r["diverse_rows"] + args.task_rows
            results[name] = r
            print(f"{name:9s} {rows:,} rows in {r['seconds']:.1f} s = {rows / r['seconds']:,.0f} rows/s, "
                  f"peak RSS {r['peak_mib']:,.0f} MiB", flush=True)
            with open(out, "rb") as f:
                written = sum(1 for _ in f)
            assert written == rows, f"{name} wrote {written} rows, {rows} expected"
            out.unlink()
        if "delia" in results:
            d = results["delia"]
            for name, r in results.items():
                if name != "delia":
                    print(f"delia / {name}: {r['seconds'] / d['seconds']:.1f}x the speed, "
                          f"{d['peak_mib'] / r['peak_mib']:.2f}x the peak memory")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6])
    else:
        main()
