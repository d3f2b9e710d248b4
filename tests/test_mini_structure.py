"""Where the demo clip's structure survives in the committed mini model (issue 13; docs/mini.md, "Why edits lose the
source's structure"): the VAE and DDIM inversion keep it; classifier-free guidance at the demo's 7.5 does not (a strict
xfail: it turns into a failure the day the model reconstructs, so the target is then asserted for good).

Settings reduced for CI: the inflated model as loaded (EI², before tuning), 10 inversion and 10 sampling steps. Measured
at these settings on the demo clip (CPU, fp32): VAE IoU 0.98 / 0.18 px; round trip 0.946 / 0.34 px; source caption at
guidance 1 0.92 / 0.86 px, at guidance 7.5 0.67 / 3.9 px (the earlier demo clip, radius 11 px touching the border:
0.95 / 0.25, 0.895 / 0.40, 0.70 / 0.88, 0.34 / 6.1)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ei2 import ddim
from ei2.mini import parse, world
from ei2.pipeline import decode, encode_video, load_models, to_frames, to_video
from ei2.unet import VideoOptions
from ei2.video import to_uint8

MODEL = Path(__file__).resolve().parents[1] / "weights" / "mini"
pytestmark = pytest.mark.skipif(not (MODEL / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
                                reason="weights/mini not trained")
CAPTION = "a red circle moving right on a white background"
STEPS = 10


@pytest.fixture(scope="module")
def demo():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the fresh STAM's initialization (its output map starts at zero: no effect yet)
    source = world.demo_frames()
    models = load_models(str(MODEL), VideoOptions(), torch.device("cpu"), "fp32")
    posterior = encode_video(models, torch.from_numpy(source).permute(0, 3, 1, 2).float() / 127.5 - 1)
    x0 = to_video(posterior.mean * models.vae.config.scaling_factor)
    empty = models.text.encode([""])
    with torch.no_grad():
        x_T = ddim.invert(models.unet, x0, empty, num_steps=STEPS, alphas=models.alphas)
    yield source, models, posterior, x0, x_T, empty
    torch.set_num_threads(before)


def rendered(models, x_T, context, empty, guidance):
    with torch.no_grad():
        z = ddim.sample(models.unet, x_T, context, empty, num_steps=STEPS, guidance=guidance, alphas=models.alphas)
    return z, to_uint8(decode(models, to_frames(z)))


def test_vae_keeps_the_demo_clip(demo):
    source, models, posterior = demo[:3]
    with torch.no_grad():
        video = to_uint8(models.vae.decode(posterior.mean).clamp(-1, 1))
    f = parse.structure_fidelity(video, source)
    assert f["iou"] >= 0.95 and f["trajectory_error"] <= 0.4, (f["iou"], f["trajectory_error"])  # 0.98, 0.18 px


def test_ddim_inversion_round_trip_keeps_the_demo_clip(demo):
    """Invert with the empty prompt, sample back with it at guidance 1: the inversion alone loses little."""
    source, models, _, x0, x_T, empty = demo
    z, video = rendered(models, x_T, empty, empty, 1.0)
    assert float((z - x0).abs().mean() / x0.abs().mean()) < 0.25  # 0.156 relative latent error at 10 steps
    f = parse.structure_fidelity(video, source)
    assert f["iou"] >= 0.9 and f["trajectory_error"] <= 0.7, (f["iou"], f["trajectory_error"])  # 0.946, 0.34 px


@pytest.mark.xfail(strict=True, reason="issue 13: at guidance 7.5 the mini model redraws the object (IoU 0.67, 3.9 px)")
def test_guided_reconstruction_keeps_the_demo_clip(demo):
    """Issue 13's target: the source caption rendered from the inverted latent at the demo's guidance 7.5 gives back
    the clip (mask IoU >= 0.8, trajectory error <= 1.5 px)."""
    source, models, _, _, x_T, empty = demo
    _, video = rendered(models, x_T, models.text.encode([CAPTION]), empty, 7.5)
    f = parse.structure_fidelity(video, source)
    assert f["iou"] >= 0.8 and f["trajectory_error"] <= 1.5, (f["iou"], f["trajectory_error"])


def test_demo_object_size_in_latent_pixels():
    """The demo's circle (radius 16 px of 64) spans 4 latent pixels of the 8x8 latent: ~13 of its 64 pixels."""
    p = parse.parse_frame(world.demo_frames()[0])
    radius = float(np.sqrt(p["area"] / np.pi))
    assert 15.5 < radius < 16.5 and p["area"] / 64 == pytest.approx(12.7, abs=0.3)
