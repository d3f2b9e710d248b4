"""Faults around the files a run writes (issue 14): the umask's permissions, temp files left by a killed writer,
one error boundary for OSError (a full disk, /proc, an output_dir that is a file), the output folder checked before
any work, and the run lock."""

import errno
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
from tiny_model import write_random_model

import ei2.diagnose
import ei2.edit
import ei2.evaluate
import ei2.mini.benchmark
import ei2.train
import ei2.video
import ei2.weights
from ei2.errors import Ei2Error, cli_main
from ei2.files import (LOCK_NAME, TMP_MARK, RunLock, atomic_path, check_writable_dir, clean_stale_temp_files,
                       write_json)
from ei2.mini.world import make_demo_clip
from ei2.video import write_video
from ei2.weights import save_safetensors

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 4, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return write_random_model(root / "model"), make_demo_clip(root / "clip.gif", n_frames=6, size=SIZE)


def train_argv(assets, out, **kw):
    model, clip = assets
    args = {"model": model, "video": clip, "caption": "a red circle moving right", "n_frames": N, "size": SIZE,
            "steps": 2, "inference_steps": 2, "inversion_steps": 2, "checkpoint_every": 1, "output_dir": out,
            "edit_prompts": ["a blue circle moving right"], **kw}
    argv = ["--no-progress"]
    for k, v in args.items():
        argv += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return argv


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


@pytest.mark.parametrize("where", ["file", "/proc/ei2-test/run", "/sys/ei2-test"])
def test_train_refuses_an_unwritable_output_dir_before_any_work(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if where == "file" else Path(where)
    monkeypatch.setattr(ei2.train, "run_locked", lambda *a: pytest.fail("work started"))
    line = one_line_error(capsys, ei2.train.main, ["--output_dir", str(out), "--no-progress"])
    assert f"output_dir {out}" in line and "choose another output_dir" in line
    assert (tmp_path / "file").read_text() == "x"


def test_diagnose_refuses_an_unwritable_out_before_its_compute(assets, monkeypatch, capsys):
    model, clip = assets
    monkeypatch.setattr(ei2.diagnose, "diagnose", lambda *a, **kw: pytest.fail("compute reached"))
    line = one_line_error(capsys, ei2.diagnose.main, ["--model", str(model), "--video", str(clip), "--caption", "x",
                                                      "--compare", "ta,stam", "--out", "/proc/ei2-test"])
    assert "--out folder /proc/ei2-test is under /proc" in line


def test_evaluate_and_benchmark_refuse_an_unwritable_output_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ei2.evaluate, "ClipScorer", lambda *a: pytest.fail("CLIP loaded"))
    assert "run folder /proc/self is under /proc" in one_line_error(capsys, ei2.evaluate.main, ["--run", "/proc/self"])
    monkeypatch.setattr(ei2.mini.benchmark, "suite", lambda *a: pytest.fail("work started"))
    (tmp_path / "f").write_text("x")
    line = one_line_error(capsys, ei2.mini.benchmark.main, ["--quick", "--out", str(tmp_path / "f")])
    assert "--out folder" in line and "is an existing file" in line


def test_edit_refuses_a_run_folder_under_proc(capsys):
    # /proc/self has no config.yaml: the run check says so first; the writability check is behind it
    line = one_line_error(capsys, ei2.edit.main, ["--run", "/proc/self", "--prompt", "x"])
    assert "not a finished ei2 run" in line


# --- A full disk and other OSErrors: one line, exit 2, nothing half-written ------------------------------------------

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


def full_disk(path, *a, **kw):
    Path(path).write_bytes(b"half")  # some bytes made it, then the disk was full
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_during_a_checkpoint_write(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = ei2.weights.save_file
    monkeypatch.setattr(ei2.weights, "save_file",
                        lambda t, path, **kw: full_disk(path) if "checkpoints" in path else real(t, path, **kw))
    line = one_line_error(capsys, ei2.train.main, train_argv(assets, out))
    assert line.startswith(f"error: no space left on device ({out / 'checkpoints'}/.last")
    assert line.endswith("free space or choose another output_dir")
    assert not (out / "checkpoints" / "last.safetensors").exists() and temp_files(out) == []
    assert not (out / LOCK_NAME).exists()


def test_a_full_disk_during_a_video_write(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(ei2.video, "_write_gif", lambda frames, shape, tmp, fps: full_disk(tmp))
    line = one_line_error(capsys, ei2.train.main, train_argv(assets, out))
    assert "no space left on device" in line and ".gif): free space or choose another output_dir" in line
    assert not list(out.rglob("*.gif")) and temp_files(out) == [] and not (out / LOCK_NAME).exists()


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


def test_train_and_edit_refuse_a_folder_in_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ei2.train, "run_locked", lambda *a: pytest.fail("work started"))
    monkeypatch.setattr(ei2.edit, "edit_locked", lambda *a: pytest.fail("work started"))
    monkeypatch.setattr(ei2.train, "check_job", lambda *a: (torch.device("cpu"), "fp32"))
    for name in ["config.yaml", "tuned.safetensors", "inverted.safetensors"]:
        (tmp_path / name).write_text("x")
    with RunLock(tmp_path):
        line = one_line_error(capsys, ei2.train.main, ["--output_dir", str(tmp_path), "--resume"])
        assert f"{tmp_path} is in use by process {os.getpid()}" in line
        line = one_line_error(capsys, ei2.edit.main, ["--run", str(tmp_path), "--prompt", "x"])
        assert f"{tmp_path} is in use by process {os.getpid()}" in line


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
