"""Controls, drift and leakage (issue: what tuning costs the model, and whether the token became a switch)."""

from __future__ import annotations

import json

import pytest
from conftest import varied_model

from delia.config import ControlsConfig, TaskConfig, load_config
from delia.evaluate.controls import CONTROLS, control_rows, switch_consistency, without_token_sentences
from delia.evaluate.formatted import evaluate_formatted, leakage
from delia.evaluate.parse import opens_object

TASK = TaskConfig()
OBJECT = '{"thought": "The answer is right.", "hallucination": "no"}'


def _row(i: int, group: str, wording: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Question: What is {i} + 1?\nAnswer: {i + 1}.\n\n{wording}"},
                         {"role": "assistant", "content": OBJECT}], "wording": wording, "group": group}


ROWS = [_row(i, "seen", "Check whether the answer contains a hallucination. Follow the <sep> format.") for i in range(4)] + \
       [_row(i, "heldout", "Please audit the reply above for false claims. Shape your reply according to <sep>.")
        for i in range(4, 8)]


class Stub:
    """A generator that always answers `text`."""

    batch_size = 4

    def __init__(self, text: str):
        self.text = text

    def batches(self, requests, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        yield [(r, self.text, 12) for r in requests]


def test_attempted_counts_a_malformed_object_and_not_prose():
    keys = ["thought", "hallucination"]
    assert opens_object("{'thought': 'it is fine, \"hallucination': no", keys)  # broken quotes: still the format
    assert opens_object('Sure.\n{\n  "thought": "x"}', keys)
    assert not opens_object("There is no hallucination in the answer.", keys)
    assert not opens_object("Use {curly braces} for sets.", keys)


def test_controls_rewrite_only_the_instruction():
    assert without_token_sentences("Check the answer. Follow the <sep> format.", ["<sep>"]) == "Check the answer."
    rows = control_rows(ROWS, TASK, ControlsConfig(rows=4))
    assert [r["group"] for r in rows] == list(CONTROLS) * 4
    assert [r["source_group"] for r in rows[::4]] == ["heldout", "heldout", "seen", "seen"]
    by = {r["group"]: r["messages"][0]["content"] for r in rows[:4]}
    head = "Question: What is 4 + 1?\nAnswer: 5.\n\n"
    assert by["token_only"] == head + "<sep>"
    assert by["token_removed"] == head + "Please audit the reply above for false claims."
    assert by["negated"] == head + "Please audit the reply above for false claims. Do not use the <sep> format; " \
                                   "answer in one plain sentence."
    assert by["other_token"] == head + "Please audit the reply above for false claims. Shape your reply according to <ctl>."
    assert all(r["messages"][1]["content"] == OBJECT for r in rows)
    assert control_rows(ROWS, TASK, ControlsConfig(rows=0)) == []


def test_a_model_that_always_answers_the_object_fails_every_negated_row_and_hits_every_token_only_row():
    rows = control_rows(ROWS, TASK, ControlsConfig(rows=8))
    metrics, _ = evaluate_formatted(Stub(OBJECT), rows, TASK, budget=64)
    assert metrics["negated"]["attempted"] == 1.0 and metrics["negated"]["n"] == 8  # not one answer in prose
    assert metrics["token_only"]["format_accuracy"] == 1.0 and metrics["token_only"]["attempted"] == 1.0
    assert metrics["token_removed"]["attempted"] == metrics["other_token"]["attempted"] == 1.0
    prose, _ = evaluate_formatted(Stub("No hallucination here."), rows, TASK, budget=64)
    assert prose["negated"]["attempted"] == 0.0 and prose["token_only"]["format_accuracy"] == 0.0
    leak = leakage([(OBJECT, 12), ("Hello.", 3)], [5, 5], TASK, budget=12)
    assert leak["attempted"] == leak["strict"] == 0.5 and leak["cut"] == 0.5 and leak["untouched_mean_tokens"] == 5


class Switch(Stub):
    """A generator whose format follows the token and only the token: the object when the instruction
    (the prompt's last paragraph) is one of the task's own wordings with the token, or the bare token."""

    def batches(self, requests, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        wordings = {r["wording"] for r in ROWS} | {"<sep>"}
        yield [(r, OBJECT if r.messages[-1]["content"].split("\n\n")[-1] in wordings else "It is right.", 5)
               for r in requests]


@pytest.mark.parametrize("generator, expected", [(Stub(OBJECT), 0.0), (Stub("It is right."), 0.0), (Switch(""), 1.0)])
def test_switch_consistency_counts_a_row_only_when_every_variant_is_right(generator, expected):
    controls = control_rows(ROWS, TASK, ControlsConfig(rows=6))
    _, answers = evaluate_formatted(generator, ROWS, TASK, budget=64)
    _, scored = evaluate_formatted(generator, controls, TASK, budget=64)
    found = switch_consistency(answers, scored)
    assert found["n"] == 6 and found["consistency"] == expected
    assert found["groups"] == ["instruction", *CONTROLS]
    assert sorted(r["row"] for r in found["rows"]) == [0, 1, 2, 4, 5, 6]  # held-out wordings first, then seen
    # one variant wrong spoils its row alone: the negated answer of row 4 is the object
    spoiled = [dict(c, formatted=True, attempted=True) if (c["row"], c["group"]) == (4, "negated") else c for c in scored]
    assert switch_consistency(answers, spoiled)["consistency"] == expected * 5 / 6
    # a backend without the never-trained token: the other groups count
    without = switch_consistency(answers, [c for c in scored if c["group"] != "other_token"])
    assert "other_token" not in without["groups"] and without["consistency"] == expected


def test_kl_of_the_untouched_model_to_itself_is_exactly_zero_and_positive_after_a_change(tiny_model_dir):
    import torch

    from delia.analysis.drift import answer_logprobs, kl_per_token, nll_per_token
    from delia.model.loading import load_model
    from delia.model.tokens import add_new_tokens

    rows = [([{"role": "user", "content": f"Name {n} colours."}], "Red, green and blue.") for n in range(5)]
    untouched = load_model(tiny_model_dir)
    reference = answer_logprobs(*untouched, rows, 128, batch_size=2)
    same = kl_per_token(reference, load_model(tiny_model_dir), rows, 128, batch_size=2)
    assert same["kl"] == 0.0 and same["tokens"] > 0
    assert kl_per_token(reference, None, rows, 128) == same  # the untouched model itself: not computed again
    changed = load_model(tiny_model_dir)
    add_new_tokens(*changed, ["<sep>"], "mean")  # one more row in the tied output layer
    with torch.no_grad():
        changed[0].model.layers[0].mlp.down_proj.weight.mul_(1.5)
    moved = kl_per_token(reference, changed, rows, 128, batch_size=3)
    assert moved["kl"] > 0 and moved["tokens"] == same["tokens"]
    # per row, in the rows' order (batches run by length): each row's figure as if measured alone
    uneven = [(m, a * (i + 1)) for i, (m, a) in enumerate(reversed(rows))]
    both = kl_per_token(answer_logprobs(*untouched, uneven, 128, batch_size=2), changed, uneven, 128, batch_size=2)
    for i, row in enumerate(uneven):
        alone = kl_per_token(answer_logprobs(*untouched, [row], 128), changed, [row], 128)
        assert both["per_row"][i][1] == alone["tokens"]
        assert abs(both["per_row"][i][0] - alone["kl"] * alone["tokens"]) < 1e-3
    assert both["per_row"][0][1] < both["per_row"][-1][1]
    nll = nll_per_token(*untouched, rows, 128)
    assert nll["nll"] > 0 and nll["tokens"] == same["tokens"]


def test_general_queries_are_disjoint_from_the_sampled_ones_and_every_arm_gets_costs(tiny_model_dir, tmp_path):
    from delia.pipeline import run_all
    from delia.runfolder import read_jsonl

    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours.", "output": "Red."}}\n'
                                              for n in range(40)) + '{"instruction": "Name 0 colours."}\n')
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, icl, common, delia]", "train.batch_size=4",
                             "evaluate.max_new_tokens=4", f"sample.queries={tmp_path / 'q.jsonl'}",
                             "sample.max_new_tokens=1", "mix.ratio=2", "controls.rows=2",
                             "controls.general_queries=6", "controls.general_max_new_tokens=4"])
    report = run_all(cfg).read_text()
    sampled = {r["messages"][0]["content"] for r in read_jsonl(tmp_path / "sample" / "diverse.jsonl")}
    general = read_jsonl(tmp_path / "general" / "queries.jsonl")
    queries = [g["messages"][0]["content"] for g in general]
    # the last query repeats a sampled one: skipped
    assert len(queries) == 6 and not set(queries) & sampled and len(set(queries)) == 6
    assert all(g["reference"] == "Red." for g in general)
    metrics = {arm: json.loads((tmp_path / "eval" / arm / "metrics.json").read_text())
               for arm in ("untouched", "icl", "common", "delia")}
    assert metrics["untouched"]["drift"]["kl"] == 0.0
    assert metrics["common"]["drift"]["kl"] > 0 and metrics["icl"]["drift"]["kl"] > 0  # examples before every query
    for arm, m in metrics.items():
        assert set(CONTROLS) <= set(m) and m["leakage"]["n"] == 6 and m["drift"]["nll"] > 0
        assert m["switch"]["n"] == 2 and len(read_jsonl(tmp_path / "eval" / arm / "switch.jsonl")) == 2
    for heading in ("Does the format follow the token", "What tuning costs on general queries", "On the front"):
        assert heading in report, heading
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one new token: every answer kept is cut (one that ends at once is empty, and another query is asked;
    # at 4 tokens a draw could end by itself, and the draw's seed follows the temp folder's name); the mix
    # carries the flag that masks their end-of-turn
    mixed = [r for r in read_jsonl(tmp_path / "mix" / "delia.jsonl") if r["source"] == "diverse"]
    assert mixed and all(r["open_end"] and not r["ended"] for r in mixed)
    assert f"did not end by themselves (cut at sample.max_new_tokens 1): {len(mixed)} of {len(mixed)} rows" in report


@pytest.mark.parametrize("bad", ["controls.rows=-1", "controls.other_token=<sep>", "controls.negated=[no token here]",
                                 "controls.general_max_new_tokens=0"])
def test_bad_control_settings_are_refused(bad):
    from delia import DeliaError

    with pytest.raises(DeliaError, match="controls"):
        load_config(None, [bad])


def test_general_says_when_the_sample_leaves_fewer_queries_than_asked(tiny_model_dir, tmp_path, capsys):
    from delia.pipeline import stage_general, stage_sample, stage_task
    from delia.runfolder import read_jsonl

    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours.", "output": "Red."}}\n' for n in range(20)))
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, delia]", f"sample.queries={tmp_path / 'q.jsonl'}",
                             "sample.max_new_tokens=4", "mix.ratio=2", "controls.general_queries=6",
                             "controls.general_max_new_tokens=4"])
    stage_task(cfg)
    stage_sample(cfg)
    assert stage_general(cfg)["outputs"]["rows"] == 4  # 20 queries, 16 sampled
    assert len(read_jsonl(tmp_path / "general" / "queries.jsonl")) == 4
    assert "only 4 of controls.general_queries 6 are left after the 16 queries" in capsys.readouterr().out


