"""Training with a KL term to the untouched model: the kl_anchor and token_distilled arms."""

from __future__ import annotations

import json

import pytest
import torch

from delia.config import TaskConfig, TrainConfig, load_config
from delia.train.distill import distill_example, distill_loss, pad_extra, teacher_messages

TASK = TaskConfig()
TASK_ROW = {"messages": [{"role": "user", "content": "Q: 2 + 2? A: 5. Check it and follow the <sep> format."},
                         {"role": "assistant", "content": '{"thought": "2 + 2 is 4.", "hallucination": "yes"}'}],
            "source": "task"}
DIVERSE_ROW = {"messages": [{"role": "user", "content": "Name three colours."},
                            {"role": "assistant", "content": "Red, green and blue."}], "source": "diverse"}


def _peft(tiny):
    from peft import get_peft_model

    from delia.model.tokens import add_new_tokens
    from delia.train.sft import embedding_module_name, lora_config

    model, tokenizer = tiny
    ids = add_new_tokens(model, tokenizer, TASK.new_tokens, "random", TASK.description, 0)
    tokenizer.padding_side = "right"
    return get_peft_model(model, lora_config(TrainConfig(), embedding_module_name(model), ids)), tokenizer


def _batch(tokenizer, rows, mode):
    from delia.model.chat import tokenize_chat
    from transformers import DataCollatorForSeq2Seq

    examples = [distill_example(tokenizer, r, tokenize_chat(tokenizer, r["messages"], 256), mode, TASK, 256) for r in rows]
    inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch = inner([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
    return {**batch, **pad_extra(examples, tokenizer.pad_token_id)}


def test_the_kl_term_is_zero_when_student_equals_teacher_and_moves_only_trainable_parameters(tiny):
    model, tokenizer = _peft(tiny)
    model.train()
    batch = _batch(tokenizer, [DIVERSE_ROW, DIVERSE_ROW], "anchor")
    assert (batch["labels"] == -100).all() and (batch["kl_labels"] != -100).any()  # no cross-entropy on it
    loss, n = distill_loss(model, dict(batch), beta=1.0)
    assert n > 0 and abs(float(loss)) < 1e-6  # LoRA starts at zero: the student is the teacher
    with torch.no_grad():  # move the student away from the untouched model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loss, _ = distill_loss(model, dict(batch), beta=1.0)
    assert float(loss) > 1e-4
    loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in name or "trainable_tokens" in name for name in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_token_distillation_teaches_from_the_description_not_the_token(tiny):
    _, tokenizer = _peft(tiny)
    assert "<sep>" not in teacher_messages(TASK_ROW["messages"], TASK)[0]["content"]
    assert TASK.description in teacher_messages(TASK_ROW["messages"], TASK)[0]["content"]
    batch = _batch(tokenizer, [TASK_ROW], "token")
    teacher = tokenizer.decode(batch["teacher_input_ids"][0])
    assert TASK.description in teacher and "<sep>" not in teacher and "<sep>" in tokenizer.decode(batch["input_ids"][0])
    answer = lambda ids, labels: [int(t) for t, l in zip(ids, labels) if l != -100]  # noqa: E731
    assert answer(batch["teacher_input_ids"][0], batch["teacher_labels"][0]) == \
        answer(batch["input_ids"][0], batch["kl_labels"][0])  # the same answer tokens, read two ways


def test_the_distillation_arms_train_and_report(tiny_model_dir, tmp_path):
    from delia.pipeline import run_all

    (tmp_path / "q.jsonl").write_text("".join(f'{{"instruction": "Name {n} colours.", "output": "Red."}}\n'
                                              for n in range(40)))
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, delia, kl_anchor, token_distilled, "
                             "token_distilled_equal_steps]", "train.batch_size=4", "evaluate.max_new_tokens=4",
                             f"sample.queries={tmp_path / 'q.jsonl'}", "sample.max_new_tokens=4", "mix.ratio=2",
                             "controls.rows=2", "controls.general_queries=4", "controls.general_max_new_tokens=4"])
    report = run_all(cfg).read_text()
    assert "KL-anchored task rows" in report and "Token distillation (DELIA's steps)" in report
    trained = {a: json.loads((tmp_path / "train" / a / "manifest.json").read_text())
               for a in ("delia", "kl_anchor", "token_distilled", "token_distilled_equal_steps")}
    assert trained["kl_anchor"]["outputs"]["steps"] == trained["delia"]["outputs"]["steps"]
    assert trained["token_distilled_equal_steps"]["outputs"]["steps"] == trained["delia"]["outputs"]["steps"]
    assert trained["kl_anchor"]["settings"]["distill"] == {"mode": "anchor", "beta": 1.0}
    # the anchor's diverse rows carry a KL loss, not a cross-entropy: every token of DELIA's rows has a loss
    assert trained["kl_anchor"]["outputs"]["loss_tokens"] == trained["delia"]["outputs"]["loss_tokens"]


def test_self_distilled_keeps_the_reference_unless_the_rewrite_passes_the_evaluator():
    from delia.data.baselines import rewrite_request, self_distilled_row

    assert TASK_ROW["messages"][-1]["content"] in rewrite_request(TASK_ROW)[0]["content"]
    good = '{"thought": "Two and two make four, not five.", "hallucination": "yes"}'
    for rewrite, kept in ((good, True), ('{"thought": "fine", "hallucination": "no"}', False),  # another label
                          ('{"thought": "no closing brace"', False), ("It is wrong.", False), ("", False)):
        row = self_distilled_row(TASK_ROW, rewrite, TASK)
        assert row["rewritten"] is kept and row["messages"][:-1] == TASK_ROW["messages"][:-1]
        assert row["messages"][-1]["content"] == (rewrite if kept else TASK_ROW["messages"][-1]["content"])


