"""`python -m ei2.mini.benchmark`: --quick end to end on a random tiny model (plumbing, not quality), the table against
the json, the aggregation over seeds on a hand-made case, and the scoring of the suite's ideal edits."""

import json
import math
import re

import numpy as np
import pytest
from tiny_model import write_random_model

from ei2.mini import benchmark, parse, suite_clips, world
from ei2.mini.benchmark import COLUMNS, aggregate, main, suite, summarize
from ei2.mini.samples import HELD_OUT
from ei2.unet import VARIANTS, UNet, UNetConfig, mark_trainable

ROW_KEYS = {"method", "description", "by_edit", "by_scene"} | {k for k, *_ in COLUMNS}
STAT_KEYS = {"mean", "std", "std_samples", "n", "n_seeds"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_benchmark")
    model = write_random_model(root / "model")
    out = root / "out"
    main(["--quick", "--model", str(model), "--steps", "2", "--inference-steps", "2", "--inversion-steps", "2",
          "--out", str(out)])
    return out


def test_quick_writes_one_row_per_method(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert [row["method"] for row in results["table"]] == ["ei2", "tav"]
    for row in results["table"]:
        assert set(row) == ROW_KEYS
        for key, *_ in COLUMNS:
            assert set(row[key]) == STAT_KEYS
            assert math.isfinite(row[key]["mean"]) and row[key]["std"] == 0.0  # one seed
        assert row["align_edited"]["n"] == 1 and set(row["by_edit"]) == {"color"}
        assert 0.0 <= row["align_edited"]["mean"] <= 1.0 and 0.0 <= row["iou"]["mean"] <= 1.0
        assert row["tuning_s"]["mean"] > 0
    assert results["settings"]["status"].startswith("complete")
    assert [r["steps"] for r in results["runs"]] == [2, 2]
    assert len(results["samples"]) == 2
    assert results["samples"][0]["prompt"] == "a blue circle moving right on a white background"
    assert (quick_run / "grids" / "red-circle-right-on-white-color.png").is_file()
    assert (quick_run / "diagnose" / "diagnose.png").is_file() and not (quick_run / "diagnose-fig4").exists()
    (pair,) = results["paired"]  # ei2 - tav on the one sample
    assert (pair["a"], pair["b"]) == ("ei2", "tav")
    ei2, tav = results["samples"]
    for key in benchmark.PAIRED_KEYS:
        assert pair[key]["mean"] == pytest.approx(ei2[key] - tav[key]) and pair[key]["n"] == 1
    report = json.loads((quick_run / "diagnose" / "diagnose.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["tav", "ei2"]


def test_table_numbers_equal_the_json(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    md = (quick_run / "results.md").read_text()
    for row in results["table"]:
        line = next(l for l in md.splitlines() if l.startswith(f"| {row['method']} |") and "±" in l)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[0] == row["method"] and int(cells[-1]) == row["align_edited"]["n"]
        for (key, _, _, decimals), cell in zip(COLUMNS, cells[1:-1]):
            mean, std = (float(x) for x in re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", cell).groups())
            assert mean == pytest.approx(row[key]["mean"], abs=0.51 * 10**-decimals), key
            assert std == pytest.approx(row[key]["std"], abs=0.51 * 10**-decimals), key


def test_aggregate_over_seeds_by_hand():
    # seed 0: 0.2, 0.4 (mean 0.3); seed 1: 0.6, 1.0 (mean 0.8)
    records = [{"seed": 0, "x": 0.2}, {"seed": 0, "x": 0.4}, {"seed": 1, "x": 0.6}, {"seed": 1, "x": 1.0}]
    a = aggregate(records, "x")
    assert a["mean"] == pytest.approx(0.55)
    assert a["std"] == pytest.approx(math.sqrt(((0.3 - 0.55) ** 2 + (0.8 - 0.55) ** 2) / 1))  # ddof 1 over seeds
    assert a["std_samples"] == pytest.approx(np.std([0.2, 0.4, 0.6, 1.0], ddof=1))
    assert (a["n"], a["n_seeds"]) == (4, 2)
    single = aggregate([{"seed": 3, "x": 0.7}], "x")
    assert (single["mean"], single["std"], single["std_samples"], single["n"]) == (0.7, 0.0, 0.0, 1)


def test_summarize_uses_runs_for_time_and_memory():
    metrics = {k: 0.5 for k, *_ in COLUMNS if k not in benchmark.RUN_KEYS}
    samples = [{"method": "ei2", "edit": e, "seed": s, **metrics, "align_edited": v}
               for s, e, v in [(0, "color", 1.0), (0, "shape", 0.0), (1, "color", 0.5), (1, "shape", 0.5)]]
    runs = [{"method": "ei2", "seed": 0, "tuning_s": 10.0, "peak_mib": 100.0},
            {"method": "ei2", "seed": 1, "tuning_s": 20.0, "peak_mib": 300.0}]
    (row,) = summarize(samples, runs, ["tav", "ei2"])  # tav has no results: no row
    assert row["method"] == "ei2" and row["align_edited"]["mean"] == 0.5 and row["align_edited"]["std"] == 0.0
    assert row["by_edit"] == {"color": 0.75, "shape": 0.25}
    assert row["tuning_s"]["mean"] == 15.0 and row["tuning_s"]["n"] == 2
    assert row["peak_mib"]["std"] == pytest.approx(math.sqrt(2) * 100)


def test_suite_edits_and_ideal_scores():
    """Every edit changes exactly its kind (of its target object) and keeps the motion, the other object and the
    background; no object lands on HELD_OUT; the ideal edit scores perfectly (one object: parse.clip_metrics, two:
    suite_clips.two_object_metrics)."""
    clips = suite(len(benchmark.CLIPS), list(parse.ATTRIBUTES))
    assert len(clips) == len(benchmark.CLIPS) >= benchmark.DEFAULT_CLIPS
    assert {c["n_objects"] for c in clips[:benchmark.DEFAULT_CLIPS]} == {1, 2}
    motions = {world.parse_caption(c["caption"])["motion"] for c in clips[:benchmark.DEFAULT_CLIPS]}
    assert {"right", "orbiting", "growing"} <= motions  # translation, orbit, growth
    for clip in clips:
        src = world.parse_caption(clip["caption"])
        assert len(src["objects"]) == clip["n_objects"] and len(clip["edits"]) == 3
        assert all((c, s, src["background"]) not in HELD_OUT for c, s in src["objects"])
        for e in clip["edits"]:
            want = world.parse_caption(e["prompt"])
            changed = [(a, j) for j, (w, o) in enumerate(zip(want["objects"], src["objects"]))
                       for a, x, y in zip(("color", "shape"), w, o) if x != y]
            if e["kind"] == "background":
                assert not changed and want["background"] != src["background"]
            else:
                assert changed == [(e["kind"], e["target"])] and want["background"] == src["background"]
            assert want["motion"] == src["motion"] and len(set(want["objects"])) == len(want["objects"])
            assert all(c != want["background"] for c, _ in want["objects"])
            assert all((c, s, want["background"]) not in HELD_OUT for c, s in want["objects"])
            m = parse.flat_scores(suite_clips.edit_metrics(e["ideal"], e, clip["caption"]))  # the ideal is perfect
            assert (m["edited_attribute_match"], m["kept_attributes_match"], m["attribute_stability"]) == (1, 1, 1)
            assert m["mask_iou_vs_source"] == 1.0 and m["trajectory_error_px"] == 0.0
            assert m["background_change"] < 0.1  # anti-aliased rims


def test_paired_differences_by_hand():
    """a - b per (clip, edit, seed); the untuned method has one seed and pairs with every seed; spread = std of the
    per-seed mean differences; better/worse follow the key's direction (trajectory: lower is better)."""
    def rec(method, seed, edit, align, traj):
        return {"method": method, "clip": "c", "edit_name": edit, "seed": seed, "align_edited": align,
                "trajectory_px": traj}
    samples = [rec("ei2", 0, "color", 1.0, 2.0), rec("ei2", 0, "shape", 0.5, 4.0),
               rec("ei2", 1, "color", 0.75, 3.0), rec("ei2", 1, "shape", 0.25, 1.0),
               rec("tav", 0, "color", 0.5, 2.0), rec("tav", 0, "shape", 0.5, 5.0),
               rec("tav", 1, "color", 1.0, 3.0), rec("tav", 1, "shape", 0.0, 2.0),
               rec("untuned", 0, "color", 0.0, 10.0), rec("untuned", 0, "shape", 0.0, 10.0)]
    d = benchmark.paired(samples, "ei2", "tav", "align_edited")  # diffs: seed 0: +0.5, 0; seed 1: -0.25, +0.25
    assert d["mean"] == pytest.approx(0.125) and d["n"] == 4 and d["n_seeds"] == 2
    assert d["std"] == pytest.approx(np.std([0.25, 0.0], ddof=1))
    assert (d["better"], d["worse"]) == (2, 1)
    t = benchmark.paired(samples, "ei2", "tav", "trajectory_px")  # diffs 0, -1, 0, -1: ei2 lower, so better
    assert t["mean"] == pytest.approx(-0.5) and (t["better"], t["worse"]) == (2, 0)
    u = benchmark.paired(samples, "ei2", "untuned", "align_edited")  # the floor pairs with both seeds
    assert u["n"] == 4 and u["mean"] == pytest.approx(0.625) and u["n_seeds"] == 2
    assert benchmark.paired(samples, "ei2", "sca_stam", "align_edited") is None


def test_plan_counts_runs_and_seconds():
    """The printed estimate: tuned methods run once per seed, the untuned one once; chart-only Fig. 4 variants are
    tuned once; each diagnose chart is added."""
    args = benchmark.resolve_args(benchmark.parser().parse_args(
        ["--clips", "2", "--seeds", "0,1,2", "--methods", "ei2,untuned", "--steps", "10"]))
    clips = suite(2, list(parse.ATTRIBUTES))
    t = benchmark.SECONDS
    base, edits = t["load"] + 25 * t["inversion_step"], 3 * (25 * t["edit_step"] + t["score_edit"])
    assert args.chart_only == ["tav", "sca_stam", *benchmark.FIG4_METHODS.split(",")]
    expect = 2 * (3 * (base + edits + 10 * t["tuning_step"]) + base + edits) + 7 * (base + 10 * t["tuning_step"]) \
        + 2 * t["diagnose"]
    assert benchmark.plan(args, clips) == (2 * 4 + 7, pytest.approx(expect))
    quick = benchmark.resolve_args(benchmark.parser().parse_args(["--quick"]))
    assert quick.chart_only == [] and quick.clips == 1 and quick.method_list == ["ei2", "tav"]


def test_fig4_layernorm_rows():
    """Fig. 4's "LayerNorm" row (`ta_ln`) tunes the temporal LayerNorm's affine with TA; "LayerNorm*" (`ta_ln_noaffine`)
    has none; Tune-A-Video (`tav`) keeps it frozen. Both LayerNorm rows are tuned for the Fig. 4 chart by default."""

    def tuned_norms(method):
        m = UNet(UNetConfig.tiny(), VARIANTS[method].video)
        mark_trainable(m)
        return sum(p.numel() for n, p in m.named_parameters() if ".norm_temp." in n and p.requires_grad)

    assert tuned_norms("ta_ln") == 5 * 2 * 32 + 11 * 2 * 64  # weight + bias of the 16 blocks' LayerNorms
    assert tuned_norms("tav") == tuned_norms("ta_ln_noaffine") == 0
    chart_only = benchmark.resolve_args(benchmark.parser().parse_args([])).chart_only
    for name in ("ta_ln", "ta_ln_noaffine"):  # tuned for the Fig. 4 chart by default
        assert name in chart_only and name in benchmark.DIAGNOSE_SETS["diagnose-fig4"]
    assert "Fig. 4 LayerNorm)" in VARIANTS["ta_ln"].label
    assert "Fig. 4 LayerNorm*" in VARIANTS["ta_ln_noaffine"].label


def test_bad_arguments_are_one_line_errors(capsys):
    for argv in (["--methods", "ei2,nope"], ["--edits", "style"], ["--clips", "9"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--lr", "nan"], "--lr=nan must be a finite number"), (["--lr", "0"], "--lr=0.0 must be > 0"),
    (["--guidance", "0.5"], "--guidance=0.5 must be"), (["--guidance", "inf"], "--guidance=inf must be a finite"),
    (["--steps", "-1"], "--steps=-1 must be"), (["--inference-steps", "0"], "--inference-steps=0 must be"),
    (["--inversion-steps", "2000"], "--inversion-steps=2000 must be"),
])
def test_numeric_flags_are_checked_by_the_config_table(argv, said, capsys, tmp_path):
    """The benchmark's numbers go through ei2.config.check_value (one range table): one line, exit 2, before any
    model is read (the model folder does not exist)."""
    with pytest.raises(SystemExit) as e:
        main(argv + ["--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_sample_metrics_of_a_two_object_edit():
    """The benchmark's record of a two-object edit: the per-object attribute fractions, scored per object."""
    clip = next(c for c in suite(len(benchmark.CLIPS), ["color"]) if c["n_objects"] == 2)
    e = clip["edits"][0]
    m = benchmark.sample_metrics(clip["frames"], e, clip["caption"])  # the model returned the source unchanged
    assert set(m["parsed_attributes"]) == {"color0", "shape0", "color1", "shape1", "background"}
    assert m["parsed_attributes"][f"color{e['target']}"] == 0.0 and m["align_edited"] == 0.0
    assert m["align_kept"] == 1.0 and m["iou"] == 1.0 and m["trajectory_px"] == 0.0
