"""The web page's glue without a browser: settings -> the TrainConfig the CLI would build, job events -> progress
lines and metrics, uploads -> frames or one-line errors, and one Worker running ei2's own job on one ModelCache
(re-editing without loading the base model again, cancel leaving a resumable checkpoint)."""

import dataclasses
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from ei2 import cache, train
from ei2.app import jobs
from ei2.app.uploads import store_upload
from ei2.config import load_config
from ei2.errors import Ei2Error, cli_main
from ei2.mini.parse import IDEAL_SCORES, SCORES
from ei2.pipeline import load_models
from ei2.tuned import read_tuned_metadata
from ei2.unet import VARIANTS
from ei2.video import read_frames

DEMO_YAML = jobs.PRESETS["miniature model (CPU demo)"]


def settings(**kw) -> jobs.Settings:
    base = dict(video=str(jobs.DEMO_CLIP), caption="a red circle moving right on a white background",
                edit_prompts=["a blue square moving right on a white background"])
    return jobs.Settings(**{**base, **kw})


@pytest.mark.parametrize("method", list(jobs.METHODS.values()))
def test_settings_give_the_config_the_cli_builds(method, tmp_path):
    s = settings(n_frames=6.0, stride=2, size=128, steps=7, learning_rate=2e-4, method=method, precision="fp32",
                 ddim_steps=9, guidance=5.5, name="clip-a")
    cfg = jobs.to_config(s, tmp_path)
    video = VARIANTS[method].video
    cli = load_config(DEMO_YAML, [
        "--video", str(jobs.DEMO_CLIP), "--caption", s.caption, "--edit_prompts", *s.edit_prompts, "--n_frames", "6",
        "--stride", "2", "--size", "128", "--steps", "7", "--learning_rate", "2e-4", "--precision", "fp32",
        "--inference_steps", "9", "--inversion_steps", "9", "--guidance", "5.5",
        "--output_dir", str(tmp_path / "clip-a"),
        *[a for f in dataclasses.fields(video) for a in (f"--{f.name}", str(getattr(video, f.name)).lower()
                                                          if getattr(video, f.name) is not None else "null")]])
    assert cfg == cli
    assert (cfg.n_frames, cfg.stride, cfg.size, cfg.steps, cfg.learning_rate) == (6, 2, 128, 7, 2e-4)
    assert dataclasses.astuple(video) == tuple(getattr(cfg, f.name) for f in dataclasses.fields(video))
    assert (cfg.score, cfg.checkpoint_every, cfg.model) == ("mini", 50, str(train.REPO / "weights" / "mini"))


def test_prompts_are_text_not_options(tmp_path):
    cfg = jobs.to_config(settings(caption="--steps 3", edit_prompts=["--size 5", "a: b"]), tmp_path)
    assert (cfg.caption, cfg.edit_prompts, cfg.steps, cfg.size) == ("--steps 3", ["--size 5", "a: b"], 100, 64)
    assert jobs.prompt_lines(" a \n\n b\n") == ["a", "b"]


@pytest.mark.parametrize("change, message", [
    (dict(size=100), "size=100 must be a positive multiple of 64"),
    (dict(learning_rate=2.0), "learning_rate=2.0 must be > 0 and <= 1"),
    (dict(n_frames=2.5), "n_frames must be an integer"),
    (dict(caption=" "), "caption is empty"),
    (dict(edit_prompts=["ok", " "]), "edit prompt 2 is empty"),
    (dict(name="a/b"), "run name 'a/b': give a folder name"),
    (dict(method="untuned"), "method 'untuned' is not one of"),
])
def test_bad_settings_are_the_clis_one_line_errors(change, message, tmp_path):
    with pytest.raises(Ei2Error) as e:
        jobs.to_config(settings(**change), tmp_path)
    line = jobs.error_line(e.value)
    assert line.startswith("error: ") and message in line and "\n" not in line, line


def test_error_line_is_what_the_cli_prints(capsys):
    for exc in (Ei2Error("video not found: x.mp4"), PermissionError(13, "Permission denied", "/ro/out")):
        @cli_main
        def main():
            raise exc
        with pytest.raises(SystemExit):
            main()
        assert capsys.readouterr().err.strip() == jobs.error_line(exc)


def test_progress_lines():
    log = jobs.ProgressLog()
    events = [{"phase": "load"}, {"phase": "encode"}, {"phase": "tune", "step": 0, "steps": 20, "loss": None},
              {"phase": "tune", "step": 10, "steps": 20, "loss": 0.123456},
              {"phase": "tune", "step": 20, "steps": 20, "loss": 0.0625}, {"phase": "invert"},
              {"phase": "edit", "index": 0, "of": 2, "prompt": "a b", "video": "/x.mp4", "scores": None},
              {"phase": "done", "run_dir": "/runs/x"}]
    for event in events:
        text = log.add(event)
    assert text.splitlines() == [
        "loading the model (kept loaded for the next job)", "encoding the clip (VAE)", "tuning: step 20/20, loss 0.0625",
        "tuned; DDIM inversion of the clip", "edit 1/2 rendered: 'a b'", "done: /runs/x"]
    assert jobs.describe({"phase": "tune", "step": 10, "steps": 20, "loss": 0.123456}) == \
        "tuning: step 10/20, loss 0.1235"
    assert jobs.describe({"phase": "error", "message": "error: x"}) == "error: x"