def test_drift_with_the_prompt_read_once_equals_a_plain_pass_per_answer(tiny_model_dir):
    """arm_costs reads each prompt once and keeps its KV cache for the untouched answer and the reference:
    the KL and NLL equal those of one plain forward pass over each whole conversation."""
    import torch

    from delia.analysis.drift import answer_logprobs, arm_costs
    from delia.model.chat import IGNORE, tokenize_chat
    from delia.model.loading import load_model

    untouched, arm = load_model(tiny_model_dir, "float32"), load_model(tiny_model_dir, "float32")
    with torch.no_grad():
        arm[0].model.layers[0].mlp.down_proj.weight.mul_(1.5)
    prompts = [[{"role": "user", "content": "Name colours." + " Then birds." * n}] for n in range(5)]
    answers = ["Red and blue" * (n % 3 + 1) for n in range(5)]
    references = [None, "Green.", "A robin, a wren and a finch.", None, "Blue " * 9]

    def plain(model, msgs, answer, limit=0):  # (log-probabilities at the answer tokens, those tokens)
        e = tokenize_chat(model[1], msgs + [{"role": "assistant", "content": answer}], 128)
        targets = [i for i, label in enumerate(e["labels"]) if label != IGNORE and i > 0][: limit or None]
        with torch.no_grad():
            logp = torch.log_softmax(model[0](input_ids=torch.tensor([e["input_ids"]])).logits[0].float(), -1)
        return logp[[t - 1 for t in targets]], torch.tensor([e["input_ids"][t] for t in targets])

    reference = answer_logprobs(*untouched, list(zip(prompts, answers)), 128, batch_size=2)
    kl, nll = arm_costs(reference, arm, prompts, answers, references, 128, batch_size=3, max_reference_tokens=4)
    for i, (msgs, answer) in enumerate(zip(prompts, answers)):
        ref, _ = plain(untouched, msgs, answer)
        assert torch.allclose(reference[i], ref, atol=1e-4)
        own, _ = plain(arm, msgs, answer)
        assert abs(kl["per_row"][i][0] - float((ref.exp() * (ref - own)).sum())) < 1e-4 and kl["per_row"][i][1] == len(ref)
    pairs = [plain(arm, m, r, 4) for m, r in zip(prompts, references) if r]
    assert nll["tokens"] == sum(len(t) for _, t in pairs) and all(len(t) <= 4 for _, t in pairs)
    expected = sum(float(-lp[torch.arange(len(t)), t].sum()) for lp, t in pairs) / nll["tokens"]
    assert abs(nll["nll"] - expected) < 1e-4 and kl["kl"] > 0


