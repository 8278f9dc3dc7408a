"""Security: remote code stays off, API keys never reach a file or a log, arm names cannot leave the
run folder, model output is never evaluated as code, the server binds to loopback."""

import ast
import contextlib
import io
import json
import shutil
import threading
from pathlib import Path

import pytest

from delia.cli import main

SRC = Path(__file__).resolve().parent.parent / "src" / "delia"


def _delia(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_remote_code_is_not_run_unless_turned_on(tiny_model_dir, tmp_path):
    from delia import DeliaError
    from delia.config import load_config
    from delia.model.loading import load_model
    from delia.pipeline import stage_report, stage_task

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaForCausalLM as Evil\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        load_model(str(folder))
    except DeliaError:
        pass  # refusing is fine; running the code is not
    assert not marker.exists()
    from transformers import LlamaForCausalLM

    try:
        load_model(str(folder), trust_remote_code=True)  # the same folder, turned on: its code does run
    finally:
        LlamaForCausalLM._auto_class = None  # registering `Evil` marked the shared class for every later save
    assert marker.exists()
    on = load_config(None, [f"run_dir={tmp_path / 'on'}", "model.trust_remote_code=true"])
    off = load_config(None, [f"run_dir={tmp_path / 'off'}"])
    stage_task(on), stage_task(off)  # a report needs a finished stage
    assert "trust_remote_code: ON" in stage_report(on).read_text()
    assert "trust_remote_code: off" in stage_report(off).read_text()


@pytest.mark.parametrize("verb", ["train", "evaluate", "export", "diagnose"])
@pytest.mark.parametrize("arm", ["../../escaped", "/tmp/escaped-arm", "delia/../../x"])
def test_arm_names_cannot_leave_the_run_folder(tmp_path, verb, arm):
    (tmp_path / "c.yaml").write_text(f"run_dir: {tmp_path / 'deep' / 'run'}\n")
    code, _, err = _delia(verb, str(tmp_path / "c.yaml"), "--arm", arm)
    assert code == 2 and err.count("\n") == 1 and f"unknown arm {arm!r}" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # nothing written anywhere
    assert not Path("/tmp/escaped-arm").exists()


def test_no_eval_or_exec_in_the_package():
    """Model output is parsed with json and ast.literal_eval only."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                calls.append(f"{path}:{node.lineno}")
    assert not calls


def test_server_binds_to_loopback_by_default(tiny):
    from delia.cli import _parser
    from delia.serve import ChatServer

    srv = ChatServer(*tiny, "tiny", port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()
    assert _parser().parse_args(["serve", "c.yaml"]).host == "127.0.0.1"


def test_api_key_never_reaches_a_file_or_a_log(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """The whole chain over a keyed server on loopback (faults on, so retries log), then a wrong key:
    the key is in no file of the run, no manifest, config dump or report, and in no output line."""
    from delia.serve import ChatServer

    secret = "sk-test-NEVER-LOG-7d1e"
    monkeypatch.setenv("DELIA_SECRET", secret)
    srv = ChatServer(*tiny, "tiny", port=0, faults=0.3, fault_seed=2, slow_seconds=0.0, api_key=secret)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        queries = tmp_path / "q.jsonl"
        queries.write_text("".join(json.dumps({"instruction": f"Name {n} colours."}) + "\n" for n in range(20)))
        (tmp_path / "c.yaml").write_text(
            f"run_dir: {tmp_path / 'run'}\nmodel: {{name: {tiny_model_dir}}}\narms: [untouched]\n"
            f"task: {{train_rows: 4, eval_rows: 2}}\nsample: {{queries: {queries}, max_new_tokens: 4}}\n"
            f"evaluate: {{max_new_tokens: 4}}\ngeneration: {{backend: openai, base_url: '{url}', "
            f"api_key_env: DELIA_SECRET, server_model: tiny, max_retries: 12, timeout: 5}}\n")
        logs = []
        for verb in ("run", "sample", "report"):
            code, out, err = _delia(verb, str(tmp_path / "c.yaml"))
            assert code == 0, err
            logs += [out, err]
        assert (tmp_path / "run" / "sample" / "diverse.jsonl").exists()
        monkeypatch.setenv("DELIA_SECRET", secret + "-wrong")  # refused: the error line names no key
        code, out, err = _delia("evaluate", str(tmp_path / "c.yaml"), "--arm", "untouched",
                                "--set", "evaluate.batch_size=3")
        assert code == 2 and "401" in err
        logs += [out, err]
    finally:
        srv.shutdown()
        srv.server_close()
    assert sum(srv.injected.values()) > 0  # the retries did happen
    assert not any(secret in log for log in logs)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in files) and any(p.name == "manifest.json" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_a_model_whose_code_is_refused_is_one_line(tiny_model_dir, tmp_path):
    """A custom architecture needs its own code: with trust_remote_code off that is one line, status 2."""
    import contextlib
    import io

    from delia.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('the code ran')\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["serve", "configs/demo.yaml", "--set", f"model.name={folder}", "--port", "0"])
    assert code == 2 and err.getvalue().count("\n") == 1 and "model.trust_remote_code: true" in err.getvalue(), err.getvalue()


def test_a_model_without_a_chat_template_is_refused_in_one_line(tiny_model_dir, tmp_path):
    import contextlib
    import io

    from delia.cli import main

    folder = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["serve", "configs/demo.yaml", "--set", f"model.name={folder}", "--port", "0"])
    assert code == 2 and err.getvalue().count("\n") == 1 and "no chat template" in err.getvalue(), err.getvalue()
