"""The OpenAI-compatible backend against a real `delia serve` server on loopback, faults included."""

import threading

import pytest

from delia import DeliaError
from delia.model.generate import LocalGenerator, OpenAIGenerator, Request
from delia.serve import ChatServer

REQUESTS = [Request(key=f"q{i}", messages=[{"role": "user", "content": f"Give {i} healthy tips."}]) for i in range(16)]


@pytest.fixture
def server(tiny):
    servers = []

    def start(**kw):
        srv = ChatServer(*tiny, "tiny", port=0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _collect(gen, requests):
    return [(r.key, text) for batch in gen.batches(requests, max_new_tokens=5, temperature=0.0) for r, text, _ in batch]


def test_every_row_exactly_once_under_faults(server, tiny):
    srv, url = server(faults=0.3, fault_seed=1, slow_seconds=1.5)
    client = OpenAIGenerator(url, "tiny", batch_size=5, concurrency=3, max_retries=12, timeout=1.0, backoff=0.01)
    rows = _collect(client, REQUESTS)
    assert sorted(k for k, _ in rows) == sorted(r.key for r in REQUESTS)
    assert sum(srv.injected.values()) >= 3 and all(srv.injected[f] for f in ("429", "500", "drop"))
    # greedy answers through the faulty server equal the local backend's
    local = dict(_collect(LocalGenerator(*tiny, batch_size=4), REQUESTS))
    assert dict(rows) == local


def test_gives_up_in_one_line(server):
    _, url = server(faults=1.0, fault_seed=0, slow_seconds=0.0)
    client = OpenAIGenerator(url, "tiny", batch_size=4, concurrency=2, max_retries=2, timeout=1.0, backoff=0.01)
    with pytest.raises(DeliaError, match="gave up after 2 retries") as e:
        _collect(client, REQUESTS[:4])
    assert "\n" not in str(e.value)


def test_key_stays_out_of_repr(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    client = OpenAIGenerator("http://127.0.0.1:9/v1", "m", api_key_env="MY_KEY")
    assert "sk-secret" not in repr(client) and "sk-secret" not in str(vars(client).get("url"))


def test_sample_stage_over_http_keeps_the_key_out_of_every_file(server, tiny_model_dir, tmp_path, monkeypatch, capfd):
    from delia.config import load_config
    from delia.pipeline import stage_sample, stage_task

    secret = "sk-test-DO-NOT-LEAK-4242"
    monkeypatch.setenv("DELIA_TEST_KEY", secret)
    _, url = server(faults=0.2, fault_seed=3, slow_seconds=0.0, api_key=secret)  # the key must reach the server
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=4",
                             "task.eval_rows=1", "mix.ratio=2", "sample.max_new_tokens=4", "generation.backend=openai",
                             f"generation.base_url={url}", "generation.api_key_env=DELIA_TEST_KEY", "generation.server_model=tiny",
                             "generation.max_retries=12", "generation.timeout=5"])
    stage_task(cfg)
    out = stage_sample(cfg)["outputs"]
    assert out["rows"] == 8 and out["rows"] + out["empty_answers"] == out["requested"]
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wrong_key_is_refused_without_retries(server, monkeypatch):
    monkeypatch.setenv("K", "wrong")
    _, url = server(api_key="right")
    client = OpenAIGenerator(url, "tiny", max_retries=5, api_key_env="K", backoff=0.01)
    with pytest.raises(DeliaError, match="HTTP 401"):
        _collect(client, REQUESTS[:1])


def test_sample_gives_up_in_one_line_and_keeps_the_finished_rows(server, tiny_model_dir, tmp_path, capfd):
    """The server starts failing every request mid-way: the stage stops with one line, the answers it had
    stay in the cache, and the rerun (server healthy again) asks only for the rest and ends with the
    rows an uninterrupted run gives."""
    import time

    from delia.config import load_config
    from delia.pipeline import stage_sample, stage_task

    srv, url = server(slow_seconds=0.0)

    def config(run):
        return load_config(None, [f"run_dir={tmp_path / run}", f"model.name={tiny_model_dir}", "task.train_rows=4",
                                  "task.eval_rows=1", "mix.ratio=3", "sample.max_new_tokens=4", "sample.batch_size=2",
                                  "generation.backend=openai", f"generation.base_url={url}",
                                  "generation.server_model=tiny", "generation.max_retries=2", "generation.timeout=5",
                                  "generation.concurrency=1"])

    whole = config("whole")
    stage_task(whole)
    stage_sample(whole)
    cut = config("cut")
    stage_task(cut)
    start = srv.served

    def break_after_four():
        while srv.served < start + 4:
            time.sleep(0.005)
        srv.faults = 1.0

    threading.Thread(target=break_after_four, daemon=True).start()
    with pytest.raises(DeliaError, match="gave up after 2 retries") as e:
        stage_sample(cut)
    assert "\n" not in str(e.value)
    kept = len((tmp_path / "cut" / "sample" / "cache.jsonl").read_text().splitlines())
    assert 4 <= kept < 12  # every answer that arrived (each request has its own seed, so part of a batch is fine)
    srv.faults = 0.0
    out = stage_sample(cut)["outputs"]
    assert out["resumed_from_cache"] == kept
    assert (tmp_path / "cut" / "sample" / "diverse.jsonl").read_text() == \
        (tmp_path / "whole" / "sample" / "diverse.jsonl").read_text()
