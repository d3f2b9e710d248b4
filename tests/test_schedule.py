"""A model's own DDIM schedule (issue 13): ddim.snr_shifted / betas_of / schedule, read from the model folder's
scheduler_config.json (weights.read_schedule) and used by every sampling, inversion and tuning step of the job.

Checked against the equation SNR'(t) = shift * SNR(t), SNR = a / (1 - a) (Hoogeboom et al. 2023, Sec. 3.1), and
against diffusers' DDIMScheduler / DDIMInverseScheduler built from the same config (`trained_betas`) as the oracle."""

import json

import pytest
import torch

from ei2 import ddim
from ei2.errors import Ei2Error
from ei2.mini.pretrain import SCHEDULER_CONFIG, scheduler_config
from ei2.pipeline import encode_video, invert, load_models, render, to_video, tune_steps
from ei2.unet import VideoOptions
from ei2.weights import read_schedule
from test_ddim import D, SHAPE, ToyEps, rand
from tiny_model import write_random_model

from diffusers import DDIMInverseScheduler, DDIMScheduler  # noqa: E402

DIFFUSERS_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
                  "set_alpha_to_one", "steps_offset", "prediction_type")


def diffusers_config(config: dict) -> dict:
    return {k: config[k] for k in DIFFUSERS_KEYS} | {"timestep_spacing": "leading"}


def snr(a: torch.Tensor) -> torch.Tensor:
    return a / (1 - a)


@pytest.mark.parametrize("shift", [4.0, 16.0])
def test_snr_shifted_multiplies_the_snr_at_every_t(shift):
    a = ddim.alphas_cumprod().double()
    shifted = ddim.snr_shifted(a, shift)
    torch.testing.assert_close(snr(shifted) / snr(a), torch.full_like(a, shift), rtol=1e-9, atol=0)
    assert bool((shifted > a).all()) and bool((shifted[1:] < shifted[:-1]).all())  # less noise, still decreasing


def test_betas_of_inverts_the_cumulative_product():
    a = ddim.snr_shifted(ddim.alphas_cumprod().double(), 16.0)
    betas = ddim.betas_of(a)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), a, rtol=1e-12, atol=0)
    # SD's own schedule: the betas are the scaled_linear ones, linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    sd = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ddim.betas_of(torch.cumprod(1 - sd, 0)), sd, rtol=1e-9, atol=0)


@pytest.mark.parametrize("shift", [1.0, 16.0])
def test_schedule_equals_diffusers_from_the_same_config(shift):
    config = scheduler_config(shift)
    ours = ddim.schedule(config)
    assert torch.equal(ours, DDIMScheduler(**diffusers_config(config)).alphas_cumprod)
    if shift == 1:
        assert config is SCHEDULER_CONFIG and torch.equal(ours, ddim.alphas_cumprod())
    else:  # the stored float32 table keeps the shift to float32 precision
        torch.testing.assert_close(snr(ours.double()) / snr(ddim.alphas_cumprod().double()),
                                   torch.full((1000,), shift, dtype=torch.float64), rtol=1e-3, atol=0)


def test_shifted_sampling_and_inversion_match_diffusers():
    config = diffusers_config(scheduler_config(16.0))
    alphas = ddim.schedule(config)
    model = ToyEps(k=1.0)
    xT, cond, uncond = rand(*SHAPE, seed=1), rand(2, 77, D, seed=2), rand(1, 77, D, seed=3)
    sched = DDIMScheduler(**config)
    sched.set_timesteps(25)
    x = xT
    for t in sched.timesteps:
        eps_u, eps_c = model(torch.cat([x, x]), t, torch.cat([uncond.expand(2, -1, -1), cond])).chunk(2)
        x = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
    ours = ddim.sample(model, xT, cond, uncond, num_steps=25, guidance=7.5, alphas=alphas)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    assert (ddim.sample(model, xT, cond, uncond, num_steps=25, guidance=7.5) - ours).abs().max() > 1e-2
    inv = DDIMInverseScheduler(**config)
    inv.set_timesteps(25)
    x = xT
    for t in inv.timesteps:
        x = inv.step(model(x, t, cond), t, x).prev_sample
    torch.testing.assert_close(ddim.invert(model, xT, cond, num_steps=25, alphas=alphas), x, rtol=0, atol=1e-5)


