"""Writing files safely, reading JSON, and the small text helpers every tool shares.

Every file ei2 writes goes through `atomic_path`: a temporary file in the same folder renamed into place, so a crash
never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import OS_ERRORS, Ei2Error, first_line


TMP_MARK = ".ei2-tmp-"  # atomic_path's temporary files: .<stem>.ei2-tmp-<pid>-<random><ext>
LOCK_NAME = ".ei2.lock"


def umask() -> int:
    """The process's umask (read by setting and restoring it: process-wide, fine in a CLI)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path `.<stem>.ei2-tmp-<pid>-<random><ext>` next to `path` (same extension, so writers that
    pick the format from it, ffmpeg and Pillow, work); on success it gets the umask's permissions (0644 under umask
    022, like any other tool's files, not mkstemp's 0600) and is renamed onto `path`, on failure it is removed. A temp
    file left by a killed writer is removed by `clean_stale_temp_files`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{TMP_MARK}{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or a nonsense pid: never trust it as dead)
    return True


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `atomic_path` under `folder` (recursively) whose writer is no longer running
    (a SIGKILL during a checkpoint or video write); finished files are never touched. Called with the run's lock held,
    so no other ei2 run writes there. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(f".*{TMP_MARK}*"):
        m = re.search(re.escape(TMP_MARK) + r"(\d+)-", p.name)
        if not p.is_file() or m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left by an interrupted run in {folder}", file=sys.stderr)
    return removed


def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Check, before any work, that `path` is (or can be made) a folder ei2 can write to: not a file, not under /proc or
    /sys, creatable, and a probe file can be written in it. Raises Ei2Error naming the problem and the fix."""
    path = Path(path).expanduser()
    fix = f"choose another {what}"
    if path.exists() and not path.is_dir():
        raise Ei2Error(f"{what} {path} is an existing file, not a folder; {fix}")
    resolved = path.resolve()
    for system in ("/proc", "/sys"):
        if resolved == Path(system) or Path(system) in resolved.parents:
            raise Ei2Error(f"{what} {path} is under {system}, a system folder ei2 cannot write to; {fix}")
    created = next((p for p in [*reversed(path.parents), path] if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe{TMP_MARK}{os.getpid()}-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Ei2Error(f"cannot write to {what} {path}: {os_problem(e)}; {fix}") from None
    finally:
        if created is not None:  # leave nothing behind: the run creates its folder when it starts writing
            for p in [path, *path.parents]:
                if p == created.parent:
                    break
                with contextlib.suppress(OSError):
                    p.rmdir()
    return path


def os_problem(e: OSError) -> str:
    """What went wrong in an OSError, in words (no errno numbers)."""
    return OS_ERRORS.get(e.errno, (e.strerror or first_line(e),))[0].lower()


class RunLock:
    """`with RunLock(folder):` holds `<folder>/.ei2.lock` (host, pid, start time; created with O_CREAT|O_EXCL) for a
    run's lifetime, so two runs never write into one folder. A lock naming this host and a dead process is stale and
    taken over with a notice; a lock from another host is never broken (the message says how to remove it)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "token": f"{os.getpid()}-{time.time_ns()}-{id(self)}"}
        self.held = False

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_take_over()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise Ei2Error(f"could not take the lock {self.path} (other runs keep taking it); wait and run again")

    def _read(self) -> dict | None:
        for _ in range(20):  # a lock being written right now is empty for a moment
            try:
                info = json.loads(self.path.read_text())
                if isinstance(info, dict) and "pid" in info:
                    return info
            except FileNotFoundError:
                return {}
            except (ValueError, UnicodeDecodeError):
                pass
            time.sleep(0.05)
        return None

    def _refuse_or_take_over(self) -> None:
        info = self._read()
        if info == {}:
            return  # removed meanwhile: try again
        remove = f"if you are sure no run uses it, remove it (rm {self.path}) and run again"
        if info is None:
            raise Ei2Error(f"{self.folder} has an unreadable lock {self.path}; {remove}")
        pid, host, started = info.get("pid"), info.get("host"), info.get("started", "at an unknown time")
        if host == self.info["host"] and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            print(f"note: taking over the lock of process {pid} on {host} (started {started}), which is no longer "
                  f"running: {self.path}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        message = (f"{self.folder} is in use by process {pid} on {host} (started {started}); wait for it or choose "
                   "another output_dir")
        if host != self.info["host"]:
            message += f" (the lock is from another host and is never removed automatically: {remove})"
        raise Ei2Error(message)

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.info["token"]:
                self.path.unlink()


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file's content; a missing or malformed file raises Ei2Error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Ei2Error(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Ei2Error(f"{path} is not valid JSON ({first_line(e)})") from None


def write_json(obj, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON, atomically. NaN/inf are refused (ValueError, nothing written): they are not JSON."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters turned into one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "edit"
