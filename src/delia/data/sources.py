"""Where rows come from: one reader for task rows and queries.

A source is
- a JSON or JSONL file (a JSON array, or one object a line);
- a `.parquet` or `.csv` file (read with `datasets`);
- a folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict: its `train` split);
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset through `datasets.load_dataset` (a Hub name, or a
  folder `load_dataset` reads); split `train` unless named.
Each record is yielded with where it came from (`file:line`, `file.csv:line`, `file.parquet row N`,
`hf:NAME@SPLIT row N`), so a bad row is named in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..config import source_name
from ..errors import DeliaError
from ..hub import offline_unless_reachable, unreachable

TABLE_SUFFIXES = (".parquet", ".csv")


def loads(text: str, where: str) -> object:
    """One JSON value, or one line naming `where` and what is wrong: invalid JSON, nesting too deep, a
    number too long to read, or text that is not Unicode (see `unicode_only`)."""
    try:
        return unicode_only(json.loads(text), where)
    except json.JSONDecodeError as e:
        raise DeliaError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DeliaError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise DeliaError(f"{where}: invalid JSON: {str(e).split(';')[0]}") from None


def unicode_only(value: object, where: str) -> object:
    """`value` if all its text can be written as UTF-8; JSON's escapes can smuggle in a lone surrogate
    (\\ud800) that fails only later, when a stage writes its output."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DeliaError(f"{where}: not Unicode text: an escaped lone surrogate ({e.object[e.start]!a})") from None
    return value


def read_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, decoded object): a JSON array file or one JSON value per line."""
    path = Path(path)
    if not path.is_file():
        from ..runfolder import not_a_file

        raise DeliaError(f"{path}: {not_a_file(path)}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DeliaError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DeliaError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x})") from None
    if not text.strip():
        raise DeliaError(f"{path}:1: the file is empty")
    if text.lstrip().startswith("["):  # a JSON array, unless it is JSON Lines whose first line is a list
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            try:
                json.loads(text.lstrip().splitlines()[0])
            except json.JSONDecodeError:
                raise DeliaError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            except (RecursionError, ValueError):
                pass  # read line by line below, which names the line and the fault
        except (RecursionError, ValueError):
            loads(text, f"{path}:1")  # raises, saying what is wrong
        else:
            for n, item in _array_items(text):
                yield n, unicode_only(item, f"{path}:{n}")
            return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, loads(line, f"{path}:{n}")


def _array_items(text: str) -> Iterator[tuple[int, object]]:
    """(line where the item starts, item) for each item of a JSON array already known to parse."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "]":
            return
        item, end = decoder.raw_decode(text, i)
        yield text.count("\n", 0, i) + 1, item
        i = end


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def hf_dataset(spec: str, default_split: str = "train", where: str = ""):
    """`NAME[:CONFIG][@SPLIT]` loaded with `datasets.load_dataset` (any failure: one line). Returns
    (dataset, split)."""
    from datasets import load_dataset

    where = where or f"hf:{spec}"
    name_config, _, split = spec.partition("@")
    name, _, config = name_config.partition(":")
    split = split or default_split
    offline = not Path(name).exists() and offline_unless_reachable()
    try:
        return load_dataset(name, config or None, split=split), split
    except Exception as e:  # noqa: BLE001 - the Hub, the network, a bad name or split: one line
        raise DeliaError(f"{where}: cannot load: {unreachable(name) if offline else why(e)}") from None


def _table(path: Path):
    from datasets import load_dataset

    kind = path.suffix[1:].lower()  # data.CSV is a CSV file, not a Hub dataset named "CSV"
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - a malformed file: one line
        raise DeliaError(f"{path}: cannot read as {kind}: {why(e)}") from None


def why(error: BaseException) -> str:
    """An error's first line, and the first line of what caused it when it only says that something failed
    (datasets' "An error occurred while generating the dataset")."""
    lines = []
    while error is not None and len(lines) < 3:
        text = str(error).strip()
        lines.append(text.splitlines()[0] if text else type(error).__name__)
        error = error.__cause__ or error.__context__
    return ": ".join(dict.fromkeys(lines))


def _saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DeliaError(f"{path}: cannot load the saved dataset: {str(e).splitlines()[0]}") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DeliaError(f"{path}: no '{split}' split (has {', '.join(data)})")
        data = data[split]
    return data


def read_source(spec: str) -> Iterator[tuple[str, object]]:
    """(where, record) for every row of a source (see the module's docstring)."""
    if spec.startswith("hf:"):
        data, split = hf_dataset(spec[3:])
        label = f"hf:{spec[3:].partition('@')[0]}@{split}"
        for i, row in enumerate(data):
            yield f"{label} row {i}", unicode_only(row, f"{label} row {i}")
        return
    path = Path(spec)
    if is_saved_dataset(path):
        for i, row in enumerate(_saved(path, "train")):
            yield f"{path} row {i}", row
    elif path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
        data = _table(path)
        csv = path.suffix.lower() == ".csv"
        for i, row in enumerate(data):  # a CSV's header is line 1
            yield (f"{path}:{i + 2}" if csv else f"{path} row {i}"), row
    else:
        for n, obj in read_records(path):
            yield f"{path}:{n}", obj


def source_files(spec: str) -> list[Path]:
    """The files a local source reads (what a stage's key hashes); none for a Hub dataset."""
    hub = spec.startswith("hf:")
    path = Path(source_name(spec))
    if hub and not path.exists():
        return []
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]
