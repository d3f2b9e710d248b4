"""User-facing errors: one line that names the problem and the fix, printed without a traceback by the CLIs."""

import errno
import functools
import re
import sys


class Ei2Error(Exception):
    """A problem with the user's input (files, weights, config), not a bug in ei2."""


def cli_main(fn):
    """Decorator for a command-line `main`, its one error boundary: an Ei2Error becomes `error: <message>` on stderr
    and exit code 2; so does an OSError (a full disk, a read-only file system, no permission, ...), as
    `error: <what> (<path>): <fix>`; Ctrl-C is `interrupted` and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (Ei2Error, OSError) as e:
            print(f"error: {user_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


OS_ERRORS = {  # errno -> (what, fix)
    errno.ENOSPC: ("no space left on device", "free space or choose another output_dir"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another output_dir"),
    errno.EROFS: ("read-only file system", "choose an output_dir on a writable file system"),
    errno.EACCES: ("permission denied", "choose a path you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you can write to, or fix its permissions"),
    errno.ENOENT: ("no such file or folder", "check the path (or create its folder)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path or choose another output_dir"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter output_dir or prompt"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or close other programs"),
    errno.ENFILE: ("too many open files in the system", "close other programs and run again"),
    errno.EIO: ("input/output error", "check the disk and run again"),
}


def user_error_line(e: BaseException) -> str | None:
    """The one line (after `error: `) for a user's problem, as the CLIs, the suite and the web page show it: an
    Ei2Error's message, an OSError's `<what> (<path>): <fix>`; None for anything else (a bug in ei2)."""
    if isinstance(e, Ei2Error):
        return str(e)
    if isinstance(e, OSError):
        return os_error_line(e)
    return None


def os_error_line(e: OSError) -> str:
    """The one-line `<what> (<path>): <fix>` for an OSError, as the CLIs print it."""
    what, fix = OS_ERRORS.get(e.errno, ((e.strerror or first_line(e)).lower(), "check the path and the file system"))
    where = f" ({e.filename})" if e.filename is not None else ""
    return f"{what}{where}: {fix}"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors; for imageio-ffmpeg, also ffmpeg's last stderr
    line (its verdict)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if "=== stderr ===" in lines and lines[-1] != "=== stderr ===":
        text += ": " + re.sub(r"^\[[^\]]*\]\s*", "", lines[-1])
    return text[:300]
