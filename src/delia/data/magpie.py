"""Diverse data without a query set: Magpie-style self-generated queries.

The chat model is given only its template's user prefix (everything up to where a user's text would
start), so it writes a user query itself; the queries are deduplicated (normalised text, then
sentence-embedding cosine above a threshold) and then answered like any query set.
"""

from __future__ import annotations

import itertools

from ..model.generate import Request
from ..runfolder import fingerprint
from .diversify import normalise

_SENTINEL = "\u2063DELIA_QUERY\u2063"


def user_prefix(tokenizer) -> str:
    """The chat template's text up to where the first user message's content starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    return text[: text.index(_SENTINEL)]


def query_requests(tokenizer, n: int, model_name: str, settings: dict) -> list[Request]:
    prefix = user_prefix(tokenizer)
    return [Request(key=fingerprint({"magpie": i, "model": model_name, "prefix": prefix, **settings}), messages=[],
                    text=prefix) for i in range(n)]


def deduplicate(queries: list[str], embed, threshold: float = 0.9) -> list[str]:
    """Drop empty queries, exact duplicates (normalised text) and near-duplicates (cosine >= threshold
    with an earlier kept query), keeping first occurrences in order."""
    seen, unique = set(), []
    for q in queries:
        q = q.strip()
        if len(q) >= 8 and normalise(q) not in seen:
            seen.add(normalise(q))
            unique.append(q)
    if not unique:
        return []
    vectors = embed(unique)
    kept_idx: list[int] = []
    for i in range(len(unique)):
        if not kept_idx or float((vectors[kept_idx] @ vectors[i]).max()) < threshold:
            kept_idx.append(i)
    return [unique[i] for i in kept_idx]


def diversity(queries: list[str], embed) -> dict:
    """Distinct n-gram ratios and embedding spread (mean pairwise cosine distance) of a query set."""
    words = [q.lower().split() for q in queries]
    out = {"n": len(queries)}
    for k in (1, 2):
        grams = [tuple(w[i : i + k]) for w in words for i in range(len(w) - k + 1)]
        out[f"distinct_{k}"] = round(len(set(grams)) / max(len(grams), 1), 4)
    if len(queries) > 1:
        v = embed(queries)
        sims = [float(v[i] @ v[j]) for i, j in itertools.combinations(range(len(queries)), 2)]
        out["embedding_spread"] = round(1 - sum(sims) / len(sims), 4)
    return out


def magpie_queries(cfg, n: int, folder) -> tuple[list[list[dict]], dict]:
    """n self-generated queries for a run (`sample.queries: magpie`): 1.5x as many are generated at
    temperature 1.0 into `folder/magpie_cache.jsonl`, then deduplicated; their diversity is measured
    beside the Alpaca demo queries'. Returns (conversations, provenance)."""
    from ..errors import DeliaError
    from ..model.backends import make_generator
    from ..model.loading import load_tokenizer, model_source
    from ..runfolder import write_jsonl
    from .diversify import SentenceEmbedder
    from .generation_cache import generate_cached
    from ..config import ALPACA_DEMO
    from .queries import load_queries

    if cfg.generation.backend == "openai":
        raise DeliaError("sample.queries 'magpie' needs the local or vllm backend (it prompts with the raw template prefix)")
    settings = {"temperature": 1.0, "top_p": 0.99, "max_new_tokens": 64, "seed": cfg.seed}
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model.trust_remote_code)
    requests = query_requests(tokenizer, -(-3 * n // 2), cfg.model.name, settings)
    folder.mkdir(parents=True, exist_ok=True)
    answers, _ = generate_cached(requests, folder / "magpie_cache.jsonl",
                                 lambda: make_generator(cfg.model, cfg.generation, cfg.sample.batch_size),
                                 settings["max_new_tokens"], settings["temperature"], settings["top_p"], cfg.seed,
                                 desc="magpie queries")
    embed = SentenceEmbedder()
    kept = deduplicate([answers[r.key]["answer"] for r in requests], embed)[:n]
    write_jsonl(folder / "magpie_queries.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in kept])
    stats = {"source": f"magpie: {len(requests)} self-generated queries, {len(kept)} kept after deduplication",
             "diversity": {"magpie": diversity(kept, embed)}}
    try:
        alpaca, _ = load_queries(ALPACA_DEMO)
        stats["diversity"]["alpaca_en_demo"] = diversity([c[0]["content"] for c in alpaca[: len(kept)]], embed)
    except DeliaError:
        pass  # no PyPI here: report the magpie figures alone
    return [[{"role": "user", "content": q}] for q in kept], stats
