"""Writing files safely, reading JSON, and the small text helpers every tool shares.

Every file ei2 writes goes through `atomic_path`: a temporary file in the same folder renamed into place, so a crash
never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import Ei2Error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path `.<stem>.<random>.tmp<ext>` next to `path` (same extension, so writers that pick the
    format from it, ffmpeg and Pillow, work); on success it is renamed onto `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters turned into one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "edit"
