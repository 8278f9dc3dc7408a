import json

import pytest
from conftest import dies_after

from delia.config import ModelConfig, SampleConfig
from delia.data import sample as sample_mod
from delia.model.generate import LocalGenerator

QUERIES = [[{"role": "user", "content": f"Give {i} tips for staying healthy."},
            {"role": "assistant", "content": f"Reference answer {i}."}] for i in range(10)]


def _run(folder, model_dir, style="plain"):
    cfg = SampleConfig(max_new_tokens=6, batch_size=3, prompt_style=style)
    return sample_mod.sample_diverse(QUERIES, ModelConfig(name=model_dir), cfg, 10, folder, seed=3)


def test_resume_after_interruption_loses_and_duplicates_nothing(tiny_model_dir, tmp_path, monkeypatch):
    full_path, stats = _run(tmp_path / "full", tiny_model_dir)
    assert stats["rows"] + stats["empty_answers"] == 10

    real = LocalGenerator.batches
    monkeypatch.setattr(LocalGenerator, "batches", dies_after(real, 2))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", tiny_model_dir)
    cache = tmp_path / "cut" / "cache.jsonl"
    assert len(cache.read_text().splitlines()) == 6  # two whole batches of 3
    assert not (tmp_path / "cut" / "diverse.jsonl").exists()
    with open(cache, "a") as f:  # a crash in the middle of a write leaves half a line
        f.write('{"key": "half')
    monkeypatch.setattr(LocalGenerator, "batches", real)
    cut_path, cut_stats = _run(tmp_path / "cut", tiny_model_dir)
    assert cut_stats["resumed_from_cache"] == 6
    assert cut_path.read_text() == full_path.read_text()  # same rows, same order, same text
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 10


def test_reference_style_prompt_shows_the_answer_first():
    query, prompt = sample_mod.build_prompt(QUERIES[1], "reference", "q")
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == prompt[3]["content"] == query
    assert prompt[2]["content"] == "Reference answer 1."


def test_rows_record_prompt_style(tiny_model_dir, tmp_path):
    path, _ = _run(tmp_path, tiny_model_dir, style="reference")
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert rows and all(r["prompt_style"] == "reference" and r["source"] == "diverse" for r in rows)
    assert rows[0]["messages"][0]["content"] == QUERIES[0][0]["content"]


@pytest.mark.parametrize("mode", ["mask", "drop", "keep"])
def test_answers_cut_at_the_token_limit_are_recorded_and_handled(tiny_model_dir, tmp_path, monkeypatch, mode):
    real = LocalGenerator.batches

    def some_end_early(self, *a, **kw):  # the tiny random model never ends by itself in 6 tokens
        for batch in real(self, *a, **kw):
            # every third query's answer ends early: by the query, not its key (keys hold the model's temporary path)
            yield [(r, text, 2 if int(r.messages[0]["content"].split()[1]) % 3 == 0 else n) for r, text, n in batch]

    monkeypatch.setattr(LocalGenerator, "batches", some_end_early)
    queries = [[{"role": "user", "content": f"Give {i} tips."}] for i in range(30)]
    cfg = SampleConfig(max_new_tokens=6, batch_size=4, cut_answers=mode)
    path, stats = sample_mod.sample_diverse(queries, ModelConfig(name=tiny_model_dir), cfg, 8, tmp_path, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == stats["rows"] == 8 and stats["cut_answers"] == mode
    assert stats["cut_rows"] == sum(not r["ended"] for r in rows)
    if mode == "drop":  # cut answers give no row: further queries were asked
        assert all(r["ended"] for r in rows) and stats["requested"] > 8 and stats["cut_asked"] > 0
    else:
        assert 0 < stats["cut_rows"] < 8 and stats["requested"] == 8 + stats["empty_answers"]  # the tiny model may say nothing
    assert [r.get("open_end", False) for r in rows] == [mode == "mask" and not r["ended"] for r in rows]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.95), (1.3, 0.5), (0.7, 1.0)])
def test_draw_samples_what_transformers_warpers_keep(temperature, top_p):
    """`draw` (the local backend's sampler) draws from the distribution of transformers' temperature and
    top-p warpers: on rows whose nucleus fits in the first k tokens and on rows that need the full ranking."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from delia.model.generate import draw

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=gen) * torch.tensor([[4.0], [0.3], [2.0], [0.05]])  # peaked to flat (no exact ties)
    expected = torch.softmax(TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
                             if top_p < 1 else logits / temperature, -1)
    n = 20000
    drawn = torch.stack([draw(logits, temperature, top_p, gen, k=3) for _ in range(n)], 1)  # k=3: both paths
    freq = torch.stack([torch.bincount(row, minlength=12) for row in drawn]).float() / n
    assert ((expected == 0) <= (freq == 0)).all()  # never a token the warpers remove
    assert (freq - expected).abs().max() < 0.015
    assert torch.equal(draw(logits, 0.0, top_p), logits.argmax(-1))
