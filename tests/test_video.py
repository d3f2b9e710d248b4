"""ei2.video: reading frames from mp4 / gif / folders, atomic writing, layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from ei2.errors import Ei2Error
from ei2.mini.world import demo_frames, make_demo_clip
from ei2.video import (
    frame_grid,
    read_frames,
    side_by_side,
    to_uint8,
    write_image,
    write_video,
)

# mp4 is lossy (H.264 at crf 18, yuv420p): the mean absolute error of smooth content stays under this many levels
MP4_MEAN_TOL = 3.0
MP4_LEVEL_TOL = 3.0  # a flat gray frame comes back within this many levels


def gray_levels(n: int) -> list[int]:
    return [20 + 20 * i for i in range(n)]  # frame i is encoded as the gray level 20 + 20 i


def gray_clip(n: int = 10, h: int = 64, w: int = 64) -> np.ndarray:
    return np.stack([np.full((h, w, 3), v, np.uint8) for v in gray_levels(n)])


def smooth_clip(n: int = 6, size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(n):
        r = (x * 255 / (size - 1)).astype(np.uint8)
        g = (y * 255 / (size - 1)).astype(np.uint8)
        b = np.full_like(r, 40 + 30 * i)
        frames.append(np.stack([r, g, b], axis=-1))
    return np.stack(frames)


def back_to_uint8(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x).astype(np.int32)


def write_folder(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / (names[i] if names else f"frame_{i:03d}.png"))
    return folder


def levels(x: torch.Tensor) -> np.ndarray:
    return back_to_uint8(x).reshape(x.shape[0], -1).mean(axis=1)


# --- round trips ----------------------------------------------------------------------------------------------------


def test_mp4_round_trip(tmp_path):
    src = smooth_clip()
    path = write_video(src, tmp_path / "clip.mp4", fps=8)
    x = read_frames(path, n_frames=6, size=64)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.abs(back_to_uint8(x) - src).mean() < MP4_MEAN_TOL


def test_gif_round_trip_exact_for_few_colors(tmp_path):
    src = demo_frames(5, 64, seed=3)
    path = write_video(src, tmp_path / "clip.gif", fps=8)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.info["loop"] == 0 and im.info["duration"] in (120, 130)  # 125 ms in 1/100 s
    x = read_frames(path, n_frames=5, size=64)
    assert x.shape == (5, 3, 64, 64)
    np.testing.assert_array_equal(back_to_uint8(x), src)


def test_gif_keeps_repeated_frames_and_quantizes_closely(tmp_path):
    src = smooth_clip(4)
    src[2] = src[1]  # Pillow's save_all would merge these two into one frame
    path = write_video(src, tmp_path / "clip.gif")
    x = read_frames(path, n_frames=4, size=64)
    assert np.abs(back_to_uint8(x) - src).mean() < 4.0  # 256-color palette per frame


def test_folder_of_pngs_exact(tmp_path):
    src = smooth_clip(3)
    x = read_frames(write_folder(tmp_path / "frames", src), n_frames=3, size=64)
    np.testing.assert_array_equal(back_to_uint8(x), src)


def test_resize_short_side_then_center_crop(tmp_path):
    # 256 wide x 128 high: black | white (middle 160 columns) | black; short side 128 -> 64, crop keeps the middle
    img = np.zeros((128, 256, 3), np.uint8)
    img[:, 48:208] = 255
    x = read_frames(write_folder(tmp_path / "f", [img]), n_frames=1, size=64)
    assert x.shape == (1, 3, 64, 64)
    assert back_to_uint8(x).min() >= 250
    # tall: the same with rows; and a single frame upscaled
    x = read_frames(write_folder(tmp_path / "g", [img.transpose(1, 0, 2).copy()]), n_frames=1, size=128)
    assert x.shape == (1, 3, 128, 128) and back_to_uint8(x).min() >= 250
    expected = np.asarray(Image.fromarray(img).resize((128, 64), Image.Resampling.BICUBIC).crop((32, 0, 96, 64)))
    x = read_frames(tmp_path / "f", n_frames=1, size=64)
    np.testing.assert_array_equal(back_to_uint8(x)[0], expected)


def test_squash_keeps_the_whole_frame(tmp_path):
    """Tune-A-Video's resize: a 256 x 128 frame of four 64-column stripes (green | red | blue | yellow) squashed to
    64 x 64 keeps all four, each 16 columns wide; crop keeps only the middle two (red | blue), 32 columns each."""
    colors = [(0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0)]
    img = np.zeros((128, 256, 3), np.uint8)
    for i, c in enumerate(colors):
        img[:, 64 * i:64 * (i + 1)] = c
    folder = write_folder(tmp_path / "f", [img])

    def stripes(kept):  # the hand-computed 64 x 64 frame, and its columns 2 or more pixels from a stripe border
        width = 64 // len(kept)
        expected = np.concatenate([np.broadcast_to(np.uint8(c), (64, width, 3)) for c in kept], axis=1)
        border = np.arange(64) % width
        return expected, (border >= 2) & (border < width - 2)

    squash = back_to_uint8(read_frames(folder, n_frames=1, size=64, resize="squash"))[0]
    expected, inner = stripes(colors)
    np.testing.assert_array_equal(squash[:, inner], expected[:, inner])
    crop = back_to_uint8(read_frames(folder, n_frames=1, size=64, resize="crop"))[0]
    expected, inner = stripes(colors[1:3])
    np.testing.assert_array_equal(crop[:, inner], expected[:, inner])
    assert read_frames(folder, n_frames=1, size=64).equal(read_frames(folder, n_frames=1, size=64, resize="crop"))
    with pytest.raises(Ei2Error, match="resize='stretch' is not one of crop, squash"):
        read_frames(folder, n_frames=1, size=64, resize="stretch")


@pytest.mark.parametrize("kind", ["mp4", "gif", "folder"])
def test_start_and_stride_pick_the_right_frames(tmp_path, kind):
    src = gray_clip(10)
    path = write_folder(tmp_path / "f", src) if kind == "folder" else write_video(src, tmp_path / f"c.{kind}")
    x = read_frames(path, n_frames=3, start=2, stride=3, size=64)  # frames 2, 5, 8
    expected = [gray_levels(10)[i] for i in (2, 5, 8)]
    tol = MP4_LEVEL_TOL if kind == "mp4" else 0
    np.testing.assert_allclose(levels(x), expected, atol=tol)
    x = read_frames(path, n_frames=10, size=64)  # exactly all frames
    np.testing.assert_allclose(levels(x), gray_levels(10), atol=tol)


def test_folder_natural_sort_and_other_extensions(tmp_path):
    src = gray_clip(12)
    names = [f"frame{i}.png" if i % 2 else f"frame{i}.jpg" for i in range(12)]  # frame10 must follow frame9
    folder = write_folder(tmp_path / "f", src, names)
    (folder / "notes.txt").write_text("not a frame")
    x = read_frames(folder, n_frames=3, start=9, size=64)
    np.testing.assert_allclose(levels(x), gray_levels(12)[9:12], atol=2)  # jpg is lossy too


def test_folder_decodes_only_the_frames_needed(tmp_path):
    folder = write_folder(tmp_path / "f", gray_clip(6))
    (folder / "frame_005.png").write_bytes(b"broken")
    x = read_frames(folder, n_frames=3, stride=2, size=64)  # 0, 2, 4: the broken frame is never opened
    np.testing.assert_allclose(levels(x), [gray_levels(6)[i] for i in (0, 2, 4)])
    with pytest.raises(Ei2Error, match="could not read image"):
        read_frames(folder, n_frames=6, size=64)


def test_mp4_decodes_only_the_frames_needed(tmp_path):
    # a file cut before its end still yields its first frames, while asking for all of them is an error
    path = write_video(gray_clip(10), tmp_path / "c.mp4")
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.95)])
    assert read_frames(cut, n_frames=1, size=64).shape == (1, 3, 64, 64)
    with pytest.raises(Ei2Error):
        read_frames(cut, n_frames=10, size=64)


def test_odd_size_mp4_is_padded(tmp_path):
    src = np.full((3, 45, 67, 3), 128, np.uint8)
    x = read_frames(write_video(src, tmp_path / "odd.mp4"), n_frames=3, size=64)
    assert x.shape == (3, 3, 64, 64)
    assert np.abs(back_to_uint8(x) - 128).mean() < MP4_LEVEL_TOL


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(Ei2Error, match=r"video not found: .*set `video:` in the config"):
        read_frames(tmp_path / "nope.mp4", n_frames=8)


def test_folder_without_images(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "readme.txt").write_text("x")
    with pytest.raises(Ei2Error, match="no images"):
        read_frames(tmp_path / "f", n_frames=1, size=64)


@pytest.mark.parametrize("kind", ["mp4", "gif", "folder"])
def test_too_few_frames(tmp_path, kind):
    src = gray_clip(5)
    path = write_folder(tmp_path / "f", src) if kind == "folder" else write_video(src, tmp_path / f"c.{kind}")
    with pytest.raises(Ei2Error, match=r"has 5 frames but n_frames=4, start=1, stride=2 need 8; use a smaller stride"):
        read_frames(path, n_frames=4, start=1, stride=2, size=64)


@pytest.mark.parametrize("size", [0, -64, 100, 500, 64.0])
def test_size_must_be_positive_multiple_of_64(tmp_path, size):
    path = make_demo_clip(tmp_path / "c.gif")
    with pytest.raises(Ei2Error, match="positive multiple of 64.*halves"):
        read_frames(path, n_frames=1, size=size)


@pytest.mark.parametrize("kw", [{"n_frames": 0}, {"n_frames": 1, "stride": 0}, {"n_frames": 1, "start": -1}])
def test_bad_sampling(tmp_path, kw):
    with pytest.raises(Ei2Error, match=">="):
        read_frames(make_demo_clip(tmp_path / "c.gif"), size=64, **kw)


def test_corrupt_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    with pytest.raises(Ei2Error, match="could not read video .*notes.mp4"):
        read_frames(text, n_frames=1, size=64)
    data = write_video(gray_clip(10), tmp_path / "c.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(Ei2Error, match="truncated.mp4"):
        read_frames(truncated, n_frames=10, size=64)
    gif = tmp_path / "bad.gif"
    gif.write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(Ei2Error, match="could not read video .*bad.gif"):
        read_frames(gif, n_frames=1, size=64)
    with pytest.raises(Ei2Error) as info:
        read_frames(text, n_frames=1, size=64)
    assert "\n" not in str(info.value)


# --- writing ------------------------------------------------------------------------------------------------------


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    src = smooth_clip(2)
    x = torch.from_numpy(src).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(to_uint8(x), src)
    assert to_uint8(x.to(torch.bfloat16)).dtype == np.uint8  # any float dtype is accepted


@pytest.mark.parametrize("name", ["out.mp4", "out.gif"])
def test_failed_write_leaves_nothing(tmp_path, name):
    frames = list(gray_clip(5))
    frames[3] = np.zeros((32, 32, 3), np.uint8)  # wrong shape, found only after 3 frames were written
    with pytest.raises(Ei2Error, match="frame 3"):
        write_video(frames, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left as it was
    target = write_video(gray_clip(2), tmp_path / name)
    before = target.read_bytes()
    with pytest.raises(Ei2Error):
        write_video(frames, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_video_rejects_float_and_unknown_extension(tmp_path):
    with pytest.raises(Ei2Error, match="uint8"):
        write_video(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "a.mp4")
    with pytest.raises(Ei2Error, match=".mp4 or .gif"):
        write_video(gray_clip(2), tmp_path / "a.avi")
    assert list(tmp_path.iterdir()) == []


def test_write_image(tmp_path):
    img = smooth_clip(1)[0]
    path = write_image(img, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    with pytest.raises(Ei2Error):
        write_image(np.zeros((4, 4), np.uint8), tmp_path / "sub" / "bad.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]


# --- layouts ------------------------------------------------------------------------------------------------------


def test_side_by_side():
    a, b = gray_clip(4, 32, 32), gray_clip(4, 32, 48)
    out = side_by_side([a, b])
    assert out.shape == (4, 32, 80, 3)
    np.testing.assert_array_equal(out[:, :, 32:], b)
    out = side_by_side([a, b], labels=["input", "a red cat"])
    assert out.shape == (4, 32 + 16, 80, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 16:, :32], a)
    assert (out[:, :16] < 128).any()  # some text was drawn
    with pytest.raises(ValueError):
        side_by_side([a, gray_clip(3, 32, 32)])


def test_frame_grid():
    a, b = gray_clip(4, 32, 24), demo_frames(4, 32)[:, :, :24]
    out = frame_grid([a, b])
    assert out.shape == (64, 96, 3)
    np.testing.assert_array_equal(out[32:, 24:48], b[1])
    out = frame_grid([a, b], labels=["source", "edit"])
    assert out.shape == (2 * (32 + 16), 96, 3)
    np.testing.assert_array_equal(out[48 + 16:, 72:], b[3])
