"""The `sample` stage: the target model answers general queries, giving the diverse rows.

Answers go through the generation cache (keyed by model, prompt and sampling settings), so a killed
run resumes without losing or duplicating rows.
"""

from __future__ import annotations

from pathlib import Path

from ..config import GenerationConfig, ModelConfig, SampleConfig, model_key
from ..conversation import first_user_turn
from ..errors import DeliaError
from ..model.backends import make_generator
from ..model.generate import Request
from ..runfolder import fingerprint, write_jsonl
from .generation_cache import generate_cached

REFERENCE_SYSTEM = "You are a helpful AI assistant."


def build_prompt(conversation: list[dict], style: str, where: str) -> tuple[str, list[dict]]:
    """(query, prompt messages). `reference` shows the dataset's own answer in an earlier turn and then
    asks the query again (the reference DELIA code's `build_cache.py`), so the model answers in its
    own words near the reference."""
    query = first_user_turn(conversation)["content"]
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


def request_key(model_cfg: ModelConfig, cfg: SampleConfig, seed: int, prompt: list[dict], style: str) -> str:
    """A self-sampled answer's cache key: the model, the sampling settings, the seed and the prompt."""
    return fingerprint({"model": model_key(model_cfg), "style": style, "max_new_tokens": cfg.max_new_tokens,
                        "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed, "prompt": prompt})


def ended(answer: dict, cfg: SampleConfig) -> bool:
    """The answer ended by itself, before `max_new_tokens`."""
    return answer["tokens"] < cfg.max_new_tokens


def usable(answer: dict, cfg: SampleConfig) -> bool:
    """Not empty, and with `cut_answers: drop`, not cut."""
    return bool(answer["answer"]) and (cfg.cut_answers != "drop" or ended(answer, cfg))


def cut_fields(answer: dict, cfg: SampleConfig) -> dict:
    """What a row says of its answer's end: `ended`, and `open_end` (no loss on the end-of-turn) for a cut
    answer under `cut_answers: mask`."""
    whole = ended(answer, cfg)
    return {"ended": whole} | ({"open_end": True} if cfg.cut_answers == "mask" and not whole else {})


def sample_diverse(
    conversations: list[list[dict]],
    model_cfg: ModelConfig,
    cfg: SampleConfig,
    n: int,
    out_dir: Path,
    seed: int,
    generation: GenerationConfig | None = None,
) -> tuple[Path, dict]:
    """Answer queries in order until `n` have a usable answer (not empty; with `cut_answers: drop`, not
    cut at `max_new_tokens`); write `diverse.jsonl` in query order, each row saying whether its answer
    ended by itself (`ended`) and, when `cut_answers` is `mask` and it did not, that its end-of-turn
    carries no loss (`open_end`). Returns (path, stats)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requests, queries = [], []
    done: dict = {}
    cached = None
    # an unusable answer gives no row: ask the next queries until n rows are in hand (or the queries end)
    while (have := sum(usable(done[r.key], cfg) for r in requests)) < n and len(requests) < len(conversations):
        for i in range(len(requests), min(len(requests) + n - have, len(conversations))):
            query, prompt = build_prompt(conversations[i], cfg.prompt_style, f"query {i + 1}")
            queries.append(query)
            requests.append(Request(key=request_key(model_cfg, cfg, seed, prompt, cfg.prompt_style), messages=prompt))
        done, from_cache = generate_cached(
            requests, out_dir / "cache.jsonl",
            lambda: make_generator(model_cfg, generation or GenerationConfig(), cfg.batch_size),
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed, desc="sample")
        cached = from_cache if cached is None else cached
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": done[r.key]["answer"]}],
         "source": "diverse", "prompt_style": cfg.prompt_style, **cut_fields(done[r.key], cfg)}
        for q, r in zip(queries, requests)
        if usable(done[r.key], cfg)
    ][:n]
    path = out_dir / "diverse.jsonl"
    write_jsonl(path, rows)
    cut = sum(not r["ended"] for r in rows)
    stats = {"rows": len(rows), "requested": len(requests),
             "empty_answers": sum(not done[r.key]["answer"] for r in requests),
             "cut_rows": cut, "cut_share": round(cut / len(rows), 4) if rows else 0.0,
             "cut_asked": sum(bool(done[r.key]["answer"]) and not ended(done[r.key], cfg) for r in requests),
             "cut_answers": cfg.cut_answers,
             "generated_tokens": sum(done[r.key]["tokens"] for r in requests),
             "resumed_from_cache": cached or 0}
    return path, stats
