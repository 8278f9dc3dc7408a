"""Run folders: atomic writes, JSONL files and the small manifest every stage leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DeliaError

MANIFEST = "manifest.json"
_VERSIONED = ("delia", "torch", "transformers", "peft", "datasets", "accelerate")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """A JSON Lines file of delia's own (a stage's output) as objects; a line that is not one is named."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise DeliaError(f"{path}:{n}: not a JSON line ({str(e).split(':')[0]}); the file was changed or "
                                     "cut after the stage wrote it: run the stage again (delete the file)") from None
                if not isinstance(row, dict):
                    raise DeliaError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    return rows


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) under `accelerate launch` / torchrun; (0, 1) alone.
    Only rank 0 writes a run folder's shared files."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def not_a_file(path: str | Path) -> str:
    """Why `path` is not a readable file, in words: a folder, a link that leads nowhere, or nothing."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    if path.is_symlink():
        return "is a symbolic link that leads nowhere (a loop, or its target is missing)"
    return "file not found"


def differences(old: Any, new: Any, name: str = "") -> list[str]:
    """The dotted names under which two JSON-like values differ (a key only one side has counts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) + [k for k in old if k not in new]
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{name}.{k}" if name else str(k))]
    return [] if old == new else [name]


WAIT = False
"""Set by `--wait`: a stage that another process is running is waited for instead of refused."""
_HELD: dict[Path, int] = {}
"""The stage locks this process holds: lock file -> its descriptor."""


def _lock_file(folder: Path) -> Path:
    """Where a stage folder's lock lives: outside the run folder (a refused or failed stage leaves nothing
    there), one file per folder, per user, on this machine."""
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"delia-locks-{getattr(os, 'getuid', lambda: 0)()}" / f"{digest}.lock"


def lock_stage(folder: Path, name: str) -> Path | None:
    """Hold the lock of a stage folder (`fcntl.flock`) so that no two processes work in it at once; the
    kernel releases it when the holder ends, killed or not. Another holder: one line naming it (status 2),
    or, with `WAIT`, wait for it. Returns the lock to release, or None when this process holds it already."""
    import fcntl

    path = _lock_file(folder)
    if path in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "?"
        if not WAIT:
            os.close(fd)
            raise DeliaError(f"{folder}: stage {name} is running in process {holder}; one process works in a stage "
                             "folder at a time (wait for it to end, or pass --wait)") from None
        print(f"delia: {name}: running in process {holder}; waiting for it", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = fd
    return path


def unlock_stage(lock: Path | None) -> None:
    fd = _HELD.pop(lock, None) if lock else None
    if fd is not None:
        os.close(fd)


class Stage:
    """Times one stage and writes its manifest (inputs with hashes, settings, versions, times).

    A stage whose manifest already holds the same key (settings + input hashes) is complete, so
    `delia run` skips it on a rerun; a changed input or setting makes it run again. From its start until it
    finishes (or the object goes), the stage holds its folder's lock (`lock_stage`; the main process only,
    under `accelerate launch`).
    """

    def __init__(self, folder: str | Path, name: str, settings: dict, inputs: dict[str, str | Path] | None = None):
        self.folder = Path(folder)
        self.name = name
        self._lock = lock_stage(self.folder, name) if world()[0] == 0 else None
        self.settings = settings
        for path in (inputs or {}).values():
            if not Path(path).is_file():
                raise DeliaError(f"{path}: {name}: input {not_a_file(path)}")
        self.inputs = {k: {"path": str(p), "sha256": file_sha256(p)} for k, p in (inputs or {}).items()}
        self.key = fingerprint({"settings": settings, "inputs": self.inputs})
        self.outputs: dict[str, Any] = {}
        self.started = time.time()

    def _finished_before(self) -> dict:
        """The manifest of the last time this stage finished here (any key), else {}."""
        path = self.folder / MANIFEST
        old = json.loads(path.read_text()) if path.exists() else {}
        return old if old.get("status") == "done" else {}

    def done(self) -> dict | None:
        """The earlier manifest if this exact stage already finished, else None."""
        old = self._finished_before()
        return old if old.get("key") == self.key else None

    def changed(self) -> list[str]:
        """What differs from the last time this stage finished here, as dotted names (`settings.task.metric`,
        `inputs.data`): why it runs again. Empty when it never finished or nothing differs."""
        if not (old := self._finished_before()):
            return []
        return differences({"settings": old.get("settings"), "inputs": old.get("inputs")},
                           {"settings": self.settings, "inputs": self.inputs})

    def finish(self, **outputs: Any) -> dict:
        self.outputs.update(outputs)
        finished = time.time()
        manifest = {
            "stage": self.name,
            "status": "done",
            "key": self.key,
            "inputs": self.inputs,
            "settings": self.settings,
            "outputs": self.outputs,
            "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
            "seconds": round(finished - self.started, 2),
        }
        write_json(self.folder / MANIFEST, manifest)
        self.release()
        return manifest

    def release(self) -> None:
        """Let another process work in this stage's folder."""
        unlock_stage(getattr(self, "_lock", None))  # also for a stage whose start was refused
        self._lock = None

    def __del__(self):
        self.release()


class RunFolder:
    """The layout of a run folder: every stage's files, named once.

        task/{train,eval}.jsonl, task.json       diversify/train.jsonl   sample/{cache,diverse}.jsonl
        general/queries.jsonl
        mix/DATA.jsonl                           train/ARM/adapter/      eval/ARM/{metrics.json,generations.jsonl}
        analysis/                                export/ARM/model/       report.{md,json}
        trials/, sweep/, tune/, diagnose/ARM/    (the studies beside the chain)
    """

    def __init__(self, root: str | Path):
        self.root = root = Path(root)
        self.task_train = root / "task" / "train.jsonl"
        self.task_eval = root / "task" / "eval.jsonl"
        self.task_meta = root / "task" / "task.json"
        self.diversified_train = root / "diversify" / "train.jsonl"
        self.sample_cache = root / "sample" / "cache.jsonl"
        self.diverse = root / "sample" / "diverse.jsonl"
        self.general = root / "general" / "queries.jsonl"
        """Held-out general queries and the untouched model's answers (drift and leakage)."""
        self.report_md = root / "report.md"
        self.report_json = root / "report.json"

    def stage(self, name: str) -> Path:
        """A stage's folder (task, diversify, sample, mix, general, sweep, tune, trials)."""
        return self.root / name

    def mix(self, data: str) -> Path:
        """The rows one kind of arm trains on (common, delia, facts, dmt, ...)."""
        return self.root / "mix" / f"{data}.jsonl"

    def train(self, arm: str) -> Path:
        return self.root / "train" / arm

    def adapter(self, arm: str) -> Path:
        return self.root / "train" / arm / "adapter"

    def eval(self, arm: str) -> Path:
        return self.root / "eval" / arm

    def export(self, arm: str) -> Path:
        return self.root / "export" / arm

    def diagnose(self, arm: str) -> Path:
        return self.root / "diagnose" / arm

    def analysis(self, name: str = "") -> Path:
        return self.root / "analysis" / name if name else self.root / "analysis"


def read_manifest(folder: Path) -> dict | None:
    """A stage folder's manifest, or None when the stage has not finished there."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
