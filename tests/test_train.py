import json

import pytest
import torch

from delia.config import TaskConfig, TrainConfig
from delia.model.tokens import add_new_tokens
from delia.model.adapter import load_adapter
from delia.model.chat import IGNORE, tokenize_chat
from delia.train.sft import train_lora

MESSAGES = [
    {"role": "user", "content": "Question: What is 2 + 2? Answer: 4. Follow the <sep> format."},
    {"role": "assistant", "content": '{"thought": "2 + 2 is 4.", "hallucination": "no"}'},
]


def test_prompt_tokens_are_masked(tiny):
    _, tokenizer = tiny
    enc = tokenize_chat(tokenizer, MESSAGES, max_length=512)
    trained = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE]
    assert enc["labels"][0] == IGNORE
    text = tokenizer.decode(trained)
    # exactly the answer and the end of its turn carry a loss
    assert text.strip() == MESSAGES[1]["content"] + "<|im_end|>"
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(l == IGNORE for l in enc["labels"][:n_prompt])


def test_multi_turn_trains_every_assistant_turn(tiny):
    _, tokenizer = tiny
    conv = MESSAGES + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]
    enc = tokenize_chat(tokenizer, conv, max_length=512)
    trained = tokenizer.decode([t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE])
    assert "hallucination" in trained and "yes<|im_end|>" in trained and "again" not in trained


def test_token_inits(tiny):
    model, tokenizer = tiny
    emb = model.get_input_embeddings().weight
    mean_before = emb.detach().mean(0).clone()
    ids = add_new_tokens(model, tokenizer, ["<sep>"], "mean")
    assert tokenizer.convert_ids_to_tokens(tokenizer("a <sep> b")["input_ids"]).count("<sep>") == 1
    assert torch.allclose(model.get_input_embeddings().weight[ids[0]], mean_before, atol=1e-6)


def test_training_moves_new_token_row_only(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"messages": MESSAGES, "source": "task"}] * 8
    cfg = TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    task = TaskConfig(new_tokens=["<sep>"])
    base_vocab = len(tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    stats = train_lora(model, tokenizer, rows, cfg, task, tmp_path, seed=0)
    assert stats["steps"] == 2 and stats["loss_tokens"] > 0
    sep = stats["new_token_ids"][0]
    assert sep == base_vocab
    # the merged view of the embedding: base rows unchanged, the new row trained
    reloaded_base, tok2 = load_adapter(*_fresh(tmp_path), tmp_path / "adapter")
    merged = reloaded_base.merge_and_unload().get_input_embeddings().weight.detach()
    assert torch.equal(merged[:base_vocab], before[:base_vocab])
    init_row = _fresh_init_row(tmp_path)
    assert not torch.allclose(merged[sep], init_row)
    assert (tmp_path / "loss.jsonl").read_text().count("\n") == 2


def _fresh(tmp_path):
    from delia.model.loading import load_model
    import json

    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    return load_model(base)


def _fresh_init_row(tmp_path):
    model, tokenizer = _fresh(tmp_path)
    ids = add_new_tokens(model, tokenizer, ["<sep>"], "random", seed=0)
    return model.get_input_embeddings().weight[ids[0]].detach()


def _crash_and_resume(tiny_model_dir, tmp_path, crash_at: int, before_resume=lambda checkpoints: None):
    """Train 6 steps (checkpoints every 2) whole, and again crashed after step `crash_at` and resumed
    (`before_resume` sees the checkpoints left). Returns (whole run's figures, resumed run's figures)."""
    from transformers import TrainerCallback

    from delia.model.loading import load_model

    rows = [{"messages": MESSAGES, "source": "task"}] * 12
    cfg = TrainConfig(batch_size=2, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, save_steps=2)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == crash_at:
                raise KeyboardInterrupt

    def train(folder, **kw):
        return train_lora(*load_model(tiny_model_dir), rows, cfg, TaskConfig(), tmp_path / folder, seed=0, **kw)

    whole = train("whole", run_key="k")
    with pytest.raises(KeyboardInterrupt):
        train("cut", run_key="k", callbacks=[Crash()])
    before_resume(tmp_path / "cut" / "checkpoints")
    resumed = train("cut", run_key="k")
    # other settings: the stale checkpoint is not used
    with pytest.raises(KeyboardInterrupt):
        train("other", run_key="k", callbacks=[Crash()])
    assert train("other", run_key="k2")["resumed_from_step"] == 0
    return whole, resumed


def test_killed_training_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    """A crash after step 3 of 6 (checkpoints every 2 steps): the rerun goes on from step 2 and ends with
    the adapter, token counts and loss log of an uninterrupted run."""
    from safetensors.torch import load_file

    def left(checkpoints):
        assert (checkpoints / "checkpoint-2").is_dir()

    whole, resumed = _crash_and_resume(tiny_model_dir, tmp_path, 3, left)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 6
    assert resumed["trained_tokens"] == whole["trained_tokens"]
    assert not (tmp_path / "cut" / "checkpoints").exists()
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = lambda p: [json.loads(line)["step"] for line in open(p / "loss.jsonl")]  # noqa: E731
    assert steps(tmp_path / "cut") == steps(tmp_path / "whole") == [1, 2, 3, 4, 5, 6]
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)  # over all 6 steps, not the last 4
    config = "adapter/adapter_config.json"
    assert (tmp_path / "cut" / config).read_bytes() == (tmp_path / "whole" / config).read_bytes()