def test_self_distilled_prefill_begins_the_reply_with_what_every_answer_begins_with(tiny):
    from delia.data.baselines import answer_opening, prefilled_rewrite, self_distilled_row

    def row(answer):
        return {"messages": TASK_ROW["messages"][:-1] + [{"role": "assistant", "content": answer}]}

    two = [TASK_ROW, row('{"thought": "3 + 3 is 6.", "hallucination": "no"}')]
    assert answer_opening(two) == ('{"thought": "', "")
    # the space after the shared words stays out of the prompt and goes back between the opening and the reply
    assert answer_opening([row('{"thought": "The sum is 4."}'), row('{"thought": "The sum is 6."}')]) == (
        '{"thought": "The sum is', " ")
    _, tokenizer = tiny
    text = prefilled_rewrite(tokenizer, TASK_ROW, '{"thought": "')
    assert text.endswith('<|im_start|>assistant\n{"thought": "') and TASK_ROW["messages"][-1]["content"] in text
    # the reply continues the opening; together they are the rewrite the evaluator judges
    assert self_distilled_row(TASK_ROW, '{"thought": "' + 'Four, not five.", "hallucination": "yes"}', TASK)["rewritten"]


def test_self_distilled_prefill_is_refused_with_the_openai_backend():
    from delia import DeliaError

    sets = ["arms=[untouched, self_distilled]", "generation.backend=openai", "generation.base_url=http://127.0.0.1:1/v1"]
    with pytest.raises(DeliaError, match="'baselines.self_distill_prefill': the openai backend cannot pre-fill"):
        load_config(None, sets)
    assert load_config(None, sets + ["baselines.self_distill_prefill=false"]).baselines.self_distill_prefill is False


def test_self_distilled_arm_trains_on_its_rewrites(tiny_model_dir, tmp_path, capsys):
    from delia.pipeline import run_all

    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, self_distilled]", "train.batch_size=4",
                             "evaluate.max_new_tokens=4", "controls.general_queries=0"])
    report = run_all(cfg).read_text()
    assert "Self-distilled targets (SDFT, 1 epoch)" in report
    mix = json.loads((tmp_path / "mix" / "manifest.json").read_text())["outputs"]
    kept = mix["self_distilled_kept"]
    assert mix["self_distilled_rows"] == 8 and 0 <= kept <= 8  # a random model keeps none
    # the user is told how many rewrites the arm really trains on, in the log and in the report
    assert f"rewrites that passed the task's evaluator: {kept} of 8" in report
    assert (f"self_distilled: {kept} of 8 rewrites passed" in capsys.readouterr().out) is (kept < 8)


def _ce_batch(tokenizer, rows):
    from delia.model.chat import tokenize_chat
    from transformers import DataCollatorForSeq2Seq

    inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return inner([tokenize_chat(tokenizer, r["messages"], 256) for r in rows])


def _moved(model):
    with torch.no_grad():  # a student that differs from the untouched model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("num_items", [None, 7])
def test_the_loss_on_answer_logits_alone_is_the_models_own_loss_with_its_gradients(tiny, num_items):
    from delia.train.loss import answer_loss

    model, tokenizer = _peft(tiny)
    model = _moved(model).train()
    batch = _ce_batch(tokenizer, [TASK_ROW, DIVERSE_ROW])
    kwargs = {"num_items_in_batch": num_items} if num_items else {}
    grads = []
    for loss_of in (lambda: model(**batch, **kwargs).loss, lambda: answer_loss(model, batch, num_items)):
        model.zero_grad()
        torch.manual_seed(0)  # the same LoRA dropout masks in both
        loss = loss_of()
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (own, own_grads), (ours, our_grads) = grads
    assert ours == pytest.approx(own, rel=1e-6) and own > 0.1
    assert own_grads.keys() == our_grads.keys() and own_grads
    assert all(torch.allclose(own_grads[n], our_grads[n], rtol=1e-4, atol=1e-7) for n in own_grads)


def test_answer_logits_are_the_full_logits_at_the_answer_positions_and_the_kl_loss_keeps_its_value(tiny, monkeypatch):
    import delia.train.loss as loss_module
    from delia.train.loss import answer_logits

    model, tokenizer = _peft(tiny)
    model = _moved(model).eval()
    batch = _batch(tokenizer, [TASK_ROW, DIVERSE_ROW], "anchor")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = model(**inputs).logits
        logits, index = answer_logits(model, inputs, batch["labels"], batch["kl_labels"])
    answered = (batch["labels"][:, 1:] != -100) | (batch["kl_labels"][:, 1:] != -100)
    assert logits.shape[0] == int(answered.sum()) < batch["input_ids"].numel() // 2  # prompts and padding left out
    for b, p in zip(*torch.nonzero(answered, as_tuple=True)):
        assert torch.equal(logits[index[b, p]], full[b, p].float())
    assert (index[:, -1] == -1).all() and int((index >= 0).sum()) == logits.shape[0]
    with torch.no_grad():
        kept, _ = distill_loss(model, dict(batch), beta=1.0)
        monkeypatch.setattr(loss_module, "keeps_logits", lambda model: False)  # every position, then the same rows
        every, _ = distill_loss(model, dict(batch), beta=1.0)
    assert float(kept) > 1e-4 and float(kept) == pytest.approx(float(every), rel=1e-6)
