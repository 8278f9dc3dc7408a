"""Generation with an append-only cache: one JSON line per answer, keyed by the request.

Answers are appended and synced after every batch, one write a batch, and every line names its batch
and the batch's size; a batch whose lines are not all there (a write torn by a kill or a power loss) is
cut off whole when the cache is read, so a resumed run asks for the same batches as an uninterrupted one
and gets the same answers. `sample` and `diversify` both generate through here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from ..errors import DeliaError
from ..model.generate import Request, batch_seed
from .sources import loads


def read_cache(path: Path) -> dict[str, dict]:
    """Answers already in the cache. The lines after the last whole batch (a line cut short, or a batch
    with lines missing) are cut off the file, so the next append starts where a whole batch ended."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    good = 0  # bytes up to the end of the last whole batch
    start, batch, rows = 0, None, []
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break  # cut short by a crash: generated again
        row = loads(line.decode("utf-8", errors="replace"), f"{path}:{n}")
        if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("answer"), str)):
            raise DeliaError(f"{path}:{n}: not a cache record (key, answer); delete this line or the file to "
                             "generate its answers again")
        size = row.get("size", 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DeliaError(f"{path}:{n}: 'size' must be a positive integer (the lines of its batch), got {size!r}; "
                             "delete this line or the file to generate its answers again")
        if row.get("batch") != batch or not rows:
            batch, rows = row.get("batch"), []
        rows.append(row)
        start += len(line)
        if len(rows) >= row.get("size", 1):  # a whole batch (a line without a batch stands alone)
            done.update((r["key"], r) for r in rows)
            good, rows = start, []
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def seed_cache(cache: Path, sources: list[Path]) -> None:
    """Start an absent cache from the largest existing one of `sources` (same keys, same answers), so a
    run that shares requests with another answers none of them twice."""
    from ..runfolder import atomic_path

    found = [p for p in sources if p.exists() and p != cache]
    if cache.exists() or not found:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        shutil.copyfile(max(found, key=lambda p: p.stat().st_size), tmp)


def generate_cached(
    requests: Sequence[Request],
    cache_path: Path,
    make_generator: Callable[[], object],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    desc: str,
) -> tuple[dict[str, dict], int]:
    """({key: {"key", "answer", "tokens"}} for every request, how many came from the cache).
    The generator is only made (the model only loaded) when something is left to generate."""
    done = read_cache(cache_path)
    pending = [r for r in requests if r.key not in done]
    if pending:
        generator = make_generator()
        bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc=desc, unit="row")
        fd = os.open(cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for batch in generator.batches(pending, max_new_tokens, temperature, top_p, seed):
                tag = batch_seed(seed, [request.key for request, _, _ in batch])
                rows = [{"key": request.key, "answer": text, "tokens": n_tokens, "batch": tag, "size": len(batch)}
                        for request, text, n_tokens in batch]
                # one write a batch, each line naming it: a kill or a torn write keeps the whole batch or,
                # once read back, none of it, so a resumed run batches the rest as the uninterrupted run did
                data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
                done.update((row["key"], row) for row in rows)
                bar.update(len(batch))
        finally:
            os.close(fd)
        bar.close()
    return done, len(requests) - len(pending)
