"""How many bad-input cases of each class keep delia's promises (issue 29): the server speaks HTTP/1.1
(an answer with a status line for every request, no keep-alive desync, one bound per request, long
prompts refused, streaming in chunks), every value is checked when the config, an experiment file or an
API call is read (one `DeliaError` naming the field, before any work). The cases are written here, apart
from the tests' own; the server runs over a tiny random model on loopback.

    .venv/bin/python benchmarks/reliability_census.py
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from delia import DeliaError  # noqa: E402
from delia.config import load_config  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3}


def tiny_server(folder: Path):
    import conftest

    from delia.model.loading import load_model
    from delia.serve import ChatServer

    class Factory:
        def mktemp(self, name):
            return folder

    srv = ChatServer(*load_model(conftest.tiny_model_dir.__wrapped__(Factory())), "tiny", port=0, api_key="k",
                     max_tokens=16, read_timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def exchange(port: int, data: bytes, pause: float = 0.0, wait: float = 4.0) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(wait)
    out = b""
    try:
        for piece in ([bytes([b]) for b in data] if pause else [data]):
            if pause and select.select([sock], [], [], pause)[0]:
                break
            sock.sendall(piece)
        while chunk := sock.recv(65536):
            out += chunk
    except OSError:
        pass
    sock.close()
    return out


def post(path: str, body: bytes, key: str = "k", method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def http_cases(port: int) -> dict[str, bool]:
    good = json.dumps(CHAT).encode()
    cases = {}
    bodies = {"smuggled": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "json": good, "binary": bytes(range(256)),
              "empty": b""}
    early = {"404 route": ("/v1/embeddings", "k", "POST"), "401 key": ("/v1/chat/completions", "no", "POST"),
             "405 PUT": ("/v1/models", "k", "PUT"), "405 DELETE": ("/v1/models", "k", "DELETE"),
             "405 PATCH": ("/v1/x", "k", "PATCH")}
    for e, (path, key, method) in early.items():
        for b, body in bodies.items():
            answer = exchange(port, post(path, body, key, method) + post("/v1/chat/completions", good)).decode("latin-1")
            cases[f"keep-alive: {e} with a {b} body, then a chat"] = re.findall(r"HTTP/1\.1 (\d{3}) ", answer)[-1:] == ["200"] \
                and len(re.findall(r"HTTP/1\.1 \d{3} ", answer)) == 2
    lines = [b"HELLO\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /\r\n", b"GET / HTTP/9.9\r\n\r\n",
             b"GET / FTP/1.0\r\n\r\n", b"G" * 70000 + b"\r\n", b"\x00\x01\x02\r\n", b"\x16\x03\x01\x00\xa5\x01\r\n",
             b"POST\r\n", b"a b c d\r\n"]
    for line in lines:
        answer = exchange(port, line)
        cases[f"request line {line[:16]!r}"] = answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 505")
    slow = {"headers a byte every 0.2 s": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 30, 0.2),
            "body a byte every 0.3 s": (post("/v1/chat/completions", good), 0.3),
            "headers that never end": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", 0.0)}
    for name, (data, pause) in slow.items():
        started = time.time()
        answer = exchange(port, data, pause, wait=6.0)
        cases[f"bound: {name}"] = answer.startswith(b"HTTP/1.1 408") and time.time() - started < 5
    for words in (400, 2000):
        body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "colour " * words}]}).encode()
        cases[f"prompt of {words} words (context 512)"] = exchange(port, post("/v1/chat/completions", body)).startswith(b"HTTP/1.1 400")
    for raw in (b'"\\ud800"', b'"a\\udfffb"', b'[{"type": "text", "text": "\\ud83d"}]'):
        body = b'{"messages": [{"role": "user", "content": ' + raw + b'}], "max_tokens": 3}'
        cases[f"content {raw.decode()}"] = exchange(port, post("/v1/chat/completions", body)).startswith(b"HTTP/1.1 400")
    for t in (1e-300, 1e-30, 5e-7):
        body = json.dumps({**CHAT, "temperature": t}).encode()
        cases[f"temperature {t:g}"] = exchange(port, post("/v1/chat/completions", body)).startswith(b"HTTP/1.1 200")
    for method in ("GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS"):
        cases[f"{method} without the key"] = exchange(port, post("/v1/models", b"", key="")).startswith(b"HTTP/1.1 401")
    head = exchange(port, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n", wait=2.0)
    cases["HEAD: 405 without a body"] = head.startswith(b"HTTP/1.1 405") and head.endswith(b"\r\n\r\n")
    return cases


def refused(call) -> bool:
    """The call raised one DeliaError line (and nothing else)."""
    try:
        call()
    except DeliaError as e:
        return "\n" not in str(e)
    except Exception:  # noqa: BLE001 - a raw error breaks the promise
        return False
    return False


def config_cases(tmp: Path) -> dict[str, bool]:
    (tmp / "file").write_text("x")
    templates = {"unclosed": "{% if messages %}", "filter": "{{ messages | nosuchfilter }}",
                 "raise": "{% if messages[0].role == 'user' %}{{ raise_exception('no users') }}{% endif %}"}
    for name, text in templates.items():
        (tmp / f"{name}.jinja").write_text(text)
    sets = ["train.lr_scheduler=Linear", "train.lr_scheduler=cosine_with_min_lr", "train.lr_scheduler=warmup_stable_decay",
            "train.lr_scheduler=5", "train.lr_scheduler=null", "train.report_to=[wandb]", "train.report_to=[tensorboard, trackio]",
            "train.batch_size=10", "train.batch_size=7", 'task.description="x\\0"', 'task.keywords=["a", "\\0"]',
            'task.new_tokens=["<s\\0p>"]', 'run_dir="runs/\\0x"', 'task.description="\\udc80"', 'controls.other_token="\\ud800"',
            "run_dir=/dev/shm/x", "run_dir=/proc", "run_dir=/sys/kernel", f"run_dir={tmp / 'file'}", f"run_dir={tmp / 'file' / 'a' / 'b'}",
            "sample.queries=''", "task.source='hf:'", "task.source='hf:@test'", "task.source='hf::config'",
            "sample.queries=' , alpaca_en_demo'", "task.eval_source='hf:'",
            *(f"model.chat_template={tmp / name}.jinja" for name in templates)]
    out = {f"--set {s}": refused(lambda s=s: load_config(str(ROOT / "configs/demo.yaml"), [s])) for s in sets}
    out["--set train.micro_batch_size=5 (paper's rule)"] = refused(
        lambda: load_config(str(ROOT / "configs/demo.yaml"), ["train.batch_size=0", "train.micro_batch_size=5"]))
    return out


def experiment_cases(tmp: Path) -> dict[str, bool]:
    from delia.experiment import load_experiment

    (tmp / "b.yaml").write_text("seed: 0\n")
    texts = {"dir: 5": "dir: 5", "dir: [a]": "dir: [a]", "dir: ''": "dir: ''", "dir: .": "dir: .", "dir: ..": "dir: ..",
             "dir: a file": f"dir: {tmp / 'b.yaml'}", "dir: under a file": f"dir: {tmp / 'b.yaml' / 'x'}",
             "dir: NUL": 'dir: "a\\0b"', "dir: /proc": "dir: /proc/x"}
    out = {}
    for name, line in texts.items():
        (tmp / "e.yaml").write_text(f"base: b.yaml\n{line}\nruns: [{{name: a}}]\n")
        out[f"experiment {name}"] = refused(lambda: load_experiment(tmp / "e.yaml"))
    for name, base in {"base: 5": "5", "base: []": "[]", "base: missing": "nope.yaml", "base: a folder": str(tmp)}.items():
        (tmp / "e.yaml").write_text(f"base: {base}\ndir: x\nruns: [{{name: a}}]\n")
        out[f"experiment {name}"] = refused(lambda: load_experiment(tmp / "e.yaml"))
    for name, run in {"300 characters": "a" * 300, "NUL": '"a\\0b"', "tab": '"a\\tb"', "newline": '"a\\nb"'}.items():
        (tmp / "e.yaml").write_text(f"base: b.yaml\ndir: x\nruns: [{{name: {run}}}]\n")
        out[f"experiment run name {name}"] = refused(lambda: load_experiment(tmp / "e.yaml"))
    return out


def api_cases() -> dict[str, bool]:
    import delia

    calls = {"load_config(5)": lambda: delia.load_config(5), "load_config(b'x')": lambda: delia.load_config(b"x"),
             "load_config([1])": lambda: delia.load_config([1]), "load_config(overrides='seed=1')":
             lambda: delia.load_config(None, "seed=1"), "load_config(overrides=[1])": lambda: delia.load_config(None, [1])}
    for ratio in (-1, float("nan"), float("inf"), [3], None, "three"):
        calls[f"mix(ratio={ratio!r})"] = lambda r=ratio: delia.mix([], [], ratio=r)
    for seed in (-1, 2**40, 1.5):
        calls[f"mix(seed={seed!r})"] = lambda s=seed: delia.mix([], [], ratio=1, seed=s)
    for key, value in (("temperature", -1), ("top_p", 0), ("top_p", 5), ("backend", "bogus"), ("backend", "openai"),
                       ("batch_size", 0), ("max_new_tokens", 0), ("max_new_tokens", -5), ("n", -1), ("n", 1.5),
                       ("cut_answers", "trim"), ("seed", -3)):
        calls[f"self_sample({key}={value!r})"] = lambda k=key, v=value: delia.self_sample(["hi"], model="/nonexistent", **{k: v})
    calls["self_sample([])"] = lambda: delia.self_sample([], model="/nonexistent")
    return {name: refused(call) for name, call in calls.items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        srv = tiny_server(tmp / "model")
        classes = {"HTTP/1.1 (delia serve)": http_cases(srv.server_address[1]),
                   "config values at load": config_cases(tmp),
                   "experiment files": experiment_cases(tmp), "Python API": api_cases()}
        srv.shutdown()
    for name, cases in classes.items():
        print(f"{name}: {sum(cases.values())} of {len(cases)} cases keep the promise")
        for case, held in cases.items():
            if not held:
                print(f"  broken: {case}")
    print("command: .venv/bin/python benchmarks/reliability_census.py")


if __name__ == "__main__":
    main()
