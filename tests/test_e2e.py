"""`delia run` end to end on the embedded SmolLM2-135M-Instruct, with a handful of rows and steps."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

CONFIG = """
run_dir: run
seed: 0
model:
  name: smollm2-135m-instruct
task:
  train_rows: 8
  eval_rows: 2
sample:
  queries: queries.jsonl
  max_new_tokens: 16
  batch_size: 8
mix:
  ratio: 1
train:
  batch_size: 4
  micro_batch_size: 4
evaluate:
  max_new_tokens: 24
"""


def test_delia_run_end_to_end(tmp_path):
    queries = [{"instruction": f"Name {n} colours.", "output": "Red."} for n in range(2, 12)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = subprocess.run([sys.executable, "-m", "delia.cli", "run", "c.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "run" / "report.md").read_text()
    for label in ("Untouched model", "Common instruction tuning (1 epoch)", "DELIA (1 epoch)",
                  "Common instruction tuning (DELIA's steps)", "Equal optimizer steps",
                  "Distance of `<sep>` to its meaning", "untouched (random init)", "untouched (mean init)"):
        assert label in report
    assert (tmp_path / "run" / "analysis" / "token_distance.png").stat().st_size > 5000
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    delia, common = data["arms"]["delia"]["train"], data["arms"]["common"]["train"]
    assert delia["steps"] == 4 and common["steps"] == 2
    assert data["arms"]["common_equal_steps"]["train"]["steps"] == delia["steps"]
    for arm in data["arms"].values():
        assert arm["metrics"]["seen"]["n"] == 2 and arm["metrics"]["heldout"]["n"] == 2

    # the adapter loads back with peft and generates
    from delia.model.loading import load_model
    from delia.model.adapter import load_adapter

    model, tokenizer = load_adapter(*load_model("smollm2-135m-instruct"), tmp_path / "run" / "train" / "delia" / "adapter")
    assert tokenizer.convert_tokens_to_ids("<sep>") == len(tokenizer) - 1
    ids = tokenizer("Check it. Follow the <sep> format.", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3

    # a second run finds every stage done
    again = subprocess.run([sys.executable, "-m", "delia.cli", "run", "c.yaml"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    # task, sample, mix, 3 x train, general, 4 x evaluate, analyze
    assert again.returncode == 0 and again.stdout.count("up to date") == 12
