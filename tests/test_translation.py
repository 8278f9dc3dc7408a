"""The translation task on the tiny random model: rows and wordings, chrF++ / BLEU, DiPMT hints, and a
whole run whose report has the paper's Table 3 shape."""

import json

import pytest

from delia import DeliaError
from delia.data.baselines import dipmt_rows
from delia.config import load_config
from delia.data.translation import build_translation_task, read_pairs
from delia.evaluate.translation import SacreScorer

PAIRS = [("Open the selected file", "Opna valda skrá"), ("Close all open windows", "Loka öllum opnum gluggum"),
         ("Save the image as a copy", "Vista myndina sem afrit"), ("The file could not be read", "Ekki tókst að lesa skrána"),
         ("Remove the selected layer", "Fjarlægja valið lag"), ("Show the hidden files", "Sýna faldar skrár")]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "en-is"
    folder.mkdir()
    for part, pairs in (("train", PAIRS * 2), ("test", PAIRS)):
        (folder / f"{part}.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    (folder / "dictionary.json").write_text(json.dumps({"skrá": ["file"], "lag": ["layer"], "gluggi": ["window"],
                                                        "afrit": ["copy", "duplicate"]}))
    return folder


def test_rows_directions_and_wordings(corpus):
    train, seen, heldout = build_translation_task(str(corpus), "is-en", 8, 3, seed=0)
    assert len(train) == 8 and len(seen) == len(heldout) == 3
    user = train[0]["messages"][0]["content"]
    sentence, _, wording = user.rpartition("\n\n")
    assert wording == train[0]["wording"] and "Icelandic" in wording or "English" in wording
    assert sentence in [t for _, t in PAIRS] and train[0]["messages"][1]["content"] in [s for s, _ in PAIRS]
    assert not {r["wording"] for r in heldout} & {r["wording"] for r in train}
    with pytest.raises(DeliaError, match="6 test pairs, 8 needed"):
        build_translation_task(str(corpus), "en-is", 4, 4, seed=0)


def test_bad_pair_files_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(DeliaError, match=r"p.jsonl:2: 'target'"):
        read_pairs(bad)
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a\tb\nno tab here\n")
    with pytest.raises(DeliaError, match=r"p.tsv:2: expected source<TAB>target"):
        read_pairs(tsv)


def test_scores():
    chrf, bleu = SacreScorer("chrf++"), SacreScorer("bleu")
    refs = [t for _, t in PAIRS]
    assert chrf.score(refs, refs) == 100.0 and bleu.score(refs, refs) == 100.0
    assert 0 < chrf.score(["Opna skrá", "Loka gluggum"], refs[:2]) < 100


def test_dipmt_hints_the_rarest_dictionary_words():
    dictionary = {"open": ["opna"], "file": ["skrá"], "selected": ["valinn", "valda", "x"], "the": ["sá"]}
    train = [{"messages": [{"role": "user", "content": "Open the file now\n\nTranslate."}]}] * 3
    row = {"messages": [{"role": "user", "content": "Open the selected file\n\nTranslate."},
                        {"role": "assistant", "content": "Opna valda skrá"}]}
    (out,) = dipmt_rows([row], train, dictionary, 2)
    # "selected" never occurs in the training sources; open, the and file 3 times each: the earliest, "open"
    assert out["hints"] == ["open", "selected"]
    assert out["messages"][0]["content"] == ('Open the selected file\n\nIn this context, the word "open" means "opna". '
                                             'In this context, the word "selected" means "valinn or valda".\n\nTranslate.')


def test_translation_run_has_table_3(corpus, tiny_model_dir, tmp_path):
    from delia.pipeline import run_all

    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"instruction": f"Name {n} colours.", "output": "Red."}) + "\n"
                                              for n in range(20)))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", "task.kind=translation",
                             f"task.source={corpus}", "task.direction=en-is", "task.new_tokens=[]", "task.train_rows=8",
                             "task.eval_rows=3", "arms=[untouched, dipmt, common, delia]", "train.batch_size=4",
                             f"sample.queries={tmp_path / 'q.jsonl'}", "sample.max_new_tokens=4", "mix.ratio=1",
                             "evaluate.max_new_tokens=6"])
    report = run_all(cfg).read_text()
    assert "| Arm | chrF++ (seen) | chrF++ (held-out) | vs untouched (held-out) |" in report
    for label in ("Untouched model", "DiPMT", "Common instruction tuning (1 epoch)", "DELIA (1 epoch)"):
        assert label in report
    metrics = json.loads((tmp_path / "run" / "eval" / "common" / "metrics.json").read_text())
    assert set(metrics["heldout"]) == {"n", "chrf++", "bleu"} and metrics["heldout"]["n"] == 3
    hinted = [json.loads(line) for line in open(tmp_path / "run" / "eval" / "dipmt" / "generations.jsonl")]
    assert any(g["hints"] for g in hinted)  # "file", "layer", "window"... are in the inverted dictionary
    assert not (tmp_path / "run" / "analysis").exists()  # no new token: nothing to analyse


