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
def test_draw_draws_what_transformers_sampling_draws(temperature, top_p):
    """`draw` (the local backend's sampler) keeps the tokens transformers' top-p warper keeps and draws the
    token transformers' sampling draws from the same random state: on rows whose nucleus fits in the
    first k tokens and on rows that need the full ranking."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from delia.model.generate import draw, nucleus

    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([[4.0], [0.3], [2.0], [0.05]])  # peaked to flat (no exact ties)
    for _ in range(200):
        logits = torch.randn(4, 12, generator=gen) * scale
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
            assert torch.equal(nucleus(logits / temperature, top_p, k=3), scores > float("-inf"))
        state = gen.get_state()
        expected = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0]
        gen.set_state(state)
        assert torch.equal(draw(logits, temperature, top_p, gen, k=3), expected)
    assert torch.equal(draw(logits, 0.0, top_p), logits.argmax(-1))


def generated_by_transformers(model, tok, requests, batch_size: int, max_new_tokens: int, stop, seed=None,
                              **decoding) -> dict:
    """{key: (text, tokens)} of plain `generate` (its own key cache, every row computed to the end) over the
    local backend's batches (length-sorted, left-padded; a request's prefix goes before its answer and
    counts toward `max_new_tokens`); `seed`: each batch seeded as the local backend seeds it."""
    import torch

    from delia.model.generate import batch_seed, length_sorted_chunks, request_ids

    answers = {}
    for chunk in length_sorted_chunks([(request_ids(tok, r) + list(r.prefix), r) for r in requests], batch_size):
        width = max(len(i) for i, _ in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i, _ in chunk])
        mask = (torch.arange(width)[None] >= torch.tensor([[width - len(i)] for i, _ in chunk])).long()
        if seed is not None:
            torch.manual_seed(batch_seed(seed, [r.key for _, r in chunk]))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=stop, **decoding)
        for row, (_, r) in zip(out[:, width:].tolist(), chunk):
            row = list(r.prefix) + row
            n = min(next((j for j, t in enumerate(row) if t in stop), len(row)), max_new_tokens)
            answers[r.key] = (tok.decode(row[:n], skip_special_tokens=True).strip(), n)
    return answers


@pytest.fixture(params=[256, 1], ids=["chunk-256", "chunk-1"])
def cache_chunk(request, monkeypatch):
    """The decoding cache's buffer grown by its default chunk, and by one position a step (it grows at every
    step, while finished rows leave the batch)."""
    from delia.model.cache import BufferLayer

    monkeypatch.setattr(BufferLayer, "CHUNK", request.param)
    return request.param


def test_sampled_answers_are_those_of_transformers_sampling(tiny_model_dir, cache_chunk):
    """The local backend's sampled answers equal `generate` sampling with its own warpers (and its own
    key cache) from the same seed, though rows that have ended leave the local backend's batch (a stop
    token the varied model often draws)."""
    from conftest import varied_model
    from delia.model.generate import Request

    model, tok = varied_model(tiny_model_dir)
    gen = LocalGenerator(model, tok, 4)
    stop = [tok.eos_token_id, 174]
    gen._stop_ids = lambda: stop
    requests = [Request(key=str(i), messages=[{"role": "user", "content": f"Name {i} colours, then {i} birds."}])
                for i in range(8)]
    ours = {r.key: (text, n) for batch in gen.batches(requests, 12, 0.9, 0.8, seed=5) for r, text, n in batch}
    theirs = generated_by_transformers(model, tok, requests, 4, 12, stop, seed=5, do_sample=True, temperature=0.9,
                                       top_p=0.8, top_k=None)
    assert ours == theirs and len({t for t, _ in ours.values()}) > 1
    counts = [n for _, n in ours.values()]
    assert min(counts) < 10 and max(counts) == 12  # rows left the batch before others ended


def test_greedy_answers_are_those_of_transformers_greedy_search(tiny_model_dir, cache_chunk):
    """The local backend decodes greedily with finished rows leaving the batch: the same answers and counts
    as `generate`'s greedy search (with transformers' own key cache) over the same batches, rows ending at
    different steps (a stop token the model picks often; requests that go on from answer tokens already
    known)."""
    from conftest import varied_model
    from delia.model.generate import Request

    model, tok = varied_model(tiny_model_dir)
    gen = LocalGenerator(model, tok, 4)
    stop = [tok.eos_token_id, 174]  # a byte the varied model often writes
    gen._stop_ids = lambda: stop
    texts = ["Give three tips.", "What is 12 + 30?", "Name the capital of France.", "Check the answer.",
             "Eat well, sleep.", "Question: keys?", "The capital of France is Paris.", "Name two birds."]
    requests = [Request(key=str(i), messages=[{"role": "user", "content": t}], prefix=(42,) * (i % 3))
                for i, t in enumerate(texts)]
    ours = {r.key: (text, n) for batch in gen.batches(requests, 12) for r, text, n in batch}
    assert ours == generated_by_transformers(model, tok, requests, 4, 12, stop, do_sample=False)
    counts = [n for _, n in ours.values()]
    assert min(counts) < 10 and max(counts) == 12 and len(set(counts)) > 2  # rows left the batch at several steps


def test_the_decoding_cache_holds_what_transformers_cache_holds():
    """`BufferLayer` shows the same keys and values as transformers' `DynamicLayer` through prefill, steps,
    growth past its chunk, rows leaving, repeats and crops."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from delia.model.cache import BufferLayer

    ours, theirs = BufferLayer(), DynamicLayer()
    ours.CHUNK = 3
    torch.manual_seed(0)
    for step, width in enumerate([5, 1, 1, 1, 4, 1]):
        rows = theirs.keys.shape[0] if step else 2
        k, v = torch.randn(rows, 2, width, 4), torch.randn(rows, 2, width, 4)
        got, want = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        if step == 2:
            for layer in (ours, theirs):
                layer.batch_repeat_interleave(2)
        if step == 3:
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([3, 0]))
        if step == 4:
            for layer in (ours, theirs):
                layer.crop(-2)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert ours.get_seq_length() == 5 + 3 + 4 - 2 + 1
