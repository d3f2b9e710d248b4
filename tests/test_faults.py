"""Faults around the files a run writes (issue 14): the umask's permissions, temp files left by a killed writer,
one error boundary for OSError, the writable check of the output folder, and the run lock (incl. processes racing
for a stale one). The bad-input rows of every CLI (an output_dir that is a file, /proc, read-only, a full disk, a held
lock, ...) are the table of tests/test_bad_inputs.py."""

import errno
import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ei2.edit
import ei2.mini.benchmark
import ei2.train
from ei2.errors import Ei2Error, cli_main
from ei2.files import (LOCK_NAME, TMP_MARK, RunLock, atomic_path, check_writable_dir, clean_stale_temp_files,
                       write_json)
from ei2.video import write_video
from ei2.weights import save_safetensors

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, fn, *args) -> str:
    """Run a CLI main; it must exit 2 with exactly one `error: ...` line and no traceback."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_MARK in p.name]


# --- Permissions ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        write_json({"a": 1}, tmp_path / "b.json")
        save_safetensors({"t": torch.zeros(2)}, tmp_path / "c.safetensors")
        write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "d.gif", fps=4)
        write_video(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "e.mp4", fps=4)
    finally:
        os.umask(old)
    for name in ["a.txt", "b.json", "c.safetensors", "d.gif", "e.mp4"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# --- Stale temp files -------------------------------------------------------------------------------------------------

def test_a_writer_killed_mid_write_leaves_a_temp_file_that_the_cleanup_removes(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    finished = tmp_path / "run" / "tuned.safetensors"
    finished.parent.mkdir(parents=True)
    finished.write_bytes(b"done")
    code = ("import os, signal, sys\nfrom ei2.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt)], env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))})
    assert r.returncode == -signal.SIGKILL
    (left,) = temp_files(tmp_path)  # the killed writer's temp file, named so it can be recognized
    assert left.parent == ckpt.parent and left.name.startswith(".last") and left.suffix == ".safetensors"
    alive = ckpt.parent / f".other{TMP_MARK}1-abc.safetensors"  # a writer that still runs (pid 1) is left alone
    alive.write_bytes(b"busy")
    assert clean_stale_temp_files(tmp_path / "run") == [left]
    assert not left.exists() and alive.exists() and finished.read_bytes() == b"done" and not ckpt.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_train_removes_stale_temp_files_under_its_lock_on_start(tmp_path, monkeypatch, resume):
    from ei2.config import load_config
    out = tmp_path / "run"
    dead = dead_pid()
    left = out / "checkpoints" / f".last{TMP_MARK}{dead}-x.safetensors"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    (out / "log.json").write_text("{}")
    seen = {}

    def reached(cfg, out, resume, progress, *a):
        seen["left"], seen["lock"] = left.exists(), json.loads((out / LOCK_NAME).read_text())
        return out

    monkeypatch.setattr(ei2.train, "run_locked", reached)
    monkeypatch.setattr(ei2.train, "check_job", lambda *a: (torch.device("cpu"), "fp32"))
    ei2.train.run(load_config(ei2.train.DEMO_CONFIG, ["--output_dir", str(out)]), resume=resume, progress=False)
    assert seen == {"left": False, "lock": seen["lock"]} and seen["lock"]["pid"] == os.getpid()
    assert (out / "log.json").read_text() == "{}" and not (out / LOCK_NAME).exists()


def test_edit_removes_stale_temp_files_under_its_lock_on_start(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ["config.yaml", "tuned.safetensors", "inverted.safetensors"]:
        (run / name).write_text("x")
    left = run / "edits" / f".00-a{TMP_MARK}{dead_pid()}-x.mp4"
    left.parent.mkdir()
    left.write_bytes(b"half")
    seen = {}
    monkeypatch.setattr(ei2.edit, "edit_locked",
                        lambda run_dir, *a: seen.update(left=left.exists(), lock=(run / LOCK_NAME).exists()) or [])
    ei2.edit.edit(run, ["a blue circle"], progress=False)
    assert seen == {"left": False, "lock": True} and not (run / LOCK_NAME).exists()


# --- The output folder, checked before any work -----------------------------------------------------------------------

def test_check_writable_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Ei2Error, match="is an existing file, not a folder; choose another output_dir"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(Ei2Error, match="a part of the path is a file"):
        check_writable_dir(tmp_path / "file" / "run")
    for system in ["/proc/ei2-test/run", "/sys/ei2-test"]:
        with pytest.raises(Ei2Error, match=f"under /{system.split('/')[1]}, a system folder"):
            check_writable_dir(system)
    assert check_writable_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked, nothing left behind


def test_a_probe_write_that_fails_is_a_one_line_error(tmp_path, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("ei2.files.tempfile.mkstemp", read_only)
    with pytest.raises(Ei2Error, match=r"cannot write to output_dir .*: read-only file system; choose another"):
        check_writable_dir(tmp_path / "run")


def test_benchmark_refuses_an_unwritable_output_before_work(tmp_path, monkeypatch, capsys):
    # train, edit, diagnose and evaluate: the table of tests/test_bad_inputs.py
    monkeypatch.setattr(ei2.mini.benchmark, "suite", lambda *a: pytest.fail("work started"))
    (tmp_path / "f").write_text("x")
    line = one_line_error(capsys, ei2.mini.benchmark.main, ["--quick", "--out", str(tmp_path / "f")])
    assert "--out folder" in line and "is an existing file" in line


# --- OSErrors: one line, exit 2 (a full disk on every CLI: tests/test_bad_inputs.py) -----------------------------

@pytest.mark.parametrize("code, what", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied")])
def test_cli_main_turns_an_oserror_into_one_line(capsys, code, what):
    @cli_main
    def main():
        raise OSError(code, os.strerror(code), "/runs/x/tuned.safetensors")
    line = one_line_error(capsys, main)
    assert line.startswith(f"error: {what} (/runs/x/tuned.safetensors): ")


def test_cli_main_keeps_ctrl_c_as_130(capsys):
    @cli_main
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 130


# --- The run lock -----------------------------------------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder: Path, host: str, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC"}))
    return folder / LOCK_NAME


def test_a_second_lock_on_one_folder_is_refused(tmp_path):
    with RunLock(tmp_path) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        message = (f"{tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} (started "
                   f"{info['started']}); wait for it or choose another output_dir")
        with pytest.raises(Ei2Error) as e:
            with RunLock(tmp_path):
                pass
        assert str(e.value) == message
        assert lock.path.exists()  # the refused one did not remove the holder's lock
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_removed_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    path = write_lock(tmp_path, socket.gethostname(), pid)
    with RunLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock of process {pid}" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()


@pytest.mark.parametrize("pid", ["alive", "dead"])
def test_a_lock_from_another_host_is_never_broken(tmp_path, pid):
    pid = os.getpid() if pid == "alive" else dead_pid()
    path = write_lock(tmp_path, "other-node-7", pid)
    with pytest.raises(Ei2Error, match=rf"in use by process {pid} on other-node-7 .*\(rm {re.escape(str(path))}\)"):
        with RunLock(tmp_path):
            pass
    assert json.loads(path.read_text())["host"] == "other-node-7"


def test_a_lock_held_by_a_live_process_on_this_host_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, socket.gethostname(), sleeper.pid)
        with pytest.raises(Ei2Error, match=f"in use by process {sleeper.pid} on "):
            RunLock(tmp_path).__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_holder_keeps_an_flock_on_the_lock_file(tmp_path):
    with RunLock(tmp_path) as lock:
        with open(lock.path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock.path.exists()


def test_a_stale_lock_being_taken_over_right_now_is_left_to_the_taker(tmp_path, monkeypatch):
    """A stale record, but its file is flock()ed (another process is taking it over): never a second takeover."""
    path = write_lock(tmp_path, socket.gethostname(), dead_pid())
    before = path.read_text()
    monkeypatch.setattr(RunLock, "WAIT_S", 0.3)
    with open(path) as taker:
        fcntl.flock(taker, fcntl.LOCK_EX)
        with pytest.raises(Ei2Error, match="is in use by process"):
            RunLock(tmp_path).__enter__()
    assert path.read_text() == before and temp_files(tmp_path) == []


@pytest.mark.parametrize("content", ["", "{not json"])
def test_an_empty_or_unreadable_lock_is_refused_with_how_to_remove_it(tmp_path, monkeypatch, content):
    (tmp_path / LOCK_NAME).write_text(content)  # empty: its writer died before writing (waited for first)
    monkeypatch.setattr(RunLock, "WAIT_S", 0.3)
    with pytest.raises(Ei2Error, match=rf"has an unreadable lock .*\(rm {re.escape(str(tmp_path / LOCK_NAME))}\)"):
        RunLock(tmp_path).__enter__()
    assert (tmp_path / LOCK_NAME).read_text() == content


def _race_for_the_lock(folder: str, start, hold, results) -> None:
    """One process of the race (forked): look slowly at the lock's owner, so every racer reads the stale lock
    before any replaces it; a winner holds the lock until the parent has heard from everyone."""
    import ei2.files
    alive = ei2.files._pid_alive
    ei2.files._pid_alive = lambda pid: time.sleep(0.3) or alive(pid)
    start.wait()
    try:
        with RunLock(folder):
            results.put(("won", os.getpid()))
            hold.wait(30)
    except Ei2Error as e:
        results.put(("refused", str(e)))


def test_processes_racing_to_take_over_one_stale_lock_exactly_one_wins(tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    write_lock(tmp_path, socket.gethostname(), dead_pid())
    start, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    racers = [ctx.Process(target=_race_for_the_lock, args=(str(tmp_path), start, hold, results)) for _ in range(6)]
    for p in racers:
        p.start()
    start.set()
    try:
        outcomes = [results.get(timeout=60) for _ in racers]
        winners = [pid for kind, pid in outcomes if kind == "won"]
        assert len(winners) == 1, outcomes
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == winners[0]  # the winner's own record
        for kind, message in outcomes:
            assert kind == "won" or f"in use by process {winners[0]} on " in message, outcomes
    finally:
        hold.set()
        for p in racers:
            p.join(30)
    assert not (tmp_path / LOCK_NAME).exists() and temp_files(tmp_path) == []
