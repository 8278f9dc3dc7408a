"""The translation task on the tiny random model: rows and wordings, chrF++ / BLEU, DiPMT hints, and a
whole run whose report has the paper's Table 3 shape."""

import json

import pytest

from delia import DeliaError
from delia.baselines import dipmt_rows
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
    train = [{"messages": [{"role": "user", "content": f"Open the file now\n\nTranslate."}]}] * 3
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
