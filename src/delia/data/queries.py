"""Query sets for self-sampling: a user file, the English demo sets shipped in the LLaMA-Factory sdist, or
several of these joined with commas (as LLaMA-Factory's `dataset: a,b`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from ..config import ALPACA_DEMO, BUILT_IN, query_parts
from ..conversation import first_user_turn
from ..errors import DeliaError
from ..model.loading import cache_dir
from ..runfolder import file_sha256, write_json
from .formats import load_conversations, to_messages

LLAMAFACTORY_SDIST = "llamafactory==0.9.5"


def _first_turns(rows: list[dict], where: str = "rows") -> list[dict]:
    """DPO / KTO rows as one-turn chats: the first user turn and, where the data marks one as good, its
    answer (the next assistant turn, or a one-turn DPO row's chosen reply; none for a KTO row labelled
    bad). A query seen before is skipped."""
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        turns = to_messages(row, f"{where}: row {n}", need_answer=False)
        user = first_user_turn(turns)
        query = user["content"].strip()
        if query in seen:
            continue
        seen.add(query)
        i = turns.index(user)
        answer = turns[i + 1]["content"] if i + 1 < len(turns) else row.get("chosen", {}).get("value")
        if row.get("label") is False:
            answer = None
        out.append({"messages": [{"role": "user", "content": query}]
                    + ([{"role": "assistant", "content": answer}] if answer else [])})
    return out


def fetch_llamafactory(name: str) -> tuple[Path, dict]:
    """Download the LLaMA-Factory sdist from PyPI (as a user would with pip) and extract its
    `data/<name>.json` into the cache (the DPO and KTO sets as first turns, `_first_turns`).
    Returns (path, provenance)."""
    folder = cache_dir() / "data"
    member_name = f"data/{name}.json"
    path = folder / (f"{name}.json" if name == ALPACA_DEMO else f"{name}.queries.jsonl")
    meta_path = folder / f"{name}.provenance.json"
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdists = sorted(downloads.glob("llamafactory-*.tar.gz"))
    if not sdists:
        print(f"delia: fetching {member_name} from the {LLAMAFACTORY_SDIST} sdist on PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        LLAMAFACTORY_SDIST, "-d", str(downloads)], capture_output=True, text=True)
        sdists = sorted(downloads.glob("llamafactory-*.tar.gz"))
    if not sdists:
        raise DeliaError(f"cannot download the {LLAMAFACTORY_SDIST} sdist with pip (no PyPI access?); "
                         f"pass your own query file as sample.queries instead")
    sdist = sdists[-1]
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + member_name)), None)
        if member is None:
            raise DeliaError(f"{sdist}: holds no {member_name}")
        data = tar.extractfile(member).read()
    if name != ALPACA_DEMO:
        data = "".join(json.dumps(r) + "\n" for r in _first_turns(json.loads(data), member.name)).encode()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    meta = {"source": f"PyPI sdist {sdist.name} ({LLAMAFACTORY_SDIST}), member {member.name}",
            "sdist_sha256": file_sha256(sdist), "sha256": file_sha256(path)}
    write_json(meta_path, meta)
    return path, meta


def load_queries(source: str) -> tuple[list[list[dict]], dict]:
    """(conversations, provenance). Each conversation holds a user query and, if the data has one,
    the dataset's reference answer. Several sources joined with commas are read in order, and a query
    already read from an earlier one is skipped."""
    parts = query_parts(source)
    if len(parts) > 1:
        conversations, metas, seen, repeats = [], [], set(), 0
        for part in parts:
            convs, meta = _load_one(part)
            metas.append(meta)
            queries = [first_user_turn(c)["content"].strip() for c in convs]
            repeats += sum(q in seen for q in queries)
            conversations += [c for c, q in zip(convs, queries) if q not in seen]
            seen.update(queries)
        return conversations, {"source": source, "parts": metas, "skipped_repeats": repeats}
    return _load_one(source)


def _load_one(source: str) -> tuple[list[list[dict]], dict]:
    if source in BUILT_IN:
        path, meta = fetch_llamafactory(source)
    else:
        from .sources import source_files

        path, meta = source, {"source": str(source), "sha256": None}
        files = source_files(source)
        if files and not all(p.exists() for p in files):
            raise DeliaError(f"{source}: query file not found")
        if files:
            meta["sha256"] = file_sha256(files[0]) if len(files) == 1 else {str(p): file_sha256(p) for p in files}
    conversations = load_conversations(path, need_answer=False)
    return conversations, meta


def held_out_queries(conversations: list[list[dict]], used: set[str], n: int) -> list[tuple[str, str | None]]:
    """Up to `n` (query, reference answer or None) from the end of `conversations`, in their order: none
    whose query text is in `used`, none twice. What drift and leakage are measured on, so no arm trained
    on them."""
    picked, seen = [], set()
    for conv in reversed(conversations):
        if len(picked) == n:
            break
        query = first_user_turn(conv)["content"].strip()
        if query not in used and query not in seen:
            seen.add(query)
            picked.append((query, next((m["content"] for m in conv if m["role"] == "assistant"), None)))
    picked.reverse()
    return picked
