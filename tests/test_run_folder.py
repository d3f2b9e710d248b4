"""The run folder: a new `ei2.train` replaces a used one (only what a run writes), --resume continues it, `ei2.edit`
adds to it with a complete edits.json; the tuned file records what `ei2.edit` checks (base-model fingerprint, latent
shape; --force renders anyway); relative and `~` paths (one rule, absolute in config.yaml). The refusals (--resume
below the checkpoint's step, mismatched run parts, an unfinished run) are rows of tests/test_bad_inputs.py."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import N, SIZE
from safetensors import safe_open

from ei2.config import load_config, resolve_path
from ei2.edit import main as edit_main
from ei2.train import DEMO_CONFIG, REPO, RUN_FILES
from ei2.train import main as train_main



@pytest.fixture
def root(assets) -> Path:
    """The folder of the tiny model (model/, model1/) and clip (clip.gif): the finished run was made from it."""
    return assets[0].parent


@pytest.fixture
def finished(tiny_run) -> Path:
    """The shared finished run (conftest.py): made with relative model and video paths from `root`."""
    return tiny_run


@pytest.fixture
def copy(finished, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(finished, dest)
    return dest


def listed(run_dir: Path) -> set[str]:
    return {e[k] for e in json.loads((run_dir / "edits.json").read_text()) for k in ("mp4", "gif") if k in e}


def in_edits(run_dir: Path) -> set[str]:
    return {f"edits/{f.name}" for f in (run_dir / "edits").iterdir()}


# --- a new run replaces a used folder; ei2.edit keeps edits.json complete ------------------------------------------


def test_new_run_replaces_the_old_one_and_keeps_other_files(root, copy, train_argv, capsys, monkeypatch):
    (copy / "edits" / "07-an-old-edit.gif").write_bytes(b"old")
    (copy / "comparison.old").write_text("old")
    (copy / "notes.txt").write_text("mine")
    (copy / "mine").mkdir()
    monkeypatch.chdir(root)
    train_main(train_argv(copy, edit_prompts=["a green star moving right"]))
    out = capsys.readouterr().out
    assert "holds an earlier run: replacing it" in out and "edits" in out.splitlines()[0]
    assert in_edits(copy) == listed(copy) == {"edits/00-a-green-star-moving-right.mp4",
                                              "edits/00-a-green-star-moving-right.gif"}
    assert not (copy / "comparison.old").exists()
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "mine").is_dir()  # never anything else


def test_clear_run_removes_only_the_run_files(tmp_path):
    from ei2.train import clear_run
    for name in ("config.yaml", "source.gif", "edits.json", "log.json", "comparison.png", "x.lock", ".hidden"):
        (tmp_path / name).write_text("x")
    for name in ("edits", "checkpoints", "other"):
        (tmp_path / name).mkdir()
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "other", "x.lock"]
    assert {p.split(".")[0] for p in RUN_FILES} >= {"config", "tuned", "inverted", "source", "edits", "comparison",
                                                    "log", "checkpoints"}


def test_edit_adds_to_the_run_and_lists_every_file(copy, capsys):
    (copy / "edits" / "05-a-cat-surfing.gif").write_bytes(b"from an interrupted run")
    edit_main(["--run", str(copy), "--prompt", "a red square moving right", "--no-progress"])
    assert in_edits(copy) == listed(copy)
    assert (copy / "edits" / "06-a-red-square-moving-right.mp4").is_file()  # numbered past every file
    assert (copy / "edits" / "05-a-cat-surfing.gif").read_bytes() == b"from an interrupted run"
    entries = json.loads((copy / "edits.json").read_text())
    assert [e["prompt"] for e in entries] == ["a blue square moving right", "a cat surfing",
                                              "a red square moving right"]


# --- the run's parts belong together ---------------------------------------------------------------------------------


def tuned_meta(run_dir: Path) -> dict:
    with safe_open(str(run_dir / "tuned.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["ei2"])


def use_model(run_dir: Path, model: Path) -> None:
    text = (run_dir / "config.yaml").read_text()
    lines = [f"model: {model}" if line.startswith("model:") else line for line in text.splitlines()]
    (run_dir / "config.yaml").write_text("\n".join(lines) + "\n")


def test_tuned_file_records_the_fingerprint_and_the_latent_shape(finished, root):
    meta = tuned_meta(finished)
    assert meta["inverted_shape"] == [1, 4, N, SIZE // 8, SIZE // 8]
    assert len(meta["base_fingerprint"]) == 64 and meta["base_model"] == str(root / "model")


def test_edit_with_another_base_model_renders_with_force(root, copy, capsys):
    # without --force: a one-line error, a row of tests/test_bad_inputs.py
    use_model(copy, root / "model1")
    edit_main(["--run", str(copy), "--prompt", "a cat", "--no-progress", "--force"])
    assert "warning: --force: rendering anyway, though the base model" in capsys.readouterr().out
    assert (copy / "edits" / "01-a-cat.mp4").is_file()


def test_old_tuned_file_without_fingerprint_skips_the_check(copy, capsys):
    from safetensors.torch import load_file, save_file
    meta = tuned_meta(copy)
    del meta["base_fingerprint"], meta["inverted_shape"]
    save_file(load_file(str(copy / "tuned.safetensors")), str(copy / "tuned.safetensors"),
              metadata={"ei2": json.dumps(meta)})
    edit_main(["--run", str(copy), "--prompt", "a cat", "--no-progress"])
    assert "records no base-model fingerprint" in capsys.readouterr().out


# --- paths: one rule, absolute in the run's config.yaml --------------------------------------------------------------


def test_run_records_absolute_paths_and_edit_works_from_another_directory(finished, root, copy, tmp_path,
                                                                          monkeypatch):
    saved = load_config(finished / "config.yaml")
    assert saved.model == str(root / "model") and saved.video == str(root / "clip.gif")
    assert "model: " + str(root / "model") in (finished / "config.yaml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    edit_main(["--run", str(copy), "--prompt", "a cat", "--no-progress"])
    assert (copy / "edits" / "01-a-cat.gif").is_file()


def test_demo_config_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_CONFIG)
    assert cfg.model == str(REPO / "weights" / "mini") and Path(cfg.model).is_dir()
    assert cfg.video == str(REPO / "assets" / "demo" / "red-circle.gif") and Path(cfg.video).is_file()


def test_working_directory_comes_first_then_the_config_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "clip.gif").write_text("x")
    (repo / "configs" / "c.yaml").write_text("video: clip.gif\ncaption: c\nmodel: m\n")
    (repo / "configs" / "clip.gif").write_text("x")  # the config's own folder is not looked at for configs/
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert load_config(repo / "configs" / "c.yaml").video == str(repo / "clip.gif")
    (cwd / "clip.gif").write_text("x")
    assert load_config(repo / "configs" / "c.yaml").video == str(cwd / "clip.gif")
    plain = tmp_path / "plain.yaml"  # a config outside configs/: its own folder
    plain.write_text("video: repo/clip.gif\ncaption: c\n")
    assert load_config(plain).video == str(repo / "clip.gif")
    assert load_config(plain).model == str(cwd / "weights/stable-diffusion-v1-4")  # nowhere: the cwd's, absolute


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["--video", "~/clip.gif", "--caption", "c", "--model", "~/sd", "--output_dir", "~/o"])
    assert (cfg.video, cfg.model, cfg.output_dir) == tuple(str(tmp_path / n) for n in ("clip.gif", "sd", "o"))
    assert resolve_path("~/x") == str(tmp_path / "x")
