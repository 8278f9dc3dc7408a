"""`delia experiment` on the tiny random model: every configured row in the report, shared sample
answers, and a SIGKILL in the middle that costs no finished run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from delia import DeliaError
from delia.experiment import load_experiment

BASE = """
model: {{name: {model}}}
task: {{train_rows: 8, eval_rows: 2}}
sample: {{queries: queries.jsonl, max_new_tokens: 4}}
train: {{batch_size: 4}}
evaluate: {{max_new_tokens: 4}}
"""
EXPERIMENT = """
base: base.yaml
dir: exp
seeds: [0, 1]
set: ["arms=[untouched, delia]", "mix.ratio=2"]
runs:
  - name: all
  - name: more-diverse
    set: ["mix.ratio=3"]
  - name: one-wording
    set: ["task.diversify=false"]
by: mix.ratio
"""


@pytest.fixture
def experiment(tiny_model_dir, tmp_path):
    queries = [{"instruction": f"Name {n} colours.", "output": "Red."} for n in range(40)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "base.yaml").write_text(BASE.format(model=tiny_model_dir))
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    return tmp_path


def _cli(cwd, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "delia.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _kill_when(cwd, path):
    proc = _cli(cwd, "experiment", "exp.yaml", start_new_session=True)
    deadline = time.time() + 300
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]  # still running: kill it mid-way
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.exists()


def test_experiment_survives_sigkill_and_reports_every_row(experiment):
    first_run = experiment / "exp" / "all" / "seed-0"
    _kill_when(experiment, first_run / "report.md")  # between two runs
    trained = json.loads((first_run / "train" / "delia" / "manifest.json").read_text())["finished"]
    def files():
        return {p: p.stat().st_mtime_ns for p in (experiment / "exp").rglob("*") if p.parent != experiment / "exp"}

    before = files()
    partial = _cli(experiment, "experiment", "exp.yaml", "--report-only")
    assert partial.wait(timeout=300) == 0
    so_far = (experiment / "exp" / "report.md").read_text()
    assert "| all | DELIA (1 epoch) |" in so_far and "seeds 0 (" in so_far
    assert "Not finished when this report was made (`--report-only`): all seed 1, more-diverse seed 0" in so_far
    assert files() == before  # nothing ran: no run folder touched
    second = experiment / "exp" / "all" / "seed-1" / "train" / "delia" / "manifest.json"
    _kill_when(experiment, second)  # inside a run: trained, not yet evaluated
    trained_second = json.loads(second.read_text())["finished"]

    again = _cli(experiment, "experiment", "exp.yaml")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    # the finished run and the finished stage were not redone
    assert json.loads((first_run / "train" / "delia" / "manifest.json").read_text())["finished"] == trained
    assert json.loads(second.read_text())["finished"] == trained_second
    report = (experiment / "exp" / "report.md").read_text()
    for run in ("all", "more-diverse", "one-wording"):
        assert f"| {run} | Untouched model |" in report and f"| {run} | DELIA (1 epoch) |" in report
    assert "±" in report  # two seeds: a mean and a spread
    delia_row = next(line for line in report.splitlines() if line.startswith("| all | DELIA (1 epoch) |"))
    assert delia_row.split("|")[-2].strip().replace(",", "").isdigit()  # trained tokens
    assert "| all | Untouched model |" in report and report.split("| all | Untouched model |")[1].split("\n")[0].endswith("| - |")
    assert "| one-wording | untouched (random init) |" in report and "| all | DELIA (1 epoch) |" in report
    # pivoted on mix.ratio: ratio 2 (all, one-wording) and ratio 3 (more-diverse), one column each
    assert "| Arm | mix.ratio = 2.0 | mix.ratio = 3.0 |" in report
    pivot = report.split("## Format accuracy by mix.ratio (held-out wordings)")[1].split("##")[0]
    assert [line.count("%") for line in pivot.splitlines() if line.startswith("| DELIA")] == [2]
    assert "middle block, by mix.ratio" in report
    # each arm against DELIA, paired over the two seeds and their rows
    paired = report.split("### Against DELIA: paired bootstrap over 2 seed(s)")[1].split("\n\n")[1]
    untouched = paired.splitlines()[2]
    assert untouched.startswith("| Untouched model | +0.0 [") and untouched.count("[") == 3  # format, KL, switch
    # DELIA moved the tiny model on every general query: the untouched one is 0
    assert untouched.split(" | ")[4] == "**yes**" and "Switch, arm − DELIA" in paired
    # each trained arm of a later run against itself in the first run, paired over both seeds
    across = report.split("## Each arm against itself in run all")[1].split("\n\n")[2].splitlines()
    more = next(line for line in across if line.startswith("| more-diverse | DELIA (1 epoch) | 2 | "))
    # the same evaluation rows are paired; the general queries are not the same (the ratio-3 run sampled more
    # of the 40 queries, so fewer were left over): no drift comparison rather than an unpaired one
    cells = [c.strip() for c in more.strip("|").split("|")]  # run, arm, seeds, then (difference, beyond noise) x 3
    assert "[" in cells[3] and cells[5:7] == ["-", "-"] and "[" in cells[7] and not any("Untouched" in line for line in across)
    assert "Switch, run − all" in report
    assert report.count("Seconds per seed") == 1 and "exp/all/seed-0/analysis/divergent.png" in report
    # the ratio-3 run of seed 0 answered only the queries the ratio-2 run had not
    sample = json.loads((experiment / "exp" / "more-diverse" / "seed-0" / "sample" / "manifest.json").read_text())
    assert sample["outputs"]["rows"] == 24 and sample["outputs"]["resumed_from_cache"] >= 16


@pytest.mark.parametrize("text,message", [
    ("base: b.yaml\nruns: []\ndir: x\n", "'runs': expected a non-empty list"),
    ("base: b.yaml\ndir: x\nruns: [{name: a}, {name: a}]\n", "exp.yaml:3: 'runs[1].name'"),
    ("base: b.yaml\ndir: x\nruns:\n  - name: a\n  - name: b\n    set: mix.ratio=2\n", "exp.yaml:6: 'runs[1].set'"),
    ("base: b.yaml\ndir: x\nruns: [{name: ../up}]\n", "'runs[0].name'"),
    ("base: b.yaml\ndir: x\nbase: c.yaml\nruns: [{name: a}]\n", "exp.yaml:3: 'base' is given twice"),
    ("base: b.yaml\ndir: x\nseeds: [zero]\nruns: [{name: a}]\n", "'seeds'"),
    ("base: b.yaml\ndir: x\nruns: [{name: a, set: mix.ratio=2}]\n", "'runs[0].set'"),
    ("base: b.yaml\ndir: x\nrun: []\n", "unknown key 'run'"),
    ("base: [b.yaml\n", "exp.yaml:2: invalid YAML"),
    ("base: b.yaml\ndir: x\nruns: [{name: a}]\nby: task.nope\n", "'by': 'task.nope' is not a setting"),
    ("base: b.yaml\ndir: 5\nruns: [{name: a}]\n", "exp.yaml:2: 'dir': expected a path, got 5"),
    ("base: b.yaml\ndir: [a, b]\nruns: [{name: a}]\n", "'dir': expected a path"),
    ("base: b.yaml\ndir: ''\nruns: [{name: a}]\n", "'dir': expected a path"),
    ("base: b.yaml\ndir: .\nruns: [{name: a}]\n", "'dir': '.' is the filesystem root, the current folder or one above"),
    ("base: b.yaml\ndir: {tmp}/b.yaml\nruns: [{name: a}]\n", "b.yaml is a file, not a folder"),
    ("base: 5\ndir: x\nruns: [{name: a}]\n", "exp.yaml:1: 'base': expected a path, got 5"),
    ("base: nope.yaml\ndir: x\nruns: [{name: a}]\n", "'base': 'nope.yaml' is not a config file"),
    ("base: b.yaml\ndir: x\nruns: [{name: " + "a" * 300 + "}]\n", "'runs[0].name'"),
    ('base: b.yaml\ndir: x\nruns: [{name: "a\\0b"}]\n', "'runs[0].name'"),
])
def test_bad_experiment_files_get_one_line(tmp_path, text, message):
    (tmp_path / "b.yaml").write_text("seed: 0\n")
    (tmp_path / "exp.yaml").write_text(text.replace("{tmp}", str(tmp_path)))
    with pytest.raises(DeliaError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as e:
        load_experiment(tmp_path / "exp.yaml")
    assert "\n" not in str(e.value) and "exp.yaml" in str(e.value)


EXPERIMENTS = __import__("pathlib").Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_shipped_experiments_are_valid(name):
    from delia.experiment import run_configs

    configs = list(run_configs(load_experiment(EXPERIMENTS / name)))
    assert configs and all(cfg.arms for _, _, cfg in configs)


def test_a_report_lists_only_the_arms_its_config_runs(tmp_path):
    """A run folder analysed before with more arms keeps their distances; the report reads only this
    config's arms (and the untouched model's init variants, always analysed)."""
    from delia.config import load_config
    from delia.report.tables import collect
    from delia.runfolder import RunFolder

    cfg = load_config("configs/demo.yaml", [f"run_dir={tmp_path / 'run'}", "arms=[untouched, delia]"])
    for name in ("token_distance.json", "divergent.json"):
        path = RunFolder(cfg.run_dir).analysis(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"untouched (random init)": {}, "delia": {}, "kl_anchor": {}}))
    data = collect(cfg)
    assert list(data["token_distance"]) == list(data["divergent"]) == ["untouched (random init)", "delia"]


def test_report_only_names_a_run_whose_report_is_cut_short(tmp_path):
    from delia.experiment import run_experiment

    (tmp_path / "b.yaml").write_text("arms: [untouched]\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: b.yaml\ndir: {tmp_path / 'exp'}\nruns: [{{name: whole}}, {{name: cut}}]\n")
    for name, text in (("whole", "{}"), ("cut", '{"arms": {"untou')):
        (tmp_path / "exp" / name / "seed-0").mkdir(parents=True)
        (tmp_path / "exp" / name / "seed-0" / "report.json").write_text(text)
    report = run_experiment(exp, report_only=True).read_text()
    assert "Not finished when this report was made (`--report-only`): cut seed 0 (its report.json is cut short" in report


def test_a_run_whose_task_fails_gets_no_shared_cache_first(tiny_model_dir, tmp_path):
    from delia.experiment import run_experiment

    (tmp_path / "b.yaml").write_text(f"model:\n  name: {tiny_model_dir}\narms: [untouched, delia]\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: b.yaml\ndir: {tmp_path / 'exp'}\nruns:\n  - name: bad\n    set: [task.source={tmp_path / 'none.jsonl'}]\n"
                   "  - name: good\n")
    cache = tmp_path / "exp" / "good" / "seed-0" / "sample" / "cache.jsonl"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"key": "k", "answer": "a", "tokens": 1}\n')
    with pytest.raises(DeliaError, match="none.jsonl"):
        run_experiment(exp)
    assert not (tmp_path / "exp" / "bad" / "seed-0" / "sample").exists()


def test_a_report_of_a_run_that_has_not_run_is_refused(tmp_path):
    import contextlib
    import io

    from delia.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["report", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}"])
    assert code == 2 and "nothing to report: no stage has finished" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "run" / "report.md").exists()
