"""An offline English-Icelandic corpus from Debian packages (`delia data en-is`).

Pairs: the msgid -> msgstr entries of the Icelandic gettext catalogs (`usr/share/locale/is/LC_MESSAGES/
*.mo`) of Debian packages, human translations of user-interface text. Kept: sentence-like entries
(at least `min_words` English words, letters first, no newline); dropped: format strings (`%s`, `{0}`,
`$VAR`), markup (`<b>`), untranslated entries and duplicates of an English source already kept;
keyboard accelerators (`_File`, `&Open`) and message contexts are removed. Each pair records its
package, version and catalog. The split into train / dev / test is a seeded shuffle.

Dictionary: the FreeDict Icelandic-English dictionary (`dict-freedict-isl-eng`, dictd format), read
into {Icelandic headword: [English senses]}; DiPMT uses it in both directions.
"""

from __future__ import annotations

import gettext
import gzip
import io
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from ..errors import DeliaError

PACKAGES = [
    "gimp-data", "inkscape", "evolution-common", "gedit-common", "nautilus-data", "gnome-control-center-data",
    "thunar-data", "mousepad", "ristretto", "xfce4-panel", "xfce4-session", "xfce4-settings", "libxfce4ui-common",
]
DICTIONARY_PACKAGE = "dict-freedict-isl-eng"
_FORMAT = re.compile(r"%[-+ #0-9.*]*[a-zA-Z]|%\(\w+\)[a-z]|\{\w*\}|\$\{?\w+|\\[nt]|<[^>]+>|&\w+;")
_ACCEL = re.compile(r"(?<!\w)[_&](?=\w)|(?<=\w)[_&](?=\w)")


def download(packages: list[str], folder: Path) -> list[Path]:
    """The .deb of each package, fetched with `apt-get download` into `folder` (kept for reuse)."""
    if not shutil.which("apt-get"):
        raise DeliaError("delia data en-is: apt-get not found; it reads Debian packages (on another system, "
                         "pass --deb-dir with .deb files you downloaded)")
    folder.mkdir(parents=True, exist_ok=True)
    debs = []
    for name in packages:
        found = sorted(folder.glob(f"{name}_*.deb"))
        if not found:
            proc = subprocess.run(["apt-get", "download", "-qq", name], cwd=folder, capture_output=True, text=True)
            found = sorted(folder.glob(f"{name}_*.deb"))
            if proc.returncode or not found:
                last = (proc.stderr.strip().splitlines() or ["no .deb written"])[-1]
                raise DeliaError(f"apt-get download {name}: {last} (run `apt-get update` first?)")
        debs.append(found[-1])
    return debs


def deb_members(deb: Path, pattern: str) -> dict[str, bytes]:
    """{path: bytes} of the files in a .deb whose path matches `pattern` (a regex)."""
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if proc.returncode:
        raise DeliaError(f"{deb}: dpkg-deb cannot read it: {proc.stderr.decode(errors='replace').strip()[:200]}")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for member in tar:
            if member.isfile() and re.search(pattern, member.name):
                out[member.name] = tar.extractfile(member).read()
    return out


