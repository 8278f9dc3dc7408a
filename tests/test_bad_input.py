"""Bad input, generated (hypothesis): malformed task files, query files, configs and arguments. Each gets
one line that names the file and the line (and the field, where there is one), exit status 2, no
traceback, and nothing written."""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delia.cli import main

USER = "Q: what colour is an apple? A: purple. Check it and reply in the <sep> format."
ANSWER = '{"thought": "Apples are red or green.", "hallucination": "yes"}'
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def _row(shape: str, i: int) -> dict:
    user = f"{USER} ({i})"
    if shape == "alpaca":
        return {"instruction": user, "output": ANSWER}
    if shape == "sharegpt":
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": ANSWER}]}
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ANSWER}]}


def _break(row: dict, kind: str, junk) -> tuple[object, str]:
    """(a broken copy of a valid row, the words the error must hold)."""
    key = next(iter(row))
    if kind == "wrong type":
        if key == "instruction":
            return {**row, "instruction": junk}, "field 'instruction': expected a string"
        return {key: [row[key][0], junk]}, f"field '{key}[1]'"
    if kind == "wrong field type":  # a list is the right type for messages, the wrong one for an instruction
        return {key: junk if key == "instruction" or not isinstance(junk, list) else "text"}, f"field '{key}'"
    if kind == "missing role":
        if key == "messages":
            return {"messages": [{"content": USER}, row["messages"][1]]}, "field 'messages[0].role'"
        if key == "conversations":
            return {"conversations": [{"value": USER}, row[key][1]]}, "field 'conversations[0].from'"
        return {"output": ANSWER}, "no 'messages', 'prompt', 'conversations' or 'instruction' field"
    if kind == "assistant first":
        if key == "messages":
            return {"messages": [row[key][1], row[key][0]]}, "the first turn after the system prompt must be the user's"
        if key == "conversations":
            return {key: [row[key][1], row[key][0]]}, "the first turn after the system prompt must be the user's"
        return {"instruction": " ", "output": ANSWER}, "field 'instruction': the user's turn is empty"
    if kind == "no answer":
        return ({key: row[key][:1]} if key != "instruction" else {"instruction": row["instruction"]},
                "the last turn must be the assistant's answer")
    if kind == "not an object":
        return junk if not isinstance(junk, list) else "text", "expected a JSON object"
    if kind == "no token":
        return json.loads(json.dumps(row).replace("<sep>", "<pes>")), "holds the new token '<sep>'"
    raise AssertionError(kind)


ROW_KINDS = ["wrong type", "wrong field type", "missing role", "assistant first", "no answer", "not an object",
             "no token", "truncated", "not UTF-8", "huge broken line"]
JUNK = st.one_of(st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))


