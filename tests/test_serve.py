"""`delia serve` answers every request with a status: real server on loopback, raw HTTP and the official
`openai` client."""

from __future__ import annotations

import http.client
import json
import re
import select
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


def _raw(srv, data: bytes, timeout: float = 5.0, pause: float = 0.0) -> bytes:
    """What the server answers on one connection to `data` (sent a byte every `pause` s when set) until it
    closes or `timeout` s pass; b"" when nothing came."""
    sock = socket.create_connection(("127.0.0.1", srv.server_address[1]))
    sock.settimeout(timeout)
    out = b""
    try:
        if pause:  # until the server answers
            for byte in data:
                if select.select([sock], [], [], pause)[0]:
                    break
                sock.sendall(bytes([byte]))
        else:
            sock.sendall(data)
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, OSError):
        pass
    finally:
        sock.close()
    return out


def _post(path: str, body: bytes, key: str = "k3y") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_unused_body_is_dropped_so_the_next_request_on_the_connection_is_read_right(server):
    smuggled = b"GET /v1/secret HTTP/1.1\r\nHost: x\r\n\r\n"
    good = json.dumps(GOOD).encode()
    # a 404, a 401 and a 405 answered before their bodies are read, then a chat, on one keep-alive connection
    data = (_post("/v1/embeddings", smuggled) + _post("/v1/chat/completions", smuggled, key="wrong")
            + b"PUT /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Length: 4\r\n\r\nPOST"
            + _post("/v1/chat/completions", good))
    answer = _raw(server, data, timeout=3.0).decode()
    statuses = re.findall(r"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == ["404", "401", "405", "200"], answer
    assert "/v1/secret" not in answer


def test_the_official_client_recovers_from_errors_on_one_keep_alive_connection(server):
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    accepted = []
    accept = server.get_request
    server.get_request = lambda: accepted.append(1) or accept()
    try:
        with openai.DefaultHttpxClient() as http:
            good = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, http_client=http)
            wrong = openai.OpenAI(base_url=url, api_key="nope", max_retries=0, http_client=http)
            chat = dict(model="tiny", messages=GOOD["messages"], max_tokens=4, seed=3)
            first = good.chat.completions.create(**chat).choices[0].message.content
            with pytest.raises(openai.NotFoundError):
                good.embeddings.create(model="tiny", input="a body the server never reads")
            assert good.chat.completions.create(**chat).choices[0].message.content == first
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(**chat)
            with pytest.raises(openai.BadRequestError):
                good.chat.completions.create(**{**chat, "n": 2})
            assert good.chat.completions.create(**chat).choices[0].message.content == first
    finally:
        server.get_request = accept
    assert len(accepted) == 1  # every call above on the same connection


@pytest.mark.parametrize("line", [b"HELLO\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /v1/models\r\n"])
def test_a_request_line_that_is_not_http_1_gets_a_status_line(server, line):
    answer = _raw(server, line)
    assert answer.startswith(b"HTTP/1.1 400 ") or answer.startswith(b"HTTP/1.1 505 "), answer
    assert b"\r\n\r\n{\"error\"" in answer


def test_the_bound_covers_the_whole_request_however_slowly_it_arrives(server):
    # read_timeout is 1 s: headers that never end, and a body at a byte every 0.25 s (each read in time)
    for data in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40,
                 _post("/v1/chat/completions", json.dumps(GOOD).encode())):
        started = time.time()
        answer = _raw(server, data, timeout=8.0, pause=0.25 if data.startswith(b"POST") else 0.1)
        assert answer.startswith(b"HTTP/1.1 408") and time.time() - started < 6, answer


def test_a_prompt_beyond_the_context_a_lone_surrogate_and_a_tiny_temperature(server):
    long = {"messages": [{"role": "user", "content": "healthy tips " * 400}], "max_tokens": 4}
    status, _, payload = _call(server, "POST", "/v1/chat/completions", long)
    assert status == 400 and "context of 512 tokens" in json.loads(payload)["error"]["message"]
    status, _, payload = _call(server, "POST", "/v1/chat/completions",
                               raw=b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 4}')
    assert status == 400 and json.loads(payload)["error"]["param"] == "messages[0].content", payload
    status, _, payload = _call(server, "POST", "/v1/chat/completions", {**GOOD, "temperature": 1e-300})
    greedy = _call(server, "POST", "/v1/chat/completions", GOOD)[2]
    assert status == 200 and json.loads(payload)["choices"] == json.loads(greedy)["choices"]


def test_every_method_needs_the_key_and_head_gets_no_body(server):
    for method in ("PUT", "HEAD", "DELETE"):
        assert _call(server, method, "/v1/models", key=None)[0] == 401, method
    status, _, payload = _call(server, "HEAD", "/v1/models")
    assert status == 405 and payload == b""


def test_a_client_that_goes_away_leaves_no_traceback(server, capsys):
    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
        try:
            raise error
        except OSError:
            server.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def talker(tiny_model_dir):
    """A server over the tiny model with wide weights, so that it writes words, not only newlines."""
    import torch

    from delia.model.loading import load_model

    model, tokenizer = load_model(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    srv = ChatServer(model, tokenizer, "tiny", port=0, max_tokens=32)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_streaming_sends_the_answer_as_it_is_made(talker):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{talker.server_address[1]}/v1", api_key="x", max_retries=0)
    chat = dict(model="tiny", messages=GOOD["messages"], max_tokens=24, seed=1)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(**chat, stream=True)
              if c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole, pieces
