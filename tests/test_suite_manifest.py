"""The suite's manifest (every problem at once, with its line; how a job's settings are layered), the shipped
manifests (configs/suite-mini.yaml, configs/loveu-tgve-2023.yaml and its generator) and the job scheduling
(longest first; every index handed out once through a torch.distributed store)."""

import json
import sys
import threading
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

import ei2.suite.run
from ei2.config import load_config
from ei2.errors import Ei2Error
from ei2.suite.__main__ import main as suite_main
from ei2.suite.manifest import load_suite
from ei2.suite.schedule import Ranks, longest_first

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import loveu_manifest  # noqa: E402  (tools/ is not a package)

BAD = """\
output_dir: out
jobz: []
defaults:
  stepz: 3
  learning_rate: 5
methods:
  ei2: {temporal: stam}
  "bad name": {}
jobs:
  - name: a
    video: a.gif
    caption: c
    edits: {x: p}
    overrides: {guidance: .nan}
  - name: a
    video: b.gif
    caption: c
    edits: {x: p}
    steps: 3
  - name: b
    video: b.gif
    edits: {x: ""}
"""


def test_every_problem_is_reported_at_once_with_its_line(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(BAD)
    with pytest.raises(SystemExit) as e:
        suite_main([str(path), "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    expected = [(2, "unknown key 'jobz'; did you mean 'jobs'?"),
                (4, "unknown config key 'stepz'; did you mean 'steps'"),
                (5, "learning_rate=5.0 must be > 0 and <= 1"), (8, "method name 'bad name'"),
                (14, "guidance=nan must be a finite number"), (15, "duplicate job name 'a' (first at line 10)"),
                (19, "unknown job key 'steps'; put ei2.train keys under overrides:"),
                (20, "job b: caption must be a non-empty text"), (22, "job b: edit x must be a non-empty prompt")]
    assert err.startswith(f"error: {len(expected)} problem(s) in the suite {path}, nothing was started")
    for line, text in expected:
        assert f"{path} line {line}: {text}" in err, (line, text, err)
    assert not (tmp_path / "out").exists()


def test_a_jobs_settings_are_layered_and_the_suites_keys_refused(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/base.yaml").write_text("model: my-model\nsteps: 7\nguidance: 3\nsize: 128\nvideo: x.gif\n"
                                                "edit_prompts: [ignored]\n")
    (tmp_path / "my-model").mkdir()  # the config's relative model: its repository's (the parent of configs/)
    path = tmp_path / "configs/suite.yaml"
    path.write_text("video_root: clips\ndefaults: {config: configs/base.yaml, steps: 8}\n"
                    "methods: {tav: {temporal: ta, guidance: 2}}\n"
                    "jobs:\n  - {name: j, video: v.gif, caption: c, edits: {k: p}, overrides: {guidance: 4}}\n")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips/v.gif").write_bytes(b"")
    suite = load_suite(path, {"inference_steps": 9}, str(tmp_path / "out"))
    (job,) = suite.jobs
    cfg = job.cfg
    assert (cfg.steps, cfg.guidance, cfg.size, cfg.temporal, cfg.inference_steps) == (8, 4.0, 128, "ta", 9)
    assert (cfg.model, cfg.video) == (str(tmp_path / "my-model"), str(tmp_path / "clips/v.gif"))
    assert (cfg.caption, cfg.edit_prompts, job.kinds) == ("c", ["p"], ["k"]) and job.missing is None
    assert cfg.output_dir == str(tmp_path / "out/tav/j") and job.id == "tav/j"
    path.write_text("defaults: {video: a.gif}\njobs:\n  - {name: j, video: v.gif, caption: c, edits: {k: p}}\n")
    with pytest.raises(Ei2Error, match=r"line 1: video is set by the suite: use the job's video:"):
        load_suite(path)


def test_strict_makes_a_missing_video_fatal_before_any_work(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(f"defaults: {{config: {ROOT / 'configs/demo.yaml'}}}\n"
                    "jobs:\n  - {name: j, video: nope.gif, caption: c, edits: {k: p}}\n")
    with pytest.raises(SystemExit) as e:
        suite_main([str(path), "--output_dir", str(tmp_path / "out"), "--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--strict: 1 video(s) missing, nothing was started: ei2/j: {Path.cwd() / 'nope.gif'}" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        suite_main([str(path), "--video", "x.gif"])
    assert "--video is set per job by the suite" in capsys.readouterr().err


def test_the_miniature_suite_uses_the_demo_model_under_two_methods():
    suite = load_suite(ROOT / "configs/suite-mini.yaml")
    demo = load_config(ROOT / "configs/demo.yaml")
    assert len(suite.jobs) == 6 and not suite.missing
    assert {j.cfg.model for j in suite.jobs} == {demo.model} and {j.cfg.size for j in suite.jobs} == {demo.size}
    assert {(j.method, j.cfg.frame_attention, j.cfg.temporal) for j in suite.jobs} == {("ei2", "ffam", "stam"),
                                                                                       ("tav", "sca", "ta")}
    assert all(j.cfg.score == "mini" and j.kinds == ["colour", "shape", "background", "multiple"] for j in suite.jobs)


def test_the_loveu_manifest_is_generated_from_the_prompt_table(tmp_path):
    rows = loveu_manifest.read_rows(ROOT / "tests/data/loveu-tgve-2023-sample.tsv")
    out = tmp_path / "loveu.yaml"
    loveu_manifest.write(rows, out)
    suite = load_suite(out, video_root=str(tmp_path))
    assert len(suite.jobs) == 2 * len(rows) == 6 and len(suite.missing) == 6  # videos are not shipped
    by_id = {j.id: j for j in suite.jobs}
    for row in rows:
        job = by_id[f"ei2/{row['video']}"]
        assert job.kinds == ["style", "object", "background", "multiple"]
        assert job.cfg.edit_prompts == [row[k] for k in job.kinds] and job.cfg.caption == row["caption"]
        assert job.cfg.n_frames == 8 and job.cfg.stride * 8 == int(row["frames"])  # 8 frames spread over the clip
        assert job.cfg.video == str(tmp_path / row["subset"] / "480p_frames" / row["video"])
    loveu_manifest.write(rows, out, all_frames=True)
    assert {j.cfg.n_frames for j in load_suite(out).jobs} == {32, 128}
    shipped = yaml.safe_load((ROOT / "configs/loveu-tgve-2023.yaml").read_text())
    assert len(shipped["jobs"]) == 76 and len({j["name"] for j in shipped["jobs"]}) == 76
    generated = loveu_manifest.manifest(rows)
    for entry in generated["jobs"]:  # the committed file is the generator's output
        assert entry in shipped["jobs"], entry["name"]
    assert {k: v for k, v in shipped.items() if k != "jobs"} == {k: v for k, v in generated.items() if k != "jobs"}


class FakeJob:
    def __init__(self, name, method, cost):
        self.name, self.method, self.cost = name, method, cost


def test_longest_first_then_grouped_by_method():
    jobs = [FakeJob("a", "ei2", 8), FakeJob("a", "tav", 8), FakeJob("b", "ei2", 128), FakeJob("b", "tav", 128),
            FakeJob("c", "ei2", 8), FakeJob("c", "tav", 8)]
    assert [(j.name, j.method) for j in longest_first(jobs)] == [
        ("b", "ei2"), ("b", "tav"), ("a", "ei2"), ("c", "ei2"), ("a", "tav"), ("c", "tav")]


def test_the_store_counter_hands_out_every_job_once():
    store = dist.HashStore()
    taken: list[list[int]] = [[] for _ in range(4)]

    def rank(r):
        ranks = Ranks(rank=r, world=4, store=store, prefix="t/")
        while (i := ranks.next_job()) < 50:
            taken[r].append(i)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for t in taken for i in t) == list(range(50))
    assert Ranks().next_job() == 0 and Ranks().add("x", 3) == 3  # alone: a local counter


def test_a_killed_job_leaves_no_marker_and_is_redone(tmp_path, monkeypatch, capsys):
    """A rank killed inside a job (KeyboardInterrupt stands for the signal: no `except Exception` catches it) leaves
    the job's folder without done.json or failed.json; the next run redoes it (ei2.train itself is stubbed here)."""
    path = tmp_path / "suite.yaml"
    path.write_text(f"defaults: {{config: {ROOT / 'configs/demo.yaml'}}}\njobs:\n"
                    f"  - {{name: j, video: {ROOT / 'assets/demo/red-circle.gif'}, caption: c, edits: {{k: p}}}}\n")
    calls = []

    def killed(cfg, out, *args):
        (out / "tuned.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    def finishes(cfg, out, *args):
        calls.append(cfg.output_dir)
        for name in ("edits.json", "log.json"):
            (out / name).write_text("[]" if name == "edits.json" else "{}")

    monkeypatch.setattr(ei2.suite.run.train, "run_locked", killed)
    with pytest.raises(SystemExit) as e:
        suite_main([str(path), "--output_dir", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 130
    job = tmp_path / "out/ei2/j"
    assert (job / "tuned.safetensors").is_file() and not (job / "done.json").exists()
    assert not (job / "failed.json").exists() and not (job / ".ei2.lock").exists()
    monkeypatch.setattr(ei2.suite.run.train, "run_locked", finishes)
    assert suite_main([str(path), "--output_dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert calls == [str(job)] and json.loads((job / "done.json").read_text())["status"] == "done"


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    bad = tmp_path / "suite.yaml"
    bad.write_text("jobs:\n  - name: a\n    caption: [unclosed\n")  # the flow sequence never closes
    with pytest.raises(Ei2Error, match=r"YAML syntax error in .*suite.yaml at line 4, column 1: .*; fix that line"):
        load_suite(bad)
