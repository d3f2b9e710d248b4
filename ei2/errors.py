"""User-facing errors: one line that names the problem and the fix, printed without a traceback by the CLIs."""

import functools
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
        except Ei2Error as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:
            from .files import os_error_line  # here, not at the top: files imports Ei2Error from this module
            print(f"error: {os_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
