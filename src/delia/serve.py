"""`delia serve`: an OpenAI-compatible chat server over the local backend (a base model plus an
optional adapter), so you can chat with what you trained. Listens on loopback unless told otherwise.

Every request gets an HTTP status and, for errors, an OpenAI-style JSON body (`{"error": {"message",
"type", "param", "code"}}`): a body of the wrong shape is a 400 naming the field, a body larger than
`MAX_BODY` a 413, a request (line, headers and body together) that does not arrive within `read_timeout`
seconds a 408, `max_tokens` above the server's limit or a prompt that does not fit the model's context
with it a 400, an unknown route or method a 404 / 405, a request line that is not HTTP/1.x a 400 (each
with a status line). A body the server does not use (an error answered first) is read and dropped, so
the next request on a keep-alive connection starts where it should. `stream: true` is served as
server-sent events, a chunk as the tokens are made, then the finish chunk and `[DONE]`, as OpenAI clients
expect; `n` > 1 is refused. Requests share the one model in turn: one generates while the others wait.
Generation stops when the client goes away. With an API key, every route and method needs it.

`faults` > 0 makes a share of requests fail on purpose (429, 500, a dropped connection, a slow answer)
to test clients: delia's own HTTP backend is tested against it.
"""

from __future__ import annotations

import io
import json
import math
import random
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .model.generate import LocalGenerator, Request

FAULTS = ("429", "500", "drop", "slow")
MAX_BODY = 1 << 20
"""Bytes a request body may have."""
ROLES = ("system", "user", "assistant")
GREEDY_BELOW = 1e-6
"""Temperatures below this decode greedily (their limit): dividing logits by them overflows."""


class _Deadline(io.RawIOBase):
    """A connection's reads under one bound per request: up to `idle` seconds for a request to begin, then
    `bound` seconds for all of it (request line, headers and body), however slowly it trickles in."""

    def __init__(self, sock: socket.socket, bound: float, idle: float):
        self.sock, self.bound, self.idle = sock, bound, idle
        self.deadline: float | None = None
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.idle if self.deadline is None else self.deadline - time.monotonic()
        self.expired = self.deadline is not None and wait <= 0
        if self.expired:
            raise TimeoutError(f"the request did not arrive within {self.bound:g} s")
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = self.deadline is not None
            raise
        finally:
            self.sock.settimeout(None)  # answers are written without this bound
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.bound
        return n


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, close: bool = False):
        super().__init__(message)
        self.param, self.status = param, status
        self.close = close or status in (408, 411, 413)
        """What follows on the connection cannot be read as the next request: end it."""


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 faults: float = 0.0, fault_seed: int = 0, slow_seconds: float = 3.0, api_key: str = "",
                 max_tokens: int = 1024, read_timeout: float = 10.0, idle_timeout: float = 120.0):
        super().__init__((host, port), _Handler)
        self.api_key = api_key  # when set, requests must carry `Authorization: Bearer <key>`
        self.generator = LocalGenerator(model, tokenizer, batch_size=1)
        self.model_id = model_id
        self.max_tokens = max_tokens
        """The most new tokens one request may ask for (and the default is the smaller of this and 256)."""
        self.read_timeout = read_timeout
        """Seconds a whole request (line, headers, body) may take to arrive."""
        self.idle_timeout = idle_timeout
        """Seconds a keep-alive connection may wait for its next request."""
        self.context = getattr(model.config, "max_position_embeddings", None) or 0
        """The model's context in tokens: a prompt and its `max_tokens` must fit in it (0: not known)."""
        self.faults = faults
        self.slow_seconds = slow_seconds
        self._rng = random.Random(fault_seed)
        self._lock = threading.Lock()  # one generation at a time on the shared model
        self.served = 0
        self.injected: dict[str, int] = {f: 0 for f in FAULTS}

    def pick_fault(self) -> str | None:
        with self._lock:
            if self._rng.random() < self.faults:
                fault = self._rng.choice(FAULTS)
                self.injected[fault] += 1
                return fault
        return None

    def handle_error(self, request, client_address):
        """A client that went away (reset, broken pipe) ends its connection quietly; anything else is one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            print(f"delia serve: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    def prompt_tokens(self, req: dict) -> int:
        """The prompt's length in tokens; BadRequest when the chat template refuses the messages or the
        prompt and `max_tokens` do not fit the model's context."""
        try:
            n = len(self.generator.prompt_ids(req["messages"]))
        except Exception as e:  # noqa: BLE001 - a template's own refusal (raise_exception) is the client's error
            raise BadRequest(f"the chat template refused these messages: {str(e)[:200]}", "messages") from None
        if self.context and n + req["max_tokens"] > self.context:
            raise BadRequest(f"the prompt has {n} tokens; with max_tokens {req['max_tokens']} it does not fit the "
                             f"model's context of {self.context} tokens", "messages")
        return n

    def complete(self, req: dict, gone=None, streamer=None) -> int:
        """The answer's token count for a checked request (its text in `req["answer"]`); `gone()` true stops
        generating; a `streamer` (transformers' TextIteratorStreamer) receives the tokens as they are made."""
        request = Request(key=str(req["seed"]), messages=req["messages"])
        with self._lock:
            ((_, text, n),) = next(self.generator.batches([request], req["max_tokens"], req["temperature"],
                                                          req["top_p"], req["seed"], should_stop=gone,
                                                          streamer=streamer))
            self.served += 1
        req["answer"] = text
        return n


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts (`{"type": "text", "text": ...}`), of text
    that UTF-8 can hold (JSON lets a lone surrogate through)."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise BadRequest(f"'{where}' must be a string or a list of text parts", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{where}' holds a lone surrogate at character {e.start}, not text", where) from None
    return value


