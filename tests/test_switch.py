"""The token as a switch: the counterfactual arms' rows stay apart from what the controls test, come from
the training rows only, are answered by the untouched model, and train with their decoy tokens untrained."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from delia.cli import main
from delia.config import NEGATED, load_config


def _delia(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


@pytest.mark.parametrize("override, words", [
    (f"counterfactual.negations=['  {NEGATED[1].upper()} ']", "'counterfactual.negations[0]'"),
    ("counterfactual.negations=['Please do not use it.']", "lacks {token}"),
    ("counterfactual.decoys=['<CTL>', '<dcy>']", "'counterfactual.decoys[0]'"),
    ("counterfactual.decoys=['<sep>']", "'counterfactual.decoys[0]'"),
])
def test_training_negations_and_decoys_equal_to_the_evaluations_are_refused_at_load(override, words, tmp_path):
    code, err = _delia("config", "configs/demo.yaml", "--set", override)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and words in err, err
    # the evaluation's own lists stay as they are: changing them does not make a training one acceptable
    code, err = _delia("config", "configs/demo.yaml", "--set", "controls.negated=['No {token} at all.']", "--set",
                       "counterfactual.negations=['no {token} AT all.']")
    assert code == 2 and "is an evaluation negation" in err


def _cfg(tiny_model_dir, tmp_path, *more):
    return load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=6",
                              "task.eval_rows=2", "sample.max_new_tokens=6", "sample.batch_size=1", "mix.ratio=2",
                              "evaluate.max_new_tokens=4", "train.batch_size=4", "controls.rows=2",
                              "controls.general_queries=4", "controls.general_max_new_tokens=4", *more])


def test_counterfactual_rows_come_from_training_rows_and_the_untouched_models_answers(tiny_model_dir, tmp_path):
    from delia.config import model_key
    from delia.data.counterfactual import row_key
    from delia.model.generate import LocalGenerator, Request
    from delia.model.loading import load_model
    from delia.pipeline import stage_mix, stage_sample, stage_task
    from delia.runfolder import fingerprint, read_jsonl

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, delia, counterfactual]")
    stage_task(cfg)
    stage_sample(cfg)
    mixed = stage_mix(cfg)["outputs"]
    train, evals = read_jsonl(tmp_path / "task" / "train.jsonl"), read_jsonl(tmp_path / "task" / "eval.jsonl")
    rows = read_jsonl(tmp_path / "mix" / "counterfactual.jsonl")
    made = [r for r in rows if "kind" in r]
    assert {r["of"] for r in made} == {row_key(r) for r in train} and not {r["of"] for r in made} & {row_key(r) for r in evals}
    kinds = mixed["counterfactual_kinds"]
    assert kinds["bare"] == 6 and kinds["task"] == 6 and kinds["diverse"] == 12 and mixed["counterfactual_rows"] == len(rows)
    untouched = LocalGenerator(*load_model(tiny_model_dir), batch_size=1)
    answered = [r for r in made if r["source"] == "counterfactual"]
    assert {r["kind"] for r in answered} <= {"plain", "negated", "decoy"} and answered
    s = cfg.sample
    for r in answered[:6]:  # the untouched model's own draw for the rewritten prompt, keyed and seeded as `sample`
        prompt = r["messages"][:-1]
        key = fingerprint({"model": model_key(cfg.model), "style": "plain", "max_new_tokens": s.max_new_tokens,
                           "temperature": s.temperature, "top_p": s.top_p, "seed": cfg.seed, "prompt": prompt})
        [[(_, text, _)]] = list(untouched.batches([Request(key=key, messages=prompt)], s.max_new_tokens,
                                                  s.temperature, s.top_p, cfg.seed))
        assert r["messages"][-1]["content"] == text
    users = [r["messages"][0]["content"] for r in made]
    assert not any(n.format(token="<sep>") in u for u in users for n in NEGATED)  # never the evaluation's
    assert sum("<dcy>" in u or "<alt>" in u or "<fmt>" in u for u in users) == kinds.get("decoy", 0) > 0
    bare = [r for r in made if r["kind"] == "bare"]
    assert all(r["messages"][0]["content"].endswith("\n\n<sep>") and r["source"] == "task" for r in bare)
    assert {r["messages"][-1]["content"] for r in bare} == {r["messages"][-1]["content"] for r in train}


def test_the_counterfactual_arms_train_with_their_decoys_untrained_and_report_the_switch(tiny_model_dir, tmp_path):
    from delia.model.arm import arm_model
    from delia.model.tokens import add_new_tokens
    from delia.pipeline import run_all

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, delia, counterfactual, counterfactual_anchor]")
    report = run_all(cfg).read_text()
    for arm in ("counterfactual", "counterfactual_anchor"):
        manifest = json.loads((tmp_path / "train" / arm / "manifest.json").read_text())
        assert manifest["settings"]["untrained_tokens"] == ["<dcy>", "<alt>", "<fmt>"]
        tokens = json.loads((tmp_path / "train" / arm / "adapter" / "delia_tokens.json").read_text())
        assert tokens["tokens"] == ["<sep>", "<dcy>", "<alt>", "<fmt>"] and tokens["untrained"] == ["<dcy>", "<alt>", "<fmt>"]
        metrics = json.loads((tmp_path / "eval" / arm / "metrics.json").read_text())
        assert metrics["switch"]["n"] == 2 and 0 <= metrics["switch"]["consistency"] <= 1
        model, tokenizer = arm_model(cfg, arm)
        merged = model.get_input_embeddings().weight  # arm_model merges a trained arm
        base, base_tok = arm_model(cfg, "untouched")
        add_new_tokens(base, base_tok, tokens["tokens"], tokens["init"], tokens["description"], tokens["seed"])
        init = base.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(tokens["tokens"])
        assert ids == base_tok.convert_tokens_to_ids(tokens["tokens"])
        assert not merged[ids[0]].equal(init[ids[0]])  # <sep> trained
        assert all(merged[i].equal(init[i]) for i in ids[1:])  # the decoys as they were added
    assert "anchor" in json.loads((tmp_path / "train" / "counterfactual_anchor" / "manifest.json").read_text())["settings"]["distill"]["mode"]
    assert "| Switch |" in report and "Counterfactual rows, KL-anchored (1 epoch)" in report


def test_the_gist_mask_hides_exactly_the_instruction_words_before_the_token(tiny):
    import torch

    from delia.model.chat import tokenize_chat
    from delia.model.tokens import add_new_tokens
    from delia.model.gist import gist_attention, gist_positions

    model, tokenizer = tiny
    add_new_tokens(model, tokenizer, ["<sep>"], "random")
    messages = [{"role": "user", "content": "Question: What is 2 + 2?\nAnswer: 4.\n\nCheck it and reply in the <sep> format."},
                {"role": "assistant", "content": '{"thought": "2 + 2 is 4.", "hallucination": "no"}'}]
    ids = tokenize_chat(tokenizer, messages, 256)["input_ids"]
    gist = gist_positions(tokenizer, messages, ["<sep>"], 256)
    token, hidden = gist[0], gist[1:]
    assert tokenizer.convert_ids_to_tokens(ids[token]) == "<sep>"
    assert tokenizer.decode([ids[i] for i in hidden]) == "Check it and reply in the "
    assert hidden == list(range(hidden[0], token))  # the words just before the token, nothing else
    mask = gist_attention(torch.ones(1, len(ids), dtype=torch.long), [gist], torch.float32)[0, 0] == 0
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    expected = causal.clone()
    expected[token + 1:, hidden] = False
    assert torch.equal(mask, expected)
    # without the token in the instruction, or cut off before it: no gist
    assert gist_positions(tokenizer, [{"role": "user", "content": "Name three colours."}], ["<sep>"], 256) == []
    assert gist_positions(tokenizer, messages, ["<sep>"], token) == []
    # the model honours the mask: what follows the token changes, what precedes it does not
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids])).logits[0]
        masked = model(input_ids=torch.tensor([ids]), attention_mask=gist_attention(
            torch.ones(1, len(ids), dtype=torch.long), [gist], torch.float32)).logits[0]
    assert torch.allclose(plain[: token + 1], masked[: token + 1], atol=1e-5)
    assert not torch.allclose(plain[token + 1:], masked[token + 1:], atol=1e-3)


def test_gist_decoding_applies_the_training_mask_to_every_generated_token(tiny):
    """GistGenerator (cached, batched, left-padded) gives what the training mask gives when the whole
    sequence is recomputed at every step; a prompt without the token decodes as LocalGenerator does."""
    import torch

    from delia.model.generate import LocalGenerator, Request, request_ids
    from delia.model.gist import GistGenerator, gist_attention, gist_positions
    from delia.model.tokens import add_new_tokens

    model, tokenizer = tiny
    add_new_tokens(model, tokenizer, ["<sep>"], "random")
    torch.manual_seed(0)
    with torch.no_grad():  # weights wide enough that greedy decoding leaves the newline it starts on
        for p in model.parameters():
            p.normal_(0, 0.3)
    with_token = [{"role": "user", "content": "Question: What is 2 + 2?\nAnswer: 4.\n\nCheck it and reply in the <sep> format."}]
    without = [{"role": "user", "content": "Give three tips for staying healthy."}]
    requests = [Request("a", with_token), Request("b", without)]
    got = {r.key: text for batch in GistGenerator(model, tokenizer, ["<sep>"], batch_size=2).batches(requests, 12)
           for r, text, _ in batch}

    def recomputed(messages):
        ids = request_ids(tokenizer, Request("", messages))
        gist = gist_positions(tokenizer, messages, ["<sep>"], len(ids), prompt=True)
        start = len(ids)
        with torch.no_grad():
            for _ in range(12):
                mask = gist_attention(torch.ones(1, len(ids), dtype=torch.long), [gist], torch.float32)
                nxt = int(model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                ids.append(nxt)
        return tokenizer.decode(ids[start:], skip_special_tokens=True).strip(), gist

    expected, gist = recomputed(with_token)
    assert len(gist) > 1 and got["a"] == expected and got["a"]
    plain = {r.key: text for batch in LocalGenerator(model, tokenizer, 2).batches(requests, 12) for r, text, _ in batch}
    assert got["b"] == plain["b"] == recomputed(without)[0]
    assert plain["a"] != got["a"]  # the mask changed what this model writes after the token


def test_the_gist_arm_trains_with_the_mask_on_the_rows_that_hold_the_token(tiny_model_dir, tmp_path):
    from delia.pipeline import stage_mix, stage_sample, stage_task, stage_train

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, delia, gist]")
    stage_task(cfg)
    stage_sample(cfg)
    mixed = stage_mix(cfg)["outputs"]
    stage_train(cfg, "delia")
    done = stage_train(cfg, "gist")
    out = done["outputs"]
    # the task rows, the bare-token rows and the negated ones ("Skip the <sep> layout ...") hold the token;
    # the self-sampled, plain and decoy rows have none to gist
    kinds = mixed["counterfactual_kinds"]
    assert out["gist_rows"] == kinds["task"] + kinds["bare"] + kinds["negated"] == 18
    assert done["settings"]["gist"] is True and out["steps"] > 0 and out["last_loss"] == out["last_loss"]  # not NaN


def test_token_first_trains_the_row_alone_then_the_task_with_that_row_frozen(tiny_model_dir, tmp_path):
    import torch

    from delia.model.arm import arm_model
    from delia.pipeline import stage_mix, stage_sample, stage_task, stage_train

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, delia, token_row, token_first]", "train.learning_rate=0.05")
    stage_task(cfg)
    stage_sample(cfg)
    stage_mix(cfg)
    stage_train(cfg, "delia")
    first = stage_train(cfg, "token_row")
    second = stage_train(cfg, "token_first")
    assert first["settings"]["token_only"] and first["settings"]["distill"]["mode"] == "description"
    assert second["settings"]["continue_as"] == "tokens" and second["outputs"]["steps"] > first["outputs"]["steps"]
    config = json.loads((tmp_path / "train" / "token_row" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS"

    untouched, tok = arm_model(cfg, "untouched")
    stage1, tok1 = arm_model(cfg, "token_row")  # merged
    sep = tok1.convert_tokens_to_ids("<sep>")
    plain = tok("Name three colours.", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the model frozen in stage 1: a prompt without the token is the untouched model's
        assert torch.equal(untouched(input_ids=plain).logits, stage1(input_ids=plain).logits[..., : len(tok)])
    init, _ = arm_model(cfg, "init_random")  # the row as every run adds it
    row1 = stage1.get_input_embeddings().weight[sep]
    assert not torch.allclose(row1, init.get_input_embeddings().weight[sep])  # stage 1 moved the row
    stage2, tok2 = arm_model(cfg, "token_first")
    merged = stage2.get_input_embeddings().weight
    assert tok2.convert_tokens_to_ids("<sep>") == sep and torch.equal(merged[sep], row1)  # frozen in stage 2


def test_the_steering_vector_changes_only_what_follows_the_token(tiny):
    import torch

    from delia.config import TaskConfig
    from delia.model.generate import LocalGenerator, Request
    from delia.model.steering import SteeringGenerator, decoder_layers, steering_vector
    from delia.model.tokens import add_new_tokens

    model, tokenizer = tiny
    add_new_tokens(model, tokenizer, ["<sep>", "<ctl>"], "mean")
    task = TaskConfig()
    rows = [{"messages": [{"role": "user", "content": f"Question: What is {n} + 1?\nAnswer: {n + 2}.\n\nReply in the <sep> format."},
                          {"role": "assistant", "content": "{}"}]} for n in range(4)]
    layer = len(decoder_layers(model)) // 2
    vector = steering_vector(model, tokenizer, rows, task, layer)
    assert vector.shape == (model.config.hidden_size,) and vector.norm() > 0
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    steer = SteeringGenerator(model, tokenizer, 50 * vector, layer, [sep], batch_size=2)
    ids = steer.prompt_ids(rows[0]["messages"][:-1])
    at = ids.index(sep)
    x = torch.tensor([ids])
    with torch.no_grad():
        plain = model(input_ids=x).logits[0]
        with steer._steered(torch.tensor([[i == at for i in range(len(ids))]])):
            steered = model(input_ids=x).logits[0]
    assert torch.equal(plain[:at], steered[:at]) and not torch.allclose(plain[at:], steered[at:], atol=1e-3)
    # prompts without the token (a general query, the never-trained <ctl> in its place) are the model's own
    requests = [Request(key="a", messages=[{"role": "user", "content": "Name three colours."}]),
                Request(key="b", messages=[{"role": "user", "content": rows[1]["messages"][0]["content"].replace("<sep>", "<ctl>")}])]
    plain_answers = [x for batch in LocalGenerator(model, tokenizer, 2).batches(requests, 6, 0.7, 0.95, 3) for x in batch]
    steered_answers = [x for batch in steer.batches(requests, 6, 0.7, 0.95, 3) for x in batch]
    assert [(r.key, t, n) for r, t, n in plain_answers] == [(r.key, t, n) for r, t, n in steered_answers]


def test_the_steering_arm_is_evaluated_with_every_control(tiny_model_dir, tmp_path):
    from delia.pipeline import run_all

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, init_mean, steering]")
    run_all(cfg)
    metrics = {arm: json.loads((tmp_path / "eval" / arm / "metrics.json").read_text()) for arm in ("init_mean", "steering")}
    assert metrics["steering"]["switch"]["n"] == 2 and set(metrics["steering"]) >= {"negated", "other_token", "leakage"}
    # general queries hold no token: the steered model drifts exactly as the same model with the token added
    assert metrics["steering"]["drift"] == metrics["init_mean"]["drift"]


def test_an_evaluation_row_among_the_training_rows_stops_the_counterfactual_mix(tiny_model_dir, tmp_path):
    from delia import DeliaError
    from delia.pipeline import stage_mix, stage_sample, stage_task

    cfg = _cfg(tiny_model_dir, tmp_path, "arms=[untouched, counterfactual]")
    stage_task(cfg)
    stage_sample(cfg)
    train, evals = tmp_path / "task" / "train.jsonl", tmp_path / "task" / "eval.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join([evals.read_text().splitlines()[0]] + lines[1:]) + "\n")  # a leak the task stage never makes
    with pytest.raises(DeliaError, match="an evaluation row is among the training rows"):
        stage_mix(cfg)
    assert not (tmp_path / "mix" / "counterfactual.jsonl").exists()


def test_the_row_alone_trains_at_its_own_learning_rate_when_set(tiny_model_dir, tmp_path):
    from delia.model.arm import arm_model
    from delia.pipeline import stage_mix, stage_sample, stage_task, stage_train

    moved = {}
    for lr in (0.0, 0.5):
        cfg = _cfg(tiny_model_dir, tmp_path / str(lr), "arms=[untouched, delia, token_row]", "train.learning_rate=1e-3",
                   f"baselines.token_row_lr={lr}")
        stage_task(cfg)
        stage_sample(cfg)
        stage_mix(cfg)
        done = stage_train(cfg, "token_row")
        assert done["settings"].get("learning_rate") == (lr or None)
        model, tok = arm_model(cfg, "token_row")
        sep = tok.convert_tokens_to_ids("<sep>")
        init, _ = arm_model(cfg, "init_random")
        moved[lr] = float((model.get_input_embeddings().weight[sep]
                           - init.get_input_embeddings().weight[sep]).norm())
    assert moved[0.5] > 50 * moved[0.0] > 0, moved