def write_config(folder, config):
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


def test_read_schedule_from_a_model_folder(tmp_path):
    assert read_schedule(tmp_path) is None  # no scheduler folder: SD v1-4's schedule
    write_config(tmp_path, scheduler_config(16.0))
    assert torch.equal(read_schedule(tmp_path), ddim.schedule(scheduler_config(16.0)))
    write_config(tmp_path, SCHEDULER_CONFIG | {"beta_end": 0.02})
    assert torch.equal(read_schedule(tmp_path), ddim.alphas_cumprod(1000, 0.00085, 0.02))
    # SD v1-4's published file (a PNDMScheduler config) and sampler settings ei2 does not take from the file: SD's
    pndm = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False}
    for config in (pndm, pndm | {"set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}):
        write_config(tmp_path, config)
        assert torch.equal(read_schedule(tmp_path), ddim.alphas_cumprod())


@pytest.mark.parametrize("change, message", [
    ({"prediction_type": "v_prediction"}, "prediction_type is 'v_prediction'"),
    ({"num_train_timesteps": 500}, "num_train_timesteps is 500"),
    ({"beta_schedule": "linear"}, "beta_schedule is 'linear'"),
    ({"trained_betas": [0.01] * 10}, "trained_betas has 10 values"),
])
def test_read_schedule_refuses_what_ei2_does_not_implement(tmp_path, change, message):
    write_config(tmp_path, SCHEDULER_CONFIG | change)
    with pytest.raises(Ei2Error, match=message) as e:
        read_schedule(tmp_path)
    assert "scheduler_config.json" in str(e.value) and "\n" not in str(e.value)


def test_the_job_uses_the_model_folders_schedule(tmp_path):
    """load_models reads the folder's schedule, and tuning (Eq. 2's x_t), inversion and rendering all use it."""
    folder = write_random_model(tmp_path / "model")
    write_config(folder, scheduler_config(16.0))
    alphas = ddim.schedule(scheduler_config(16.0))
    torch.manual_seed(0)
    models = load_models(str(folder), VideoOptions(), torch.device("cpu"), "fp32")
    assert torch.equal(models.alphas, alphas)
    frames = rand(4, 3, 32, 32, seed=4).clamp(-1, 1)
    posterior = encode_video(models, frames)
    empty = models.text.encode([""])
    x0 = to_video(posterior.mean * models.vae.config.scaling_factor)
    unet = models.unet.eval()
    with torch.no_grad():
        x_T = invert(models, posterior, 5, progress=False)
        torch.testing.assert_close(x_T, ddim.invert(unet, x0, empty, num_steps=5, alphas=alphas), rtol=0, atol=0)
        video = render(models, x_T, "a red circle", 3.0, 5, progress=False)
        z = ddim.sample(unet, x_T, models.text.encode(["a red circle"]), empty, num_steps=5, guidance=3.0,
                        alphas=alphas)
        torch.testing.assert_close(video, models.vae.decode_latents(z[0].transpose(0, 1)).float().clamp(-1, 1))
    # one tuning step: its loss is Eq. 2's with x_t = sqrt(a'_t) x_0 + sqrt(1 - a'_t) eps of the shifted schedule
    context = models.text.encode(["a red circle"])
    losses = []
    optimizer = torch.optim.SGD([p for p in models.unet.parameters() if p.requires_grad], lr=0.0)
    tune_steps(models, posterior, context, optimizer, torch.Generator().manual_seed(3), 0, 1, 1.0, sync_every=1,
               on_sync=lambda step, values: losses.extend(values), progress=False)
    g = torch.Generator().manual_seed(3)
    x0 = to_video(posterior.sample(g).float() * models.vae.config.scaling_factor)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    xt = alphas[t] ** 0.5 * x0 + (1 - alphas[t]) ** 0.5 * noise
    with torch.no_grad():
        models.unet.train()
        expected = torch.nn.functional.mse_loss(models.unet(xt, t, context), noise)
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
