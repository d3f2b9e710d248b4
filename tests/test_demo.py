"""The README's run command on the shipped demo (configs/demo.yaml: weights/mini and assets/demo), at reduced steps,
and the diagnose command on the same demo model, as CI runs them."""

import json
from pathlib import Path

import imageio.v3 as iio
import pytest

from ei2.config import load_config
from ei2.diagnose import main as diagnose_main
from ei2.train import DEMO_CONFIG, main as train_main

ROOT = Path(__file__).resolve().parents[1]
FEW = ["--steps", "3", "--inference_steps", "3", "--inversion_steps", "3", "--checkpoint_every", "0", "--no-progress"]

pytestmark = pytest.mark.skipif(not (ROOT / "weights/mini/unet/diffusion_pytorch_model.safetensors").is_file(),
                                reason="weights/mini not trained")


def test_demo_config_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the repository root, as in the README
    out = tmp_path / "demo"
    train_main(FEW + ["--output_dir", str(out)])  # no --config: the embedded demo
    cfg = load_config(DEMO_CONFIG, [])
    printed = capsys.readouterr().out
    assert f"done: outputs in {out}/" in printed and "exact metrics of" in printed
    edits = json.loads((out / "edits.json").read_text())
    assert [e["prompt"] for e in edits] == cfg.edit_prompts
    for path in [out / "source.mp4", out / "source.gif"] + [out / e[k] for e in edits for k in ("mp4", "gif")]:
        assert iio.imread(path, index=None).shape[:3] == (cfg.n_frames, cfg.size, cfg.size), path
    assert iio.imread(out / "comparison.png").shape[1] == cfg.n_frames * cfg.size
    metrics = edits[0]["mini_metrics"]
    assert 0.0 <= metrics["edited_attribute_match"] <= 1.0 and metrics["trajectory_error_px"] >= 0
    # the demo's edit is scored against the ideal edit (parse.ideal_edit: the source's path, the prompt's attributes)
    assert 0.0 <= metrics["mask_iou_vs_ideal"] <= 1.0 and metrics["trajectory_error_vs_ideal_px"] >= 0
    assert "vs the ideal edit: mask IoU" in printed


def test_diagnose_compare_on_demo_model(tmp_path):
    out = tmp_path / "diag"
    diagnose_main(["--model", str(ROOT / "weights/mini"), "--video", str(ROOT / "assets/demo/red-circle.gif"),
                   "--caption", "a red circle moving right on a white background", "--size", "64",
                   "--compare", "ta,stam", "--timesteps", "500", "--out", str(out), "--no-progress"])
    report = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.png").is_file()
    variants = {v["label"]: v for v in report["variants"]}
    assert set(variants) == {"ta", "stam"}
    for layer in variants["stam"]["layers"]:  # Eq. 6: Instance Centering leaves no temporal mean, exactly
        assert layer["stats"]["mu_rv_hat"] < 1e-4, layer["layer"]
    for layer in variants["ta"]["layers"]:  # LayerNorm centers over channels, not frames
        assert layer["stats"]["mu_rv_hat"] > 0.1, layer["layer"]
