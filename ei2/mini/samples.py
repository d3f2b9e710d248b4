"""Sampling and judging the mini model: seeded DDIM sample grids of seen and held-out captions scored by the parser
(`ei2.mini.parse`), VAE reconstructions, the golden outputs the tests reproduce, and the loss curves.

`python -m ei2.mini.pretrain` calls `evaluate` after training (and alone with --eval-only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import chart
from ..ddim import sample
from ..files import atomic_path
from ..text import TextEncoder
from ..unet import UNet
from ..vae import AutoencoderKL
from ..video import to_uint8
from ..weights import read_schedule, save_safetensors
from . import world
from .parse import parse_frame

# (color, shape, background) combinations never shown in training: samples of their captions test composition
HELD_OUT = (
    ("yellow", "star", "gray"),
    ("purple", "square", "white"),
    ("green", "triangle", "black"),
    ("orange", "circle", "blue"),
    ("white", "star", "green"),
    ("red", "triangle", "gray"),
)
# the mini model is an image model: its UNet without temporal modules, images as 1-frame videos (b, 4, 1, h, w)
IMAGE_OPTIONS = dict(frame_attention="self", temporal="none")
GOLDEN_CAPTION = "a red circle on a white background"
SAMPLE_GUIDANCE = 5.0
SAMPLE_STEPS = 50
LOSS_TITLES = {"vae": "VAE (weighted L1 + L2 + KL)", "unet": "UNet (eps MSE)", "decoder": "VAE decoder tuning"}


def latent_size(vae: AutoencoderKL) -> int:
    """The latents' height and width: the VAE halves the image at each level but the last (8 for SD's 64 -> 8)."""
    return vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)


def is_held_out(scene: world.Scene) -> bool:
    return any((o.color, o.shape, scene.background) in HELD_OUT for o in scene.objects)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (b, H, W, 3) -> float (b, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def sample_captions(seed: int, n_seen: int = 24) -> tuple[list[str], list[str]]:
    """Captions for sample grids: every HELD_OUT combination, and n_seen random seen ones (no motion phrase)."""
    held = [f"a {c} {s} on a {b} background" for c, s, b in HELD_OUT]
    rng = np.random.default_rng(seed)
    seen: list[str] = []
    while len(seen) < n_seen:
        s = world.random_scene(rng)
        c = s.caption()
        if not is_held_out(s) and c not in seen:
            seen.append(c)
    return seen, held


@torch.no_grad()
def generate(unet: UNet, vae: AutoencoderKL, text: TextEncoder, captions: list[str], seed: int,
             steps: int = SAMPLE_STEPS, guidance: float = SAMPLE_GUIDANCE, batch: int = 32,
             alphas: torch.Tensor | None = None) -> np.ndarray:
    """uint8 images (len(captions), H, W, 3): DDIM with classifier-free guidance from seeded noise (`alphas`: the
    model's schedule, weights.read_schedule; None: SD's)."""
    h = latent_size(vae)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), 4, 1, h, h, generator=g)
    uncond = text.encode([""]).float()
    out = []
    for i in range(0, len(captions), batch):
        ctx = text.encode(captions[i:i + batch]).float()
        z = sample(unet, noise[i:i + batch], ctx, uncond, num_steps=steps, guidance=guidance, alphas=alphas)
        out.append(to_uint8(vae.decode_latents(z[:, :, 0])))
    return np.concatenate(out)


def grid_image(images: np.ndarray, labels: list[str] | None = None, cols: int = 8, scale: int = 2) -> Image.Image:
    """A PIL grid of uint8 images, each upscaled `scale` x (nearest), an optional label under each."""
    n, h, w, _ = images.shape
    label_h = 22 if labels else 0
    rows = math.ceil(n / cols)
    W, H = w * scale, h * scale
    canvas = Image.new("RGB", (cols * W, rows * (H + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        im = Image.fromarray(images[i]).resize((W, H), Image.Resampling.NEAREST)
        canvas.paste(im, (c * W, r * (H + label_h)))
        if labels:
            words = labels[i].replace(" background", "").replace("a ", "").replace(" on", " /").split(" / ")
            for j, line in enumerate(words[:2]):
                draw.text((c * W + 2, r * (H + label_h) + H + 1 + 10 * j), line, fill=(0, 0, 0))
    return canvas


def judge(images: np.ndarray, captions: list[str]) -> dict:
    """Fraction of images whose parsed color / shape / background match the caption (ei2.mini.parse)."""
    hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
    for im, cap in zip(images, captions):
        want = world.parse_caption(cap)
        got = parse_frame(im)
        ok = {k: got[k] == want[k] for k in ("color", "shape", "background")}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / max(len(captions), 1) for k, v in hits.items()} | {"n": len(captions)}


def evaluate(out: Path, seed: int = 0, repeats: int = 4) -> dict:
    """Load the saved model through the normal loaders, draw sample grids, judge them with the parser, write
    golden.safetensors, eval.json, samples_*.png and loss_curves.png."""
    unet = UNet.from_pretrained(out, **IMAGE_OPTIONS).eval()
    vae = AutoencoderKL.from_pretrained(out)
    text = TextEncoder.from_pretrained(out)
    alphas = read_schedule(out)
    seen, held = sample_captions(seed)
    result = {"guidance": SAMPLE_GUIDANCE, "steps": SAMPLE_STEPS}
    for name, caps in (("seen", seen), ("held_out", held)):
        caps_rep = [c for c in caps for _ in range(repeats)]
        images = generate(unet, vae, text, caps_rep, seed=seed + (1 if name == "seen" else 2), alphas=alphas)
        result[name] = judge(images, caps_rep)
        grid_image(images[: 8 * 8] if name == "seen" else images, caps_rep[: 8 * 8] if name == "seen" else caps_rep,
                   cols=8).save(out / f"samples_{name}.png")
    # reconstructions of the VAE on held-out renders, and parser accuracy on them
    rng = np.random.default_rng(seed + 3)
    scenes = [world.random_clip(rng).frames[0] for _ in range(64)]
    real = np.stack([world.render(s) for s in scenes])
    with torch.no_grad():
        rec = to_uint8(vae.decode(vae.encode(to_tensor(real)).mean))
    caps = [s.caption() for s in scenes]
    result["vae_reconstruction"] = {"mae_uint8": float(np.abs(rec.astype(float) - real).mean())} | judge(rec, caps)
    pairs = np.stack([real[:16], rec[:16]], 1).reshape(32, *real.shape[1:])
    grid_image(pairs, cols=8).save(out / "vae_reconstructions.png")
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    write_golden(out, unet, vae, text)
    log = json.loads((out / "train_log.json").read_text()) if (out / "train_log.json").is_file() else {}
    if log:
        chart.save(plot_losses(log), out / "loss_curves.png")
    return result


@torch.no_grad()
def golden_inputs(h: int = world.SIZE // 8):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 4, 1, h, h, generator=g)
    noise = torch.randn(1, 4, 1, h, h, generator=g)
    return x, noise, torch.tensor(500)


@torch.no_grad()
def golden_outputs(unet: UNet, vae: AutoencoderKL, text: TextEncoder,
                   alphas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The reference numbers the tests reproduce: eps at t=500, a 5-step DDIM sample (guidance 5, the model's
    schedule `alphas`) and its decode."""
    x, noise, t = golden_inputs(latent_size(vae))
    ctx = text.encode([GOLDEN_CAPTION]).float()
    uncond = text.encode([""]).float()
    eps = unet(x, t, ctx)
    z = sample(unet, noise, ctx, uncond, num_steps=5, guidance=SAMPLE_GUIDANCE, alphas=alphas)
    image = vae.decode_latents(z[:, :, 0])
    return {"context": ctx, "eps": eps, "sample_latent": z, "sample_image": image}


def write_golden(out: Path, unet, vae, text) -> None:
    save_safetensors(golden_outputs(unet, vae, text, read_schedule(out)), out / "golden.safetensors",
                     metadata={"caption": GOLDEN_CAPTION, "note": "see tests/test_mini_model.py"})


def plot_losses(log: dict, width: int = 900, height: int = 320) -> Image.Image:
    """Loss curves (log-scale y, x = step) of each training phase in train_log.json, side by side."""
    phases = [p for p in LOSS_TITLES if log.get(p)]
    img, draw = chart.canvas(width, height)
    pw = width // max(len(phases), 1)
    for k, phase in enumerate(phases):
        steps = [e["step"] for e in log[phase]]
        last = max(steps)
        ticks = [(f * last, str(int(f * last))) for f in (0, 0.5, 1)]
        chart.panel(draw, (k * pw + 60, 40, (k + 1) * pw - 20, height - 40),
                    [chart.Series("loss", [e["loss"] for e in log[phase]], chart.RED, xs=steps, markers=False)],
                    x_lim=(0, last), x_ticks=ticks, title=LOSS_TITLES[phase], log_y=True)
    return img
