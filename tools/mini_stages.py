"""Where the demo clip's structure survives, stage by stage, in a miniature model (issue 13; docs/mini.md).

    python tools/mini_stages.py --model weights/mini --steps 100 --guidance 1,3,7.5

Prints one markdown table: the VAE (decode of the posterior mean), the DDIM round trip (invert and sample with "" at
guidance 1), the source caption rendered from the inverted latent at each --guidance (a reconstruction, scored
against the source), then each --edit at each guidance (scored against the ideal edit, parse.edit_scores). The model is
tuned as the demo tunes it (configs/demo.yaml's lr, weight decay, clip, seed; --steps) before inverting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ei2 import ddim
from ei2.cache import init_temporal_
from ei2.config import INVERSION_PROMPTS, inversion_text, load_config
from ei2.mini import parse, world
from ei2.pipeline import (decode, encode_video, invert, load_models, make_optimizer, render, to_frames, to_video,
                          tune_steps)
from ei2.unet import VideoOptions
from ei2.video import to_uint8

DEMO = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")  # lr, weight decay, clip, seed
CAPTION = DEMO.caption
EDITS = ["a blue circle moving right on a white background", "a red square moving right on a white background",
         "a blue square moving right on a white background"]


def row(name: str, scores: dict) -> str:
    return "| " + name + " | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in scores) + " |"


@torch.no_grad()
def snr_probe(models, source: np.ndarray, timesteps=(981, 801, 601, 401, 201, 101)) -> None:
    """One denoising step from the clip noised to t (fixed noise): the x_0 the model predicts at guidance 1 and 7.5,
    scored against the source. Shows down to which SNR the guided prediction keeps the layout."""
    posterior = encode_video(models, torch.from_numpy(source).permute(0, 3, 1, 2).float() / 127.5 - 1)
    x0 = to_video(posterior.mean * models.vae.config.scaling_factor)
    alphas = ddim.schedule({}) if models.alphas is None else models.alphas
    context, empty = models.text.encode([CAPTION]), models.text.encode([""])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    print("| t | SNR | guidance 1: IoU | px | guidance 7.5: IoU | px |\n|---|---|---|---|---|---|")
    for t in timesteps:
        a = alphas[t]
        x_t = ddim.add_noise(x0, noise, t, alphas)
        scores = []
        for g in (1.0, 7.5):
            eps = ddim._eps(models.unet, x_t, torch.tensor(t), context, empty, g)
            pred = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
            f = parse.structure_fidelity(to_uint8(decode(models, to_frames(pred))), source)
            scores += [f["iou"], f["trajectory_error"]]
        print(row(f"{t} | {float(a / (1 - a)):.3f}", scores), flush=True)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/mini")
    p.add_argument("--steps", type=int, default=100, help="tuning steps (the demo's 100)")
    p.add_argument("--guidance", default="1,3,7.5")
    p.add_argument("--edit", action="append", help="edit prompts (default: colour, shape, both)")
    p.add_argument("--inversion-steps", type=int, default=25)
    p.add_argument("--inference-steps", type=int, default=25)
    p.add_argument("--invert-with", choices=INVERSION_PROMPTS, default="empty",
                   help="the inversion's prompt: \"\" (Tune-A-Video's, the default) or the source caption")
    p.add_argument("--probe", action="store_true", help="first, one-step x_0 predictions from the noised clip per t")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = DEMO
    t0 = time.time()
    source = world.demo_frames()
    models = load_models(args.model, VideoOptions(), torch.device("cpu"), "fp32")
    init_temporal_(models.unet, cfg.seed)
    if args.probe:
        snr_probe(models, source)
    posterior = encode_video(models, torch.from_numpy(source).permute(0, 3, 1, 2).float() / 127.5 - 1)
    print(f"| stage | IoU | trajectory px |\n|---|---|---|")
    with torch.no_grad():
        vae = to_uint8(models.vae.decode(posterior.mean).clamp(-1, 1))
    f = parse.structure_fidelity(vae, source)
    print(row("VAE", [f["iou"], f["trajectory_error"]]), flush=True)
    if args.steps:
        opt = make_optimizer(models.unet, cfg.learning_rate, cfg.weight_decay)
        tune_steps(models, posterior, models.text.encode([CAPTION]), opt, torch.Generator().manual_seed(cfg.seed), 0,
                   args.steps, cfg.grad_clip, progress=False)
    models.unet.eval()
    inversion_prompt = inversion_text(args.invert_with, CAPTION)
    x_T = invert(models, posterior, args.inversion_steps, progress=False, prompt=inversion_prompt)
    context, empty = models.text.encode([inversion_prompt]), models.text.encode([""])
    with torch.no_grad():
        z = ddim.sample(models.unet, x_T, context, empty, num_steps=args.inference_steps, guidance=1.0,
                        alphas=models.alphas)
    f = parse.structure_fidelity(to_uint8(decode(models, to_frames(z))), source)
    x0 = to_video(posterior.mean * models.vae.config.scaling_factor)
    err = float((z - x0).abs().mean() / x0.abs().mean())
    print(row(f"round trip (latent error {err:.3f})", [f["iou"], f["trajectory_error"]]), flush=True)
    guidances = [float(g) for g in args.guidance.split(",")]
    for g in guidances:
        f = parse.structure_fidelity(to_uint8(render(models, x_T, CAPTION, g, args.inference_steps, progress=False)),
                                     source)
        print(row(f"reconstruction, guidance {g:g}", [f["iou"], f["trajectory_error"]]), flush=True)
    print("\n| edit | guidance | edited | kept | IoU vs ideal | px vs ideal |\n|---|---|---|---|---|---|")
    for prompt in args.edit or EDITS:
        for g in guidances:
            video = to_uint8(render(models, x_T, prompt, g, args.inference_steps, progress=False))
            s = parse.edit_scores(video, prompt, source, CAPTION)
            print(row(f"{prompt.split(' moving')[0]} | {g:g}",
                      [s["edited_attribute_match"], s["kept_attributes_match"], s["mask_iou_vs_ideal"],
                       s["trajectory_error_vs_ideal_px"]]), flush=True)
    print(f"\n{args.model}, {args.steps} tuning steps, inverted with {args.invert_with!r}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
