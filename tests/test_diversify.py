import json

from delia.config import load_config
from delia.data.diversify import SentenceEmbedder, apply_wordings, clean_answer, filter_paraphrases, protected_spans
from delia.pipeline import stage_diversify, stage_task

ORIGINAL = "Check whether the answer contains a hallucination. Follow the <sep> format."


def test_filter_keeps_only_faithful_new_wordings():
    embed = SentenceEmbedder()
    candidates = [
        (ORIGINAL, "Determine if the answer has a hallucination, and follow the <sep> format."),  # good
        (ORIGINAL, "Determine if the answer has a hallucination, and follow the <sep> format!"),  # duplicate
        (ORIGINAL, "Check whether the answer contains a hallucination. Follow the format."),  # lost <sep>
        (ORIGINAL, "My favourite dessert is a warm apple pie with <sep> cream."),  # meaning drifted
        (ORIGINAL, "check whether the answer contains a hallucination follow the <sep> format"),  # the original
        (ORIGINAL, ""),
    ]
    records = filter_paraphrases(candidates, ["<sep>"], embed, (0.6, 0.98))
    assert [r["kept"] for r in records] == [True, False, False, False, False, False]
    assert [r["reason"].split()[0] for r in records[1:]] == ["duplicate", "lost", "similarity", "duplicate", "empty"]
    assert records[0]["similarity"] > 0.6 > records[3]["similarity"]


def test_spans_and_cleaning():
    assert protected_spans("Fill {name} in <sep> form", ["<sep>", "<x>"]) == ["<sep>", "{name}"]
    assert clean_answer('Rewritten instruction: "Judge it in <sep> form."\nmore') == "Judge it in <sep> form."


def test_rows_take_wordings_from_their_pool():
    rows = [{"messages": [{"role": "user", "content": f"Q{i}\n\n{ORIGINAL}"}, {"role": "assistant", "content": "{}"}],
             "wording": ORIGINAL} for i in range(40)]
    para = "Determine if the answer has a hallucination, and follow the <sep> format."
    out = apply_wordings(rows, [{"source": ORIGINAL, "paraphrase": para, "kept": True}], seed=0)
    wordings = {r["wording"] for r in out}
    assert wordings == {ORIGINAL, para}
    assert all(r["messages"][0]["content"].endswith(r["wording"]) for r in out)
    assert [r["messages"][0]["content"].split("\n")[0] for r in out] == [f"Q{i}" for i in range(40)]


def test_stage_writes_provenance_and_resumes(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=6",
                             "task.eval_rows=1", "diversify.paraphrases=2", "diversify.max_new_tokens=8"])
    stage_task(cfg)
    out = stage_diversify(cfg)["outputs"]
    assert out["asked"] == 2 * out["wordings"] == 12
    records = [json.loads(l) for l in (tmp_path / "diversify" / "wordings.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all({"source", "paraphrase", "similarity", "kept", "backend", "seed"} <= set(r) for r in records)
    assert len((tmp_path / "diversify" / "train.jsonl").read_text().splitlines()) == 6
    (tmp_path / "diversify" / "manifest.json").unlink()
    assert stage_diversify(cfg)["outputs"]["resumed_from_cache"] == 12
