"""The arm registry: its tables are consistent, and an arm added as one entry runs through every stage."""

from __future__ import annotations

import pytest

from delia import DeliaError
from delia.arms import ARMS, REFERENCE, Arm, comparison, label, missing_dependency, trained_arms, training_order
from delia.config import load_config


def test_every_trait_names_something_that_exists():
    from delia.pipeline import MIX_DATA, PROMPTS

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
