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

try:
    import fcntl
except ImportError:  # Windows: no flock (RunLock's takeover is then not serialized)
    fcntl = None

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
    """`with RunLock(folder):` holds `<folder>/.ei2.lock` (host, pid, start time) for a run's lifetime, so two runs
    never write into one folder. A lock naming this host and a dead process is stale and taken over with a notice; a
    lock from another host is never broken (the message says how to remove it).

    The lock file is created with O_CREAT|O_EXCL and, for as long as it is held, also flock()ed by its holder (the
    kernel releases that when the process dies). A takeover happens only under that flock, on the file still at the
    lock's path, and replaces the stale file by one already holding the new owner's record and flock (a rename): of
    two processes taking over one stale lock, exactly one wins, the other then finds a live owner and is refused."""

    WAIT_S = 5.0  # how long a lock being created or taken over right now (or left empty) is waited for

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "token": f"{os.getpid()}-{time.time_ns()}-{id(self)}"}
        self.held = False
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        # the first folder this lock creates: removed again on exit when the run wrote nothing (it failed early)
        self._created = next((p for p in [*reversed(self.folder.parents), self.folder] if not p.exists()), None)
        deadline = time.monotonic() + self.WAIT_S
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666 & ~umask())
            except FileNotFoundError:
                continue  # an empty folder removed meanwhile by a run that failed early: make it again
            except FileExistsError:
                if self._refuse_or_take_over(time.monotonic() > deadline):
                    break
                time.sleep(0.05)
                continue
            try:  # a process that looks at the file meanwhile sees it empty and waits
                _flock(fd, block=True)
                _write_all(fd, json.dumps(self.info).encode())
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise
            self._fd = fd
            break
        self.held = True
        return self

    def _refuse_or_take_over(self, give_up: bool) -> bool:
        """The lock exists: True when this process took it over (stale), False to look again (it is being created,
        taken over or removed right now); raises Ei2Error when a live run holds it (or it stays unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # removed meanwhile
        try:
            free = _flock(fd, block=False)
            if free and os.fstat(fd).st_ino != _inode(self.path):
                return False  # taken over meanwhile: look at the new file
            info = _read_lock(fd)
            remove = f"if you are sure no run uses it, remove it (rm {self.path}) and run again"
            if info == {} and not give_up:
                return False  # empty: being written right now (or its writer died before writing: give up later)
            if not info:
                raise Ei2Error(f"{self.folder} has an unreadable lock {self.path}; {remove}")
            pid, host, started = info.get("pid"), info.get("host"), info.get("started", "at an unknown time")
            stale = host == self.info["host"] and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)
            if stale and not free and not give_up:
                return False  # another process is taking it over right now
            if stale and free:
                print(f"note: taking over the lock of process {pid} on {host} (started {started}), which is no "
                      f"longer running: {self.path}", file=sys.stderr)
                self._replace()
                return True
            message = (f"{self.folder} is in use by process {pid} on {host} (started {started}); wait for it or "
                       "choose another output_dir")
            if host != self.info["host"]:
                message += f" (the lock is from another host and is never removed automatically: {remove})"
            raise Ei2Error(message)
        finally:
            os.close(fd)  # releases the flock on the stale file (after the rename below)

    def _replace(self) -> None:
        """Put a lock file holding this process's record and flock in place of the stale one, by one rename."""
        fd, tmp = tempfile.mkstemp(prefix=f".ei2-lock{TMP_MARK}{os.getpid()}-", dir=self.folder)
        try:
            _flock(fd, block=True)
            _write_all(fd, json.dumps(self.info).encode())
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd = fd

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.info["token"]:
                self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)  # after the unlink: a process waiting on this file then sees that it is gone
            self._fd = None
        if self._created is not None:  # nothing half-made: the folders this lock created, if still empty
            for p in [self.folder, *self.folder.parents]:
                if p == self._created.parent:
                    break
                try:
                    p.rmdir()
                except OSError:
                    break


def _flock(fd: int, block: bool) -> bool:
    """An exclusive flock on `fd`; False when another process holds one (only when not blocking). Without fcntl
    (Windows) there is no flock and this always says yes."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _read_lock(fd: int) -> dict | None:
    """The record in a lock file (read through `fd`); {} when it is empty, None when it is not a record."""
    chunks = []
    while chunk := os.pread(fd, 65536, sum(map(len, chunks))):
        chunks.append(chunk)
    if not chunks:
        return {}
    try:
        info = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


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
