"""The `mix` stage: task rows plus `ratio` x as many diverse rows, shuffled with a seed.

`mix_files` streams: the diverse file is indexed by byte offsets and its lines are copied into place,
so a million diverse rows mix in seconds within a few tens of MB (benchmarks/mix_throughput.py).
`mix_with_diverse` is the same mix over rows in memory: the same rows in the same order (the file
mix keeps any other keys the diverse rows carry).
"""

from __future__ import annotations

import json
import math
import os
import random
from array import array
from pathlib import Path

from .. import DeliaError
from ..runfolder import atomic_path


def diverse_count(ratio: float, n_task: int) -> int:
    """Diverse rows that go with `n_task` task rows at `ratio` (rounded half up)."""
    return math.floor(ratio * n_task + 0.5)


def _too_few(ratio: float, n_task: int, n_diverse: int, have: int) -> DeliaError:
    return DeliaError(f"mix.ratio {ratio:g} needs {n_diverse} diverse rows for {n_task} task rows, "
                      f"but only {have} were sampled; lower the ratio or sample more queries")


def mix_with_diverse(task_rows: list[dict], diverse_rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """Every task row once and round(ratio * len(task_rows)) diverse rows (the first ones, in order),
    each tagged with `source`, shuffled together with `seed`."""
    n_diverse = diverse_count(ratio, len(task_rows))
    if n_diverse > len(diverse_rows):
        raise _too_few(ratio, len(task_rows), n_diverse, len(diverse_rows))
    rows = [{"messages": r["messages"], "source": "task"} for r in task_rows]
    rows += [{"messages": r["messages"], "source": "diverse"} for r in diverse_rows[:n_diverse]]
    return [rows[i] for i in _order(len(rows), seed)]


def _order(n: int, seed: int) -> list[int]:
    """The shuffle of `n` rows: shuffling indices draws as shuffling the rows themselves."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _line_offsets(path: Path, limit: int, block: int = 1 << 24) -> tuple[array, array]:
    """Byte offsets (start, end without the line break) of the first `limit` non-blank lines of a file,
    found block by block with numpy: the file is never read whole."""
    import numpy as np

    starts, ends = array("q"), array("q")
    base, carry = 0, b""
    with open(path, "rb") as f:
        while len(starts) < limit:
            data = f.read(block)
            if not data and not carry:
                break
            buf = carry + data
            view = np.frombuffer(buf, dtype=np.uint8)
            cuts = np.flatnonzero(view == 10)
            if not data:  # the last line has no newline
                cuts = np.append(cuts, len(buf)).astype(np.int64)
            if not len(cuts):  # no line ends in this block yet
                carry = buf
                continue
            begin = np.concatenate(([0], cuts[:-1] + 1)).astype(np.int64)
            end = cuts - (view[np.maximum(cuts - 1, 0)] == 13) * (cuts > begin)  # CRLF: drop the CR
            short = np.flatnonzero(end - begin < 8)  # blank or whitespace-only lines are skipped
            blank = [i for i in short.tolist() if not buf[begin[i] : end[i]].strip()]
            keep = np.ones(len(begin), dtype=bool)
            keep[blank] = False
            take = min(limit - len(starts), int(keep.sum()))
            starts.frombytes((begin[keep][:take] + base).tobytes())
            ends.frombytes((end[keep][:take] + base).tobytes())
            tail = int(cuts[-1]) + 1
            base, carry = base + tail, buf[tail:]
            if not data:
                break
    return starts, ends


def mix_files(task_rows: list[dict], diverse_path: Path, ratio: float, seed: int, out: Path) -> int:
    """`mix_with_diverse` from a diverse JSONL file (rows tagged `"source": "diverse"`, as `sample` writes
    them) into `out`, streaming: the diverse rows are never all in memory. Returns the diverse rows used."""
    n_diverse = diverse_count(ratio, len(task_rows))
    starts, ends = _line_offsets(diverse_path, n_diverse)
    if len(starts) < n_diverse:
        raise _too_few(ratio, len(task_rows), n_diverse, len(starts))
    task_lines = [json.dumps({"messages": r["messages"], "source": "task"}, ensure_ascii=False).encode() + b"\n"
                  for r in task_rows]
    n_task = len(task_lines)
    fd = os.open(diverse_path, os.O_RDONLY)
    pread = os.pread
    try:
        with atomic_path(out) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
            write = f.write
            for i in _order(n_task + n_diverse, seed):
                if i < n_task:
                    write(task_lines[i])
                else:
                    i -= n_task
                    write(pread(fd, ends[i] - starts[i], starts[i]))
                    write(b"\n")
    finally:
        os.close(fd)
    return n_diverse
