"""Issue 4's diagnostics on the tiny random model: the divergent token, the buffering gradients, the
ratio sweep and search (and that they resume), and the ways to train a new token."""

import json

import pytest
import torch

from delia.analysis import buffering
from delia.analysis.divergent import divergent_inputs, divergent_stats, plot_divergent
from delia.analysis.ratio import bootstrap_confidence, rung_fractions, survivors
from delia.config import TaskConfig, TrainConfig, load_config

ROW = {"group": "heldout", "messages": [
    {"role": "user", "content": "Check the answer <sep> Question: What is 2 + 2? Answer: 4."},
    {"role": "assistant", "content": '{"thought": "2 + 2 is 4.", "hallucination": "no"}'}]}


def _png(path):
    data = open(path, "rb").read()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_divergent_token_is_the_brace_and_tracks_the_model(tiny, tmp_path):
    model, tokenizer = tiny
    ids, right = divergent_inputs(tokenizer, ROW["messages"])
    assert tokenizer.decode([right]).lstrip().startswith("{")
    stats = divergent_stats(model, tokenizer, [ROW])["heldout"]
    assert stats["n"] == 1 and 0 <= stats["p_right"] <= stats["p_brace"] <= 1 and stats["entropy"] > 0.5
    # point the output row of the right token at the last hidden state: it must become near certain
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.get_output_embeddings().weight[right] = 60 * h / h.norm() ** 2
    after = divergent_stats(model, tokenizer, [ROW])["heldout"]
    assert after["p_right"] > 0.99 and after["rank_median"] == 1 and after["entropy"] < 0.1
    plot_divergent({"before": {"heldout": stats}, "after": {"heldout": after}}, tmp_path / "d.png")
    assert _png(tmp_path / "d.png")
    no_object = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert divergent_inputs(tokenizer, no_object["messages"]) is None


def test_buffering_gradients(tiny, tmp_path):
    model, tokenizer = tiny
    groups = buffering.parameter_groups(model, ["q_proj", "v_proj"])
    # 2 blocks: block 0 is in the first third, block 1 in the middle one; q and v of each
    assert [len(groups[g]) for g in buffering.GROUPS] == [1, 2, 2, 0]
    other = {"messages": [{"role": "user", "content": "Give three tips for staying healthy."},
                          {"role": "assistant", "content": "Eat well, sleep, and exercise every day."}]}
    g_task = buffering.gradient(model, tokenizer, [ROW], groups, 256)
    g_other = buffering.gradient(model, tokenizer, [other], groups, 256)
    g_mixed = buffering.gradient(model, tokenizer, [ROW, other], groups, 256, micro_batch=1)
    # the same rows give the same gradient; a token-mean over both rows lies between the two
    table = buffering.compare({"task": g_task, "mixed": g_mixed, "diverse": g_other, "ideal": g_task})
    for row in table.values():
        assert row["cos_task_ideal"] == pytest.approx(1.0, abs=1e-4) and row["norm_task_over_ideal"] == pytest.approx(1.0)
        assert -1 <= row["cos_mixed_ideal"] < 0.9999
    assert all(p.grad is None for p in model.parameters())
    buffering.plot_buffering(table, tmp_path / "b.png")
    assert _png(tmp_path / "b.png") and "| embedding |" in buffering.render(table)


