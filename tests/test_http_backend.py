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
