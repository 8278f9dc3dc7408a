"""Translation as a task: parallel pairs turned into chat rows with an instruction wording.

A row's user turn is the source sentence, a blank line, then the instruction (its *wording*, as in
every delia task); the assistant turn is the reference translation. Training rows use the training
wordings; evaluation rows come with training wordings (`seen`) and with held-out wordings.

Where pairs come from (`task.source` for training, `task.eval_source` for evaluation, by default the
same source's test part):
- a folder from `delia data en-is` (train.jsonl, test.jsonl);
- a JSONL file with `source`/`target` (English and the other language when the direction has English in
  it, else the direction's order) or with language codes as keys (`{"en": ..., "is": ...}`), or a TSV
  file (source TAB target); one file serves both: 2 x eval_rows pairs are held out for evaluation;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (a Hub name or a local folder) with the `translation`
  column (`{"en": ..., "is": ...}`) or one column per language; splits train and test (or validation);
- `sacrebleu:TESTSET` (e.g. `sacrebleu:wmt21`): a test set sacrebleu downloads (online only) for the
  direction's language pair, first reference.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import DeliaError
from .sources import loads

LANGUAGES = {"en": "English", "is": "Icelandic", "de": "German", "fr": "French", "cs": "Czech", "ru": "Russian",
             "zh": "Chinese", "ja": "Japanese", "ha": "Hausa", "es": "Spanish", "it": "Italian", "pl": "Polish",
             "uk": "Ukrainian", "fi": "Finnish", "et": "Estonian", "lt": "Lithuanian", "ro": "Romanian",
             "tr": "Turkish", "hi": "Hindi", "bn": "Bengali", "xh": "Xhosa", "zu": "Zulu", "km": "Khmer",
             "ps": "Pashto", "gu": "Gujarati", "kk": "Kazakh", "ta": "Tamil", "iu": "Inuktitut", "hr": "Croatian"}
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


def languages(direction: str) -> tuple[str, str]:
    parts = direction.split("-")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise DeliaError(f"task.direction: expected two language codes such as en-is, got {direction!r}")
    return parts[0], parts[1]


def _keyed(source: str, target: str, direction: str) -> dict:
    """A source/target pair from a file keyed by language: English is the source side whenever the
    direction has English in it (so one en-is corpus serves both directions)."""
    a, b = languages(direction)
    if "en" in (a, b):
        return {"en": source, (b if a == "en" else a): target}
    return {a: source, b: target}


def read_pairs(path: Path, direction: str = "en-is") -> list[dict]:
    """Pairs keyed by language from a JSONL or TSV file; bad lines are errors naming file and line."""
    a, b = languages(direction)
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
            pairs.append(_keyed(parts[0].strip(), parts[1].strip(), direction))
            continue
        row = loads(line, f"{path}:{n}")
        keys = (a, b) if isinstance(row, dict) and a in row and b in row else ("source", "target")
        for key in keys:
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                raise DeliaError(f"{path}:{n}: '{key}': expected a non-empty string")
        pairs.append({a: row[a], b: row[b]} if keys == (a, b) else _keyed(row["source"], row["target"], direction))
    if not pairs:
        raise DeliaError(f"{path}: no pairs")
    return pairs


def hf_pairs(spec: str, part: str, direction: str) -> list[dict]:
    """Pairs from a Hugging Face dataset: `NAME[:CONFIG]`, split `train`, or `test` (else `validation`)."""
    from datasets import get_dataset_split_names

    from .sources import hf_dataset

    a, b = languages(direction)
    name, _, config = spec.partition(":")
    where = f"hf:{spec}"
    try:
        splits = get_dataset_split_names(name, config or None)
    except Exception as e:  # noqa: BLE001 - the Hub, the network, a bad name: one line
        raise DeliaError(f"{where}: cannot load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    split = "train" if part == "train" else next((s for s in ("test", "validation") if s in splits), None)
    if split not in splits:
        raise DeliaError(f"{where}: no {'train' if part == 'train' else 'test or validation'} split (has {', '.join(splits)})")
    data, _ = hf_dataset(f"{spec}@{split}", where=where)
    columns = data.column_names
    if "translation" in columns:
        rows = (r["translation"] for r in data)
    elif a in columns and b in columns:
        rows = iter(data)
    else:
        raise DeliaError(f"{where}: expected a 'translation' column or columns {a!r} and {b!r}, found {', '.join(columns)}")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row.get(a), str) or not isinstance(row.get(b), str):
            raise DeliaError(f"{where}: split {split}, row {i}: no {a!r} and {b!r} text")
        pairs.append({a: row[a], b: row[b]})
    return pairs


def sacrebleu_pairs(test_set: str, direction: str) -> list[dict]:
    """A sacrebleu test set for the direction's language pair (downloaded into $SACREBLEU, default
    ~/.sacrebleu), with its first reference."""
    from sacrebleu.dataset import DATASETS

    a, b = languages(direction)
    dataset = DATASETS.get(test_set)
    if dataset is None:
        raise DeliaError(f"sacrebleu:{test_set}: no such test set (e.g. wmt21; `sacrebleu --list`)")
    if direction not in dataset.langpairs:
        raise DeliaError(f"sacrebleu:{test_set}: no {direction} pair (has {', '.join(sorted(dataset.langpairs))})")
    try:
        sources = list(dataset.source(direction))
        references = [refs[0].strip() for refs in dataset.references(direction)]
    except (Exception, SystemExit) as e:  # noqa: BLE001 - sacrebleu exits on a failed download
        raise DeliaError(f"sacrebleu:{test_set}: cannot download the {direction} test set (no internet?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [{a: s, b: r} for s, r in zip(sources, references)]


def load_pairs(source: str, part: str, direction: str) -> list[dict]:
    """Pairs keyed by language from any supported source (see the module's docstring)."""
    if source.startswith("hf:"):
        return hf_pairs(source[3:], part, direction)
    if source.startswith("sacrebleu:"):
        return sacrebleu_pairs(source[len("sacrebleu:"):], direction)
    path = Path(source)
    if path.is_dir():
        path = path / f"{part}.jsonl"
    if not path.exists():
        raise DeliaError(f"{path}: not found (build it with `delia data en-is`)")
    return read_pairs(path, direction)


def oriented(pairs: list[dict], direction: str) -> list[dict]:
    """Language-keyed pairs as source -> target in the direction."""
    a, b = languages(direction)
    return [{"source": p[a], "target": p[b]} for p in pairs]


def make_row(pair: dict, wording: str, direction: str) -> dict:
    src, tgt = (LANGUAGES.get(x, x) for x in languages(direction))
    text = wording.format(src=src, tgt=tgt)
    return {"messages": [{"role": "user", "content": f"{pair['source']}\n\n{text}"},
                         {"role": "assistant", "content": pair["target"]}], "wording": text}


def build_translation_task(source: str, direction: str, train_rows: int, eval_rows: int, seed: int,
                           eval_source: str = ""):
    """(train rows, seen-wording eval rows, held-out-wording eval rows)."""
    languages(direction)
    rng = random.Random(seed)
    train_pairs = oriented(load_pairs(source, "train", direction), direction)
    rng.shuffle(train_pairs)
    one_file = not eval_source and Path(source).is_file()
    if one_file:  # one file serves both: the first 2 x eval_rows shuffled pairs are evaluation pairs
        test_pairs, train_pairs = train_pairs[: 2 * eval_rows], train_pairs[2 * eval_rows :]
    else:
        test_pairs = oriented(load_pairs(eval_source or source, "test", direction), direction)
    if len(test_pairs) < 2 * eval_rows:
        raise DeliaError(f"{eval_source or source}: {len(test_pairs)} test pairs, {2 * eval_rows} needed "
                         f"(task.eval_rows per group)")
    if not train_pairs:
        raise DeliaError(f"{source}: no training pairs left after holding out {2 * eval_rows} for evaluation")
    train = [make_row(p, TRAIN_WORDINGS[i % len(TRAIN_WORDINGS)], direction)
             for i, p in enumerate(train_pairs[: train_rows or None])]
    seen = [make_row(p, TRAIN_WORDINGS[i % len(TRAIN_WORDINGS)], direction)
            for i, p in enumerate(test_pairs[:eval_rows])]
    heldout = [make_row(p, HELDOUT_WORDINGS[i % len(HELDOUT_WORDINGS)], direction)
               for i, p in enumerate(test_pairs[eval_rows : 2 * eval_rows])]
    return train, seen, heldout