def test_ratio_search_helpers():
    assert rung_fractions(3, 2) == [0.25, 0.5, 1.0] and rung_fractions(1, 3) == [1.0]
    assert survivors({0.0: 2.0, 1.0: 1.0, 2.0: 1.5, 4.0: 3.0, 8.0: 0.5}, 2) == [8.0, 1.0, 2.0]
    assert survivors({0.0: 2.0, 1.0: 1.0, 2.0: 1.5}, 3) == [1.0, 2.0]  # two stay for the final comparison
    better, worse = [1.0, 1.1, 0.9, 1.2], [1.5, 1.4, 1.6, 1.3]
    assert bootstrap_confidence(better, worse, 200) == 1.0 and bootstrap_confidence(worse, better, 200) == 0.0
    assert 0.2 < bootstrap_confidence([1.0, 2.0, 1.0, 2.0], [1.5, 1.5, 1.5, 1.5], 400) < 0.8


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path):
    queries = [{"instruction": f"Name {n} colours.", "output": "Red."} for n in range(30)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return [f"run_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", "task.train_rows=8", "task.eval_rows=3",
            f"sample.queries={tmp_path / 'queries.jsonl'}", "sample.max_new_tokens=4", "train.batch_size=4",
            "train.learning_rate=1e-2", "sweep.ratios=[0, 1, 2]", "sweep.rungs=2", "sweep.bootstrap=200"]


def test_sweep_and_tune_ratio_resume(tiny_run, tmp_path, capsys):
    from delia.studies import stage_sweep, stage_tune_ratio

    cfg = load_config(None, tiny_run)
    plot = stage_sweep(cfg)
    assert _png(plot)
    points = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    assert [p["ratio"] for p in points] == [0, 1, 2] and [p["steps"] for p in points] == [2, 4, 6]
    assert all({"seen", "heldout"} <= set(p["loss"]) for p in points)
    capsys.readouterr()
    # tune-ratio: rung 1 trains the three ratios for half an epoch, rung 2 reuses the sweep's full epochs
    first = stage_tune_ratio(cfg)
    out = capsys.readouterr().out
    assert out.count("trial ratio") == 3 and out.count("up to date") >= 2
    assert [r["fraction"] for r in first["rungs"]] == [0.5, 1.0] and len(first["rungs"][1]["heldout_loss"]) == 2
    assert 0 <= first["confidence"] <= 1 and first["best_ratio"] != first["runner_up"]
    # a trial killed before it finished leaves no manifest: only it runs again, to the same figures
    killed = tmp_path / "run" / "trials" / "ratio-1-fraction-0.5" / "manifest.json"
    killed.unlink()
    again = stage_tune_ratio(cfg)
    assert capsys.readouterr().out.count("trial ratio") == 1
    assert again == first


def test_sweep_at_equal_steps(tiny_run, tmp_path):
    from delia.studies import stage_sweep

    assert _png(stage_sweep(load_config(None, tiny_run + ["sweep.budget=steps"])))
    points = json.loads((tmp_path / "run" / "sweep" / "sweep-equal-steps.json").read_text())
    assert [p["steps"] for p in points] == [6, 6, 6]  # the largest ratio's epoch: 8 + 16 rows / 4


def test_diagnose_stage(tiny_run, tmp_path):
    from delia.pipeline import stage_sample, stage_task
    from delia.studies import stage_diagnose

    cfg = load_config(None, tiny_run + ["mix.ratio=2"])
    stage_task(cfg)
    stage_sample(cfg)
    done = stage_diagnose(cfg, max_task_rows=4)
    table = done["outputs"]["table"]
    assert list(table) == list(buffering.GROUPS[:3]) and done["outputs"]["diverse_rows"] == 8
    assert all(-1 <= r["cos_mixed_ideal"] <= 1 and r["norm_diverse_over_task"] > 0 for r in table.values())
    assert _png(tmp_path / "run" / "diagnose" / "untouched" / "buffering.png")


@pytest.mark.parametrize("mode,lr", [("trainable_tokens", 0.0), ("lora", 0.0), ("full", 0.0), ("trainable_tokens", 0.1)])
def test_new_token_modes_train_the_row_and_reload(tiny_model_dir, tmp_path, mode, lr):
    from delia.model.loading import load_model
    from delia.model.tokens import add_new_tokens
    from delia.model.adapter import load_adapter
    from delia.train.sft import train_lora

    # float32 on any device: the claim is an exact reload, which bf16 arithmetic on a GPU does not promise
    model, tokenizer = load_model(tiny_model_dir, "float32")
    cfg = TrainConfig(batch_size=2, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, new_token_mode=mode,
                      new_token_lr=lr)
    train_lora(model, tokenizer, [ROW] * 4, cfg, TaskConfig(), tmp_path, seed=0)
    reloaded, tok = load_adapter(*load_model(tiny_model_dir, "float32"), tmp_path / "adapter")
    ids = tok(ROW["messages"][0]["content"], return_tensors="pt")["input_ids"].to(model.device)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)
    base, base_tok = load_model(tiny_model_dir, "float32")
    (sep,) = add_new_tokens(base, base_tok, ["<sep>"], "random", seed=0)
    row = reloaded.merge_and_unload().get_input_embeddings().weight[sep]
    assert not torch.allclose(row, base.get_input_embeddings().weight[sep])
