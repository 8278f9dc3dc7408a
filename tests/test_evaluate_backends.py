"""Evaluation through the configured backend: a trained arm over HTTP (a real `delia serve` on loopback)
answers as it does locally, and `delia export` writes a plain model folder equal to base + adapter."""

import json
import threading

import pytest
import torch

from delia import DeliaError
from delia.config import load_config
from delia.model.loading import load_model, placement
from delia.pipeline import stage_evaluate, stage_export, stage_general, stage_mix, stage_task, stage_train
from delia.serve import ChatServer
from delia.model.adapter import load_adapter


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A run folder with the common arm trained on the tiny model."""
    run = tmp_path_factory.mktemp("run")
    sets = [f"run_dir={run}", f"model.name={tiny_model_dir}", "task.train_rows=8", "task.eval_rows=3",
            "arms=[untouched, common]", "train.batch_size=4", "train.learning_rate=1e-2", "evaluate.max_new_tokens=6"]
    cfg = load_config(None, sets)
    stage_task(cfg)
    stage_mix(cfg)
    stage_train(cfg, "common")
    return sets


def _answers(cfg, arm):
    path = cfg.run_dir + f"/eval/{arm}/generations.jsonl"
    return [json.loads(line)["answer"] for line in open(path)]


def _serve(model, tokenizer, name):
    srv = ChatServer(model, tokenizer, name, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_trained_arm_over_http_answers_as_locally(trained, tiny_model_dir):
    local = load_config(None, trained)
    stage_evaluate(local, "common")
    srv, url = _serve(*load_adapter(*load_model(tiny_model_dir), local.run_dir + "/train/common/adapter"), "common")
    try:
        remote = load_config(None, trained + ["generation.backend=openai", f"generation.base_url={url}",
                                              "generation.server_model='{arm}'"])
        done = stage_evaluate(remote, "common")
        controls = sum(1 for _ in open(remote.run_dir + "/eval/common/controls.jsonl"))
        assert controls > 0 and not any('"other_token"' in line for line in open(remote.run_dir + "/eval/common/controls.jsonl"))
        assert done["settings"]["backend"] == "openai" and srv.served == 6 + controls  # every answer over HTTP
        assert _answers(remote, "common") == _answers(local, "common") != []
        # without {arm} every arm would reach the same model: refused in one line
        plain = load_config(None, trained + ["generation.backend=openai", f"generation.base_url={url}",
                                             "generation.server_model=common"])
        with pytest.raises(DeliaError, match=r"needs '\{arm\}'"):
            stage_evaluate(plain, "common")
        # a model the server does not have is an error, not a silent answer from another model
        wrong = load_config(None, trained + ["generation.backend=openai", f"generation.base_url={url}",
                                             "generation.server_model=base-{arm}", "generation.max_retries=0"])
        with pytest.raises(DeliaError, match="HTTP 404"):
            stage_evaluate(wrong, "common")
    finally:
        srv.shutdown()
        srv.server_close()


def test_export_is_base_plus_adapter(trained, tiny_model_dir):
    cfg = load_config(None, trained + ["model.dtype=float32"])  # merged in float32: exact on any device
    folder = stage_export(cfg, "common")
    exported, tok = load_model(str(folder), "float32")
    assert "<sep>" in tok.get_vocab()
    adapted, tok2 = load_adapter(*load_model(tiny_model_dir, "float32"), cfg.run_dir + "/train/common/adapter")
    ids = tok2("Check <sep> the answer", return_tensors="pt")["input_ids"].to(exported.device)
    assert ids[0].tolist() == tok("Check <sep> the answer", return_tensors="pt")["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, adapted(ids).logits, atol=1e-5)
    # up to date on a second call: the same folder, not rewritten
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert stage_export(cfg, "common") == folder and (folder / "config.json").stat().st_mtime_ns == mtime
    # the key holds the dtype the export is stored in: `auto` is this export where it means float32 (a CPU)
    # and another one where it means bfloat16 (a GPU), which it once reused
    auto = load_config(None, trained + ["model.dtype=auto"])
    assert stage_export(auto, "common") == folder
    assert ((folder / "config.json").stat().st_mtime_ns == mtime) == (placement(auto.model.device, "auto")[1] == "float32")


def test_the_fast_evaluation_computes_what_the_plain_one_does(trained, tiny_model_dir):
    """The evaluation merges a trained arm's adapter, adds the control token to that same model in place and
    computes the untouched model's half of the drift once a process: the same next-token distributions as
    the adapter unmerged and as a fresh model with the token, and the drift of one measured from scratch."""
    from delia.analysis.drift import answer_logprobs, kl_per_token
    from delia.evaluate.controls import control_rows
    from delia.model.arm import add_control_tokens, arm_generator, arm_model
    from delia.model.generate import request_ids, Request
    from delia.runfolder import read_jsonl

    cfg = load_config(None, trained + ["model.dtype=float32"])
    rows = read_jsonl(cfg.run_dir + "/task/eval.jsonl")
    token = (cfg.controls.other_token,)

    def logits(model, tokenizer, row):
        ids = torch.tensor([request_ids(tokenizer, Request("", row["messages"][:-1]))], device=model.device)
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1]

    fast = arm_generator(cfg, "common", cfg.evaluate.batch_size)
    unmerged = load_adapter(*load_model(tiny_model_dir, "float32"), cfg.run_dir + "/train/common/adapter")
    for row in rows:
        assert torch.allclose(logits(fast.model, fast.tokenizer, row), logits(*unmerged, row), atol=1e-5)
    add_control_tokens(cfg, fast.model, fast.tokenizer, token)
    fresh = arm_model(cfg, "common", extra_tokens=token)
    other = [r for r in control_rows(rows, cfg.task, cfg.controls) if r["group"] == "other_token"]
    assert other and cfg.controls.other_token in other[0]["messages"][-2]["content"]
    for row in other:
        assert torch.equal(logits(fast.model, fast.tokenizer, row), logits(*fresh, row))

    stage_general(cfg)
    done = stage_evaluate(cfg, "common")
    general = read_jsonl(cfg.run_dir + "/general/queries.jsonl")
    answers = [(g["messages"], g["answer"]) for g in general]
    reference = answer_logprobs(*load_model(tiny_model_dir, "float32"), answers, cfg.train.max_length, cfg.controls.batch_size)
    kl = kl_per_token(reference, unmerged, answers, cfg.train.max_length)["kl"]
    assert general and kl > 0 and abs(done["outputs"]["drift"]["kl"] - kl) <= 1e-4 * kl
