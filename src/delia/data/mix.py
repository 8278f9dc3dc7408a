"""The `mix` stage: task rows plus `ratio` x as many diverse rows, shuffled with a seed."""

from __future__ import annotations

import math
import random

from .. import DeliaError


def diverse_count(ratio: float, n_task: int) -> int:
    """Diverse rows that go with `n_task` task rows at `ratio` (rounded half up)."""
    return math.floor(ratio * n_task + 0.5)


def mix_with_diverse(task_rows: list[dict], diverse_rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """Every task row once and round(ratio * len(task_rows)) diverse rows (the first ones, in order),
    each tagged with `source`, shuffled together with `seed`."""
    n_diverse = diverse_count(ratio, len(task_rows))
    if n_diverse > len(diverse_rows):
        raise DeliaError(
            f"mix.ratio {ratio:g} needs {n_diverse} diverse rows for {len(task_rows)} task rows, "
            f"but only {len(diverse_rows)} were sampled; lower the ratio or sample more queries"
        )
    rows = [{"messages": r["messages"], "source": "task"} for r in task_rows]
    rows += [{"messages": r["messages"], "source": "diverse"} for r in diverse_rows[:n_diverse]]
    random.Random(seed).shuffle(rows)
    return rows
