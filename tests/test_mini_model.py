"""The committed mini model (weights/mini): the real SD folder layout in fp16, loaded through ei2's normal loaders,
reproducing the golden outputs stored at training time (weights/mini/golden.safetensors)."""

import json
from pathlib import Path

import pytest
import torch

from ei2.ddim import alphas_cumprod, schedule
from ei2.mini import pretrain, samples, world
from ei2.text import TextEncoder
from ei2.unet import UNet, UNetConfig
from ei2.vae import AutoencoderKL, VAEConfig
from ei2.weights import read_schedule, read_state_dict

MODEL = Path(__file__).resolve().parents[1] / "weights" / "mini"
pytestmark = pytest.mark.skipif(not (MODEL / "golden.safetensors").is_file(),
                                reason="weights/mini not trained (python -m ei2.mini.pretrain --out weights/mini)")

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is as fast here, and does not stall against other jobs on a shared CPU (2 OpenMP
    threads made these tests 50x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(one_thread):
    unet = UNet.from_pretrained(MODEL, **samples.IMAGE_OPTIONS).eval()
    vae = AutoencoderKL.from_pretrained(MODEL)
    text = TextEncoder.from_pretrained(MODEL)
    return unet, vae, text


@pytest.fixture(scope="module")
def golden():
    return read_state_dict(MODEL / "golden.safetensors")


def test_sd_folder_layout_in_fp16_and_small():
    for f in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
              "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json", *WEIGHT_FILES):
        assert (MODEL / f).is_file(), f
    total = 0
    for f in WEIGHT_FILES:
        tensors = read_state_dict(MODEL / f)
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, f
        total += (MODEL / f).stat().st_size
    assert total < 40e6, f"{total / 1e6:.1f} MB"
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]


def test_configs_hold_every_field_the_loaders_need():
    log = json.loads((MODEL / "train_log.json").read_text())
    vae_config, unet_config = pretrain.configs(log["args"].get("downsample", 8))
    unet_cfg = json.loads((MODEL / "unet/config.json").read_text())
    assert UNetConfig.from_dict(unet_cfg) == unet_config
    text_cfg = json.loads((MODEL / "text_encoder/config.json").read_text())
    assert unet_cfg["cross_attention_dim"] == text_cfg["hidden_size"]
    assert unet_cfg["attention_head_dim"] == unet_config.attention_head_dim  # SD v1: the number of heads
    vae_cfg = VAEConfig.from_dict(json.loads((MODEL / "vae/config.json").read_text()))
    assert vae_cfg.block_out_channels == vae_config.block_out_channels and vae_cfg.sample_size == world.SIZE
    assert 0.05 < vae_cfg.scaling_factor < 20
    # the schedule it was trained with: SD's, shifted to SNR'(t) = s SNR(t) (ei2.ddim.snr_shifted) when s != 1
    shift = log["args"].get("snr_shift", 1.0)
    sched = json.loads((MODEL / "scheduler/scheduler_config.json").read_text())
    snr = lambda a: a / (1 - a)  # noqa: E731
    torch.testing.assert_close(snr(schedule(sched).double()) / snr(alphas_cumprod().double()),
                               torch.full((1000,), shift, dtype=torch.float64), rtol=1e-3, atol=0)


def test_tokenizer_has_one_token_per_word(models):
    _, _, text = models
    ids = text.tokenize("a red circle moving right on a white background")[0]
    assert ids.shape == (77,)
    eos = text.tokenizer.eos_token_id
    assert int((ids != eos).sum()) == 1 + 9  # bos + nine words


def test_golden_eps(models, golden):
    unet, vae, text = models
    ctx = text.encode([samples.GOLDEN_CAPTION]).float()
    torch.testing.assert_close(ctx, golden["context"], atol=1e-5, rtol=1e-4)
    x, _, t = samples.golden_inputs(samples.latent_size(vae))
    with torch.no_grad():
        eps = unet(x, t, ctx)
    torch.testing.assert_close(eps, golden["eps"], atol=1e-4, rtol=1e-3)


def test_golden_five_step_ddim_sample(models, golden):
    out = samples.golden_outputs(*models, read_schedule(MODEL))
    torch.testing.assert_close(out["sample_latent"], golden["sample_latent"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out["sample_image"], golden["sample_image"], atol=2e-3, rtol=1e-3)


def test_inflated_unet_with_one_frame_is_the_image_model(models):
    """The demo path loads the same folder with FFAM + STAM (fresh temporal modules): with one frame FFAM is plain
    self-attention and STAM is the identity, so the inflated UNet reproduces the image model."""
    unet, vae, text = models
    video = UNet.from_pretrained(MODEL).eval()  # default VideoOptions: ffam + stam
    x, _, t = samples.golden_inputs(samples.latent_size(vae))
    ctx = text.encode(["a blue square on a black background"])
    with torch.no_grad():
        torch.testing.assert_close(video(x, t, ctx), unet(x, t, ctx), atol=1e-5, rtol=1e-4)
        eight = x.expand(1, 4, 8, *x.shape[-2:]).contiguous()
        assert torch.isfinite(video(eight, t, ctx)).all()
        # eight identical frames with self-attention + STAM: STAM centers them to zero and the video GroupNorm has the
        # same statistics, so every frame is the image model's output (FFAM would weigh the repeated coarse keys twice)
        stam = UNet.from_pretrained(MODEL, frame_attention="self", temporal="stam").eval()
        torch.testing.assert_close(stam(eight, t, ctx), unet(x, t, ctx).expand(1, 4, 8, *x.shape[-2:]),
                                   atol=1e-4, rtol=1e-3)


# Generated samples of seen captions must read as their captions (ei2.mini.parse); the committed model gets 8 of 8.
SAMPLE_BAR = 7


def test_samples_read_as_their_captions(models):
    from ei2.mini.parse import parse_frame

    captions = ["a red circle on a white background"] * 4 + ["a blue square on a black background"] * 4
    images = samples.generate(*models, captions, seed=5, steps=25, alphas=read_schedule(MODEL))
    ok = 0
    for im, cap in zip(images, captions):
        want, got = world.parse_caption(cap), parse_frame(im)
        ok += all(got[k] == want[k] for k in ("color", "shape", "background"))
    assert ok >= SAMPLE_BAR, f"{ok} of {len(captions)} samples read as their captions"
