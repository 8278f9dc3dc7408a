"""Task rows and queries from wherever a TRL or LLaMA-Factory user keeps them: JSON / JSONL, parquet,
CSV, a `save_to_disk` folder, `hf:` (a folder `load_dataset` reads, as the Hub would), in messages,
TRL prompt / completion (plain and conversational, content as parts), alpaca or sharegpt shape."""

import json

import pytest

from delia import DeliaError
from delia.data.formats import load_conversations, load_located

ROWS = [{"instruction": f"Is {n} + {n} = {2 * n}? Answer in the <sep> format.", "input": "",
         "output": json.dumps({"thought": f"{n} + {n} is {2 * n}.", "hallucination": "no"})} for n in range(6)]
EXPECTED = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}] for r in ROWS]


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_every_source_gives_the_same_conversations(tmp_path):
    from datasets import DatasetDict

    data = _dataset(ROWS)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data.to_parquet(str(tmp_path / "rows.parquet"))
    data.to_csv(str(tmp_path / "rows.csv"), index=False)
    data.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "saved-dict"))
    (tmp_path / "hub-like").mkdir()
    data.to_parquet(str(tmp_path / "hub-like" / "train.parquet"))
    for source in ("rows.jsonl", "rows.parquet", "rows.csv", "saved", "saved-dict"):
        assert load_conversations(tmp_path / source) == EXPECTED, source
    assert load_conversations(f"hf:{tmp_path / 'hub-like'}") == EXPECTED
    assert load_conversations(f"hf:{tmp_path / 'hub-like'}@train[:2]") == EXPECTED[:2]
    where = [w for w, _ in load_located(tmp_path / "rows.csv")]
    assert where[0] == f"{tmp_path / 'rows.csv'}:2" and where[-1] == f"{tmp_path / 'rows.csv'}:7"  # after the header


def test_trl_prompt_completion_rows_plain_and_conversational(tmp_path):
    plain = [{"prompt": r["instruction"], "completion": r["output"]} for r in ROWS]
    chat = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": r["instruction"]}]}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in ROWS]
    for name, rows in (("plain.jsonl", plain), ("chat.parquet", chat)):
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            _dataset(rows).to_parquet(str(path))
        assert load_conversations(path) == EXPECTED, name
    # prompt only: a query
    (tmp_path / "q.jsonl").write_text('{"prompt": "Name three colours."}\n')
    assert load_conversations(tmp_path / "q.jsonl", need_answer=False) == [[{"role": "user", "content": "Name three colours."}]]


