"""Bad values, frames and prompts (issue 14): the one range table (`ei2.config.RANGES`, `CLI_RANGES`) covers every
numeric key and any number typed is either in range or refused in one line (hypothesis; the bad numbers of each CLI
are rows of tests/test_bad_inputs.py), JSON that refuses NaN, every image mode read to the right 8-bit RGB, frames of
different sizes refused, scoring that never breaks a run, and the warning for prompts over CLIP's 77 tokens."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ei2.config import CLI_RANGES, RANGES, TrainConfig, check_value, cli_number, load_config
from ei2.errors import Ei2Error
from ei2.files import write_json
from ei2.mini.tokenizer import write_tiny_text_model
from ei2.text import TextEncoder
from ei2.train import DEMO_CONFIG, main as train_main
from ei2.video import read_all_frames, read_frames, to_rgb

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "weights/mini/unet/diffusion_pytorch_model.safetensors"


# --- numbers: one range table (the bad numbers of every CLI are rows of tests/test_bad_inputs.py) ------------------


def test_every_numeric_key_has_a_range():
    numeric = {k for k, v in vars(TrainConfig()).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(RANGES) == numeric
    for name, default in vars(TrainConfig()).items():
        if name in RANGES:
            assert check_value(name, default) == default  # the defaults (the paper's) are in range


def test_write_json_refuses_nan(tmp_path):
    path = tmp_path / "edits.json"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            write_json([{"guidance": bad}], path)
        assert not path.exists() and not list(tmp_path.iterdir())  # no file, no temp file
    write_json([{"guidance": 7.5}], path)
    assert json.loads(path.read_text()) == [{"guidance": 7.5}]


hypothesis = pytest.importorskip("hypothesis")  # the `test` extra installs it
from hypothesis import given, settings, strategies as st  # noqa: E402

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                    st.sampled_from(["nan", "inf", "-inf", ".nan", ".inf", "1e400", "-0.0", "1e-400"]))


def _in_range(name: str, value) -> bool:
    low, high, excluded = RANGES[name]
    return (math.isfinite(value) and (value > low if excluded else value >= low)
            and (high is None or value <= high))


@settings(max_examples=300, deadline=None, database=None)
@given(name=st.sampled_from(sorted(RANGES)), value=NUMBERS)
def test_property_any_number_is_accepted_in_range_or_refused_in_one_line(name, value):
    """Whatever number a user types for any numeric key, load_config either gives a finite value inside RANGES or
    raises Ei2Error (a one-line message naming the key): never inf/nan, never an out-of-range value, never a crash."""
    argv = ["--video", "clip.gif", "--caption", "a cat", f"--{name}", str(value)]
    try:
        cfg = load_config(None, argv)
    except Ei2Error as e:
        assert "\n" not in str(e) and name in str(e)
        return
    got = getattr(cfg, name)
    assert _in_range(name, got), (name, value, got)
    text = yaml.safe_dump(got)  # what config.yaml records
    assert "nan" not in text.lower() and "inf" not in text.lower()


@settings(max_examples=200, deadline=None, database=None)
@given(name=st.sampled_from(sorted(CLI_RANGES)), value=NUMBERS)
def test_property_a_cli_number_is_in_range_or_refused_in_one_line(name, value):
    """The numbers of a CLI that are not config keys (ei2.evaluate --max-frames) follow the same rule."""
    tp, low, high, excluded = CLI_RANGES[name]
    flag = "--" + name.replace("_", "-")
    try:
        got = cli_number(name, str(value), flag)
    except Ei2Error as e:
        assert "\n" not in str(e) and str(e).startswith(flag)
        return
    assert isinstance(got, tp) and (got > low if excluded else got >= low) and (high is None or got <= high)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data(), name=st.sampled_from(sorted(RANGES)))
def test_property_every_value_in_range_is_accepted(data, name):
    low, high, excluded = RANGES[name]
    is_int = isinstance(getattr(TrainConfig(), name), int)
    if is_int:
        value = data.draw(st.integers(low + excluded, high if high is not None else 10**6))
        if name == "size":
            value = 64 * max(1, value // 64)
    else:
        value = data.draw(st.floats(low, high if high is not None else 1e6, exclude_min=excluded))
    cfg = load_config(None, ["--video", "clip.gif", "--caption", "a cat", f"--{name}", repr(value)])
    assert getattr(cfg, name) == value


# --- frames: every image mode, one size --------------------------------------------------------------------------


def test_16_bit_png_reads_to_the_expected_8_bit_values(tmp_path):
    row = np.array([0, 257, 128 * 257, 65535, 128, 385, 1000, 40000], dtype=np.uint16)  # round(v / 257)
    expected = np.array([0, 1, 128, 255, 0, 1, 4, 156], dtype=np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.tile(row, (4, 1))).save(folder / "f0.png")
    assert Image.open(folder / "f0.png").mode in ("I;16", "I")  # really a 16-bit file
    frame = read_all_frames(folder)[0]
    assert frame.shape == (4, 8, 3)
    np.testing.assert_array_equal(frame[0], np.repeat(expected[:, None], 3, axis=1))
    # and through the tuning reader: a 16-bit mid-grey stays mid-grey (it was all white)
    Image.fromarray(np.full((64, 64), 128 * 257, np.uint16)).save(folder / "f0.png")
    clip = read_frames(folder, 1, size=64)
    assert np.allclose(clip.numpy(), 128 / 127.5 - 1, atol=1e-6)


def test_16_bit_big_endian_32_bit_int_and_float_modes():
    big = Image.frombytes("I;16B", (2, 1), np.array([257, 65535], ">u2").tobytes())
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [1, 255]
    i32 = Image.fromarray(np.array([[0, 514, 65535]], np.int32))
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 2, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(Ei2Error, match=r"32-bit integer image with values 0..70000, beyond 16 bits"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)), "x.png")
    with pytest.raises(Ei2Error, match=r"float image with values 0..3, not in \[0, 1\]"):
        to_rgb(Image.fromarray(np.array([[0.0, 3.0]], np.float32)), "x.png")


def test_cmyk_la_palette_to_expected_rgb(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 255, 255, 0))  # red
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # black
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0], [0, 0, 0]]]
    folder = tmp_path / "frames"
    folder.mkdir()
    la = Image.new("LA", (3, 1))
    for x, px in enumerate([(100, 255), (0, 0), (0, 255)]):  # opaque grey, transparent black, opaque black
        la.putpixel((x, 0), px)
    la.save(folder / "a.png")
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    for x in range(3):
        pal.putpixel((x, 0), x)
    pal.save(folder / "b.png", transparency=2)  # index 2 (green) transparent: composited on white
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.save(folder / "c.png")
    a, b, c = read_all_frames(folder)
    assert a.tolist() == [[[100] * 3, [255] * 3, [0] * 3]]  # alpha composited on white
    assert b.tolist() == [[[255, 0, 0], [0, 0, 255], [255, 255, 255]]]
    assert c.tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_frames_of_different_sizes_are_refused(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, size in enumerate([(64, 64), (64, 64), (80, 64), (96, 64)]):
        Image.new("RGB", size, (200, 0, 0)).save(folder / f"f{i}.png")
    with pytest.raises(Ei2Error) as info:
        read_frames(folder, 4, size=64)
    assert str(info.value) == (f"the frames in {folder} differ in size: f0.png is 64x64, f2.png is 80x64; resize the "
                               "frames to one size")
    assert read_frames(folder, 2, size=64).shape == (2, 3, 64, 64)  # one size among the sampled frames: fine


# --- scoring never breaks a run -----------------------------------------------------------------------------------


@pytest.mark.skipif(not MINI.is_file(), reason="weights/mini not trained")
def test_demo_with_prompts_outside_the_mini_grammar_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    prompts = ["a cat surfing in the ocean", "a dog painting, watercolor"]
    train_main(["--steps", "2", "--inference_steps", "2", "--inversion_steps", "2", "--checkpoint_every", "0",
                "--no-progress", "--output_dir", str(out), "--edit_prompts", *prompts])  # no SystemExit: exit 0
    captured = capsys.readouterr()
    assert captured.err.count("note: score mini: the edit prompt is outside the miniature world's grammar") == 1
    assert f"done: outputs in {out}/" in captured.out
    edits = json.loads((out / "edits.json").read_text())
    assert [e["prompt"] for e in edits] == prompts
    for e in edits:
        m = e["mini_metrics"]
        assert m["edited_attribute_match"] is None and m["all_attributes_match"] is None
        assert 0 <= m["mask_iou_vs_source"] <= 1 and m["attribute_stability"] is not None  # scored: need no text
        assert "edited_attribute_match" in e["mini_skipped"]
    assert json.loads((out / "log.json").read_text())["loss"]
    assert (out / "comparison.png").is_file() and (out / "comparison.mp4").is_file()


# --- prompts over 77 tokens ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> TextEncoder:
    words = ["a", "on", "the", "red", "blue", "square", "circle", "background"]
    return TextEncoder.from_pretrained(write_tiny_text_model(tmp_path_factory.mktemp("sd") / "tiny", words, seed=0))


def test_long_prompt_warned_once_with_count_and_kept_text(encoder, capsys):
    prompt = " ".join(["a red square"] * 30)  # 90 tokens + start + end
    encoder.tokenize(prompt)
    encoder.tokenize([prompt, "a blue circle"])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert "is 92 tokens, CLIP reads 77" in err
    kept = " ".join(["a red square"] * 25)  # 75 tokens between start and end
    assert f"only {kept!r} is used" in err
    encoder.tokenize("a red square on the blue background")
    assert capsys.readouterr().err == ""
