"""The ctranslate2 backend on the tiny model, converted through the same code path as any model:
greedy float32 answers equal the local backend's, sampling follows the batch seeds, the conversion
happens once per content and type, a killed sample stage resumes to the same rows, and a trained arm
(with its control token) evaluates as it does locally."""

import json

import pytest
from conftest import dies_after

from delia.config import GenerationConfig, ModelConfig, SampleConfig, load_config
from delia.data import sample as sample_mod
from delia.model.backends import make_generator
from delia.model.generate import Request

pytest.importorskip("ctranslate2")

PROMPTS = ["Give three tips for staying healthy.", "What is 12 + 30?", "The capital of France is",
           "Check whether the answer contains a hallucination.", "json object keys"]
REQUESTS = [Request(key=f"k{i}", messages=[{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _answers(generator, **kw):
    return {r.key: (text, n) for batch in generator.batches(REQUESTS, 12, **kw) for r, text, n in batch}


def test_greedy_float32_equals_the_local_backend(tiny_model_dir, cache):
    ct2 = make_generator(ModelConfig(name=tiny_model_dir), GenerationConfig(backend="ctranslate2"), 2)
    local = make_generator(ModelConfig(name=tiny_model_dir), GenerationConfig(), 2)
    assert _answers(ct2) == _answers(local)
    assert all(0 < n <= 12 for _, n in _answers(ct2).values())


def test_sampling_follows_the_batch_seeds_and_conversion_happens_once(tiny_model_dir, cache):
    cfg = GenerationConfig(backend="ctranslate2", compute_type="int8")
    gen = make_generator(ModelConfig(name=tiny_model_dir), cfg, 2)
    first = _answers(gen, temperature=0.9, top_p=0.95, seed=1)
    assert first == _answers(gen, temperature=0.9, top_p=0.95, seed=1)
    assert first != _answers(gen, temperature=0.9, top_p=0.95, seed=2)
    converted = sorted(p.name for p in (cache / "ct2").iterdir())
    assert len(converted) == 1 and converted[0].endswith("-int8")
    stamp = (cache / "ct2" / converted[0] / "model.bin").stat().st_mtime_ns
    make_generator(ModelConfig(name=tiny_model_dir), cfg, 4)  # same content: the cached conversion
    make_generator(ModelConfig(name=tiny_model_dir), GenerationConfig(backend="ctranslate2"), 4)
    assert (cache / "ct2" / converted[0] / "model.bin").stat().st_mtime_ns == stamp
    assert sorted(p.name.split("-")[1] for p in (cache / "ct2").iterdir() if not p.name.startswith(".")) == ["float32", "int8"]


def test_a_killed_sample_stage_resumes_to_the_same_rows(tiny_model_dir, cache, tmp_path, monkeypatch):
    from delia.model.ct2 import CT2Generator

    queries = [[{"role": "user", "content": f"Give {i} tips for staying healthy."}] for i in range(10)]
    gen = GenerationConfig(backend="ctranslate2")

    def run(folder):
        return sample_mod.sample_diverse(queries, ModelConfig(name=tiny_model_dir), SampleConfig(
            max_new_tokens=6, batch_size=3), 10, tmp_path / folder, seed=3, generation=gen)

    whole, _ = run("whole")
    real = CT2Generator.batches
    monkeypatch.setattr(CT2Generator, "batches", dies_after(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    assert len((tmp_path / "cut" / "cache.jsonl").read_text().splitlines()) == 6
    monkeypatch.setattr(CT2Generator, "batches", real)
    resumed, stats = run("cut")
    assert stats["resumed_from_cache"] == 6 and resumed.read_text() == whole.read_text()


def test_a_trained_arm_and_its_controls_evaluate_as_locally(tiny_model_dir, cache, tmp_path):
    from delia.pipeline import stage_evaluate, stage_mix, stage_task, stage_train

    sets = [f"run_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", "task.train_rows=8", "task.eval_rows=3",
            "arms=[untouched, common]", "train.batch_size=4", "train.learning_rate=1e-2", "evaluate.max_new_tokens=6",
            "controls.rows=3"]
    cfg = load_config(None, sets)
    stage_task(cfg)
    stage_mix(cfg)
    stage_train(cfg, "common")

    def answers(name):
        return [json.loads(line)["answer"] for line in open(tmp_path / "run" / "eval" / "common" / name)]

    stage_evaluate(cfg, "common")
    local = answers("generations.jsonl"), answers("controls.jsonl")
    done = stage_evaluate(load_config(None, sets + ["generation.backend=ctranslate2"]), "common")
    assert done["outputs"]["placement"] == "ctranslate2 cpu float32"
    assert (answers("generations.jsonl"), answers("controls.jsonl")) == local
    groups = {json.loads(line)["group"] for line in open(tmp_path / "run" / "eval" / "common" / "controls.jsonl")}
    assert "other_token" in groups  # the control token added to the arm's model, converted as it is in memory


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    import ctranslate2

    from delia import DeliaError
    from delia.model.backends import ct2_device

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    with pytest.raises(DeliaError, match="model.device: cuda, but CTranslate2 sees no CUDA GPU"):
        ct2_device("cuda")
    assert ct2_device("auto") == ct2_device("cpu") == "cpu"