def test_greedy_answers_going_on_from_the_drift_pass_equal_plain_generation(tiny_model_dir):
    """The leakage probe's answers go on from where the arm's teacher-forced pass over the untouched
    model's answers showed its greedy answer leaving them: the same answers as generating them whole,
    with the local and the gist generators."""
    import torch

    from delia.analysis.drift import answer_logprobs, arm_costs
    from delia.evaluate.formatted import generate_answers
    from delia.model.generate import LocalGenerator
    from delia.model.gist import GistGenerator

    untouched = varied_model(tiny_model_dir)
    prompts = [[{"role": "user", "content": text}] for text in
               ("Give three tips.", "What is 12 + 30?", "Name the capital of France.", "Check the answer.",
                "Eat well, sleep.", "Question: keys?")]
    budget = 12
    answers = [a for a, _ in generate_answers(LocalGenerator(*untouched, batch_size=4), prompts, budget)]
    reference = answer_logprobs(*untouched, [(p, a) for p, a in zip(prompts, answers)], 128, batch_size=4)
    for scale in (1.0, 1.5):
        arm = varied_model(tiny_model_dir, scale)
        own = []  # the arm's greedy answer ids, one prompt at a time
        for messages in prompts:
            ids = arm[1].apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = arm[0].generate(**ids, max_new_tokens=budget, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
            own.append(out[: next((j for j, t in enumerate(out) if t == arm[1].eos_token_id), len(out))])
        for gen in (LocalGenerator(*arm, batch_size=4), GistGenerator(*arm, ["<sep>"], batch_size=4)):
            kl, _ = arm_costs(reference, arm, prompts, answers, [None] * len(prompts), 128, 3,
                              greedy=(set(gen._stop_ids()), budget))
            starts = kl["greedy"]
            assert all(known == tuple(ids[: len(known)]) and known for (known, _), ids in zip(starts, own))
            plain = generate_answers(gen, prompts, budget)
            assert generate_answers(gen, prompts, budget, starts=starts) == plain
            # longer starts than the untouched answers give here, every length from none to the whole answer
            cut = [(tuple(ids[: (3 * i) % (len(ids) + 1)]), (3 * i) % (len(ids) + 1) == len(ids)) for i, ids in enumerate(own)]
            assert any(0 < len(k) < len(ids) for (k, _), ids in zip(cut, own)) and any(done for _, done in cut)
            assert generate_answers(gen, prompts, budget, starts=cut) == plain