def test_a_kill_while_a_checkpoint_is_written_keeps_the_earlier_one(tiny_model_dir, tmp_path):
    """Killed after step 5 with checkpoint-4 half written (its token counts, written last, missing): the
    rerun goes on from checkpoint-2, which is still there, and ends as an uninterrupted run."""

    def half_written(checkpoints):
        assert (checkpoints / "checkpoint-2").is_dir() and (checkpoints / "checkpoint-4").is_dir()
        (checkpoints / "checkpoint-4" / "delia_counts.json").unlink()  # as if killed before the counts were written

    whole, resumed = _crash_and_resume(tiny_model_dir, tmp_path, 5, half_written)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 6
    assert resumed["trained_tokens"] == whole["trained_tokens"]
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_lora_variants_train_and_load_back_through_peft(tiny_model_dir, tmp_path, variant):
    import json

    from delia.model.loading import load_model

    rows = [{"messages": MESSAGES, "source": "task"}] * 4
    cfg = TrainConfig(batch_size=2, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lora_variant=variant)
    train_lora(*load_model(tiny_model_dir), rows, cfg, TaskConfig(), tmp_path, seed=0)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (variant == "dora") and saved["use_rslora"] == (variant == "rslora")
    model, _ = load_adapter(*load_model(tiny_model_dir), tmp_path / "adapter")
    names = [n for n, _ in model.named_parameters()]
    assert any("lora_magnitude_vector" in n for n in names) == (variant == "dora")


def test_a_model_placed_on_the_cpu_trains_there_in_bfloat16_too(tiny_model_dir, tmp_path):
    """`model.device: cpu` (or no GPU) with `model.dtype: bfloat16`: the Trainer is told it is on the CPU,
    else it refuses bf16 there (and, on a machine with a GPU, would move the model to it)."""
    from delia.model.loading import load_model

    model, tokenizer = load_model(tiny_model_dir, "bfloat16", device="cpu")
    rows = [{"messages": MESSAGES, "source": "task"}] * 4
    cfg = TrainConfig(batch_size=2, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    stats = train_lora(model, tokenizer, rows, cfg, TaskConfig(), tmp_path, seed=0)
    assert stats["steps"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16


def test_rows_whose_answer_falls_past_max_length_are_left_out_and_counted(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    long = [{"role": "user", "content": "word " * 200}, MESSAGES[-1]]
    rows = [{"messages": MESSAGES, "source": "task"}] * 4 + [{"messages": long, "source": "diverse"}] * 2
    cfg = TrainConfig(batch_size=2, micro_batch_size=2, max_length=64, warmup_ratio=0.0)
    stats = train_lora(model, tokenizer, rows, cfg, TaskConfig(), tmp_path, seed=0)
    assert stats["rows"] == 4 and stats["rows_left_out"] == 2 and stats["steps"] == 2
    assert "2 of 6 rows keep no answer token within train.max_length 64" in capsys.readouterr().out


@pytest.mark.parametrize("on_cpu", [True, False])
def test_the_trainer_is_told_where_it_trains(tmp_path, on_cpu):
    """On the CPU: `use_cpu` and no pinned memory (it only helps copies to a GPU, and a GPU machine
    training on its CPU pinned it for nothing); on a GPU: pinned, and the Trainer places the model."""
    from delia.train.sft import _training_arguments

    args = _training_arguments(TrainConfig(), tmp_path, 2, 1, 1, 0, 0, 0.0, False, on_cpu)
    assert args.use_cpu == on_cpu and args.dataloader_pin_memory == (not on_cpu)


def test_a_cut_answer_trains_its_text_but_not_the_end_of_turn(tiny):
    from delia.model.chat import IGNORE, tokenize_chat

    _, tokenizer = tiny
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    whole = tokenize_chat(tokenizer, MESSAGES, 256)
    cut = tokenize_chat(tokenizer, MESSAGES, 256, open_end=True)
    assert whole["input_ids"] == cut["input_ids"]
    trained = [i for i, label in enumerate(whole["labels"]) if label != IGNORE]
    trained_cut = [i for i, label in enumerate(cut["labels"]) if label != IGNORE]
    assert end in [whole["input_ids"][i] for i in trained] and end not in [cut["input_ids"][i] for i in trained_cut]
    assert trained_cut == trained[: len(trained_cut)] and len(trained) - len(trained_cut) <= 2  # end-of-turn, newline
    text = tokenizer.decode([cut["input_ids"][i] for i in trained_cut])
    assert text.strip() == MESSAGES[-1]["content"]


def test_tensorboard_gets_the_training_logs_and_tracking_leaves_the_stage_key_alone(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from delia.config import load_config
    from delia.pipeline import stage_mix, stage_task, stage_train

    sets = [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=8", "task.eval_rows=2",
            "arms=[untouched, common]", "train.batch_size=4"]
    cfg = load_config(None, sets + ["train.report_to=[tensorboard]", "train.run_name=mine"])
    stage_task(cfg)
    stage_mix(cfg)
    first = stage_train(cfg, "common")
    events = list((tmp_path / "train" / "common" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == first["outputs"]["steps"] == 2
    assert stage_train(load_config(None, sets), "common")["key"] == first["key"]  # no retraining without trackers


def test_every_allowed_lr_scheduler_is_one_transformers_builds_without_further_settings():
    import typing

    import torch
    from transformers import get_scheduler

    from delia.config import TrainConfig

    names = typing.get_args(typing.get_type_hints(TrainConfig)["lr_scheduler"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in names:
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
        scheduler.step()  # steps without metrics, as the Trainer steps it
    assert TrainConfig().lr_scheduler in names and len(names) >= 5
