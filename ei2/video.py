"""Video in and out: read n frames of an mp4 / gif / folder of images as a model-sized tensor, write mp4 / gif / png
atomically, lay clips side by side or in a grid.

Frames travel as torch tensors (n, 3, H, W) in [-1, 1] into the model and as uint8 arrays (n, H, W, 3) out of it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import imageio_ffmpeg
import numpy as np
import torch
from PIL import GifImagePlugin, Image, ImageDraw, ImageFont

from .errors import Ei2Error, first_line
from .files import atomic_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
GIF_EXTS = (".gif",)
VIDEO_HINT = "set `video:` in the config to an mp4, gif or a folder of frames"


# --- Reading ------------------------------------------------------------------------------------------------------


RESIZES = ("crop", "squash")


def read_frames(
    path: str | os.PathLike, n_frames: int, start: int = 0, stride: int = 1, size: int = 512, resize: str = "crop"
) -> torch.Tensor:
    """Frames start, start+stride, ..., start+(n_frames-1)*stride of a video file (mp4 or anything ffmpeg reads), a
    .gif or a folder of images (natural name order), each brought to size x size by `resize` (`fit_frame`). Returns
    float32 (n_frames, 3, size, size) in [-1, 1]. Decoding stops at the last frame needed."""
    _check_sampling(n_frames, start, stride, size)
    if resize not in RESIZES:
        raise Ei2Error(f"resize={resize!r} is not one of {', '.join(RESIZES)}")
    path = Path(path)
    if not path.exists():
        raise Ei2Error(f"video not found: {path}; {VIDEO_HINT}")
    wanted = [start + i * stride for i in range(n_frames)]
    last, wanted_set = wanted[-1], set(wanted)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise Ei2Error(f"no images ({', '.join(IMAGE_EXTS)}) in folder {path}; {VIDEO_HINT}")
        if last >= len(files):
            raise _too_short(path, len(files), n_frames, start, stride)
        frames = {i: _open_image(files[i]) for i in wanted}
        first = frames[wanted[0]].size
        other = next((i for i in wanted if frames[i].size != first), None)
        if other is not None:  # each would be cropped on its own: the clip would jump
            (w0, h0), (w1, h1) = first, frames[other].size
            raise Ei2Error(f"the frames in {path} differ in size: {files[wanted[0]].name} is {w0}x{h0}, "
                           f"{files[other].name} is {w1}x{h1}; resize the frames to one size")
    else:
        reader = iter_file(path, last + 1)
        frames, count = {}, 0
        try:
            for i, frame in enumerate(reader):
                count = i + 1
                if i in wanted_set:
                    frames[i] = frame
                if i >= last:
                    break
        except Ei2Error:
            raise
        except Exception as e:  # imageio-ffmpeg raises OSError/RuntimeError, Pillow OSError/ValueError/EOFError
            raise Ei2Error(
                f"could not read video {path} ({first_line(e)}); is it a valid, complete video file?"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                reader.close()  # stops ffmpeg early
        if count == 0:
            raise Ei2Error(f"video {path} has no frames; {VIDEO_HINT}")
        if last >= count:
            raise _too_short(path, count, n_frames, start, stride)
    out = np.stack([np.asarray(fit_frame(frames[i], size, resize), dtype=np.uint8) for i in wanted])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def read_all_frames(path: str | os.PathLike, max_frames: int | None = None) -> list[np.ndarray]:
    """Every frame (up to max_frames) of a video file, a gif, an image or a folder of images, as uint8 RGB arrays
    (H, W, 3) at the file's own resolution (for scoring: CLIP's processor resizes)."""
    path = Path(path)
    if not path.exists():
        raise Ei2Error(f"video not found: {path}")
    limit = max_frames or 1 << 30
    if path.is_dir():
        files = image_files(path)[:limit]
        if not files:
            raise Ei2Error(f"no images in folder {path}")
        reader = (_open_image(f) for f in files)
    else:
        reader = iter_file(path, limit)
    frames = []
    try:
        for frame in reader:
            frames.append(np.asarray(frame))
            if len(frames) >= limit:
                break
    except Ei2Error:
        raise
    except Exception as e:
        raise Ei2Error(f"could not read video {path} ({first_line(e)}); is it a valid, complete video?") from None
    finally:
        with contextlib.suppress(Exception):
            reader.close()  # stops ffmpeg early
    if not frames:
        raise Ei2Error(f"video {path} has no frames")
    return frames


def _check_sampling(n_frames: int, start: int, stride: int, size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % 64:
        raise Ei2Error(
            f"size={size!r} must be a positive multiple of 64: SD's VAE works at 1/8 resolution and its UNet halves "
            "that latent 3 times; use e.g. 512 or 256"
        )
    if not isinstance(n_frames, int) or n_frames < 1:
        raise Ei2Error(f"n_frames={n_frames!r} must be an integer >= 1")
    if not isinstance(start, int) or start < 0:
        raise Ei2Error(f"start={start!r} must be an integer >= 0")
    if not isinstance(stride, int) or stride < 1:
        raise Ei2Error(f"stride={stride!r} must be an integer >= 1")


def _too_short(path: Path, count: int, n_frames: int, start: int, stride: int) -> Ei2Error:
    need = start + (n_frames - 1) * stride + 1
    return Ei2Error(
        f"{path} has {count} frames but n_frames={n_frames}, start={start}, stride={stride} need {need}; "
        "use a smaller stride, start or n_frames"
    )


def natural_key(name: str) -> list:
    """Sort key under which frame2 < frame10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of a folder, in natural name order (hidden files skipped)."""
    files = [p for p in Path(folder).iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return to_rgb(im, path)
    except Ei2Error:
        raise
    except Exception as e:
        raise Ei2Error(f"could not read image {path} ({first_line(e)}); remove or replace it") from None


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, path: str | os.PathLike = "image") -> Image.Image:
    """An 8-bit RGB copy of any image Pillow opens, with its values kept: 16-bit grey (I;16*, and mode I holding
    0..65535, as Pillow opens 16-bit PNGs) is scaled by 255/65535 (round(v / 257)); float (F) in [0, 1] by 255;
    transparency (RGBA, LA, PA, P with a transparent colour) is composited on white; 1, L, P, CMYK, YCbCr are
    converted by Pillow. Values it cannot map (mode I beyond 16 bits, F outside [0, 1]) raise Ei2Error, never a
    silent all-white or all-black frame."""
    mode = im.mode
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
                raise Ei2Error(f"{path} is a float image with values {a.min():g}..{a.max():g}, not in [0, 1]; save "
                               "it as an 8- or 16-bit image")
            a = np.round(a * 255.0)
        else:
            if a.min() < 0 or a.max() > 65535:
                raise Ei2Error(f"{path} is a 32-bit integer image with values {a.min()}..{a.max()}, beyond 16 bits; "
                               "save it as an 8- or 16-bit image")
            a = np.round(a.astype(np.float64) / 257.0)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def iter_file(path: Path, max_frames: int) -> Iterator[Image.Image]:
    """The RGB frames of a video file, in order: Pillow's for a gif or an image (a still image is a one-frame video),
    ffmpeg's (decoding at most max_frames) for anything else."""
    return _iter_pillow(path) if path.suffix.lower() in GIF_EXTS + IMAGE_EXTS else _iter_ffmpeg(path, max_frames)


