"""SIGKILL at several points of `sample` and `diversify` (real subprocesses on the tiny model): each
resumed run ends with output identical to an uninterrupted run with the same seed, no row lost or
duplicated, and no temporary file left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _config(tmp_path: Path, model: str, run: str, extra: str) -> Path:
    queries = [{"instruction": f"Give {n} tips for staying healthy."} for n in range(80)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    path = tmp_path / f"{run}.yaml"
    path.write_text(f"run_dir: {tmp_path / run}\nseed: 5\nmodel: {{name: {model}}}\n"
                    f"task: {{train_rows: 8, eval_rows: 2}}\n{extra}")
    return path


def _delia(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "delia.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_and_resume(verb: str, config: Path, cache: Path, points: list[int]) -> list[int]:
    """Start `delia VERB`, SIGKILL it once the cache holds `point` answers, for each point; then run it to
    the end. Returns the cache sizes the kills left."""
    left = []
    for point in points:
        proc = _delia(verb, str(config), start_new_session=True)
        deadline = time.time() + 120
        while _lines(cache) < point and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[0][-2000:]  # killed mid-way, not after it ended
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left.append(_lines(cache))
    proc = _delia(verb, str(config))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return left


def _no_temp_files(folder: Path):
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.mark.parametrize("verb, extra, outputs, total", [
    ("sample", "mix: {ratio: 6}\nsample: {queries: QUERIES, batch_size: 2, max_new_tokens: 24}\n",
     ["diverse.jsonl"], 48),
    ("diversify", "diversify: {paraphrases: 6, batch_size: 2, max_new_tokens: 24}\n",
     ["wordings.jsonl", "train.jsonl"], None),
])
def test_sigkill_at_several_points_then_resume_is_identical(tiny_model_dir, tmp_path, verb, extra, outputs, total):
    extra = extra.replace("QUERIES", str(tmp_path / "queries.jsonl"))
    for run in ("whole", "killed"):
        config = _config(tmp_path, tiny_model_dir, run, extra)
        assert subprocess.run([sys.executable, "-m", "delia.cli", "task", str(config)], capture_output=True).returncode == 0
    whole = _delia(verb, str(tmp_path / "whole.yaml"))
    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, out[-2000:]
    folder = tmp_path / "killed" / verb
    reference = tmp_path / "whole" / verb
    asked = _lines(reference / "cache.jsonl")
    assert total is None or asked >= total
    # at start-up (nothing answered), early, and late
    left = _kill_and_resume(verb, tmp_path / "killed.yaml", folder / "cache.jsonl", [0, 2, asked // 2])
    assert left[-1] < asked  # the last kill came before the end
    for name in outputs:
        assert (folder / name).read_text() == (reference / name).read_text(), name
    keys = [json.loads(line)["key"] for line in (folder / "cache.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == asked  # nothing lost, nothing answered twice
    assert json.loads((folder / "manifest.json").read_text())["status"] == "done"
    _no_temp_files(tmp_path / "killed")


class _BatchSensitive:
    """Answers that depend on the whole batch a request is in, as sampled answers do (one seed a batch):
    a resumed run that batched differently would answer differently."""

    batch_size = 3

    def batches(self, requests, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        from delia.model.generate import batch_seed

        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            tag = batch_seed(seed, [r.key for r in chunk]) % 10_000
            yield [(r, f"answer to {r.key} in batch {tag} " + "ü" * (len(r.key) % 3), 5) for r in chunk]


def test_a_cache_torn_at_any_byte_resumes_to_the_uninterrupted_answers(tmp_path):
    """The cache cut at every byte offset of a small run, then resumed: the same answers, each once."""
    from delia.data.generation_cache import generate_cached
    from delia.model.generate import Request

    requests = [Request(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(8)]
    whole = tmp_path / "whole.jsonl"
    expected, _ = generate_cached(requests, whole, _BatchSensitive, 5, 0.7, 0.95, 3, desc="whole")
    data = whole.read_bytes()
    cache = tmp_path / "torn.jsonl"
    for cut in range(len(data) + 1):
        cache.write_bytes(data[:cut])
        got, _ = generate_cached(requests, cache, _BatchSensitive, 5, 0.7, 0.95, 3, desc="resume")
        assert {k: v["answer"] for k, v in got.items()} == {k: v["answer"] for k, v in expected.items()}, cut
        keys = [json.loads(line)["key"] for line in cache.read_text(encoding="utf-8").splitlines()]
        assert sorted(keys) == sorted(r.key for r in requests), cut  # every answer once
