"""The offline English-Icelandic corpus: gettext catalogs and a dictd dictionary inside .deb files
built here with dpkg-deb, read through the same code as Debian's packages."""

import gzip
import json
import shutil
import struct
import subprocess

import pytest

from delia import DeliaError
from delia.data import en_is


def write_mo(entries: dict[str, str]) -> bytes:
    """A compiled gettext catalog (GNU .mo, little-endian, no hash table)."""
    keys = sorted(entries)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(entries[k].encode() + b"\0" for k in keys)
    n = len(keys)
    start = 28 + 16 * n
    id_table, offset = [], start
    for k in keys:
        id_table += [len(k.encode()), offset]
        offset += len(k.encode()) + 1
    str_table = []
    for k in keys:
        str_table += [len(entries[k].encode()), offset]
        offset += len(entries[k].encode()) + 1
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    return header + struct.pack(f"<{2 * n}I", *id_table) + struct.pack(f"<{2 * n}I", *str_table) + ids + strs


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = alphabet[n % 64]
    while n >= 64:
        n //= 64
        out = alphabet[n % 64] + out
    return out


def dictd(entries: dict[str, list[str]]) -> tuple[bytes, bytes]:
    body, index = b"", []
    for word, senses in entries.items():
        text = (word + " /pron/\n" + "\n".join(senses) + "\n").encode()
        index.append(f"{word}\t{_b64(len(body))}\t{_b64(len(text))}")
        body += text
    return "\n".join(["00databaseutf8\tA\tB"] + index).encode() + b"\n", gzip.compress(body)


CATALOG = {
    "": "Content-Type: text/plain; charset=UTF-8\n",
    "Open the selected file": "Opna valda skrá",
    "_Save the image as a copy": "_Vista myndina sem afrit",
    "menu\x04Close all open windows": "Loka öllum opnum gluggum",
    "Could not open %s for reading": "Gat ekki opnað %s til lestrar",
    "<b>Bold</b> text in here": "<b>Feitletraður</b> texti hér",
    "Two\nlines of text here": "Tvær\nlínur af texta",
    "Quit": "Hætta",
    "Keep this English text": "Keep this English text",
    "open the selected   FILE": "Opna valda skrá aftur",
}


def _deb(folder, name, files: dict[str, bytes]):
    root = folder / f"{name}-root"
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\n"
                                              "Maintainer: t <t@example.org>\nDescription: test\n")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(folder / f"{name}_1.0-1_all.deb")],
                   check=True, capture_output=True)
    shutil.rmtree(root)


def test_catalog_pairs_and_cleaning():
    pairs = dict(en_is.mo_pairs(write_mo(CATALOG)))
    assert "" not in pairs and pairs["Close all open windows"] == "Loka öllum opnum gluggum"  # context removed
    kept = [p for p in (en_is.clean_pair(s, t) for s, t in pairs.items()) if p]
    assert sorted(kept) == sorted([
        ("Open the selected file", "Opna valda skrá"),
        ("Save the image as a copy", "Vista myndina sem afrit"),  # accelerators removed
        ("Close all open windows", "Loka öllum opnum gluggum"),
        ("open the selected   FILE", "Opna valda skrá aftur"),
    ])  # format strings, markup, two lines, one word and untranslated text dropped


def test_dictionary_round_trip_and_inversion():
    index, data = dictd({"hús": ["house", "building"], "vatn": ["water"], "afbaka": ["to distort"],
                         "þó": ["even though it is"]})
    d = en_is.read_freedict(index, data)
    assert d == {"hús": ["house", "building"], "vatn": ["water"], "afbaka": ["to distort"], "þó": ["even though it is"]}
    inv = en_is.invert(d)
    assert inv["house"] == ["hús"] and inv["distort"] == ["afbaka"] and "is" not in inv


def test_build_from_debs_with_provenance_and_a_seeded_split(tmp_path):
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is not installed")
    debs = tmp_path / "debs"
    debs.mkdir()
    catalog = {f"Open the selected file number {i} now": f"Opna völdu skrána númer {i} núna" for i in range(30)}
    _deb(debs, "app-one", {"usr/share/locale/is/LC_MESSAGES/app.mo": write_mo({**CATALOG, **catalog}),
                           "usr/share/locale/de/LC_MESSAGES/app.mo": write_mo({"Open it now please": "Öffne es"})})
    _deb(debs, "app-two", {"usr/share/locale/is/LC_MESSAGES/two.mo": write_mo(CATALOG)})  # duplicates of app-one
    index, data = dictd({"hús": ["house"]})
    _deb(debs, en_is.DICTIONARY_PACKAGE, {"usr/share/dictd/freedict-isl-eng.index": index,
                                          "usr/share/dictd/freedict-isl-eng.dict.dz": data})
    out = en_is.build(tmp_path / "out", ["app-one", "app-two"], debs, dev=4, test=6, seed=1)
    # "open the selected   FILE" repeats "Open the selected file" once normalised: dropped
    assert out["pairs"] == 33 and out["sizes"] == {"test": 6, "dev": 4, "train": 23}
    assert out["packages"]["app-two"]["kept"] == 0 and out["dictionary_headwords"] == 1
    rows = {part: [json.loads(line) for line in open(tmp_path / "out" / f"{part}.jsonl")] for part in out["sizes"]}
    sources = [r["source"] for part in rows.values() for r in part]
    assert len(sources) == len(set(sources)) == 33 and all(r["package"] == "app-one" for p in rows.values() for r in p)
    assert rows["test"][0]["catalog"] == "app.mo" and rows["test"][0]["version"] == "1.0-1"
    again = en_is.build(tmp_path / "other", ["app-one", "app-two"], debs, dev=4, test=6, seed=1)
    assert (tmp_path / "other" / "test.jsonl").read_text() == (tmp_path / "out" / "test.jsonl").read_text()
    assert again["pairs"] == 33
    with pytest.raises(DeliaError, match="cannot give 30 dev"):
        en_is.build(tmp_path / "small", ["app-one"], debs, dev=30, test=6)
