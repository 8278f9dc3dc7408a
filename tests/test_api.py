"""The README's Python API example, run as written on the tiny model (only MODEL and QUERIES point at
what the test makes), and the API's own checks."""

import json
import re
import shutil
from pathlib import Path

import pytest

import delia
from delia import DeliaError

ROOT = Path(__file__).parent.parent


def test_the_readme_notebook_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"instruction": f"Name {n} colours.", "output": "Red."}) + "\n"
                               for n in range(200)))
    code = code.replace('MODEL = "smollm2-135m-instruct"', f'MODEL = {tiny_model_dir!r}')
    code = code.replace('QUERIES = "alpaca_en_demo"', f'QUERIES = {str(queries)!r}')
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "configs")
    (tmp_path / "configs" / "demo.yaml").write_text((tmp_path / "configs" / "demo.yaml").read_text().replace(
        "queries: alpaca_en_demo", f"queries: {queries}").replace("max_new_tokens: 128", "max_new_tokens: 8"))
    task = [{"messages": [{"role": "user", "content": f"Is {n} even? Reply in the <sep> format."},
                          {"role": "assistant", "content": json.dumps({"thought": "t", "hallucination": "no"})}]}
            for n in range(5)]
    (tmp_path / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))  # conversions of the tiny model stay here
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    train = scope["train"]
    assert train.num_rows == 5 + 15 and sorted(set(train["source"])) == ["diverse", "task"]
    assert len(scope["diverse"]) == 24 and set(scope["diverse"].column_names) == {"messages", "ended", "open_end"}
    assert scope["report"].exists() and 0 <= scope["held_out"]["format_accuracy"] <= 1
    assert (tmp_path / "runs" / "notebook" / "train" / "delia" / "adapter").is_dir()


def test_load_config_takes_a_dict_or_keywords_and_checks_them():
    assert delia.load_config({"mix": {"ratio": 7}}).mix.ratio == 7
    cfg = delia.load_config("configs/demo.yaml", mix={"ratio": 5}, overrides=["seed=3"])
    assert cfg.mix.ratio == 5 and cfg.seed == 3 and cfg.train.learning_rate == 1e-3  # the file's other settings kept
    with pytest.raises(DeliaError, match="'mix.ratio': must be >= 0"):
        delia.load_config(mix={"ratio": -1})
    with pytest.raises(DeliaError, match="unknown stage 'sampel'"):
        delia.stage("sampel", cfg)
    with pytest.raises(DeliaError, match="name the arm"):
        delia.stage("train", cfg)


@pytest.mark.parametrize("call,words", [
    (lambda: delia.load_config(5), "load_config: expected a config file's path, a dict of settings or None, got int"),
    (lambda: delia.load_config(None, "seed=1"), "overrides must be a list of KEY=VALUE strings"),
    (lambda: delia.load_config(5, mix={"ratio": 1}), "load_config: expected a config file's path"),
    (lambda: delia.mix([], [], ratio=-1), "delia.mix: 'mix.ratio': must be >= 0, got -1"),
    (lambda: delia.mix([], [], ratio=float("nan")), "'mix.ratio': must be a finite number"),
    (lambda: delia.mix([], [], ratio=float("inf")), "'mix.ratio': must be a finite number"),
    (lambda: delia.mix([], [], ratio=[3]), "'mix.ratio': expected float"),
    (lambda: delia.mix([], [], ratio=1, seed=-1), "delia.mix: 'seed': must be >= 0"),
    (lambda: delia.self_sample(["hi"], temperature=-1), "delia.self_sample: 'sample.temperature': must be >= 0"),
    (lambda: delia.self_sample(["hi"], top_p=5), "'sample.top_p': must be > 0 and <= 1, got 5"),
    (lambda: delia.self_sample(["hi"], backend="bogus"), "'generation.backend': expected one of"),
    (lambda: delia.self_sample(["hi"], batch_size=0), "'sample.batch_size': must be >= 1, got 0"),
    (lambda: delia.self_sample(["hi"], max_new_tokens=-5), "'sample.max_new_tokens': must be >= 1"),
    (lambda: delia.self_sample(["hi"], cut_answers="trim"), "'sample.cut_answers': expected one of"),
    (lambda: delia.self_sample(["hi"], n=-2), "delia.self_sample: 'n': must be an integer >= 0"),
    (lambda: delia.self_sample([], model="/nonexistent"), "delia.self_sample: 'queries': no queries"),
])
def test_every_api_entry_point_checks_its_values_as_the_config_does(call, words):
    with pytest.raises(DeliaError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