def _iter_pillow(path: Path) -> Iterator[Image.Image]:
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            yield im.convert("RGB") if path.suffix.lower() in GIF_EXTS else to_rgb(im, path)


def _iter_ffmpeg(path: Path, max_frames: int) -> Iterator[Image.Image]:
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-frames:v", str(max_frames)])
    try:
        meta = next(gen)
        w, h = meta["size"]
        for data in gen:
            if len(data) != w * h * 3:
                raise OSError(f"frame of {len(data)} bytes, expected {w}x{h}x3")
            yield Image.frombytes("RGB", (w, h), data)
    finally:
        gen.close()


def fit_frame(im: Image.Image, size: int, resize: str = "crop") -> Image.Image:
    """One frame to size x size.

    crop (ei2's default): the short side to `size` (bicubic), then the center size x size; the aspect ratio is kept,
    the long side's ends are cut off.
    squash (Tune-A-Video's): both sides to `size` (bilinear), the whole frame kept, its aspect ratio not. Tune-A-Video's
    dataset (tuneavideo/data/dataset.py) reads with `decord.VideoReader(path, width=512, height=512)`, which runs
    ffmpeg's `scale=512:512` filter (decord src/video/ffmpeg/threaded_decoder.cc); that filter's default interpolation
    is bilinear in the ffmpeg 4 that decord's wheels bundle. Pillow's bilinear (a triangle filter, widened when
    shrinking, as swscale's) is not the same code: pixels may differ slightly from Tune-A-Video's, the geometry does
    not."""
    if resize == "squash":
        return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR)
    return _resize_crop(im, size)


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