def test_language_keyed_file_serves_both_parts(tmp_path):
    """One JSONL with language codes as keys: evaluation pairs held out of training, either direction."""
    path = tmp_path / "de-en.jsonl"
    path.write_text("".join(json.dumps({"de": f"Satz {i}", "en": f"Sentence {i}"}) + "\n" for i in range(12)))
    train, seen, heldout = build_translation_task(str(path), "de-en", 100, 2, seed=0)
    assert len(train) == 8 and len(seen) == len(heldout) == 2
    sources = lambda rows: {r["messages"][0]["content"].split("\n\n")[0] for r in rows}  # noqa: E731
    assert not sources(train) & sources(seen + heldout) and all(s.startswith("Satz") for s in sources(train))
    assert "German" in train[0]["wording"] and "English" in train[0]["wording"]
    train, _, _ = build_translation_task(str(path), "en-de", 100, 2, seed=0)
    assert all(r["messages"][1]["content"].startswith("Satz") for r in train)


def test_hugging_face_dataset_through_load_dataset(tmp_path):
    """`hf:NAME` goes through datasets.load_dataset (here a local folder, as a Hub name would): the
    translation column or one column per language, the test split, or validation when there is none."""
    folder = tmp_path / "wmt-like"
    folder.mkdir()
    for split, n in (("train", 10), ("validation", 4)):
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"translation": {"is": f"Setning {split} {i}", "en": f"Sentence {split} {i}"}}) + "\n"
            for i in range(n)))
    train, seen, heldout = build_translation_task(f"hf:{folder}", "is-en", 6, 2, seed=0)
    assert len(train) == 6 and all(r["messages"][0]["content"].startswith("Setning train") for r in train)
    assert all(r["messages"][1]["content"].startswith("Sentence validation") for r in seen + heldout)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "train.jsonl").write_text("".join(json.dumps({"en": f"a {i}", "is": f"b {i}"}) + "\n" for i in range(6)))
    with pytest.raises(DeliaError, match=r"hf:.*flat: no test or validation split \(has train\)"):
        build_translation_task(f"hf:{flat}", "en-is", 4, 1, seed=0)
    train, seen, _ = build_translation_task(f"hf:{flat}", "en-is", 4, 1, seed=0, eval_source=f"hf:{folder}")
    assert train[0]["messages"][1]["content"].startswith("b ") and seen[0]["messages"][0]["content"].startswith("Sentence")
    with pytest.raises(DeliaError, match=r"hf:.*flat: expected a 'translation' column or columns 'de' and 'en'"):
        build_translation_task(f"hf:{flat}", "de-en", 4, 1, seed=0, eval_source=f"hf:{folder}")


WMT21_XML = """<?xml version="1.0" encoding="utf-8"?>
<dataset id="newstest2021"><collection id="general">
<doc id="news.1" origlang="en"><src lang="en"><p>{src}</p></src><ref lang="is" translator="A"><p>{ref}</p></ref></doc>
</collection></dataset>
"""


def _sacrebleu_task(sacrebleu_dir, direction, eval_rows):
    import subprocess
    import sys

    code = (f"from delia.data.translation import build_translation_task as b; import json; "
            f"r = b({str(sacrebleu_dir / 'train.jsonl')!r}, {direction!r}, 4, {eval_rows}, 0, 'sacrebleu:wmt21'); "
            f"print(json.dumps([[x['messages'][0]['content'], x['messages'][1]['content']] for x in r[1] + r[2]]))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "SACREBLEU": str(sacrebleu_dir)})


def test_sacrebleu_test_set_as_evaluation_pairs(tmp_path):
    """`sacrebleu:wmt21` read by sacrebleu itself from its cache folder ($SACREBLEU): here the WMT21 XML is
    written in place of the download this machine cannot make; elsewhere sacrebleu fetches it."""
    raw = tmp_path / "wmt21" / "raw"
    (raw / "test").mkdir(parents=True)
    (raw / "wmt21.test.tgz").write_bytes(b"downloaded")  # sacrebleu's mark that the tarball is here
    segs = lambda words: "".join(f'<seg id="{i}">{w} {i}.</seg>' for i, w in enumerate(words, 1))  # noqa: E731
    (raw / "test" / "newstest2021.en-is.xml").write_text(WMT21_XML.format(src=segs(["Hello"] * 4), ref=segs(["Halló"] * 4)))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"source": f"s {i}", "target": f"t {i}"}) + "\n" for i in range(6)))
    out = _sacrebleu_task(tmp_path, "en-is", 2)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert [r[1] for r in rows] == ["Halló 1.", "Halló 2.", "Halló 3.", "Halló 4."]
    assert rows[0][0].startswith("Hello 1.\n\n")
    fresh = tmp_path / "empty"  # nothing cached: sacrebleu downloads it, or (offline) the error is one line
    fresh.mkdir()
    (fresh / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    out = _sacrebleu_task(fresh, "is-en", 1)
    if out.returncode == 0:
        assert len(json.loads(out.stdout)) == 2
    else:
        assert "delia.DeliaError: sacrebleu:wmt21: cannot download the is-en test set" in out.stderr.splitlines()[-1]
