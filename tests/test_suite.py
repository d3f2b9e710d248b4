"""`ei2.suite` end to end on the miniature model (configs/demo.yaml's weights/mini) at reduced steps: torchrun with 2
CPU ranks (gloo store) against one process and against plain ei2.train, bad jobs failing alone, reruns."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import ei2.suite.run
from ei2.suite.__main__ import main as suite_main
from ei2.train import main as train_main
from ei2.weights import read_state_dict

ROOT = Path(__file__).resolve().parents[1]
FEW = ["--steps", "2", "--inference_steps", "2", "--inversion_steps", "2", "--n_frames", "2"]
GOOD = ["ei2/red-circle-right", "ei2/yellow-square-up"]
BAD = ["ei2/missing", "ei2/broken"]

pytestmark = pytest.mark.skipif(not (ROOT / "weights/mini/unet/diffusion_pytorch_model.safetensors").is_file(),
                                reason="weights/mini not trained")


def manifest(folder: Path) -> Path:
    (folder / "broken.gif").write_bytes(b"GIF89a but not really a gif" * 20)  # exists, cannot be decoded
    path = folder / "suite.yaml"
    path.write_text(f"""\
video_root: {ROOT / 'assets/suite-mini'}
defaults:
  config: {ROOT / 'configs/demo.yaml'}
  checkpoint_every: 0
jobs:
  - name: red-circle-right
    video: red-circle-right.gif
    caption: a red circle moving right on a white background
    edits: {{colour: a blue circle moving right on a white background}}
  - name: missing
    video: nope.gif
    caption: a red circle moving right on a white background
    edits: {{colour: a blue circle moving right on a white background}}
  - name: yellow-square-up
    video: yellow-square-up.gif
    caption: a yellow square moving up on a black background
    edits: {{shape: a yellow circle moving up on a black background}}
  - name: broken
    video: {folder / 'broken.gif'}
    caption: a red circle moving right on a white background
    edits: {{colour: a blue circle moving right on a white background}}
