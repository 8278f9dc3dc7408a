"""`delia serve` answers every request with a status: real server on loopback, raw HTTP and the official
`openai` client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from delia.serve import MAX_BODY, ChatServer

GOOD = {"messages": [{"role": "user", "content": "Give two healthy tips."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from delia.model.loading import load_model

    srv = ChatServer(*load_model(tiny_model_dir), "tiny", port=0, api_key="k3y", max_tokens=16, read_timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _call(srv, method: str, path: str, body=None, raw: bytes | None = None, key: str | None = "k3y", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), payload


BAD_BODIES = [([], "JSON object"), (None, "JSON object"), ({"messages": ["hi"]}, "messages[0]"),
              ({"messages": [{"role": "user"}]}, "messages[0].content"), ({**GOOD, "max_tokens": -5}, "max_tokens"),
              ({**GOOD, "max_tokens": 17}, "this server's limit"), ({**GOOD, "temperature": "hot"}, "temperature"),
              ({**GOOD, "seed": 1.5}, "seed"), ({**GOOD, "n": 2}, "'n' must be 1"), ({**GOOD, "stream": "yes"}, "stream"),
              ({"messages": [{"role": "wizard", "content": "x"}]}, "role"), ({**GOOD, "top_p": float("inf")}, "top_p"),
              ({"messages": [{"role": "assistant", "content": "x"}]}, "user turn")]


@pytest.mark.parametrize("body,words", BAD_BODIES)
def test_a_body_of_the_wrong_shape_is_a_400_naming_the_field(server, body, words):
    status, kind, payload = _call(server, "POST", "/v1/chat/completions", raw=json.dumps(body).encode())
    error = json.loads(payload)["error"]
    assert status == 400 and kind == "application/json" and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_every_route_and_method_answers_in_json(server):
    assert _call(server, "GET", "/v1/models", key=None)[0] == 401  # the key guards every route
    assert _call(server, "GET", "/v1/models", key="wrong")[0] == 401
    assert json.loads(_call(server, "GET", "/v1/models")[2])["data"][0]["id"] == "tiny"
    for method, path, status in (("GET", "/nowhere", 404), ("DELETE", "/v1/models", 405), ("PUT", "/v1/x", 405),
                                 ("BREW", "/v1/models", 501), ("POST", "/v1/completions", 404)):
        code, kind, payload = _call(server, method, path, body={})
        assert code == status and kind == "application/json" and "error" in json.loads(payload), (method, path)
    code, _, payload = _call(server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert code == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    code, _, _ = _call(server, "POST", "/v1/chat/completions", raw=b"x" * 10, headers={"Content-Length": str(MAX_BODY + 1)})
    assert code == 413


def test_a_slow_body_times_out_and_others_are_served_meanwhile(server):
    slow = socket.create_connection(("127.0.0.1", server.server_address[1]))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                 b"Content-Length: 500\r\n\r\n{\"messages\":")
    started = time.time()
    assert _call(server, "POST", "/v1/chat/completions", GOOD)[0] == 200  # not blocked by the slow one
    slow.settimeout(10)
    answer = slow.recv(4096).decode()
    slow.close()
    assert answer.startswith("HTTP/1.1 408") and time.time() - started < 8, answer


def test_the_official_openai_client_chats_streams_and_is_refused_a_wrong_key(server):
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=4, seed=3)
    text = done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 4
    chunks = list(client.chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=4, seed=3,
                                                 stream=True))
    assert chunks and "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=4, n=2)


def test_generation_stops_when_the_client_goes_away(tiny):
    from delia.model.generate import LocalGenerator, Request

    gen = LocalGenerator(*tiny, batch_size=1)
    request = [Request(key="a", messages=GOOD["messages"])]
    calls = []

    def gone():
        calls.append(1)
        return len(calls) >= 3

    ((_, _, n),) = next(gen.batches(request, 40, should_stop=gone))
    assert n <= 3 < 40 and len(calls) == 3


def test_bad_port_or_host_is_one_line_before_the_model_loads(tmp_path):
    from delia.cli import main
    import contextlib
    import io

    for args, words in ((["--port", "70000"], "must be from 0 to 65535"), (["--host", "no.such.host.invalid"], "cannot listen")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["serve", "configs/demo.yaml", "--set", "model.name=/nonexistent", *args])
        assert code == 2 and words in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