def mo_pairs(data: bytes) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a compiled catalog: no header, no plural forms, contexts removed."""
    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog
    pairs = []
    for key, value in catalog.items():
        if not isinstance(key, str) or not key:
            continue
        pairs.append((key.split("\x04", 1)[-1], value))
    return pairs


def clean_pair(source: str, target: str, min_words: int = 3, max_chars: int = 300) -> tuple[str, str] | None:
    """The pair without accelerators if it is a sentence-like human translation, else None."""
    if "\n" in source or "\n" in target or _FORMAT.search(source) or _FORMAT.search(target):
        return None
    source, target = _ACCEL.sub("", source).strip(), _ACCEL.sub("", target).strip()
    if not source[:1].isalpha() or not target[:1].isalpha() or source == target:
        return None
    if len(source.split()) < min_words or max(len(source), len(target)) > max_chars:
        return None
    return source, target


def corpus_pairs(debs: list[Path], min_words: int = 3) -> tuple[list[dict], dict]:
    """Cleaned, deduplicated pairs from the Icelandic catalogs of `debs`, and per-package counts."""
    rows, seen, counts = [], set(), {}
    for deb in debs:
        package, version = deb.name.split("_")[:2]
        kept = total = 0
        for path, data in sorted(deb_members(deb, r"/locale/is/LC_MESSAGES/[^/]+\.mo$").items()):
            for source, target in mo_pairs(data):
                total += 1
                pair = clean_pair(source, target, min_words)
                key = pair and " ".join(pair[0].lower().split())
                if not pair or key in seen:
                    continue
                seen.add(key)
                kept += 1
                rows.append({"source": pair[0], "target": pair[1], "package": package, "version": version,
                             "catalog": Path(path).name})
        counts[package] = {"entries": total, "kept": kept}
    return rows, counts


def split(rows: list[dict], dev: int, test: int, seed: int) -> dict[str, list[dict]]:
    if dev + test >= len(rows):
        raise DeliaError(f"en-is: {len(rows)} pairs cannot give {dev} dev and {test} test pairs and a training set")
    order = list(rows)
    random.Random(seed).shuffle(order)
    return {"test": order[:test], "dev": order[test : test + dev], "train": order[test + dev :]}


def read_freedict(index: bytes, dictionary: bytes) -> dict[str, list[str]]:
    """{headword: [senses]} from a dictd index (word, base64 offset, base64 length) and its .dict.dz."""
    text = gzip.decompress(dictionary) if dictionary[:2] == b"\x1f\x8b" else dictionary
    entries: dict[str, list[str]] = {}
    for line in index.decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00database"):
            continue
        word, offset, length = parts[0], _b64(parts[1]), _b64(parts[2])
        body = text[offset : offset + length].decode("utf-8", errors="replace").splitlines()
        senses = [s.strip() for s in body[1:] if s.strip()]
        if senses:
            entries.setdefault(word, [])
            entries[word] += [s for s in senses if s not in entries[word]]
    return entries


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(text: str) -> int:
    """dictd's base64 number (most significant digit first, no padding)."""
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def dictionary_from_deb(deb: Path) -> dict[str, list[str]]:
    files = deb_members(deb, r"\.(index|dict\.dz)$")
    index = next((v for k, v in files.items() if k.endswith(".index")), None)
    data = next((v for k, v in files.items() if k.endswith(".dict.dz")), None)
    if index is None or data is None:
        raise DeliaError(f"{deb}: no dictd index and .dict.dz inside")
    return read_freedict(index, data)


def invert(dictionary: dict[str, list[str]]) -> dict[str, list[str]]:
    """English -> Icelandic from Icelandic -> English: a sense such as "to distort" is filed under its
    last word only when it is one or two words long (longer senses are explanations, not words)."""
    out: dict[str, list[str]] = {}
    for word, senses in dictionary.items():
        for sense in senses:
            words = sense.lower().split()
            if 1 <= len(words) <= 2 and words[-1].isalpha():
                out.setdefault(words[-1], [])
                if word not in out[words[-1]]:
                    out[words[-1]].append(word)
    return out


def build(out_dir: Path, packages: list[str] | None = None, deb_dir: Path | None = None, dev: int = 200,
          test: int = 500, seed: int = 0, min_words: int = 3) -> dict:
    """Write train/dev/test.jsonl (English `source`, Icelandic `target`, provenance) and dictionary.json
    (Icelandic -> English senses) in `out_dir`, with a manifest; returns the manifest's outputs.
    The .deb files are fetched into `deb_dir` (default OUT_DIR/debs) unless they are there already."""
    from ..runfolder import Stage, file_sha256, write_json, write_jsonl

    packages = packages or PACKAGES
    deb_dir = deb_dir or out_dir / "debs"
    debs = download(packages + [DICTIONARY_PACKAGE], deb_dir)
    stage = Stage(out_dir, "data:en-is", {"packages": packages, "dev": dev, "test": test, "seed": seed,
                                          "min_words": min_words}, {d.name: d for d in debs})
    if done := stage.done():
        print(f"delia: data en-is: up to date ({out_dir})")
        return done["outputs"]
    rows, counts = corpus_pairs(debs[:-1], min_words)
    parts = split(rows, dev, test, seed)
    for name, part in parts.items():
        write_jsonl(out_dir / f"{name}.jsonl", part)
    dictionary = dictionary_from_deb(debs[-1])
    write_json(out_dir / "dictionary.json", dictionary)
    return stage.finish(pairs=len(rows), sizes={k: len(v) for k, v in parts.items()}, packages=counts,
                        dictionary_headwords=len(dictionary),
                        debs={d.name: file_sha256(d) for d in debs})["outputs"]
