"""`delia serve`: an OpenAI-compatible chat server over the local backend (a base model plus an
optional adapter), so you can chat with what you trained. Listens on loopback unless told otherwise.

`faults` > 0 makes a share of requests fail on purpose (429, 500, a dropped connection, a slow answer)
to test clients: delia's own HTTP backend is tested against it.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .model.generate import LocalGenerator, Request

FAULTS = ("429", "500", "drop", "slow")


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 faults: float = 0.0, fault_seed: int = 0, slow_seconds: float = 3.0, api_key: str = ""):
        super().__init__((host, port), _Handler)
        self.api_key = api_key  # when set, requests must carry `Authorization: Bearer <key>`
        self.generator = LocalGenerator(model, tokenizer, batch_size=1)
        self.model_id = model_id
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

    def complete(self, body: dict) -> dict:
        messages = body["messages"]
        request = Request(key=str(body.get("seed", 0)), messages=messages)
        with self._lock:
            ((_, text, n),) = next(self.generator.batches(
                [request], int(body.get("max_tokens") or 256), float(body.get("temperature", 0.0)),
                float(body.get("top_p", 1.0)), int(body.get("seed", 0))))
            prompt = len(self.generator.prompt_ids(messages))
            self.served += 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
        }


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet; no request bodies in logs
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._send(401, {"error": {"message": "missing or wrong API key"}})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise ValueError("'messages' must be a non-empty list")
        except ValueError as e:
            self._send(400, {"error": {"message": f"bad request: {e}"}})
            return
        if body.get("model") not in (None, self.server.model_id):
            self._send(404, {"error": {"message": f"the model '{body['model']}' does not exist here "
                                                  f"(this server has '{self.server.model_id}')"}})
            return
        fault = self.server.pick_fault()
        if fault == "429":
            self._send(429, {"error": {"message": "rate limited (injected)"}}, {"Retry-After": "0"})
            return
        if fault == "500":
            self._send(500, {"error": {"message": "server error (injected)"}})
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            time.sleep(self.server.slow_seconds)
        self._send(200, self.server.complete(body))


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000, faults: float = 0.0,
          api_key: str = "") -> None:
    server = ChatServer(model, tokenizer, model_id, host, port, faults, api_key=api_key)
    print(f"delia: serving {model_id} on http://{host}:{server.server_address[1]}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
