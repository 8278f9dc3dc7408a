"""Baselines on the tiny random model: model arithmetic decoding, fact rows, in-context examples, and
every baseline arm producing its row of the report."""

import json

import pytest
import torch
from safetensors.torch import load_file

from delia.data.baselines import default_facts, fact_rows, icl_prefix
from delia.model.arithmetic import ArithmeticGenerator, describe_tokens
from delia.config import TaskConfig, load_config
from delia.model.generate import LocalGenerator, Request

TASK = TaskConfig()
PROMPTS = [[{"role": "user", "content": f"Check {i} + {i} = {2 * i} and reply in the <sep> format."}] for i in range(3)]


def _run(gen, prompts):
    reqs = [Request(key=str(i), messages=p) for i, p in enumerate(prompts)]
    return [text for batch in gen.batches(reqs, max_new_tokens=6) for _, text, _ in batch]


def test_arithmetic_lambda_zero_is_greedy_on_the_described_prompt(tiny):
    described = [describe_tokens(p, TASK) for p in PROMPTS]
    assert "<sep> (a JSON object with the keys thought and hallucination)" in described[0][0]["content"]
    assert _run(ArithmeticGenerator(*tiny, TASK, lam=0.0, batch_size=1), PROMPTS) == \
        _run(LocalGenerator(*tiny, batch_size=1), described)


def test_arithmetic_without_the_token_is_plain_greedy(tiny):
    plain = [[{"role": "user", "content": "Give three tips for staying healthy."}]]
    assert _run(ArithmeticGenerator(*tiny, TASK, lam=2.0, batch_size=1), plain) == \
        _run(LocalGenerator(*tiny, batch_size=1), plain)


def test_fact_rows_cover_every_fact_evenly():
    facts = default_facts(TASK)
    assert facts[0] == "<sep> means a JSON object with the keys thought and hallucination." and len(facts) == 3
    rows = fact_rows(facts, TASK, 5)
    assert [sum(r["messages"][1]["content"] == f for r in rows) for f in facts] == [5, 5, 5]
    assert all("<sep>" in r["messages"][0]["content"] and r["source"] == "fact" for r in rows)


def test_icl_prefix_is_k_turn_pairs_fixed_by_the_seed():
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    prefix = icl_prefix(rows, 3, seed=1)
    assert [m["role"] for m in prefix] == ["user", "assistant"] * 3 and prefix == icl_prefix(rows, 3, seed=1)
    assert prefix != icl_prefix(rows, 3, seed=2)


def test_every_baseline_arm_gets_its_row(tiny_model_dir, tmp_path):
    from delia.pipeline import run_all

    arms = ["untouched", "icl", "init_random", "init_mean", "init_description", "arithmetic", "common", "neftune",
            "facts", "dmt", "delia", "facts_equal_steps", "dmt_equal_steps"]
    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours.", "output": "Red."}}\n'
                                              for n in range(20)))
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", f"arms=[{', '.join(arms)}]", "train.batch_size=4",
                             "evaluate.max_new_tokens=4", "baselines.icl_k=2", "baselines.rows_per_fact=2",
                             f"sample.queries={tmp_path / 'q.jsonl'}", "sample.max_new_tokens=4", "mix.ratio=2",
                             "baselines.dmt_task_fraction=0.25", "baselines.arithmetic_lambdas=[0.5, 2]"])
    report = run_all(cfg).read_text()
    for label in ("Untouched model", "In-context examples", "random init (untrained)", "mean init (untrained)",
                  "description init (untrained)", "Model arithmetic", "Common instruction tuning (1 epoch)",
                  "NEFTune", "Fact-based injection (1 epoch)", "DMT", "Fact-based injection (DELIA's steps)",
                  "DMT (both stages together DELIA's steps)", "the best format accuracy on 16 training rows"):
        assert label in report, label
    steps = {arm: json.loads((tmp_path / "train" / arm / "manifest.json").read_text())["outputs"]
             for arm in ("common", "dmt", "delia", "facts_equal_steps", "dmt_equal_steps")}
    # DMT: stage 2 on 16 diverse + 2 task rows (5 steps of 4) after common's 2 steps
    assert steps["dmt"]["stage2_steps"] == 5 and steps["dmt"]["steps"] == 5 + steps["common"]["steps"]
    assert steps["facts_equal_steps"]["steps"] == steps["delia"]["steps"] == 6
    assert steps["dmt_equal_steps"]["stage2_steps"] == 6 - steps["common"]["steps"]
    assert steps["dmt_equal_steps"]["steps"] == 6
    arithmetic = json.loads((tmp_path / "eval" / "arithmetic" / "metrics.json").read_text())
    assert set(arithmetic["arithmetic_tuning"]) == {"0.5", "2"} and arithmetic["arithmetic_lambda"] in (0.5, 2)
    assert (tmp_path / "mix" / "facts.jsonl").read_text().count('"source": "fact"') == 6  # 3 facts x 2
    weights = {arm: load_file(tmp_path / "train" / arm / "adapter" / "adapter_model.safetensors")
               for arm in ("common", "neftune", "dmt")}
    # same rows, same seed: only NEFTune's noise tells the two adapters apart; DMT went on from common
    assert any(not torch.equal(weights["common"][k], weights["neftune"][k]) for k in weights["common"])
    assert weights["dmt"].keys() == weights["common"].keys()
    assert any(not torch.equal(weights["common"][k], weights["dmt"][k]) for k in weights["common"])
    icl = (tmp_path / "eval" / "icl" / "manifest.json").read_text()
    assert '"icl_k": 2' in icl


def test_untrained_baselines_need_the_local_backend(tiny_model_dir, tmp_path):
    from delia import DeliaError
    from delia.model.arm import arm_generator

    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "generation.backend=openai",
                             "generation.base_url=http://127.0.0.1:9/v1"])
    with pytest.raises(DeliaError, match="local backend only"):
        arm_generator(cfg, "arithmetic", 4)


def test_dmt_without_facts_mixes(tiny_model_dir, tmp_path):
    from delia.pipeline import stage_mix, stage_sample, stage_task

    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours.", "output": "Red."}}\n'
                                              for n in range(20)))
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[common, dmt]", f"sample.queries={tmp_path / 'q.jsonl'}",
                             "sample.max_new_tokens=4", "mix.ratio=2", "baselines.dmt_task_fraction=0.25"])
    stage_task(cfg)
    stage_sample(cfg)
    out = stage_mix(cfg)["outputs"]
    assert out["dmt_rows"] == 16 + 2 and "facts_rows" not in out
