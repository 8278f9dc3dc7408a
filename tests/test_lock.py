"""Two jobs never work in one stage folder: a second `delia` process on a stage that another is running says
so in one line and exits 2 (or waits with --wait), and a lock left by a killed process does not block."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from delia.runfolder import _lock_file


def _delia(tmp_path: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "delia.cli", "task", "configs/demo.yaml", "--set",
                             f"run_dir={tmp_path}", "--set", "task.train_rows=8", "--set", "task.eval_rows=2", *more],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hold(folder: Path) -> int:
    """The stage folder's lock, held by this (test) process as a running stage would hold it."""
    path = _lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def test_a_second_process_on_a_running_stage_is_refused_in_one_line_and_then_runs(tmp_path):
    fd = _hold(tmp_path / "task")
    try:
        out, err = _delia(tmp_path).communicate(timeout=120)
    finally:
        os.close(fd)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"stage task is running in process {os.getpid()}" in err and "--wait" in err
    assert not (tmp_path / "task" / "train.jsonl").exists()  # nothing done, nothing written
    done = _delia(tmp_path)
    assert done.wait(timeout=120) == 0 and (tmp_path / "task" / "manifest.json").exists()


def test_with_wait_the_second_process_waits_for_the_first(tmp_path):
    fd = _hold(tmp_path / "task")
    waiting = _delia(tmp_path, "--wait")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and waiting.poll() is None and not (tmp_path / "task").exists():
            time.sleep(0.2)
        time.sleep(3)
        assert waiting.poll() is None and not (tmp_path / "task" / "manifest.json").exists()  # still waiting
    finally:
        os.close(fd)
    out, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "running in process" in out and "waiting for it" in out
    assert (tmp_path / "task" / "manifest.json").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from delia.runfolder import lock_stage; lock_stage(Path(sys.argv[1]), 'task'); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path / "task")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert _delia(tmp_path).wait(timeout=120) == 2  # held
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert _delia(tmp_path).wait(timeout=120) == 0  # the kernel let go of it with the process
