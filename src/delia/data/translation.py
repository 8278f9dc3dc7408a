"""Translation as a task: parallel pairs turned into chat rows with an instruction wording.

A row's user turn is the source sentence, a blank line, then the instruction (its *wording*, as in
every delia task); the assistant turn is the reference translation. Training rows use the training
wordings; evaluation rows come with training wordings (`seen`) and with held-out wordings. Pairs are
read from a folder written by `delia data en-is` (train.jsonl for training, test.jsonl for evaluation)
or from JSONL files with `source` and `target`, or TSV files (source TAB target).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import DeliaError

LANGUAGES = {"en": "English", "is": "Icelandic"}
TRAIN_WORDINGS = [
    "Translate the {src} text above into {tgt}.",
    "Give the {tgt} translation of this {src} sentence.",
    "Render the text above in {tgt}.",
    "What is this in {tgt}? Answer with the translation only.",
    "Translate from {src} to {tgt}.",
    "Please write the sentence above in {tgt}.",
    "{src} to {tgt}: translate the text above.",
    "Provide a faithful {tgt} version of the {src} text.",
]
HELDOUT_WORDINGS = [
    "Could you put the preceding {src} line into {tgt} for me?",
    "I need the text above in {tgt}, please translate it.",
    "Convert this passage from {src} into natural {tgt}.",
]


def read_pairs(path: Path) -> list[dict]:
    """[{"source", "target"}] from a JSONL or TSV file; bad lines are errors naming file and line."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DeliaError(f"{path}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".tsv":
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                raise DeliaError(f"{path}:{n}: expected source<TAB>target")
            pairs.append({"source": parts[0].strip(), "target": parts[1].strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DeliaError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        for key in ("source", "target"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                raise DeliaError(f"{path}:{n}: '{key}': expected a non-empty string")
        pairs.append({"source": row["source"], "target": row["target"]})
    if not pairs:
        raise DeliaError(f"{path}: no pairs")
    return pairs


def _pairs(source: str, part: str) -> list[dict]:
    path = Path(source)
    if path.is_dir():
        path = path / f"{part}.jsonl"
    if not path.exists():
        raise DeliaError(f"{path}: not found (build it with `delia data en-is`)")
    return read_pairs(path)


def oriented(pairs: list[dict], direction: str) -> list[dict]:
    """Pairs stored English -> Icelandic, swapped for is-en."""
    return pairs if direction.startswith("en") else [{"source": p["target"], "target": p["source"]} for p in pairs]


def make_row(pair: dict, wording: str, direction: str) -> dict:
    src, tgt = (LANGUAGES[x] for x in direction.split("-"))
    text = wording.format(src=src, tgt=tgt)
    return {"messages": [{"role": "user", "content": f"{pair['source']}\n\n{text}"},
                         {"role": "assistant", "content": pair["target"]}], "wording": text}


def build_translation_task(source: str, direction: str, train_rows: int, eval_rows: int, seed: int):
    """(train rows, seen-wording eval rows, held-out-wording eval rows)."""
    if direction not in ("en-is", "is-en"):
        raise DeliaError(f"task.direction: expected en-is or is-en, got {direction!r}")
    rng = random.Random(seed)
    train_pairs = oriented(_pairs(source, "train"), direction)
    test_pairs = oriented(_pairs(source, "test"), direction)
    rng.shuffle(train_pairs)
    if len(test_pairs) < 2 * eval_rows:
        raise DeliaError(f"{source}: {len(test_pairs)} test pairs, {2 * eval_rows} needed (task.eval_rows per group)")
    train = [make_row(p, TRAIN_WORDINGS[i % len(TRAIN_WORDINGS)], direction)
             for i, p in enumerate(train_pairs[:train_rows])]
    seen = [make_row(p, TRAIN_WORDINGS[i % len(TRAIN_WORDINGS)], direction)
            for i, p in enumerate(test_pairs[:eval_rows])]
    heldout = [make_row(p, HELDOUT_WORDINGS[i % len(HELDOUT_WORDINGS)], direction)
               for i, p in enumerate(test_pairs[eval_rows : 2 * eval_rows])]
    return train, seen, heldout
