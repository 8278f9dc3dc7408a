import json

import pytest

from delia import DeliaError
from delia.config import TaskConfig
from delia.conversation import wording_of
from delia.data import demo_task
from delia.data.task import build_task
from delia.evaluate.parse import extract_object


def test_demo_labels_and_thoughts_are_right():
    train, evals = build_task(TaskConfig(train_rows=60, eval_rows=30), seed=0)
    for row in train + evals:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        obj = json.loads(answer)
        assert set(obj) == {"thought", "hallucination"}
        question = user.split("\n")[0].removeprefix("Question: ")
        given = user.split("\n")[1].removeprefix("Answer: ").removeprefix("It is ").rstrip(".")
        if question.startswith("What is the capital of"):
            country = question.removeprefix("What is the capital of ").rstrip("?")
            right = next(c for k, c, _ in demo_task.CAPITALS if k == country)
        elif question.startswith("How many"):
            to, rest = question.removeprefix("How many ").rstrip("?").split(" are in ")
            n, frm = rest.split(" ", 1)
            right = str(int(n) * next(f for t, fr, f in demo_task.CONVERSIONS if t == to and fr == frm))
        else:
            a, op, b = question.removeprefix("What is ").rstrip("?").split()
            right = str({"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op])
        assert obj["hallucination"] == ("no" if given == right else "yes"), row
        assert f"The correct value is {right}" in obj["thought"]


def test_demo_wordings_split():
    assert len(demo_task.TRAIN_WORDINGS) >= 40
    assert not set(demo_task.TRAIN_WORDINGS) & set(demo_task.HELDOUT_WORDINGS)
    assert all("<sep>" in w for w in demo_task.TRAIN_WORDINGS + demo_task.HELDOUT_WORDINGS)
    train, evals = build_task(TaskConfig(train_rows=48, eval_rows=12), seed=0)
    train_wordings = {r["wording"] for r in train}
    assert len(train_wordings) == 48
    assert {r["wording"] for r in evals if r["group"] == "heldout"} <= set(demo_task.HELDOUT_WORDINGS)
    assert {r["wording"] for r in evals if r["group"] == "seen"} <= train_wordings
    train_questions = {r["question"] for r in train}
    assert not any(r["question"] in train_questions for r in evals)


def test_one_fixed_wording_ablation():
    train, _ = build_task(TaskConfig(train_rows=20, eval_rows=4, diversify=False), seed=0)
    assert len({r["wording"] for r in train}) == 1
    assert all(r["messages"][0]["content"].endswith(train[0]["wording"]) for r in train)


def _write(path, rows):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))


def _conv(i, wording):
    return [{"role": "user", "content": f"context {i}\n\n{wording} <sep>"},
            {"role": "assistant", "content": "{'thought': 'x', 'hallucination': 'no'}"}]


def test_file_split_by_wording(tmp_path):
    rows = [_conv(i, f"wording {i % 10}") for i in range(30)]  # 10 wordings, 3 rows each
    _write(tmp_path / "t.jsonl", rows)
    train, evals = build_task(TaskConfig(source=str(tmp_path / "t.jsonl"), train_rows=0, eval_rows=50,
                                         heldout_wording_fraction=0.2), seed=0)
    heldout = {r["wording"] for r in evals if r["group"] == "heldout"}
    train_w = {r["wording"] for r in train}
    assert len(heldout) == 2 and not heldout & train_w
    assert {r["wording"] for r in evals if r["group"] == "seen"} <= train_w
    assert len(train) + len(evals) == 30
    assert wording_of(rows[3]) == "wording 3 <sep>"


def test_shared_paper_data_splits(tmp_path):
    import pathlib

    path = pathlib.Path(__file__).parents[1] / ".." / "shared" / "data" / "hallucination-json" / "train.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/hallucination-json is not beside this checkout")
    train, evals = build_task(TaskConfig(source=str(path), train_rows=0, eval_rows=20), seed=0)
    assert len(train) + len(evals) <= 100 and len(evals) == sum(1 for _ in evals)
    assert all(extract_object(r["messages"][1]["content"]) for r in train + evals)
    assert {r["group"] for r in evals} == {"seen", "heldout"}