@pytest.mark.parametrize("row,message", [
    ({"prompt": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], "completion": "a"},
     "field 'prompt[0].content[0]': only text parts are read, got 'image'"),
    ({"prompt": "Hi", "completion": 3}, "field 'completion': expected a list"),
    ({"prompt": "", "completion": "a"}, "the user's turn is empty"),
])
def test_a_bad_row_in_a_table_is_named_by_file_and_line(tmp_path, row, message):
    good = {"prompt": "Hi", "completion": "Hello."}
    (tmp_path / "t.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DeliaError, match=f"t.jsonl:2: .*{message.replace('[', '.').replace(']', '.')}"):
        load_conversations(tmp_path / "t.jsonl")


def test_a_csv_row_without_an_instruction_is_named_by_its_line(tmp_path):
    (tmp_path / "t.csv").write_text('instruction,output\n"Hi","Hello."\n,"Hello."\n')
    with pytest.raises(DeliaError, match=r"t\.csv:3: field 'instruction': expected a string"):
        load_conversations(tmp_path / "t.csv")


def test_an_upper_case_csv_is_read_and_a_bad_one_says_why(tmp_path):
    (tmp_path / "t.CSV").write_text('instruction,output\n"Hi","Hello."\n')
    assert [m[0]["content"] for m in load_conversations(tmp_path / "t.CSV")] == ["Hi"]
    (tmp_path / "bad.csv").write_text('instruction,output\n"Hi","Hello."\n"a","b","c"\n')
    with pytest.raises(DeliaError, match=r"bad\.csv: cannot read as csv: .*Expected 2 fields in line 3, saw 3"):
        load_conversations(tmp_path / "bad.csv")


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    """With the Hub's host refusing connections, a Hub dataset and a Hub model not in the cache fail within
    seconds, in delia's one line, without the libraries' retry lines."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    for setting, words in (("task.source=hf:no-such/dataset", "hf:no-such/dataset: cannot load: the Hugging Face Hub "
                                                              "cannot be reached from this machine"),
                           ("model.name=no-such/model", "model 'no-such/model': cannot load: the Hugging Face Hub")):
        started = time.time()
        verb = "task" if setting.startswith("task") else "run"
        done = subprocess.run([sys.executable, "-m", "delia.cli", verb, "configs/demo.yaml", "--set",
                               f"run_dir={tmp_path / 'run'}", "--set", setting], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert time.time() - started < 20


def test_a_missing_hub_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DeliaError, match=r"^hf:no-such/dataset: cannot load: "):
        load_conversations("hf:no-such/dataset")


def test_the_task_stage_reads_a_saved_dataset_and_reruns_when_it_changes(tiny_model_dir, tmp_path):
    from delia.config import load_config
    from delia.pipeline import stage_task

    _dataset(ROWS * 4).save_to_disk(str(tmp_path / "task"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", f"task.source={tmp_path / 'task'}",
                             "task.eval_rows=2", "task.heldout_wording_fraction=0"])
    first = stage_task(cfg)
    assert first["outputs"]["train_rows"] > 0 and any(k.startswith("source:") for k in first["inputs"])
    assert stage_task(cfg)["finished"] == first["finished"]  # up to date
    _dataset(ROWS * 3).save_to_disk(str(tmp_path / "task"))
    again = stage_task(cfg)
    assert again["inputs"] != first["inputs"] and again["outputs"]["train_rows"] != first["outputs"]["train_rows"]


def test_query_sources_joined_with_commas_are_read_in_order_without_repeats(tmp_path):
    from delia.config import load_config
    from delia.data.queries import load_queries
    from delia.pipeline import _query_inputs

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"instruction": q}) + "\n" for q in ["one", "two", "two"]))
    (tmp_path / "b.csv").write_text("instruction,output\nthree,III\n two ,II\nfour,IV\n")
    conversations, meta = load_queries(f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b.csv'}")
    # a repeat inside one source stays (as that source alone gives it); one an earlier source holds is skipped
    assert [c[0]["content"] for c in conversations] == ["one", "two", "two", "three", "four"]
    assert conversations[3][1] == {"role": "assistant", "content": "III"} and meta["skipped_repeats"] == 1
    assert [p["source"] for p in meta["parts"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")]
    cfg = load_config("configs/demo.yaml", [f"sample.queries={tmp_path / 'a.jsonl'},alpaca_en_demo,{tmp_path / 'b.csv'}"])
    assert set(_query_inputs(cfg)) == {f"queries:{tmp_path / 'a.jsonl'}", f"queries:{tmp_path / 'b.csv'}"}


def test_the_sdist_dpo_and_kto_sets_are_first_turns_as_counted(tmp_path):
    """The DPO and KTO demo sets become one-turn queries, as many as the config's size check counts;
    a KTO answer labelled bad is not kept as a reference."""
    from delia.config import BUILT_IN
    from delia.data.queries import _first_turns, load_queries

    for name in ("dpo_en_demo", "kto_en_demo"):
        conversations, meta = load_queries(name)
        assert len(conversations) == BUILT_IN[name] and name in meta["source"], name
        assert all(len(c) in (1, 2) and c[0]["role"] == "user" and c[-1]["role"] in ("user", "assistant")
                   for c in conversations)
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"}],
             "chosen": {"from": "gpt", "value": "Hello."}},
            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hey."}]},
            {"messages": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "No."}], "label": False}]
    assert _first_turns(rows) == [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
                                  {"messages": [{"role": "user", "content": "Bye?"}]}]