""")
    return path


class FakeClip:
    """Stands for CLIP ViT-L/14 (no weights here): numbers from the frames and the prompt, to follow them to the
    tables."""
    folder = Path("fake-clip")

    def score(self, frames, prompt):
        return {"frames": len(frames), "frame_consistency": float(len(prompt)),
                "textual_alignment": float(np.mean(np.stack(frames)))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same suite on 2 torchrun ranks and on one process (with CLIP stood in for)."""
    folder = tmp_path_factory.mktemp("suite")
    path = manifest(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ei2.suite", str(path),
                          "--output_dir", str(folder / "two"), *FEW], capture_output=True, text=True, env=env,
                         timeout=600)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ei2.suite.run.Rank, "clip", lambda self, device: FakeClip())
        one = suite_main([str(path), "--output_dir", str(folder / "one"), "--no-progress", *FEW])
    return folder, two, one


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = read_state_dict(a), read_state_dict(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def same_videos(a: Path, b: Path) -> bool:
    """The tuned and inverted tensors and every written video's frames are equal."""
    names = ["tuned.safetensors", "inverted.safetensors"]
    videos = sorted(p.relative_to(a) for p in [*a.glob("edits/*"), *a.glob("source.*")])
    assert videos and videos == sorted(p.relative_to(b) for p in [*b.glob("edits/*"), *b.glob("source.*")])
    return all(tensors_equal(a / n, b / n) for n in names) and all(
        np.array_equal(iio.imread(a / v, index=None), iio.imread(b / v, index=None)) for v in videos)


def test_two_ranks_run_every_job_once_and_equal_one_process(runs):
    folder, two, one = runs
    assert one == 2, "exit status: the number of failed jobs"
    assert two.returncode != 0, two.stdout + two.stderr  # a rank's non-zero status makes torchrun's non-zero
    logs = "".join((folder / "two/logs" / f"rank{r}.log").read_text() for r in (0, 1))
    started = re.findall(r" start (\S+) ", logs)
    assert sorted(started) == sorted(GOOD + BAD), logs  # each job handed out exactly once over the two ranks
    assert "[rank 0]" in two.stdout and "[rank 1]" in two.stdout
    assert re.search(r"suite: 4/4 finished \(2 done, 2 failed, 0 skipped\), 0 running, 0 waiting; \d+:\d\d elapsed",
                     two.stdout), two.stdout  # rank 0's progress line for the whole suite
    for job in GOOD:
        assert (folder / "two" / job / "done.json").is_file()
        assert same_videos(folder / "two" / job, folder / "one" / job), job


def test_a_job_equals_plain_ei2_train(runs, tmp_path):
    folder, _, _ = runs
    job = folder / "two" / GOOD[1]
    train_main(["--config", str(job / "config.yaml"), "--output_dir", str(tmp_path / "alone"), "--no-progress"])
    assert same_videos(job, tmp_path / "alone")


def test_bad_jobs_fail_alone_with_their_errors_and_the_tables_say_so(runs):
    folder, two, _ = runs
    for out in (folder / "one", folder / "two"):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["counts"] == {"done": 2, "failed": 2, "not finished": 0}
        jobs = {j["id"]: j for j in summary["jobs"]}
        assert jobs["ei2/missing"]["error"].startswith("video not found: " + str(ROOT / "assets/suite-mini/nope.gif"))
        assert str(folder / "broken.gif") in jobs["ei2/broken"]["error"]
        assert all("\n" not in jobs[j]["error"] for j in BAD)
        for job in BAD:
            assert not (out / job / "done.json").exists() and (out / job / "failed.json").is_file()
        edits = [e for j in GOOD for e in jobs[j]["edits"]]
        assert [e["kind"] for e in edits] == ["colour", "shape"]
        overall = summary["overall"]["ei2"]
        assert overall["edits"] == 2 and overall["done"] == 2 and overall["failed"] == 2
        # the overall mean is the mean of the two edits' exact metrics, as written in each run's edits.json
        runs_edits = [json.loads((out / j / "edits.json").read_text())[0]["mini_metrics"] for j in GOOD]
        for key, value in overall.items():
            if key in runs_edits[0] and all(r[key] is not None for r in runs_edits):
                assert value == pytest.approx((runs_edits[0][key] + runs_edits[1][key]) / 2), key
        table = (out / "summary.md").read_text()
        assert "| ei2 | colour | 1 |" in table and "| broken | ei2 | failed |" in table
    assert "missing video, job ei2/missing will fail" in two.stderr


def test_clip_scores_reach_the_tables(runs):
    folder, _, _ = runs
    summary = json.loads((folder / "one/summary.json").read_text())
    assert summary["metrics"][:2] == ["frame_consistency", "textual_alignment"]
    scored = [json.loads((folder / "one" / job / "metrics.json").read_text())["edits"][0] for job in GOOD]
    assert scored[0]["frame_consistency"] == len("a blue circle moving right on a white background")
    overall = summary["overall"]["ei2"]
    for key in ("frame_consistency", "textual_alignment"):
        assert overall[key] == pytest.approx((scored[0][key] + scored[1][key]) / 2), key
    assert summary["by_kind"]["ei2"]["shape"]["textual_alignment"] == pytest.approx(scored[1]["textual_alignment"])
    assert "CLIP textual alignment" in (folder / "one/summary.md").read_text()
    assert "frame_consistency" not in json.loads((folder / "two/summary.json").read_text())["metrics"]  # no CLIP


def test_rerun_skips_finished_jobs_and_redoes_an_interrupted_one(runs, capsys):
    folder, _, _ = runs
    out = folder / "rerun"
    shutil.copytree(folder / "one", out)
    interrupted, finished = out / GOOD[0], out / GOOD[1]
    before = read_state_dict(interrupted / "tuned.safetensors")
    (interrupted / "done.json").unlink()  # a rank killed before its last write: outputs partial, no marker
    (interrupted / "edits.json").unlink()
    (interrupted / ".ei2.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    stamp = (finished / "tuned.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert suite_main([str(folder / "suite.yaml"), "--output_dir", str(out), *FEW]) == 2
    printed = capsys.readouterr().out
    assert f"skip {GOOD[1]}: finished earlier" in printed and f"start {GOOD[0]}" in printed
    assert all(f"skip {job}: failed earlier" in printed for job in BAD)
    assert (finished / "tuned.safetensors").stat().st_mtime_ns == stamp  # not run again
    assert (interrupted / "done.json").is_file() and (interrupted / "edits.json").is_file()
    after = read_state_dict(interrupted / "tuned.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert suite_main([str(folder / "suite.yaml"), "--output_dir", str(out), "--retry-failed", *FEW]) == 2
    printed = capsys.readouterr().out
    assert all(f"start {job}" in printed for job in BAD) and f"skip {GOOD[0]}: finished earlier" in printed
