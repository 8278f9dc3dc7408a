import subprocess
import sys

import pytest


def _delia(*args, cwd):
    return subprocess.run([sys.executable, "-m", "delia.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_config_one_line_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lora_r: sixteen\n")
    out = _delia("task", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["delia: error: c.yaml:2: 'train.lora_r': expected int, got 'sixteen'"]


def test_invalid_yaml_names_the_line(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: x\ntrain: [unclosed\n")
    out = _delia("task", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("delia: error: c.yaml:") and "invalid YAML" in out.stderr


def test_bad_task_file_exit_2_and_nothing_written(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "q <sep>"}]}\n')
    (tmp_path / "c.yaml").write_text("run_dir: run\ntask:\n  source: data.jsonl\n")
    out = _delia("task", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "delia: error: data.jsonl:1: field 'messages': the last turn must be the assistant's answer"
    assert not (tmp_path / "run" / "task" / "train.jsonl").exists()


def test_task_stage_writes_rows_and_manifest(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: run\ntask:\n  train_rows: 10\n  eval_rows: 4\n")
    assert _delia("task", "c.yaml", cwd=tmp_path).returncode == 0
    folder = tmp_path / "run" / "task"
    assert len((folder / "train.jsonl").read_text().splitlines()) == 10
    assert len((folder / "eval.jsonl").read_text().splitlines()) == 8
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["outputs"]["train_rows"] == 10 and "transformers" in manifest["versions"]
    again = _delia("task", "c.yaml", cwd=tmp_path)
    assert "up to date" in again.stdout
    # a changed setting makes the stage run again, and the user is told which one
    changed = _delia("task", "c.yaml", "--set", "task.train_rows=12", cwd=tmp_path)
    assert changed.returncode == 0 and "up to date" not in changed.stdout
    assert "delia: task: finished before with other settings.task.train_rows; running it again" in changed.stdout
    assert len((folder / "train.jsonl").read_text().splitlines()) == 12


def test_differences_name_what_changed():
    from delia.runfolder import differences

    old = {"settings": {"task": {"rows": 1, "kind": "a"}, "seed": 0}, "inputs": {"data": {"sha256": "x"}}}
    new = {"settings": {"task": {"rows": 1, "kind": "a", "metric": "object"}, "seed": 1}, "inputs": {"data": {"sha256": "y"}}}
    assert differences(old, new) == ["settings.task.metric", "settings.seed", "inputs.data.sha256"]
    assert differences(old, old) == [] and differences({"a": 1}, {}) == ["a"]


def test_missing_task_file_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: run\ntask:\n  source: nowhere.jsonl\n")
    out = _delia("task", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "delia: error: nowhere.jsonl: task: input file not found"


def test_model_placement_follows_the_machine():
    from delia import DeliaError
    from delia.model.loading import placement

    assert placement("auto", "auto", cuda=False) == ("cpu", "float32")
    assert placement("auto", "auto", cuda=True, bf16=True) == ("cuda", "bfloat16")
    assert placement("auto", "auto", cuda=True, bf16=False) == ("cuda", "float32")
    assert placement("cpu", "auto", cuda=True, bf16=True) == ("cpu", "float32")  # bf16 on a CPU: slow, not chosen
    assert placement("auto", "float16", cuda=False) == ("cpu", "float16")
    with pytest.raises(DeliaError, match="no CUDA GPU"):
        placement("cuda", "auto", cuda=False)


def test_the_model_loads_where_the_config_says(tiny_model_dir):
    import torch

    from delia.model.loading import load_model

    model, _ = load_model(tiny_model_dir, "auto", device="cpu")
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert load_model(tiny_model_dir, "bfloat16")[0].dtype == torch.bfloat16


def test_config_prints_the_resolved_config_that_run_accepts_back(tmp_path):
    from delia.config import load_config

    out = _delia("config", "configs/demo.yaml", "--set", "train.lora_r=8", cwd=".")
    assert out.returncode == 0 and "lora_r: 8" in out.stdout and "general_queries: 64" in out.stdout
    (tmp_path / "resolved.yaml").write_text(out.stdout)
    assert load_config(tmp_path / "resolved.yaml") == load_config("configs/demo.yaml", ["train.lora_r=8"])


def test_quiet_default_and_verbose_say_what_they_promise(tiny_model_dir, tmp_path):
    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours."}}\n' for n in range(40)))
    (tmp_path / "c.yaml").write_text(
        f"model: {{name: {tiny_model_dir}}}\ntask: {{train_rows: 8, eval_rows: 2}}\narms: [untouched, common, delia]\n"
        "sample: {queries: q.jsonl, max_new_tokens: 4}\ntrain: {batch_size: 4}\nevaluate: {max_new_tokens: 4}\n"
        "controls: {rows: 2, general_queries: 4, general_max_new_tokens: 4}\nmix: {ratio: 1}\n")
    said = {}
    for flag in ("--quiet", "", "--verbose"):
        out = _delia("run", "c.yaml", "--set", f"run_dir=run{flag}", *([flag] if flag else []), cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        said[flag] = out.stdout + out.stderr
    quiet, default, verbose = said["--quiet"], said[""], said["--verbose"]
    assert "delia: train common (1 epoch)" in quiet and "# DELIA report" in quiet
    for noise in ("it/s]", "{'loss'", "Warning", "Loading weights"):
        assert noise not in quiet, noise
    assert "analyze: 100%" in default and "{'loss'" in default  # progress bars, the analysis stage's too
    assert "is_gradient_checkpointing" not in default and "pin_memory" not in default
    assert "is_gradient_checkpointing" in verbose  # the libraries' notices, shown on request


@pytest.mark.parametrize("args, words", [
    (["sample", "c.yaml"], "run/task/train.jsonl: missing; run the task stage first"),
    (["serve", "c.yaml", "--faults", "5"], "--faults 5.0: a share of requests, from 0 to 1"),
    (["serve", "c.yaml", "--faults", "nan"], "--faults nan"),
    (["serve", "c.yaml", "--faults", "-1"], "--faults -1.0"),
    (["serve", "c.yaml", "--adapter", "c.yaml"], "--adapter c.yaml: not a trained arm's adapter folder"),
    (["serve", "c.yaml", "--adapter", "nowhere"], "--adapter nowhere: not a trained arm's adapter folder"),
])
def test_a_stage_before_its_input_and_bad_serve_arguments_are_one_line_before_any_model_loads(tmp_path, args, words):
    (tmp_path / "c.yaml").write_text("run_dir: run\nmodel:\n  name: no/such-model\n")  # loading it would fail otherwise
    out = _delia(*args, "--port", "0", cwd=tmp_path) if args[0] == "serve" else _delia(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert words in out.stderr, out.stderr