def check_request(body, max_tokens: int) -> dict:
    """The chat completion request's settings, checked; BadRequest names the field that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"'messages[{i}]' must be an object with a role ({', '.join(ROLES)})", f"messages[{i}]")
        checked.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}].content")})
    if checked[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in checked):
        raise BadRequest("'messages' must hold a user turn and end with one", "messages")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = min(256, max_tokens)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_tokens:
        raise BadRequest(f"'max_tokens' must be an integer from 1 to {max_tokens} (this server's limit), got {limit!r}",
                         "max_tokens")
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest(f"'seed' must be a non-negative integer, got {seed!r}", "seed")
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise BadRequest(f"'n' must be 1 (one answer per request), got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model")
    temperature = _number(body, "temperature", 0.0, 0, 2)
    return {"messages": checked, "max_tokens": limit, "temperature": temperature if temperature >= GREEDY_BELOW else 0.0,
            "top_p": _number(body, "top_p", 1.0, 0, 1), "seed": seed, "stream": bool(stream), "model": model}


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet; no request bodies in logs
        pass

    def setup(self):
        super().setup()
        self._reader = _Deadline(self.connection, self.server.read_timeout, self.server.idle_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """One request under the whole-request bound; one that runs past it gets a 408 and the connection ends."""
        self._reader.deadline, self._reader.expired = None, False
        self._body_read, self._answered = False, False
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"  # until a request line is read
        super().handle_one_request()  # a read past the bound ends it (TimeoutError is caught there)
        if self._reader.expired and not self._answered:
            self.send_error(408, f"the request did not arrive within {self.server.read_timeout:g} s")

    def parse_request(self) -> bool:
        if len(str(self.raw_requestline, "iso-8859-1").split()) == 2:  # HTTP/0.9 (`GET /`): not served
            self.request_version = "HTTP/1.0"
            self.send_error(400, "not an HTTP/1.x request line")
            return False
        return super().parse_request()

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._drain()
        data = json.dumps(payload).encode()
        self._answered = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
               headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}}, headers)

    def send_error(self, code, message=None, explain=None):
        """The framework's own errors (a request line that is not HTTP, an unknown method) as JSON too, with
        a status line, and the connection closed (what follows on it cannot be trusted)."""
        self.close_connection, self._body_read = True, True
        if getattr(self, "request_version", "") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # so the status line and headers are written
        try:
            self._error(code, message or self.responses.get(code, ("error",))[0])
        except OSError:
            pass

    def _drain(self) -> None:
        """Read and drop a body that will not be used, so the next request on this connection starts where it
        should; a body of unknown or too large a size, or one that does not arrive in time, ends the
        connection instead."""
        if self._body_read:
            return
        self._body_read = True
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or (length is not None and not (length.isdigit() and int(length) <= MAX_BODY)):
            self.close_connection = True
            return
        try:
            self.rfile.read(int(length or 0))
        except (TimeoutError, OSError):
            self.close_connection = True

    def _authorised(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._error(401, "missing or wrong API key", kind="authentication_error")
            return False
        return True

    def _gone(self) -> bool:
        """The client closed its connection (what it would send next is not read, only peeked at)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_GET(self):
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                         "created": 0, "owned_by": "delia"}]})
        else:
            self._error(404, f"no route {self.path}", kind="not_found_error")

    def _not_allowed(self):
        if self._authorised():
            self._error(405, f"method {self.command} is not allowed on {self.path}", headers={"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed

    def _body(self):
        length = self.headers.get("Content-Length")
        self._body_read = True
        if length is None:
            raise BadRequest("a Content-Length header is needed", status=411)
        if not length.isdigit() or int(length) > MAX_BODY:
            raise BadRequest(f"Content-Length must be an integer of at most {MAX_BODY} bytes, got {length[:20]!r}",
                             status=413 if length.isdigit() else 400, close=True)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise BadRequest(f"the request did not arrive within {self.server.read_timeout:g} s", status=408) from None
        if len(raw) < int(length):
            raise BadRequest("the body ended before Content-Length bytes", status=400, close=True)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None

    def do_POST(self):
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", kind="not_found_error")
            return
        try:
            req = check_request(self._body(), self.server.max_tokens)
            prompt = self.server.prompt_tokens(req)
        except BadRequest as e:
            self.close_connection = e.close
            self._error(e.status, f"bad request: {e}", e.param)
            return
        if req["model"] not in (None, self.server.model_id):
            self._error(404, f"the model '{req['model']}' does not exist here (this server has "
                             f"'{self.server.model_id}')", "model", kind="not_found_error")
            return
        fault = self.server.pick_fault()
        if fault == "429":
            self._error(429, "rate limited (injected)", kind="rate_limit_error", headers={"Retry-After": "0"})
            return
        if fault == "500":
            self._error(500, "server error (injected)", kind="server_error")
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            time.sleep(self.server.slow_seconds)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": self.server.model_id}
        if req["stream"]:
            self._stream(req, head)
            return
        try:
            n = self.server.complete(req, gone=self._gone)
        except Exception as e:  # noqa: BLE001 - the client gets a status, not a dropped connection
            self._error(500, f"generation failed: {type(e).__name__}", kind="server_error")
            return
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        self._send(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": req["answer"]},
             "finish_reason": "length" if n >= req["max_tokens"] else "stop"}]})

    def _stream(self, req: dict, head: dict) -> None:
        """Server-sent events: the role, then a content chunk as each piece of text is made (leading and
        trailing white space dropped, as in the whole answer), the finish chunk and `[DONE]`."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.server.generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate():
            try:
                result["n"] = self.server.complete(req, gone=self._gone, streamer=streamer)
            except Exception as e:  # noqa: BLE001 - reported in the stream
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        self._answered = self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        worker.start()
        try:
            event({"role": "assistant", "content": ""})
            sent, held = False, ""
            for piece in streamer:
                text = held + piece
                if not sent:
                    text = text.lstrip()
                body = text.rstrip()
                held = text[len(body):]  # white space that only counts if more text follows
                if body:
                    event({"content": body})
                    sent = True
            worker.join()
            if "error" in result:
                event({"content": f"[generation failed: {type(result['error']).__name__}]"}, "stop")
            else:
                event({}, "length" if result["n"] >= req["max_tokens"] else "stop")
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client went away: generation stops at its next step
            worker.join()


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000, faults: float = 0.0,
          api_key: str = "", max_tokens: int = 1024) -> None:
    server = ChatServer(model, tokenizer, model_id, host, port, faults, api_key=api_key, max_tokens=max_tokens)
    print(f"delia: serving {model_id} on http://{host}:{server.server_address[1]}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