def test_missing_token_in_file_is_an_error(tmp_path):
    rows = [[{"role": "user", "content": "no token here"}, {"role": "assistant", "content": "{}"}]] * 12
    _write(tmp_path / "t.jsonl", rows)
    with pytest.raises(DeliaError, match=r"t.jsonl:1: field 'messages': no user turn holds the new token"):
        build_task(TaskConfig(source=str(tmp_path / "t.jsonl"), heldout_wording_fraction=0), seed=0)


def _own_task(tmp_path, answers, wordings=("Reply in the <sep> format.", "Use <sep> for the reply.")):
    rows = [{"messages": [{"role": "user", "content": f"Item {i}.\n\n{wordings[i % len(wordings)]}"},
                          {"role": "assistant", "content": a}]} for i, a in enumerate(answers)]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "own.jsonl")


def _task_stage(tmp_path, source, *sets):
    from delia.config import load_config
    from delia.pipeline import stage_task

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"task.source={source}", "task.eval_rows=2",
                             "task.heldout_wording_fraction=0", *sets])
    return stage_task(cfg)


def test_a_task_whose_references_fail_its_evaluator_stops_at_the_first_failing_row(tmp_path):
    source = _own_task(tmp_path, ['{"answer": "%d", "verdict": "ok"}' % i for i in range(12)])
    with pytest.raises(DeliaError, match=r"own\.jsonl:\d+: the reference answer lacks the key\(s\) 'thought', "
                                         r"'hallucination' of task.required_keys \(it has 'answer', 'verdict'\)"):
        _task_stage(tmp_path, source)
    assert not (tmp_path / "run" / "task" / "train.jsonl").exists()  # nothing written
    done = _task_stage(tmp_path, source, "task.required_keys=[answer, verdict]", "task.label_key=verdict")
    assert done["outputs"]["train_rows"] == 10  # train_rows 0: every row not held out
    prose = _own_task(tmp_path, [f"The answer is {i}." for i in range(12)])
    with pytest.raises(DeliaError, match="holds no JSON object .*task.metric exact or regex"):
        _task_stage(tmp_path, prose)
    assert _task_stage(tmp_path, prose, "task.metric=exact")["outputs"]["train_rows"] == 10
    with pytest.raises(DeliaError, match="does not match task.answer_pattern"):
        _task_stage(tmp_path, prose, "task.metric=regex", "task.answer_pattern='The answer is [a-z]+\\.'")


def test_exact_and_regex_metrics_score_plain_answers():
    from delia.evaluate.formatted import score

    exact = TaskConfig(metric="exact")
    assert score(" Paris ", "Paris", exact) == {"formatted": True, "attempted": True, "label": None}
    assert score("It is Paris", "Paris", exact)["formatted"] is False
    regex = TaskConfig(metric="regex", answer_pattern=r"Verdict: (?P<label>yes|no)\.")
    assert score("Verdict: no.", "Verdict: no.", regex) == {"formatted": True, "attempted": True, "label": True}
    assert score("Verdict: yes.", "Verdict: no.", regex)["label"] is False
    assert score("Well. Verdict: no. Bye", "Verdict: no.", regex) == {"formatted": False, "attempted": True, "label": False}


def test_a_source_with_a_wording_per_row_is_warned_about(tmp_path, capsys):
    source = _own_task(tmp_path, ['{"thought": "t", "hallucination": "no"}'] * 12,
                       wordings=[f"Instruction number {i} with <sep>." for i in range(12)])
    _task_stage(tmp_path, source, "task.heldout_wording_fraction=0.2")
    out = capsys.readouterr().out
    assert "delia: warning: " in out and "12 instruction wordings for 12 rows" in out


@pytest.mark.parametrize("bad,message", [("task.metric=regex", "needs a pattern"),
                                         ("task.answer_pattern='('", "not a regular expression")])
def test_bad_metric_settings_are_refused_at_load(bad, message):
    from delia.config import load_config

    with pytest.raises(DeliaError, match=message):
        load_config(None, ["task.metric=regex", bad] if "pattern" in bad else [bad])