# --- Writing ------------------------------------------------------------------------------------------------------


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8 (values outside [-1, 1] are clipped)."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames of shape (n, 3, H, W), got {tuple(frames.shape)}")
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _check_frame(frame, shape: tuple[int, ...] | None, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    wrong = frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3
    if wrong or (shape is not None and frame.shape != shape):
        want = f"{shape}" if shape is not None else "(H, W, 3)"
        raise Ei2Error(f"frame {index} is {frame.dtype} {frame.shape}, expected uint8 {want}; convert with to_uint8")
    return frame


def write_video(frames: np.ndarray | Sequence[np.ndarray], path: str | os.PathLike, fps: float = 8) -> Path:
    """Write uint8 frames (n, H, W, 3) as .mp4 (H.264, yuv420p; odd sizes are padded by one edge pixel) or .gif
    (looping, 1000/fps ms per frame, every frame kept even when equal to the previous). Atomic: a failure leaves no
    file and no temporary file behind. Returns the path."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".mp4", ".gif"):
        raise Ei2Error(f"cannot write video {path}: use a .mp4 or .gif file name")
    if len(frames) == 0:
        raise Ei2Error(f"no frames to write to {path}")
    if not fps > 0:
        raise Ei2Error(f"fps={fps!r} must be > 0")
    shape = _check_frame(frames[0], None, 0).shape
    with atomic_path(path) as tmp:
        if ext == ".gif":
            _write_gif(frames, shape, tmp, fps)
        else:
            _write_mp4(frames, shape, tmp, fps)
    return path


def write_clip(frames: np.ndarray, stem: Path, fps: float) -> dict:
    """The clip as `stem`.mp4 and `stem`.gif; returns their file names {"mp4": ..., "gif": ...}."""
    stem = Path(stem)
    for ext in (".mp4", ".gif"):
        write_video(frames, stem.with_suffix(ext), fps=fps)
    return {"mp4": stem.with_suffix(".mp4").name, "gif": stem.with_suffix(".gif").name}


def _write_mp4(frames, shape, tmp: Path, fps: float) -> None:
    h, w = shape[:2]
    ph, pw = h % 2, w % 2  # yuv420p needs even sizes
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w + pw, h + ph), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-crf", "18", "-preset", "medium", "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    try:
        for i, frame in enumerate(frames):
            frame = _check_frame(frame, shape, i)
            if ph or pw:
                frame = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_gif(frames, shape, tmp: Path, fps: float) -> None:
    # Pillow's save_all merges a frame equal to the previous one into it, which would change the frame count, so the
    # file is assembled from Pillow's per-frame GIF encoder: each frame gets its own (local) palette.
    duration = max(1, round(1000 / fps))
    with open(tmp, "wb") as f:
        for i, frame in enumerate(frames):
            im = Image.fromarray(_check_frame(frame, shape, i))
            im = im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            if i == 0:
                header, _ = GifImagePlugin.getheader(im, info={"loop": 0, "duration": duration})
                for part in header:
                    f.write(part)
            for part in GifImagePlugin.getdata(im, duration=duration, disposal=1, include_color_table=True):
                f.write(part)
        f.write(b";")


def write_image(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W, 3) image atomically (format from the extension, normally .png). Returns the path."""
    path = Path(path)
    array = _check_frame(array, None, 0)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)
    return path


# --- Layout -------------------------------------------------------------------------------------------------------

LABEL_HEIGHT = 16


def _label_strip(text: str, width: int) -> np.ndarray:
    strip = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
    try:
        font = ImageFont.load_default()
        draw = ImageDraw.Draw(strip)
        while text and draw.textlength(text, font=font) > width - 4:  # cut to fit the column
            text = text[:-1]
        draw.text((2, 2), text, fill=(0, 0, 0), font=font)
    except Exception:  # no usable font: leave the strip blank
        pass
    return np.asarray(strip, dtype=np.uint8)


def _check_clips(clips: Sequence[np.ndarray], labels: Sequence[str] | None, same: str) -> list[np.ndarray]:
    clips = [np.asarray(c) for c in clips]
    if not clips:
        raise ValueError("no clips")
    for c in clips:
        if c.dtype != np.uint8 or c.ndim != 4 or c.shape[3] != 3:
            raise ValueError(f"expected uint8 clips (n, H, W, 3), got {c.dtype} {c.shape}")
    key = (lambda c: c.shape[:2]) if same == "nh" else (lambda c: c.shape)
    if len({key(c) for c in clips}) != 1:
        raise ValueError(f"clips differ in shape: {[c.shape for c in clips]}")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"{len(labels)} labels for {len(clips)} clips")
    return clips


def side_by_side(clips: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> np.ndarray:
    """Clips (n, H, W_i, 3) placed left to right -> (n, H [+16 with labels], sum W_i, 3); a label above each column."""
    clips = _check_clips(clips, labels, same="nh")
    out = np.concatenate(clips, axis=2)
    if labels is not None:
        strip = np.concatenate([_label_strip(t, c.shape[2]) for t, c in zip(labels, clips)], axis=1)
        out = np.concatenate([np.broadcast_to(strip, (out.shape[0], *strip.shape)), out], axis=1)
    return np.ascontiguousarray(out)


def frame_grid(clips: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> np.ndarray:
    """One row per clip, one column per frame: clips (n, H, W, 3) -> (rows * (H [+16 with labels]), n * W, 3), with a
    label strip above each row."""
    clips = _check_clips(clips, labels, same="all")
    rows = []
    for i, c in enumerate(clips):
        row = np.concatenate(list(c), axis=1)
        if labels is not None:
            rows.append(_label_strip(labels[i], row.shape[1]))
        rows.append(row)
    return np.ascontiguousarray(np.concatenate(rows, axis=0))