def test_metrics_line_shows_every_score():
    scores = dict(zip(SCORES, [1.0, 0.875, None, 0.21234, 5.5, 0.5, 4.16]))
    assert jobs.metrics_line("p", scores) == (
        "'p': edited attribute match 1, kept attributes match 0.875, all attributes match -, mask iou vs source 0.212, "
        "trajectory error px 5.5, attribute stability 0.5, background change 4.16")
    # an edit in the grammar is also scored against the ideal edit (ei2.mini.parse.IDEAL_SCORES): shown after them
    ideal = dict(zip(IDEAL_SCORES, [0.625, 2.25]))
    assert jobs.metrics_line("p", scores | ideal).endswith(
        "background change 4.16, mask iou vs ideal 0.625, trajectory error vs ideal px 2.25")


@pytest.mark.parametrize("name, content, message", [
    ("clip.gif", b"GIF89a broken", "could not read video clip.gif"),
    ("clip.mp4", b"\x00\x00\x00\x18ftypmp42 broken", "could not read video clip.mp4"),
    ("notes.txt", b"hello", "notes.txt: .txt is not a clip ei2 reads; upload an mp4"),
    ("empty.gif", b"", "empty.gif is empty (0 bytes)"),
    ("frames.zip", b"PK not a zip", "frames.zip is not a readable zip file"),
])
def test_bad_upload_is_one_line(name, content, message, tmp_path):
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(Ei2Error) as e:
        store_upload(path, tmp_path / "runs")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not any((tmp_path / "runs" / "uploads").glob("*/*")), "a refused upload is not kept"


def test_zip_of_frames_unpacks_in_order_and_stays_inside(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, f in enumerate(frames):
            png = tmp_path / f"f{i}.png"
            Image.fromarray(f).save(png)
            z.write(png, f"../../clip/frame{i + 1}.png" if i == 0 else f"clip/frame{i + 1}.png")
        z.writestr("clip/readme.txt", "not a frame")
    folder = store_upload(archive, tmp_path / "runs")
    assert folder.parent == tmp_path / "runs" / "uploads" and sorted(p.name for p in folder.iterdir()) == \
        ["frame1.png", "frame2.png", "frame3.png"]
    got = read_frames(folder, 3, size=64)
    want = np.stack(frames).transpose(0, 3, 1, 2) / 127.5 - 1
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert store_upload(archive, tmp_path / "runs") == folder  # the same upload again: the same folder


def test_no_zip_frames_is_one_line(tmp_path):
    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(Ei2Error, match=r"^frames.zip holds no images \(.png, .jpg, .jpeg, .webp\); zip the frames"):
        store_upload(archive, tmp_path / "runs")


def test_worker_runs_ei2s_job_reedits_on_the_cached_models_and_cancels(tmp_path, monkeypatch):
    loads = []  # every base-model load, whichever cache or path makes it
    monkeypatch.setattr(cache, "load_models", lambda *a, **k: loads.append(a[0]) or load_models(*a, **k))
    worker = jobs.Worker()
    cfg = jobs.to_config(settings(n_frames=4, steps=2, ddim_steps=2, name="w"), tmp_path)
    events = list(worker.train(cfg))
    phases = [e["phase"] for e in events]
    assert phases == ["load", "encode", "tune", "tune", "tune", "invert", "edit", "write", "done"], events
    run = tmp_path / "w"
    assert events[-1]["run_dir"] == str(run.resolve()) and loads == [cfg.model]
    listed = json.loads((run / "edits.json").read_text())
    assert events[6]["scores"] == listed[0]["mini_metrics"] and events[6]["video"] == str(run / listed[0]["mp4"])
    assert jobs.finished_runs(tmp_path) == [str(run)]

    new = list(worker.edit(run, "a green star moving right on a white background", 3.0, steps=2))
    assert [e["phase"] for e in new] == ["load", "edit", "done"] and loads == [cfg.model]  # no second load
    assert [(e["prompt"][:7], e["guidance"]) for e in jobs.run_edits(run)] == [("a blue ", 7.5), ("a green", 3.0)]
    assert new[1]["video"] == jobs.run_edits(run)[1]["mp4"]

    long = dataclasses.replace(cfg, steps=400, output_dir=str(tmp_path / "c"))
    seen = []
    for event in worker.train(long):
        seen.append(event)
        if event["phase"] == "tune":
            assert worker.cancel().startswith("cancelling")
    assert seen[-1]["phase"] == "cancelled" and seen[-1]["message"].startswith("cancelled: stopped at step "), seen[-1]
    step = int(read_tuned_metadata(tmp_path / "c" / "checkpoints" / "last.safetensors")["step"])
    assert 1 <= step < 400 and "--resume" in seen[-1]["message"] and worker.cancel() == "no job is running"

    bad = list(worker.edit(tmp_path / "missing", "x", 7.5))
    assert bad == [{"phase": "error", "message": f"error: run folder not found: {tmp_path / 'missing'}; give --run "
                                                   "the output_dir of a `python -m ei2.train` run"}]


def test_cli_without_the_app_extra_or_with_a_bad_port_is_one_line(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None; from ei2.app.__main__ import main; "
            f"main(['--runs', {str(tmp_path)!r}, '--port', sys.argv[1]])")
    for port, message in (("7860", 'error: the web page needs gradio: pip install -e ".[app]" (from the repository root)'),
                          ("70000", "error: --port 70000 is not a port number (1..65535)")):
        out = subprocess.run([sys.executable, "-c", code, port], capture_output=True, text=True, timeout=300)
        assert (out.returncode, out.stderr.strip()) == (2, message)
