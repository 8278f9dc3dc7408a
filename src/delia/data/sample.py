"""The `sample` stage: the target model answers general queries, giving the diverse rows.

Rows are appended to a cache (one JSON line per answer, keyed by model, prompt and sampling settings)
after every batch; a killed run resumes from the cache without losing or duplicating rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from .. import DeliaError
from ..config import ModelConfig, SampleConfig
from ..model.generate import LocalGenerator, Request
from ..runfolder import fingerprint, write_jsonl

REFERENCE_SYSTEM = "You are a helpful AI assistant."


def build_prompt(conversation: list[dict], style: str, where: str) -> tuple[str, list[dict]]:
    """(query, prompt messages). `reference` shows the dataset's own answer in an earlier turn and then
    asks the query again (the reference DELIA code's `build_cache.py`), so the model answers in its
    own words near the reference."""
    query = next(m["content"] for m in conversation if m["role"] == "user")
    if style == "plain":
        return query, [{"role": "user", "content": query}]
    answer = next((m["content"] for m in conversation if m["role"] == "assistant"), None)
    if not answer:
        raise DeliaError(f"{where}: prompt_style 'reference' needs each query's reference answer")
    return query, [
        {"role": "system", "content": REFERENCE_SYSTEM},
        {"role": "user", "content": query},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": query},
    ]


def _read_cache(path: Path) -> dict[str, dict]:
    """Answers already in the cache. A last line cut short by a crash is cut off, so the next
    append starts on a fresh line; its request is simply generated again."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            done[row["key"]] = row
    return done


def sample_diverse(
    conversations: list[list[dict]],
    model_cfg: ModelConfig,
    cfg: SampleConfig,
    n: int,
    out_dir: Path,
    seed: int,
    load=None,
) -> tuple[Path, dict]:
    """Answer the first `n` queries; write `diverse.jsonl` in query order. Returns (path, stats)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_cfg.name, "style": cfg.prompt_style, "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed}
    requests, queries = [], []
    for i, conv in enumerate(conversations[:n]):
        query, prompt = build_prompt(conv, cfg.prompt_style, f"query {i + 1}")
        queries.append(query)
        requests.append(Request(key=fingerprint({**settings, "prompt": prompt}), messages=prompt))
    cache_path = out_dir / "cache.jsonl"
    done = _read_cache(cache_path)
    pending = [r for r in requests if r.key not in done]
    if pending:
        if load is None:
            from ..model.loading import load_model as load
        model, tokenizer = load(model_cfg.name, model_cfg.dtype, model_cfg.trust_remote_code)
        generator = LocalGenerator(model, tokenizer, cfg.batch_size)
        bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc="sample", unit="row")
        with open(cache_path, "a", encoding="utf-8") as cache:
            for batch in generator.batches(pending, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed):
                for request, text, n_tokens in batch:
                    row = {"key": request.key, "answer": text, "tokens": n_tokens}
                    cache.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[request.key] = row
                cache.flush()
                os.fsync(cache.fileno())
                bar.update(len(batch))
        bar.close()
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": done[r.key]["answer"]}],
         "source": "diverse", "prompt_style": cfg.prompt_style}
        for q, r in zip(queries, requests)
        if done[r.key]["answer"]
    ]
    path = out_dir / "diverse.jsonl"
    write_jsonl(path, rows)
    stats = {"rows": len(rows), "requested": len(requests), "empty_answers": len(requests) - len(rows),
             "generated_tokens": sum(done[r.key]["tokens"] for r in requests),
             "resumed_from_cache": len(requests) - len(pending)}
    return path, stats