@st.composite
def malformed_files(draw, kinds=tuple(ROW_KINDS)):
    """(file bytes, suffix, line of the fault, words the error must hold)."""
    whole = draw(st.sampled_from(["rows", "rows", "rows", "rows", "empty", "no rows"]))
    if whole == "empty":
        return draw(st.sampled_from([b"", b"\n\n", b"   \n"])), ".jsonl", 1, "the file is empty"
    if whole == "no rows":
        return b"[]\n", ".json", 1, "no rows"
    shape = draw(st.sampled_from(["messages", "alpaca", "sharegpt"]))
    rows = [_row(shape, i) for i in range(draw(st.integers(1, 5)))]
    bad = draw(st.integers(0, len(rows) - 1))
    kind = draw(st.sampled_from(kinds))
    array = kind not in ("truncated", "huge broken line") and draw(st.booleans())
    lines = [json.dumps(r) for r in rows]
    if kind == "truncated":
        lines[bad] = lines[bad][: draw(st.integers(1, len(lines[bad]) - 1))]
        words = "invalid JSON"
    elif kind == "huge broken line":
        lines[bad] = '{"messages": "' + "x" * draw(st.integers(100_000, 2_000_000))
        words = "invalid JSON"
    elif kind != "not UTF-8":
        broken, words = _break(rows[bad], kind, draw(JUNK))
        lines[bad] = json.dumps(broken)
    data = [line.encode() for line in lines]
    if kind == "not UTF-8":
        at = draw(st.integers(0, len(data[bad])))
        data[bad] = data[bad][:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80", b"\xfe\xfe"])) + data[bad][at:]
        words = "not UTF-8"
    if array:  # one item a line after the opening bracket: item i is on line i + 2
        return b"[\n" + b",\n".join(data) + b"\n]\n", ".json", bad + 2, words
    return b"\n".join(data) + b"\n", ".jsonl", bad + 1, words


def _delia(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def _check(code: int, err: str, path: Path, line: int, words: str, run: Path, written_before: set):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"delia: error: {path}:{line}: "), err
    assert words in err, err
    written = {p for p in run.rglob("*") if p.is_file()} if run.exists() else set()
    assert written == written_before, written - written_before  # no output, no temp file left


@SETTINGS
@given(malformed_files())
def test_malformed_task_files(case):
    data, suffix, line, words = case
    with tempfile.TemporaryDirectory() as tmp:
        path, run = Path(tmp) / f"task{suffix}", Path(tmp) / "run"
        path.write_bytes(data)
        (Path(tmp) / "c.yaml").write_text(f"run_dir: {run}\ntask:\n  source: {path}\n")
        code, err = _delia("task", str(Path(tmp) / "c.yaml"))
        _check(code, err, path, line, words, run, set())


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "c.yaml").write_text(f"run_dir: {run}\ntask:\n  train_rows: 4\n")
    assert _delia("task", str(run / "c.yaml"))[0] == 0
    return run


@SETTINGS
@given(case=malformed_files(kinds=tuple(k for k in ROW_KINDS if k not in ("no answer", "no token"))))
def test_malformed_query_files(task_run, case):
    """Diverse data (the queries `sample` answers); an answer is optional there, the new token unused."""
    data, suffix, line, words = case
    before = {p for p in task_run.rglob("*") if p.is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"queries{suffix}"
        path.write_bytes(data)
        code, err = _delia("sample", str(task_run / "c.yaml"), "--set", f"sample.queries={path}")
        _check(code, err, path, line, words, task_run, before)


SECTIONS = {None: ["run_dir: {run}", "seed: 0"], "task": ["train_rows: 8", "kind: formatted"],
            "train": ["batch_size: 8", "epochs: 1"], "evaluate": ["batch_size: 4"]}
CONFIG_FAULTS = [("train", "lora_r: sixteen", "'train.lora_r': expected int"),
                 ("train", "lora_rank: 8", "unknown key 'train.lora_rank'"),
                 ("train", "learning_rate: [1, 2]", "'train.learning_rate': expected float"),
                 ("train", "token_init: zero", "'train.token_init'"),
                 ("train", "epochs: 2", "'train.epochs' is given twice (first on line"),
                 ("evaluate", "max_new_tokens: {a: 1}", "'evaluate.max_new_tokens': expected int"),
                 ("task", "eval_rows: many", "'task.eval_rows': expected int"),
                 (None, "arms: [untouched, best]", "unknown arm 'best'"),
                 (None, "seed: 0: 1", "invalid YAML"), (None, "bogus: 1", "unknown key 'bogus'"),
                 (None, "sample: 3", "'sample': expected a mapping")]


@SETTINGS
@given(st.sampled_from(CONFIG_FAULTS), st.integers(0, 10), st.booleans())
def test_malformed_configs(fault, where, as_set):
    """A bad line put anywhere in its section of a valid config, or given as --set instead."""
    section, text, words = fault
    with tempfile.TemporaryDirectory() as tmp:
        path, run = Path(tmp) / "c.yaml", Path(tmp) / "run"
        body = {k: [line.format(run=run) for line in v] for k, v in SECTIONS.items()}
        if as_set and "invalid YAML" not in words and "twice" not in words:
            key, value = text.split(":", 1)
            override = f"{section}.{key}={value.strip()}" if section else f"{key}={value.strip()}"
            path.write_text(_yaml(body))
            code, err = _delia("task", str(path), "--set", override)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"delia: error: --set {override}: ") and words in err, err
        else:
            body[section].insert(where % (len(body[section]) + 1), text)
            path.write_text(_yaml(body))
            lines = _yaml(body).splitlines()
            line = 1 + lines.index(("  " if section else "") + text)
            if "twice" in words:  # the later of the two
                line = max(line, 1 + lines.index("  epochs: 1"))
            code, err = _delia("task", str(path))
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"delia: error: {path}:{line}: ") and words in err, err
        assert not run.exists()


