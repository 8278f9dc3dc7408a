"""A model without a chat template: refused in one line, or given one (`model.chat_template`); and a
trained adapter loaded with plain PEFT (`AutoPeftModelForCausalLM`) after the vocabulary grew."""

import json
import shutil

import pytest
import torch

from delia import DeliaError
from delia.config import load_config


@pytest.fixture
def no_template(tiny_model_dir, tmp_path):
    folder = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_model_without_a_template_is_refused_or_given_one(no_template, tmp_path, monkeypatch, tiny_model_dir):
    from delia.model.loading import load_tokenizer
    from delia.pipeline import run_all

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    sets = [f"run_dir={tmp_path / 'run'}", f"model.name={no_template}", "task.train_rows=8", "task.eval_rows=2",
            "arms=[untouched, common]", "train.batch_size=4", "evaluate.max_new_tokens=4", "controls.general_queries=0"]
    with pytest.raises(DeliaError, match=r"has no chat template; .* model.chat_template: chatml or a \.jinja file"):
        run_all(load_config(None, sets))
    report = run_all(load_config(None, sets + ["model.chat_template=chatml"]))
    assert report.exists()
    trained = json.loads((tmp_path / "run" / "train" / "common" / "manifest.json").read_text())
    exported = (tmp_path / "run" / "train" / "common" / "adapter")
    assert load_tokenizer(str(exported)).chat_template == load_tokenizer(tiny_model_dir).chat_template
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    from delia.model.loading import model_source

    cfg = load_config(None, sets + [f"model.chat_template={template}"])
    rendered = load_tokenizer(model_source(cfg.model)).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "[user] Hi\n[assistant] "
    from delia.pipeline import stage_train

    other = stage_train(cfg, "common")  # another template: the arm trains again, under another key
    assert other["key"] != trained["key"] and other["settings"]["model"].endswith("]")
    with pytest.raises(DeliaError, match="model.chat_template.*'nope.jinja' is neither a known name"):
        model_source(load_config(None, sets + ["model.chat_template=nope.jinja"]).model)


def test_plain_peft_loads_the_adapter_after_the_vocabulary_grew(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from delia.model.adapter import load_adapter
    from delia.model.loading import load_model
    from delia.pipeline import stage_mix, stage_task, stage_train

    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8",
                             "task.eval_rows=2", "arms=[untouched, common]", "train.batch_size=4",
                             "train.learning_rate=1e-2"])
    stage_task(cfg)
    stage_mix(cfg)
    stage_train(cfg, "common")
    adapter = tmp_path / "train" / "common" / "adapter"
    plain = AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # resizes to the adapter's tokenizer
    ours, tokenizer = load_adapter(*load_model(tiny_model_dir), adapter)
    ids = tokenizer("Is 2 + 2 = 5? Reply in the <sep> format.", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<sep>") in ids[0].tolist()
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
