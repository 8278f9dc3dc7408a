"""Generation with an append-only cache: one JSON line per answer, keyed by the request.

Answers are appended and synced after every batch, one write a batch, so a killed run resumes without
losing or duplicating rows and with the same batches; `sample` and `diversify` both generate through here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from .. import DeliaError
from ..model.generate import Request
from .formats import loads


def read_cache(path: Path) -> dict[str, dict]:
    """Answers already in the cache. A last line cut short by a crash is cut off, so the next
    append starts on a fresh line; its request is simply generated again."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            row = loads(line, f"{path}:{n}")
            if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("answer"), str)):
                raise DeliaError(f"{path}:{n}: not a cache record (key, answer); delete this line or the file to "
                                 "generate its answers again")
            done[row["key"]] = row
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
                rows = [{"key": request.key, "answer": text, "tokens": n_tokens} for request, text, n_tokens in batch]
                # one write a batch: a kill keeps the whole batch or none of it, so a resumed run batches
                # the remaining requests as the uninterrupted run did and samples the same answers
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
