"""Bad input, one table (issue 14 and the classes before it): each row is one class of bad input (its path or value),
run on every CLI it applies to (train, edit, diagnose, evaluate), with the expected exit code and a fragment of the
one-line message. Every case also checks: no traceback, exactly one `error:` line, and nothing half-written (no
temporary file, no lock left behind, every file in the case's folders either untouched or complete and readable).

In-process calls of the CLIs' `main` on a tiny random model (tests/conftest.py); `test_as_a_user_runs_it` runs a few
rows as real processes, and the demo runs end to end from another working directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import imageio.v3 as iio
import pytest
import torch
import yaml
from conftest import N, SIZE
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ei2.diagnose
import ei2.edit
import ei2.evaluate
import ei2.train
import ei2.video
import ei2.weights
from ei2.files import LOCK_NAME, TMP_MARK

REPO = Path(__file__).resolve().parents[1]
CLIS = {"train": ei2.train.main, "edit": ei2.edit.main, "diagnose": ei2.diagnose.main,
        "evaluate": ei2.evaluate.main}
CAPTION, PROMPT = "a red circle moving right", "a blue square moving right"


class Case:
    """One row on one CLI: a fresh folder, the shared tiny model, clip and finished run, and each CLI's ordinary
    command line; the methods that break something copy it into the folder first."""

    def __init__(self, tmp: Path, assets, tiny_run: Path, train_argv, monkeypatch):
        self.tmp, self.mp, self._train_argv, self._run = tmp, monkeypatch, train_argv, tiny_run
        self.model, self.clip = assets
        self.out = tmp / "out"

    # --- the command lines ---
    def train(self, *extra, **keys) -> list[str]:
        return self._train_argv(keys.pop("output_dir", self.out), **keys) + list(extra)

    def edit(self, *extra, run: Path | None = None) -> list[str]:
        return ["--run", str(run or self.run()), "--prompt", PROMPT, "--no-progress", *extra]

    def diagnose(self, *extra, **keys) -> list[str]:
        args = {"model": self.model, "video": self.clip, "caption": CAPTION, "n-frames": N, "size": SIZE,
                "timesteps": "500", "out": self.out, **keys}
        return ["--no-progress", *[x for k, v in args.items() for x in (f"--{k}", str(v))], *extra]

    def evaluate(self, *extra, run: Path | None = None, **keys) -> list[str]:
        where = ["--video", str(keys.pop("video")), "--prompt", CAPTION] if "video" in keys else \
            ["--run", str(run or self.run())]
        return [*where, "--clip", str(keys.pop("clip", self.tmp / "clip")), "--no-progress", *extra]

    # --- what the rows break ---
    def run(self, model: Path | None = None) -> Path:
        """A copy of the finished tiny run (with its config's model replaced)."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self._run, run)
        if model is not None:
            text = (run / "config.yaml").read_text().splitlines()
            (run / "config.yaml").write_text("\n".join(f"model: {model}" if line.startswith("model:") else line
                                                       for line in text) + "\n")
        return run

    def broken_model(self, how: str) -> Path:
        """A copy of the tiny model with one weight file missing, corrupt, misshaped or a code-running pickle."""
        model = self.tmp / "model"
        shutil.copytree(self.model, model)
        unet = model / "unet" / "diffusion_pytorch_model.safetensors"
        if how == "missing":
            unet.unlink()
        elif how == "corrupt":  # the VAE's: the UNet file is the run's fingerprint, the VAE loads after it
            (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 100)
        elif how == "misshaped":
            state = load_file(str(unet))
            state["conv_in.weight"] = state["conv_in.weight"][:, :2].contiguous()
            save_file(state, str(unet))
        elif how == "pickle":
            unet.unlink()
            torch.save({"conv_in.weight": torch.zeros(1), "x": RunsCode(self.tmp / "code-ran")},
                       str(unet.with_suffix(".bin")))
        return model

    def clip_folder(self, how: str) -> Path:
        """A CLIP folder for ei2.evaluate: with every file but the weights, or with unreadable weights."""
        folder = self.tmp / "clip"
        folder.mkdir()
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (folder / name).write_text("{}")
        if how == "corrupt":
            (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
        return folder

    def frames(self, how: str) -> Path:
        folder = self.tmp / "frames"
        folder.mkdir()
        for i in range(6):
            size = (SIZE, SIZE) if how != "sizes" or i < 2 else (SIZE + 16, SIZE)
            Image.new("RGB", size, (200, 0, 0)).save(folder / f"f{i}.png")
        if how == "truncated":
            (folder / "f0.png").write_bytes((folder / "f0.png").read_bytes()[:40])
        return folder

    def bad_video(self) -> Path:
        bad = self.tmp / "bad.mp4"
        bad.write_bytes(b"not a video at all" * 100)
        return bad

    def a_file(self) -> Path:
        (self.tmp / "file").write_text("x")
        return self.tmp / "file"

    def lock(self, folder: Path, host: str | None = None) -> Path:
        """`folder` locked by a live process (this one) on this host, or by any process on `host`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": os.getpid(),
                                                    "started": "2026-01-01 00:00:00 UTC"}))
        return folder

    def read_only(self) -> None:
        """The probe file of the writable check cannot be made (what a read-only file system says)."""
        def refuse(*a, **kw):
            raise OSError(errno.EROFS, "Read-only file system")
        self.mp.setattr("ei2.files.tempfile.mkstemp", refuse)

    def full_disk(self, where: str) -> None:
        """The disk fills up in the middle of a write: some bytes reach the temporary file, then ENOSPC."""
        def full(path, *a, **kw):
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        if where == "checkpoint":
            real = ei2.weights.save_file
            self.mp.setattr(ei2.weights, "save_file", lambda t, path, **kw: full(path) if "checkpoints" in path
                            else real(t, path, **kw))
        elif where == "video":
            self.mp.setattr(ei2.video, "_write_gif", lambda frames, shape, tmp, fps: full(tmp))
        else:  # the first text file (config.yaml, edits.json, diagnose.json, metrics.json)
            real_text = Path.write_text
            self.mp.setattr(Path, "write_text", lambda p, *a, **kw: full(p) if TMP_MARK in p.name
                            else real_text(p, *a, **kw))

    def fake_clip(self, scorer=None) -> None:
        """ei2.evaluate scores with a stand-in for CLIP (the rows about CLIP's own files use the real loader)."""
        self.mp.setattr(ei2.evaluate, "ClipScorer", scorer or FakeScorer)


class RunsCode:
    """A pickle that creates a file when unpickled: a weight file must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class FakeScorer:
    def __init__(self, folder, device):
        self.folder = folder

    def score(self, frames, prompt):
        return {"frames": len(frames), "frame_consistency": 95.0, "textual_alignment": 30.0}


class NaNClip(ei2.evaluate.ClipScorer):
    """CLIP's own scoring (ClipScorer.score) on embeddings that hold a NaN, as weights holding NaN give."""

    def __init__(self, folder, device):
        self.folder = folder

    def image_embeddings(self, frames):
        e = torch.ones(len(frames), 4)
        e[0, 0] = float("nan")
        return e

    def text_embedding(self, prompt):
        return torch.ones(4)


@dataclass
class Row:
    what: str  # the class of bad input
    value: str  # the path or value given
    clis: dict[str, Callable[[Case], list[str]]]  # each CLI it applies to -> that CLI's command line
    fragment: str | dict[str, str]  # in the one-line message (per CLI where the CLIs word it differently)
    writes: bool | set[str] = False  # (the CLIs that) wrote files before the failure: checked complete, not unchanged
    code: int = 2
    after: Callable[[Case], None] = field(default=lambda c: None)  # a row's own extra check


NOT_FOUND = "model not found at"
TRAIN_FIRST = {"train"}  # ei2.train writes config.yaml (complete) before it reads the weight files' contents
TABLE = [
    # --- weights ---
    Row("missing weights folder", "model: <tmp>/no-model, --clip <tmp>/no-clip", {
        "train": lambda c: c.train(model=c.tmp / "no-model"),
        "edit": lambda c: c.edit(run=c.run(model=c.tmp / "no-model")),
        "diagnose": lambda c: c.diagnose(model=c.tmp / "no-model"),
        "evaluate": lambda c: c.evaluate(clip=c.tmp / "no-clip")},
        {"train": NOT_FOUND, "edit": NOT_FOUND, "diagnose": NOT_FOUND, "evaluate": "CLIP not found"}),
    Row("missing weight file", "unet/diffusion_pytorch_model.safetensors deleted; CLIP without model.safetensors", {
        "train": lambda c: c.train(model=c.broken_model("missing")),
        "edit": lambda c: c.edit(run=c.run(model=c.broken_model("missing"))),
        "diagnose": lambda c: c.diagnose(model=c.broken_model("missing")),
        "evaluate": lambda c: c.evaluate(clip=c.clip_folder("missing"))},
        {"train": "unet/diffusion_pytorch_model.safetensors", "edit": "unet/diffusion_pytorch_model.safetensors",
         "diagnose": "unet/diffusion_pytorch_model.safetensors", "evaluate": "(model.safetensors missing)"}),
    Row("corrupt weight file", "vae/diffusion_pytorch_model.safetensors (CLIP's model.safetensors) = garbage", {
        "train": lambda c: c.train(model=c.broken_model("corrupt")),
        "edit": lambda c: c.edit(run=c.run(model=c.broken_model("corrupt"))),
        "diagnose": lambda c: c.diagnose(model=c.broken_model("corrupt")),
        "evaluate": lambda c: c.evaluate(clip=c.clip_folder("corrupt"))},
        {"train": "is not a readable safetensors file", "edit": "is not a readable safetensors file",
         "diagnose": "is not a readable safetensors file", "evaluate": "could not load CLIP from"}, writes=TRAIN_FIRST),
    Row("wrong-shape weights", "conv_in.weight (4 -> 2 input channels); a tuned tensor of another shape", {
        "train": lambda c: c.train(model=c.broken_model("misshaped")),
        "edit": lambda c: c.edit(run=misshaped_tuned(c.run())),
        "diagnose": lambda c: c.diagnose(model=c.broken_model("misshaped"))},
        {"train": "does not match the model (1 wrong shape: conv_in.weight",
         "edit": "tuned.safetensors does not fit the model",
         "diagnose": "does not match the model (1 wrong shape: conv_in.weight"}, writes=TRAIN_FIRST),
    Row("a pickle that runs code", "unet/diffusion_pytorch_model.bin", {
        "train": lambda c: c.train(model=c.broken_model("pickle")),
        "diagnose": lambda c: c.diagnose(model=c.broken_model("pickle"))},
        "ei2 never unpickles arbitrary code", writes=TRAIN_FIRST, after=lambda c: not_there(c.tmp / "code-ran")),
    # --- the video ---
    Row("missing video", "video: <tmp>/nope.mp4", {
        "train": lambda c: c.train(video=c.tmp / "nope.mp4"),
        "diagnose": lambda c: c.diagnose(video=c.tmp / "nope.mp4"),
        "evaluate": lambda c: c.evaluate(video=c.tmp / "nope.mp4")}, "video not found"),
    Row("corrupt video", "bad.mp4 (text bytes)", {
        "train": lambda c: c.train(video=c.bad_video()),
        "diagnose": lambda c: c.diagnose(video=c.bad_video()),
        "evaluate": lambda c: c.evaluate(video=c.bad_video())}, "could not read video"),
    # 16-bit, 32-bit, float, palette, CMYK and LA frames are read, not refused (their values: tests/test_bad_values.py);
    # the modes to_rgb refuses (integer grey beyond 16 bits, float grey outside [0, 1]) no PNG/JPEG/WebP frame can hold
    Row("unreadable frame", "frames/f0.png truncated", {
        "train": lambda c: c.train(video=c.frames("truncated")),
        "diagnose": lambda c: c.diagnose(video=c.frames("truncated")),
        "evaluate": lambda c: c.evaluate(video=c.frames("truncated"))}, "could not read image"),
    Row("frames of different sizes", "frames/: 64x64, then 80x64", {
        "train": lambda c: c.train(video=c.frames("sizes")),
        "diagnose": lambda c: c.diagnose(video=c.frames("sizes"))},
        "differ in size: f0.png is 64x64, f2.png is 80x64"),
    Row("too few frames", "n_frames 8 of a 6-frame clip", {
        "train": lambda c: c.train(n_frames=8),
        "diagnose": lambda c: c.diagnose(**{"n-frames": 8})}, "has 6 frames"),
    Row("size not a multiple of 64", "size 96", {
        "train": lambda c: c.train(size=96),
        "diagnose": lambda c: c.diagnose(size=96)},
        "size=96 must be a positive multiple of 64"),
    # --- values (every number of every CLI: test_bad_number below) ---
    Row("non-finite value", "inf / nan", {
        "train": lambda c: c.train(guidance="inf"),
        "edit": lambda c: c.edit("--guidance", "nan"),
        "diagnose": lambda c: c.diagnose(lr="nan"),
        "evaluate": lambda c: c.evaluate("--max-frames", "nan")},
        {"train": "guidance=inf must be a finite number", "edit": "--guidance=nan must be a finite number",
         "diagnose": "--lr=nan must be a finite number", "evaluate": "--max-frames must be an integer, got 'nan'"}),
    Row("out-of-range value", "-1e-4 / 0 / -1 / 1", {
        "train": lambda c: c.train(learning_rate="-1e-4"),
        "edit": lambda c: c.edit("--steps", "0"),
        "diagnose": lambda c: c.diagnose(lr="-1"),
        "evaluate": lambda c: c.evaluate("--max-frames", "1")},
        {"train": "learning_rate=-0.0001 must be > 0", "edit": "--steps=0 must be in 1..1000",
         "diagnose": "--lr=-1.0 must be > 0", "evaluate": "--max-frames=1 must be >= 2"}),
    Row("CLIP weights that give NaN (patched)", "a NaN in the image embeddings", {
        "evaluate": lambda c: [*c.evaluate(), c.fake_clip(NaNClip)][:-1]},
        "gives non-finite scores (frame_consistency=nan"),
    Row("empty prompt", "caption ' ' / --prompt ' '", {
        "train": lambda c: c.train(caption=" "),
        "edit": lambda c: ["--run", str(c.run()), "--prompt", " "],
        "diagnose": lambda c: c.diagnose(caption="")},
        {"train": "caption is empty", "edit": "prompt 1 is empty", "diagnose": "--caption"}),
    Row("unknown config key", "--stpes 3", {"train": lambda c: c.train("--stpes", "3")}, "did you mean 'steps'"),
    Row("missing config file", "--config <tmp>/missing.yaml", {
        "train": lambda c: ["--config", str(c.tmp / "missing.yaml")]}, "config file not found"),
    Row("bad --device", "gpu0", {
        "train": lambda c: c.train(device="gpu0"),
        "edit": lambda c: c.edit("--device", "gpu0"),
        "diagnose": lambda c: c.diagnose(device="gpu0"),
        "evaluate": lambda c: c.evaluate("--device", "gpu0")},
        {"train": "device='gpu0' must be auto, cpu, cuda, cuda:N or mps", "edit": "device 'gpu0' is not one of",
         "diagnose": "device 'gpu0' is not one of", "evaluate": "device 'gpu0' is not one of"}),
    Row("a device this machine lacks", "mps", {
        "train": lambda c: c.train(device="mps"),
        "edit": lambda c: c.edit("--device", "mps"),
        "diagnose": lambda c: c.diagnose(device="mps"),
        "evaluate": lambda c: c.evaluate("--device", "mps")}, "MPS (Apple GPU) is not available"),
    Row("bad --precision", "fp64", {
        "train": lambda c: c.train(precision="fp64"),
        "edit": lambda c: c.edit("--precision", "fp64"),
        "diagnose": lambda c: c.diagnose(precision="fp64")},
        {"train": "precision='fp64' is not one of auto, fp32, bf16, fp16",
         "edit": "precision 'fp64' is not one of auto, fp32, bf16, fp16",
         "diagnose": "argument --precision: invalid choice: 'fp64'"}),  # argparse's choices: usage, then the line
    # --- the output location, checked before any work ---
    Row("output location is a file", "<tmp>/file", {
        "train": lambda c: c.train(output_dir=c.a_file()),
        "edit": lambda c: c.edit(run=c.a_file()),
        "diagnose": lambda c: c.diagnose(out=c.a_file()),
        "evaluate": lambda c: c.evaluate("--json", str(c.a_file() / "scores.json"), video=c.clip)},
        {"train": "is an existing file, not a folder; choose another output_dir", "edit": "run folder not found",
         "diagnose": "--out folder", "evaluate": "--json folder"}),
    Row("output location under /proc", "/proc/ei2-test/run (/proc/self for a run)", {
        "train": lambda c: c.train(output_dir="/proc/ei2-test/run"),
        "diagnose": lambda c: c.diagnose(out="/proc/ei2-test/run"),
        "evaluate": lambda c: c.evaluate(run=Path("/proc/self"))}, "under /proc, a system folder"),
    Row("output location under /sys", "/sys/ei2-test", {
        "train": lambda c: c.train(output_dir="/sys/ei2-test"),
        "diagnose": lambda c: c.diagnose(out="/sys/ei2-test"),
        "evaluate": lambda c: c.evaluate("--json", "/sys/ei2-test/scores.json", video=c.clip)},
        "under /sys, a system folder"),
    Row("read-only output location (patched)", "EROFS on the probe file", {
        "train": lambda c: c.read_only() or c.train(),
        "edit": lambda c: [*c.edit(), c.read_only()][:-1],
        "diagnose": lambda c: c.read_only() or c.diagnose(),
        "evaluate": lambda c: [*c.evaluate(), c.read_only()][:-1]},
        {"train": "cannot write to output_dir", "edit": "cannot write to run folder",
         "diagnose": "cannot write to --out folder", "evaluate": "cannot write to run folder"}),
    Row("disk full writing a text file (patched)", "ENOSPC in config.yaml / edits.json / diagnose.json / metrics.json", {
        "train": lambda c: c.full_disk("text") or c.train(),
        "edit": lambda c: [*c.edit(), c.full_disk("text")][:-1],
        "diagnose": lambda c: c.full_disk("text") or c.diagnose(),
        "evaluate": lambda c: [*c.evaluate(), c.fake_clip(), c.full_disk("text")][:-2]},
        "no space left on device", writes=True),
    Row("disk full writing a checkpoint (patched)", "ENOSPC in checkpoints/last.safetensors", {
        "train": lambda c: c.full_disk("checkpoint") or c.train()},
        "no space left on device", writes=True, after=lambda c: not_there(c.out / "checkpoints" / "last.safetensors")),
    Row("disk full writing a video (patched)", "ENOSPC in a .gif", {
        "train": lambda c: c.full_disk("video") or c.train(),
        "edit": lambda c: [*c.edit(), c.full_disk("video")][:-1]},
        "no space left on device", writes=True),
    # --- runs ---
    Row("run folder locked by a live run", "<folder>/.ei2.lock of this process", {
        "train": lambda c: c.train(output_dir=c.lock(c.out)),
        "edit": lambda c: c.edit(run=c.lock(c.run()))}, f"is in use by process {os.getpid()} on "),
    Row("run folder locked from another host", "<folder>/.ei2.lock of host other-node-7", {
        "train": lambda c: c.train(output_dir=c.lock(c.out, "other-node-7")),
        "edit": lambda c: c.edit(run=c.lock(c.run(), "other-node-7"))},
        "the lock is from another host and is never removed automatically"),
    Row("--resume below the checkpoint's step", "--resume --steps 2 (checkpoint at step 4)", {
        "train": lambda c: c.train("--resume", output_dir=c.run(), steps=2)}, "is at step 4 but steps=2"),
    Row("--resume without a checkpoint", "--resume into an empty folder", {
        "train": lambda c: c.train("--resume")}, "--resume: no checkpoint at"),
    Row("run folder not found", "--run <tmp>/nope", {
        "edit": lambda c: c.edit(run=c.tmp / "nope"),
        "diagnose": lambda c: ["--run", str(c.tmp / "nope")],
        "evaluate": lambda c: c.evaluate(run=c.tmp / "nope")},
        {"edit": "run folder not found", "diagnose": "nope", "evaluate": "run directory not found"}),
    Row("unfinished run", "inverted.safetensors / source.* missing", {
        "edit": lambda c: c.edit(run=without(c.run(), "inverted.safetensors")),
        "evaluate": lambda c: [*c.evaluate(run=without(c.run(), "source.mp4", "source.gif")), c.fake_clip()][:-1]},
        {"edit": "missing inverted.safetensors (the inverted latent x_T)", "evaluate": "video of the source clip"}),
    Row("run parts that do not belong together: base model", "config.yaml's model: another tiny model", {
        "edit": lambda c: c.edit(run=c.run(model=c.model.parent / "model1"))},
        "is not the one the run was tuned on"),
    Row("run parts that do not belong together: inverted latent", "inverted.safetensors of 3 frames", {
        "edit": lambda c: c.edit(run=short_latent(c.run()))},
        f"the inverted latent has shape [1, 4, {N - 1}, 8, 8], the run recorded [1, 4, {N}, 8, 8]"),
]


def misshaped_tuned(run: Path) -> Path:
    with safe_open(str(run / "tuned.safetensors"), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(run / "tuned.safetensors"))
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = state[key][:, :1].contiguous()
    save_file(state, str(run / "tuned.safetensors"), metadata=meta)
    return run


def short_latent(run: Path) -> Path:
    save_file({"latent": torch.zeros(1, 4, N - 1, SIZE // 8, SIZE // 8)}, str(run / "inverted.safetensors"))
    return run


def without(run: Path, *names: str) -> Path:
    for name in names:
        (run / name).unlink()
    return run


def not_there(path: Path) -> None:
    assert not path.exists(), path


# --- the checks of every case ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (its sha256) and folder (an empty folder left behind counts) under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def complete(path: Path) -> None:
    """A file that looks like a JSON/YAML/weights/video/image file is one, in full (not cut off by the failure)."""
    suffix = path.suffix
    if suffix == ".json":
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
    elif suffix == ".yaml":
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    elif suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    elif suffix in (".mp4", ".gif", ".png"):
        assert iio.imread(path, index=None).size > 0, path


def one_error_line(err: str, fragment: str) -> None:
    """Exactly one line `error: ...` (argparse's own errors: its usage lines, then `<prog>: error: ...`), holding the
    fragment; no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage: "):
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1 and lines[-1] == errors[0], err
    else:
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and len([line for line in lines if "error" in line.lower()]) == 1, err
    assert fragment in errors[0], err


CASES = [(row, cli) for row in TABLE for cli in row.clis]


@pytest.mark.parametrize("row, cli", CASES, ids=[f"{row.what}-{cli}" for row, cli in CASES])
def test_bad_input(row, cli, assets, tiny_run, train_argv, tmp_path, monkeypatch, capsys):
    case = Case(tmp_path, assets, tiny_run, train_argv, monkeypatch)
    fails_cleanly(cli, row.clis[cli](case), row.fragment if isinstance(row.fragment, str) else row.fragment[cli],
                  tmp_path, assets, capsys, row.code, row.writes is True or cli in (row.writes or ()))
    row.after(case)


def fails_cleanly(cli, argv, fragment, tmp_path, assets, capsys, code=2, writes=False) -> None:
    """The CLI exits with `code` and one error line holding `fragment`; nothing half-written: no temporary file, no
    lock but one the row put there, and the case's files untouched or (where the run got to write before the
    failure: `writes`) each written file complete."""
    before, shared = snapshot(tmp_path), snapshot(assets[0].parent)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        CLIS[cli](argv)
    assert exit_.value.code == code
    one_error_line(capsys.readouterr().err, fragment)
    after = snapshot(tmp_path)
    assert not [f for f in after if TMP_MARK in f], after
    locks = {f: h for f, h in before.items() if f.endswith(LOCK_NAME)}
    assert {f: h for f, h in after.items() if f.endswith(LOCK_NAME)} == locks
    if writes:
        for f in after:
            if after[f] not in (before.get(f), "folder"):  # written by the run (the broken inputs are not: they are the row)
                complete(tmp_path / f)
    else:
        assert after == before
    assert snapshot(assets[0].parent) == shared  # the shared model and clip are never written


# --- every number of every CLI: one range table (ei2.config.RANGES / CLI_RANGES, check_value) -----------------------

NUMBERS = [  # (cli, arguments, message fragment)
    ("train", ["--guidance", "inf"], "guidance=inf must be a finite number"),
    ("train", ["--guidance", "nan"], "guidance=nan must be a finite number"),
    ("train", ["--guidance", "-1"], "guidance=-1.0 must be >= 1"),
    ("train", ["--guidance", "1e9"], "guidance=1000000000.0 must be >= 1 and <= 100"),
    ("train", ["--learning_rate", "nan"], "learning_rate=nan must be a finite number"),
    ("train", ["--learning_rate", "-1e-4"], "learning_rate=-0.0001 must be > 0"),
    ("train", ["--weight_decay", "-inf"], "weight_decay=-inf must be a finite number"),
    ("train", ["--grad_clip", "inf"], "grad_clip=inf must be a finite number"),
    ("train", ["--steps", "inf"], "steps must be an integer"),
    ("train", ["--steps", "-5"], "steps=-5 must be >= 0"),
    ("train", ["--seed", str(2**64)], f"seed={2**64} must be in -{2**63}..{2**64 - 1}"),
    ("train", ["--fps", "nan"], "fps must be an integer"),
    ("train", ["--learning_rate", "1" + "0" * 400], "learning_rate must be a number"),
    ("edit", ["--guidance", "nan"], "--guidance=nan must be a finite number"),
    ("edit", ["--guidance", "inf"], "--guidance=inf must be a finite number"),
    ("edit", ["--guidance", "0.5"], "--guidance=0.5 must be >= 1"),
    ("edit", ["--steps", "0"], "--steps=0 must be in 1..1000"),
    ("edit", ["--steps", "5000"], "--steps=5000 must be in 1..1000"),
    ("edit", ["--device", "cuda:1" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"],
     "asked for but"),
    ("diagnose", ["--lr", "-1"], "--lr=-1.0 must be > 0"),
    ("diagnose", ["--lr", "inf"], "--lr=inf must be a finite number"),
    ("diagnose", ["--tune-steps", "-1"], "--tune-steps=-1 must be >= 0"),
    ("diagnose", ["--ratio", "0"], "--ratio=0 must be >= 1"),
    ("diagnose", ["--n-frames", "0"], "--n-frames=0 must be >= 1"),
    ("diagnose", ["--seed", str(2**70)], f"--seed={2**70} must be in -"),
    ("evaluate", ["--max-frames", "inf"], "--max-frames must be an integer, got 'inf'"),
    ("evaluate", ["--max-frames", "0"], "--max-frames=0 must be >= 2 (frame consistency compares pairs of frames)"),
    ("evaluate", ["--max-frames", "2.5"], "--max-frames must be an integer, got '2.5'"),
    ("evaluate", ["--max-frames", "many"], "--max-frames must be an integer, got 'many'"),
]


@pytest.mark.parametrize("cli, args, fragment", NUMBERS, ids=[f"{c}{' '.join(a)[:30]}" for c, a, _ in NUMBERS])
def test_bad_number(cli, args, fragment, assets, tiny_run, train_argv, tmp_path, monkeypatch, capsys):
    case = Case(tmp_path, assets, tiny_run, train_argv, monkeypatch)
    fails_cleanly(cli, getattr(case, cli)(*args), fragment, tmp_path, assets, capsys)


# --- as a user runs it: real processes ----------------------------------------------------------------------------


def test_as_a_user_runs_it(assets, tiny_run, tmp_path):
    """One row per CLI as a `python -m ei2.<cli>` process (started together): exit 2, one line, no traceback."""
    model, clip = assets
    rows = [
        ("train", ["--guidance", "inf", "--output_dir", str(tmp_path / "o1")], "guidance=inf must be a finite number"),
        ("edit", ["--run", str(tiny_run), "--prompt", PROMPT, "--device", "gpu0"], "device 'gpu0' is not one of"),
        ("diagnose", ["--model", str(model), "--video", str(clip), "--caption", CAPTION, "--lr", "-1"],
         "--lr=-1.0 must be > 0"),
        ("evaluate", ["--video", str(clip), "--prompt", CAPTION, "--max-frames", "nan"],
         "--max-frames must be an integer"),
    ]
    before = snapshot(tiny_run)
    procs = [subprocess.Popen([sys.executable, "-m", f"ei2.{cli}", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for cli, argv, _ in rows]
    for (cli, argv, fragment), proc in zip(rows, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (cli, argv, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        one_error_line(err, fragment)
    assert snapshot(tiny_run) == before and not list(tmp_path.iterdir())


# --- the demo from another working directory ------------------------------------------------------------------------


@pytest.mark.skipif(not (REPO / "weights/mini/unet/diffusion_pytorch_model.safetensors").is_file(),
                    reason="weights/mini not trained")
def test_demo_runs_from_another_working_directory(tmp_path):
    """The README: `python -m ei2.train` (the demo) works when started from another directory, with the editable
    install; its outputs go to runs/demo under the working directory, and the run records absolute paths."""
    r = subprocess.run([sys.executable, "-m", "ei2.train", "--steps", "2", "--inference_steps", "2",
                        "--inversion_steps", "2", "--checkpoint_every", "0", "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "runs" / "demo"
    assert "done: outputs in runs/demo/" in r.stdout and out.is_dir()
    for name in ("config.yaml", "tuned.safetensors", "inverted.safetensors", "source.mp4", "edits.json",
                 "log.json", "comparison.png"):
        complete(out / name)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(REPO / "weights" / "mini") and saved["video"] == str(REPO / "assets/demo/red-circle.gif")
    assert saved["output_dir"] == "runs/demo" or Path(saved["output_dir"]).resolve() == out
    assert [e["prompt"] for e in json.loads((out / "edits.json").read_text())] == saved["edit_prompts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing else written into the working directory
