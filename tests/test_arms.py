"""The arm and probe registries: their tables are consistent, and an arm or a probe added as one entry runs
through every stage."""

from __future__ import annotations

import json

import pytest

from delia import DeliaError
from delia.arms import ARMS, REFERENCE, Arm, comparison, label, missing_dependency, trained_arms, training_order
from delia.config import load_config


def test_every_trait_names_something_that_exists():
    from delia.data.baselines import PROMPTS
    from delia.data.mix import MIX_DATA

    assert len({a.label for a in ARMS.values()}) == len(ARMS)
    for arm in ARMS.values():
        assert not arm.trained or arm.data in MIX_DATA, arm.name
        assert not arm.prompt or arm.prompt in PROMPTS, arm.name
        assert not arm.continues_from or arm.continues_from in trained_arms(), arm.name
        assert (arm.budget != "none") == arm.trained, arm.name


def test_tables_close_on_the_reference_arm_and_training_respects_dependencies():
    assert comparison("Equal optimizer steps", ["delia", "common_equal_steps", "dmt_equal_steps"]) == \
        ["common_equal_steps", "dmt_equal_steps", "delia"]
    assert comparison("One epoch each (the paper's protocol)", ["delia", "common", "untouched"]) == \
        ["untouched", "common", "delia"]
    order = training_order(["dmt_equal_steps", "facts", "delia", "common", "untouched"])
    assert set(order) == {"dmt_equal_steps", "facts", "delia", "common"}
    assert order.index("delia") < order.index("dmt_equal_steps") and order.index("common") < order.index("dmt_equal_steps")
    assert "needs the common arm" in missing_dependency(["dmt", "delia"])
    assert f"needs the {REFERENCE} arm" in missing_dependency(["common", "common_equal_steps"])
    assert missing_dependency(["untouched", "common", "delia", "common_equal_steps"]) == ""
    assert label("untouched (mean init)") == "untouched (mean init)"


def test_config_refuses_an_arm_for_another_task_kind():
    with pytest.raises(DeliaError, match="'arms': dipmt is for translation tasks"):
        load_config(None, ["arms=[untouched, dipmt]"])


def test_one_new_entry_is_a_new_arm_in_every_stage(tiny_model_dir, tmp_path, monkeypatch):
    """A made-up arm (common rows with NEFTune noise) is added to the
    table alone; config, train, evaluate and report take it without another edit."""
    import delia.arms as arms
    from delia.pipeline import run_all

    new = Arm("noisy_common", "Noisy common tuning (1 epoch)", data="common", budget="epoch", neftune=True)
    monkeypatch.setitem(arms.ARMS, new.name, new)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, noisy_common]", "train.batch_size=4",
                             "evaluate.max_new_tokens=4"])
    report = run_all(cfg).read_text()
    assert "Noisy common tuning (1 epoch)" in report
    manifest = (tmp_path / "train" / "noisy_common" / "manifest.json").read_text()
    assert '"neftune_alpha"' in manifest and (tmp_path / "eval" / "noisy_common" / "metrics.json").exists()


def test_one_new_entry_is_a_new_probe_in_every_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """A made-up probe (the bare token as the whole instruction, as docs/arms.md writes it) is added to the
    table alone: the evaluate stage runs it, writes its figures and rows, and a changed setting it reads
    reruns the evaluation."""
    from delia.conversation import set_wording
    from delia.evaluate import probes
    from delia.evaluate.formatted import evaluate_formatted
    from delia.pipeline import stage_evaluate, stage_general, stage_task

    def bare_token(ev):
        assert ev.cfg.controls.other_token not in ev.generator.tokenizer.get_vocab()
        rows = ev.prompted([{**set_wording(r, ev.cfg.task.new_tokens[0]), "group": "bare"} for r in ev.eval_rows])
        metrics, generations = evaluate_formatted(ev.generator, rows, ev.cfg.task, ev.budget, ev.cfg.seed)
        return {"bare": metrics["bare"]}, {"bare.jsonl": generations}

    monkeypatch.setitem(probes.PROBES, "bare", probes.Probe(bare_token, settings=("sample",)))
    overrides = [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=4", "task.eval_rows=2",
                 "arms=[untouched]", "evaluate.max_new_tokens=4", "controls.rows=0", "controls.general_queries=0"]
    cfg = load_config(None, overrides)
    stage_task(cfg)
    stage_general(cfg)
    done = stage_evaluate(cfg, "untouched")
    folder = tmp_path / "eval" / "untouched"
    bare = [json.loads(line) for line in (folder / "bare.jsonl").read_text().splitlines()]
    assert len(bare) == 4 and {b["group"] for b in bare} == {"bare"}
    assert json.loads((folder / "metrics.json").read_text())["bare"]["n"] == 4 == done["outputs"]["bare"]["n"]
    order = probes.applicable(cfg)  # before the controls, which add their token to the model it reads
    assert "sample" in done["settings"] and order.index("bare") < order.index("controls") < order.index("switch")
    again = stage_evaluate(load_config(None, overrides + ["sample.temperature=0.5"]), "untouched")
    assert again["key"] != done["key"]