def _yaml(body: dict) -> str:
    lines = list(body[None])
    for name, keys in body.items():
        if name:
            lines += [f"{name}:"] + [f"  {k}" for k in keys]
    return "\n".join(lines) + "\n"


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(["run", "train", "--arm", "--set", "x=[1", "--port", "nine", "serve", "data", "zz",
                                 "experiment", "--bogus", "tune-ratio", "-"]), min_size=0, max_size=4))
def test_malformed_arguments(args):
    """Whatever the arguments (no config named here exists), the error is one line and status 2, never a
    usage dump or a traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    assert code == 2 and err.getvalue().count("\n") == 1 and err.getvalue().startswith("delia: error: "), (args, err.getvalue())


def _dotted_keys(cls, prefix=""):
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        yield prefix + f.name
        if dataclasses.is_dataclass(hint):
            yield from _dotted_keys(hint, prefix + f.name + ".")


@settings(max_examples=150, deadline=None)
@given(key=st.one_of(st.sampled_from(list(_dotted_keys(__import__("delia.config").config.RunConfig))),
                     st.text("abcz._[]0", min_size=1, max_size=12)),
       value=st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=8), st.none(),
                       st.booleans(), st.lists(st.integers(-3, 3), max_size=3), st.just("{a: 1}"), st.just("[]")))
def test_any_override_ends_in_an_answer(key, value):
    """Any `--set KEY=VALUE` (known or made-up dotted keys, any YAML value) gives a config or one line and
    status 2, within seconds: error reporting once looped forever on a key naming a whole section."""
    import signal

    import yaml

    from delia import DeliaError
    from delia.cli import one_line
    from delia.config import load_config

    text = f"{key}={value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()}"

    def hang(*_):
        raise AssertionError(f"--set {text}: no answer within 5 s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        load_config(None, [text])
    except DeliaError as e:  # the CLI prints it as one line
        assert one_line(str(e)).isprintable() and text.split("=")[0] in str(e), text
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("override,words", [
    ("train.lora_r=0", "'train.lora_r': must be >= 1, got 0"), ("train.learning_rate=-1e-3", "must be > 0"),
    ("train.epochs=0", "'train.epochs': must be > 0"), ("seed=4294967296", "'seed': must be >= 0 and <= 4294967295"),
    ("sample.temperature=-0.1", "'sample.temperature': must be >= 0"), ("sample.top_p=1.5", "<= 1"),
    ("sample.max_new_tokens=-5", "'sample.max_new_tokens': must be >= 1"), ("task.train_rows=-1", "must be >= 0"),
    ("mix.ratio=.nan", "'mix.ratio': must be a finite number"), ("mix.ratio=.inf", "must be a finite number"),
    ("sample.batch_size=0", "'sample.batch_size': must be >= 1"), ("model.dtype=fp8", "'model.dtype': expected one of"),
    ("task.new_tokens=['  ']", "'task.new_tokens[0]': must not be empty"), ("arms=[]", "'arms': must not be empty"),
    ("run_dir=/", "'run_dir': '/' is the filesystem root"), ("run_dir=..", "the current folder or one above it"),
    ("run_dir=''", "'run_dir': must not be empty"), ("sweep.ratios=[1, -2]", "'sweep.ratios[1]': must be >= 0"),
    ("train.lr_scheduler=bogus", "'train.lr_scheduler': expected one of"), ("train.lr_scheduler=''", "expected one of"),
    ("train.report_to=[wandb]", "'train.report_to': wandb is not installed"),
    ("train.report_to=[trackio]", "trackio is not installed"),
    ("train.batch_size=6", "'train.batch_size': 6 is not a multiple of train.micro_batch_size 4"),
    ('task.description="a\\0b"', "'task.description': holds a NUL character"),
    ('task.keywords=["\\ud800"]', "'task.keywords[0]': holds a lone surrogate"),
    ("run_dir=/dev/null", "'run_dir': '/dev/null' is in the kernel's folders"), ("run_dir=/proc/self", "kernel's folders"),
    ("sample.queries=''", "'sample.queries': '' names no source"), ("task.source='hf:'", "'task.source': 'hf:' names no source"),
    ("task.source=hf:@train", "names no source"), ("sample.queries='alpaca_en_demo, '", "join named sets or files with commas"),
])
def test_values_outside_their_domain_are_refused_before_any_work(tmp_path, override, words):
    """Each field's domain is declared with it and checked when the config loads: one line, status 2,
    nothing written (the run folder is not even made)."""
    code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set", override)
    assert code == 2 and err.count("\n") == 1 and words in err and err.startswith(f"delia: error: --set {override}"), err
    assert not (tmp_path / "run").exists()


def test_yaml_that_expands_explosively_is_refused_at_once(tmp_path):
    import time

    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)] + ["seed: *a8"]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.time()
    code, err = _delia("task", str(tmp_path / "bomb.yaml"))
    assert code == 2 and "expands to more than 100,000 values" in err and time.time() - started < 5, err


def test_experiment_run_names_are_folders_as_written(tmp_path):
    from delia.experiment import run_configs

    exp = {"base": str(Path("configs/demo.yaml").resolve()), "dir": str(tmp_path), "seeds": [0, 1], "set": [],
           "runs": [{"name": "lr #1"}, {"name": "lr #2"}], "by": None}
    dirs = [cfg.run_dir for _, _, cfg in run_configs(exp)]
    assert dirs == [str(tmp_path / n / f"seed-{s}") for n in ("lr #1", "lr #2") for s in (0, 1)]


ROW = json.dumps({"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]})


@pytest.mark.parametrize("name,data,words", [
    ("surrogate.jsonl", (ROW + "\n") * 3 + ROW.replace("apple", "app\\ud800le") + "\n", ":4: not Unicode text"),
    ("deep.jsonl", ROW + "\n" + "[" * 50000 + "]" * 50000 + "\n", ":2: invalid JSON: nested too deeply"),
    ("deep.json", "[" + "[" * 50000 + "]" * 50000 + "]\n", ":1: invalid JSON: nested too deeply"),
    ("bigint.jsonl", '{"messages": ' + "7" * 5000 + "}\n", ":1: invalid JSON: Exceeds the limit"),
])
def test_any_bytes_in_a_task_file_end_in_one_line(tmp_path, name, data, words):
    """JSON that parses but is not text, or that Python's parser refuses for its depth or size: one line
    with the file and line, status 2, no run folder (a lone surrogate once failed only when written)."""
    (tmp_path / name).write_text(data)
    (tmp_path / "c.yaml").write_text(f"run_dir: {tmp_path / 'run'}\ntask:\n  source: {tmp_path / name}\n")
    code, err = _delia("task", str(tmp_path / "c.yaml"))
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / name}{words}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_folder_or_a_link_loop_is_named_as_what_it_is(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for source, words in (("folder", "is a folder, not a file"), ("a", "symbolic link that leads nowhere")):
        (tmp_path / "c.yaml").write_text(f"run_dir: {tmp_path / 'run'}\ntask:\n  source: {tmp_path / source}\n")
        code, err = _delia("task", str(tmp_path / "c.yaml"))
        assert code == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("text,words", [
    ('{"key": "k", "answer": "a", "tokens": 1}\n{"key": \n', ":2: invalid JSON"),
    ('{"key": "k", "answer": "a", "tokens": 1, "batch": "b", "size": "2"}\n', ":1: 'size' must be a positive integer"),
])
def test_a_corrupt_cache_line_names_the_cache_and_the_line(task_run, text, words):
    cache = task_run / "sample" / "cache.jsonl"
    cache.parent.mkdir(exist_ok=True)
    kept = cache.read_text() if cache.exists() else ""
    try:
        cache.write_text(text)
        code, err = _delia("sample", str(task_run / "c.yaml"))
        assert code == 2 and err.count("\n") == 1 and f"{cache}{words}" in err, err
    finally:
        cache.write_text(kept)


def test_a_changed_diverse_or_mix_file_is_named_by_its_line(tiny_model_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_model_dir}\ntask:\n  train_rows: 4\n"
                      "sample:\n  max_new_tokens: 4\narms: [untouched, delia]\n")
    for verb in ("task", "sample"):
        assert _delia(verb, str(config))[0] == 0
    diverse = tmp_path / "run" / "sample" / "diverse.jsonl"
    lines = diverse.read_text().splitlines(keepends=True)
    diverse.write_text("".join(lines[:2]) + '{"messages": [\n' + "".join(lines[3:]))
    code, err = _delia("mix", str(config))
    assert code == 2 and err.count("\n") == 1 and f"{diverse}:3: not a JSON object with messages" in err, err
    diverse.write_text("".join(lines))
    assert _delia("mix", str(config))[0] == 0
    mixed = tmp_path / "run" / "mix" / "delia.jsonl"
    rows = mixed.read_text().splitlines(keepends=True)
    mixed.write_text(rows[0] + "[1, 2]\n" + "".join(rows[1:]))
    code, err = _delia("train", str(config), "--arm", "delia")
    assert code == 2 and err.count("\n") == 1 and f"{mixed}:2: expected a JSON object" in err, err


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["task.jsonl", "task.json", "config.yaml", "experiment.yaml", "queries.jsonl", "cache.jsonl"]),
       data=st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      st.lists(JSON_VALUES, min_size=1, max_size=4).map(
                          lambda vs: b"".join(json.dumps(v).encode() + b"\n" for v in vs))))
def test_any_bytes_or_json_in_any_input_end_in_one_line(tiny_model_dir, kind, data):
    """Arbitrary bytes and arbitrary JSON values as a task file, a config, an experiment file, a query file
    or a generation cache read back: status 0 or 2, never a traceback; on 2, one line naming the file, and
    the run folder as it was."""
    with tempfile.TemporaryDirectory() as tmp:
        path, run = Path(tmp) / kind, Path(tmp) / "run"
        if kind in ("queries.jsonl", "cache.jsonl"):  # a run with its task, then `sample` reads the file
            (Path(tmp) / "c.yaml").write_text(f"run_dir: {run}\nmodel: {{name: {tiny_model_dir}}}\ntask: {{train_rows: 2}}\n"
                                              "sample: {max_new_tokens: 2}\nmix: {ratio: 1}\n")
            assert _delia("task", str(Path(tmp) / "c.yaml"))[0] == 0
            if kind == "cache.jsonl":
                path = run / "sample" / "cache.jsonl"
                path.parent.mkdir()
                (Path(tmp) / "q.jsonl").write_text('{"instruction": "Name two colours."}\n' * 3)
        path.write_bytes(data)
        before = {p for p in run.rglob("*") if p.is_file()} if run.exists() else set()
        if kind.startswith("task"):
            (Path(tmp) / "c.yaml").write_text(f"run_dir: {run}\ntask:\n  source: {path}\n")
            code, err = _delia("task", str(Path(tmp) / "c.yaml"))
        elif kind == "config.yaml":
            code, err = _delia("task", str(path), "--set", f"run_dir={run}")
        elif kind == "experiment.yaml":
            code, err = _delia("experiment", str(path))
        else:
            queries = path if kind == "queries.jsonl" else Path(tmp) / "q.jsonl"
            code, err = _delia("sample", str(Path(tmp) / "c.yaml"), "--set", f"sample.queries={queries}")
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert err.count("\n") == 1 and str(path) in err, err
            assert ({p for p in run.rglob("*") if p.is_file()} if run.exists() else set()) == before, err


def test_too_few_queries_for_the_ratio_is_said_before_sampling(tmp_path):
    from delia import DeliaError
    from delia.config import load_config

    with pytest.raises(DeliaError, match="asks for 52000 diverse rows, but sample.queries alpaca_en_demo has at most 999 "
                       "queries; add dpo_en_demo,kto_en_demo"):
        load_config("configs/paper.yaml", ["sample.queries=alpaca_en_demo"])
    with pytest.raises(DeliaError, match="asks for 1632 diverse rows, but sample.queries dpo_en_demo, kto_en_demo,alpaca_en_demo "
                       "has at most 1591 queries; give a larger"):
        load_config("configs/demo.yaml", ["mix.ratio=34", "sample.queries=dpo_en_demo, kto_en_demo,alpaca_en_demo"])
    load_config("configs/demo.yaml", ["mix.ratio=32", "sample.queries=dpo_en_demo,kto_en_demo,alpaca_en_demo"])
    with pytest.raises(DeliaError, match="'sample.queries': 'magpie,alpaca_en_demo': join named sets or files"):
        load_config("configs/demo.yaml", ["sample.queries=magpie,alpaca_en_demo"])
    (tmp_path / "q.jsonl").write_text('{"instruction": "Name a colour."}\n' * 5)
    code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set",
                       f"sample.queries={tmp_path / 'q.jsonl'}")
    assert code == 2 and "5 queries, but 144 diverse rows are needed" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "sample").exists()  # nothing sampled


def test_an_override_inside_a_setting_is_blamed_on_the_override(tmp_path):
    code, err = _delia("task", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.lora_r.x=1")
    assert code == 2 and err.startswith("delia: error: --set train.lora_r.x=1: 'train.lora_r': expected int"), err


def test_a_run_dir_that_is_or_lies_under_a_file_is_refused_at_load(tmp_path):
    (tmp_path / "f").write_text("x")
    for run_dir in (tmp_path / "f", tmp_path / "f" / "run"):
        code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={run_dir}")
        assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'f'} is a file, not a folder" in err, err


@pytest.mark.parametrize("template,words", [
    ("{% for m in messages %}{{ m['content'] }", "does not render"),  # a syntax error
    ("{{ messages[0].content.nope() }}", "UndefinedError"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_a_chat_template_that_does_not_render_is_refused_at_load(tmp_path, template, words):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"model.chat_template={path}")
    assert code == 2 and err.count("\n") == 1 and "'model.chat_template'" in err and words in err, err
    assert err.startswith(f"delia: error: --set model.chat_template={path}"), err
    assert not (tmp_path / "run").exists()


def test_target_modules_the_model_lacks_are_refused_before_the_first_stage(tiny_model_dir, tmp_path):
    code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"model.name={tiny_model_dir}",
                       "--set", "train.target_modules=[q_proj, no_such_proj]")
    assert code == 2 and err.count("\n") == 1 and "train.target_modules: no_such_proj name no linear layer" in err, err
    assert "q_proj" in err.split("its layers:")[1] and not (tmp_path / "run").exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, err = _delia("run", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"model.name={adapter}")
    assert code == 2 and "is an adapter folder, not a model" in err and not (tmp_path / "run").exists(), err
