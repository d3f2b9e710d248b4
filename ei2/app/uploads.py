"""An uploaded clip -> a video path ei2.train reads: an mp4 (or another video ffmpeg reads) or a gif kept as it is,
a zip of frames unpacked to a folder of images. The upload is stored under <runs>/uploads/ (named by its content),
so the run's config.yaml keeps pointing at it and the CLI can --resume the run later. A bad upload is an Ei2Error
with one line saying what is wrong; the first frame is decoded before a job starts."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import Ei2Error, first_line
from ..files import atomic_path, slug
from ..video import GIF_EXTS, IMAGE_EXTS, VIDEO_HINT, read_frames

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
ACCEPTED = VIDEO_EXTS + GIF_EXTS + (".zip",)
MAX_ZIP_BYTES = 4 << 30  # unpacked size of a frames zip
HINT = "upload an mp4 (or webm/mov/mkv/avi), a gif, or a zip of frames (png/jpg/webp, named in order)"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def store_upload(upload: str | Path, runs: str | Path, name: str | None = None) -> Path:
    """Copy (a video, a gif) or unpack (a zip of frames) `upload` into <runs>/uploads/<hash>-<name>; return the path
    to give ei2.train as `video`. `name`: the file name the user uploaded (the upload's own name when None)."""
    upload = Path(upload)
    name = name or upload.name
    ext = Path(name).suffix.lower()
    if not upload.is_file():
        raise Ei2Error(f"upload {name} not found; upload the clip again")
    if ext not in ACCEPTED:
        raise Ei2Error(f"{name}: {ext or 'a file without extension'} is not a clip ei2 reads; {HINT}")
    if upload.stat().st_size == 0:
        raise Ei2Error(f"{name} is empty (0 bytes); {HINT}")
    dest = Path(runs).expanduser() / "uploads" / f"{digest(upload)}-{slug(Path(name).stem, 40)}"
    if ext == ".zip":
        target = dest
        if not target.is_dir():
            unpack_frames(upload, target, name)
    else:
        target = dest / f"clip{ext}"
        if not target.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(upload, tmp)
    try:
        check_clip(target, name)
    except Ei2Error:
        shutil.rmtree(dest, ignore_errors=True)  # a refused upload is not kept
        raise
    return target


def unpack_frames(archive: Path, folder: Path, name: str) -> None:
    """The images of a zip into `folder`, flat (names kept without their folders, so no path leaves `folder`)."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir() and PurePosixPath(m.filename).suffix.lower()
                       in IMAGE_EXTS and not PurePosixPath(m.filename).name.startswith(".")
                       and not m.filename.startswith("__MACOSX/")]
            if not members:
                raise Ei2Error(f"{name} holds no images ({', '.join(IMAGE_EXTS)}); zip the frames of one clip")
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise Ei2Error(f"{name} unpacks to over {MAX_ZIP_BYTES >> 30} GiB; send fewer or smaller frames")
            names = [PurePosixPath(m.filename).name for m in members]
            if len(set(names)) != len(names):
                raise Ei2Error(f"{name} holds two frames of the same name in different folders; zip one clip's "
                               "frames")
            tmp = folder.with_name(f".{folder.name}.unpacking")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for member, base in zip(members, names):
                with z.open(member) as src, open(tmp / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            tmp.rename(folder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise Ei2Error(f"{name} is not a readable zip file ({first_line(e)}); {HINT}") from None


def check_clip(path: Path, name: str) -> None:
    """Decode the first frame (ei2.video.read_frames): a broken file is refused before a job starts."""
    try:
        read_frames(path, 1, size=64)
    except Ei2Error as e:
        raise Ei2Error(str(e).replace(str(path), name).replace(VIDEO_HINT, HINT)) from None
