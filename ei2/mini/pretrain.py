"""Train the mini world's text-to-image model with ei2's own modules, and save it in Stable Diffusion's folder layout.

    python -m ei2.mini.pretrain --out weights/mini [--device cpu] [--vae-steps N] [--unet-steps N] [--resume]

Phases (all seeded; the same arguments on the same machine give the same weights):
 1. text: a tiny CLIP text model at random init with one token per word of `world.VOCAB` (`ei2.mini.tokenizer.
    write_tiny_text_model`), rounded to fp16 and kept FROZEN. A random causal transformer still gives every caption
    its own embedding sequence (each word's vector plus its position, mixed over the earlier words), which is all the
    UNet's cross-attention needs; training it would add a third model to keep consistent for no gain in this world.
 2. vae: ei2's AutoencoderKL at a small config (4 levels, so 64x64 images <-> 8x8x4 latents: SD's 8x factor), on
    freshly rendered scenes each step. Loss: L1 weighted x5 on object pixels (objects cover ~10% of a frame and carry
    all the information) + L2 + 1e-4 x KL to N(0, 1) (per element means), on a posterior sample. AdamW, EMA weights.
 3. latents: a fixed set of training images (random frames of random clips; a few (color, shape, background)
    combinations `HELD_OUT` are never shown) encoded by the fp16-rounded VAE; `scaling_factor` = 1 / std of the
    latents (as SD's 0.18215 was chosen), written to vae/config.json.
 4. unet: ei2's UNet (VideoOptions(frame_attention="self", temporal="none"); images as 1-frame videos (b, 4, 1, h, w))
    as an epsilon-prediction diffusion model (EI² Eq. 2 with one frame): x_t = ei2.ddim.add_noise(x_0, eps, t), t
    uniform in 0..999 on SD's scaled-linear schedule, loss |eps - eps_theta(x_t, t, c)|^2. Captions name the clip's
    motion half of the time ("a red circle moving right on ...") so the words the one-shot tuning will see are not
    new; 10% of captions are "" for classifier-free guidance. AdamW, constant lr after warmup, EMA weights saved.
 5. save + evaluate: everything in fp16 under --out (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), loss log train_log.json, then `ei2.mini.samples.evaluate`: loss_curves.png, sample grids of seen
    and held-out captions judged by `ei2.mini.parse`, and golden.safetensors (reference outputs the tests reproduce).

Training state is checkpointed atomically to --out/.train_state/ every --checkpoint-every steps; --resume continues
from it. The learning rates are constant after warmup, so a run cut short and resumed with more steps equals a run
asked for that many steps from the start.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ddim import add_noise, betas_of, schedule, snr_shifted
from ..errors import Ei2Error, cli_main
from ..files import atomic_path
from ..text import TextEncoder
from ..unet import UNet, UNetConfig, VideoOptions
from ..vae import AutoencoderKL, VAEConfig
from ..weights import read_state_dict, save_safetensors
from . import world
from .samples import HELD_OUT, IMAGE_OPTIONS, evaluate, is_held_out, to_tensor
from .tokenizer import write_tiny_text_model

TEXT = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
VAE_CONFIG = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                       sample_size=world.SIZE)
UNET_CONFIG = UNetConfig(sample_size=world.SIZE // 8, block_out_channels=(64, 128, 128),
                         cross_attention=(True, True, True), layers_per_block=1, attention_head_dim=4,
                         cross_attention_dim=TEXT["hidden_size"], norm_num_groups=16)
DOWNSAMPLE = (8, 4)  # --downsample: SD's 8x (the shipped model: 8x8 latents) or 4x (16x16 latents; issue 13)


def configs(downsample: int = 8) -> tuple[VAEConfig, UNetConfig]:
    """The VAE and UNet configs for a VAE that downsamples 8x (VAE_CONFIG, UNET_CONFIG) or 4x (one level fewer: 64 px
    frames <-> 16x16x4 latents; issue 13). At 16x16 the UNet is half as wide, (32, 64, 64), 16x16 -> 8x8 -> 4x4: at the
    full width a step costs 3.3x the 8x8 one (4.49 s against 1.35 s for a batch of 64, one idle core) and the demo's
    100 video tuning steps would not fit its 90 s; half width costs 1.6x (2.15 s; a video tuning step 471 ms against
    242 ms)."""
    if downsample not in DOWNSAMPLE:
        raise Ei2Error(f"--downsample must be one of {', '.join(map(str, DOWNSAMPLE))}, got {downsample}")
    if downsample == 8:
        return VAE_CONFIG, UNET_CONFIG
    return (replace(VAE_CONFIG, block_out_channels=VAE_CONFIG.block_out_channels[:-1]),
            replace(UNET_CONFIG, sample_size=world.SIZE // downsample, block_out_channels=(32, 64, 64),
                    norm_num_groups=8))

SCHEDULER_CONFIG = {  # SD v1-4's numbers (ei2.ddim implements them); DDIM is what ei2 samples and inverts with
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def round_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Round the weights through fp16 (what is saved) while keeping the module's dtype."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


class EMA:
    """Exponential moving average of a model's weights; decay ramps up as (1 + step) / (10 + step), capped."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                e.copy_(p)


# --- Training state (atomic checkpoints, resume) -----------------------------------------------------------------


def _state_path(out: Path, phase: str) -> Path:
    return out / ".train_state" / f"{phase}.pt"


def save_state(out: Path, phase: str, step: int, model, ema: EMA, opt, rng: np.random.Generator,
               gen: torch.Generator, log: list) -> None:
    state = {"step": step, "model": model.state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
             "rng": json.dumps(rng.bit_generator.state), "gen": gen.get_state(), "log": json.dumps(log)}
    with atomic_path(_state_path(out, phase)) as tmp:
        torch.save(state, tmp)


def load_state(out: Path, phase: str, model, ema: EMA, opt, rng: np.random.Generator, gen: torch.Generator):
    path = _state_path(out, phase)
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    rng.bit_generator.state = json.loads(state["rng"])
    gen.set_state(state["gen"])
    return int(state["step"]), json.loads(state["log"])


# --- Phases ------------------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup)


def train_vae(args, out: Path, device, frozen_encoder: AutoencoderKL | None = None) -> AutoencoderKL:
    """Phase 2, or with `frozen_encoder` the decoder fine-tuning (phase 4b): only the decoder and post_quant_conv
    learn, on posterior samples of the frozen encoder, so the latent space the UNet was trained on does not move."""
    phase = "vae" if frozen_encoder is None else "decoder"
    steps = args.vae_steps if frozen_encoder is None else args.decoder_steps
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(configs(args.downsample)[0]) if frozen_encoder is None else copy.deepcopy(frozen_encoder)
    vae = vae.to(device).train().requires_grad_(True)  # the frozen copy handed in has requires_grad off
    params = list(vae.parameters())
    if frozen_encoder is not None:
        for m in (vae.encoder, vae.quant_conv):
            m.requires_grad_(False).eval()
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    ema = EMA(vae, args.ema)
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    offset = 100 if frozen_encoder is None else 500
    rng = np.random.default_rng(args.seed + offset)
    gen = torch.Generator().manual_seed(args.seed + offset + 1)
    start, log = load_state(out, phase, vae, ema, opt, rng, gen) if args.resume else (0, [])
    if start:
        print(f"{phase}: resuming at step {start}", flush=True)
    t0, acc = time.time(), []
    for step in range(start, steps):
        scenes = [world.training_example(rng, p_two=args.p_two)[0] for _ in range(args.vae_batch)]
        images = np.stack([world.render(s) for s in scenes])
        bg = np.stack([np.asarray(world.BACKGROUNDS[s.background], dtype=np.uint8) for s in scenes])
        fg = torch.from_numpy((images != bg[:, None, None]).any(-1)).float()[:, None].to(device)
        x = to_tensor(images).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_lr, 100)
        with torch.set_grad_enabled(frozen_encoder is None):
            post = vae.encode(x)
        noise = torch.randn(post.mean.shape, generator=gen).to(device)
        y = vae.decode(post.mean + post.std * noise)
        err = (y - x).abs()
        l1 = (err * (1 + 4 * fg)).mean()
        l2 = err.pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).mean()
        loss = l1 + l2 + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(vae, step)
        acc.append([loss.item(), l1.item(), l2.item(), kl.item(), err.mean().item()])
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            m = np.mean(acc, axis=0).tolist()
            acc = []
            log.append({"step": step + 1, "loss": m[0], "l1_weighted": m[1], "l2": m[2], "kl": m[3], "mae": m[4],
                        "seconds": time.time() - t0})
            print(f"{phase} {step + 1}/{steps} loss {m[0]:.4f} mae {m[4]:.4f} kl {m[3]:.2f} "
                  f"({(time.time() - t0) / max(step + 1 - start, 1):.2f} s/step)", flush=True)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            save_state(out, phase, step + 1, vae, ema, opt, rng, gen, log)
    save_state(out, phase, steps, vae, ema, opt, rng, gen, log)
    _write_log(out, phase, log)
    return round_fp16(ema.model.float().cpu().eval())


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, n: int, seed: int, batch: int = 128, p_two: float = 0.0):
    """Training images (no HELD_OUT combination), their posterior means and stds (unscaled), scenes and motions."""
    rng = np.random.default_rng(seed)
    scenes, motions = [], []
    while len(scenes) < n:
        s, m = world.training_example(rng, p_two=p_two)
        if not is_held_out(s):
            scenes.append(s)
            motions.append(m)
    means, stds = [], []
    for i in range(0, n, batch):
        post = vae.encode(to_tensor(np.stack([world.render(s) for s in scenes[i:i + batch]])))
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds), scenes, motions


class CaptionCache:
    """Text embeddings of captions, computed once each (the text encoder is frozen)."""

    def __init__(self, text: TextEncoder):
        self.text, self.cache = text, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for i in range(0, len(new), 256):
            for c, e in zip(new[i:i + 256], self.text.encode(new[i:i + 256]).float()):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


def train_unet(args, out: Path, device, latents: torch.Tensor, stds: torch.Tensor, scenes, motions,
               text: TextEncoder) -> UNet:
    torch.manual_seed(args.seed + 200)
    unet = UNet(configs(args.downsample)[1], VideoOptions(**IMAGE_OPTIONS)).to(device).train()
    ema = EMA(unet, args.ema)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 300)
    gen = torch.Generator().manual_seed(args.seed + 301)
    start, log = load_state(out, "unet", unet, ema, opt, rng, gen) if args.resume else (0, [])
    if start:
        print(f"unet: resuming at step {start}", flush=True)
    embed = CaptionCache(text)
    alphas = schedule(scheduler_config(args.snr_shift))  # SD's, or shifted for small latents (--snr-shift)
    n = latents.shape[0]
    t0, acc = time.time(), []
    for step in range(start, args.unet_steps):
        idx = rng.integers(n, size=args.unet_batch)
        r = rng.random((args.unet_batch, 2))
        captions = ["" if r[k, 0] < args.uncond else scenes[i].caption(motions[i] if r[k, 1] < 0.5 and motions[i]
                                                                      else None)
                    for k, i in enumerate(idx)]
        idx_t = torch.from_numpy(idx)
        x0 = latents[idx_t] + stds[idx_t] * torch.randn(latents[idx_t].shape, generator=gen)  # a fresh posterior sample
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.unet_batch,), generator=gen)
        xt = add_noise(x0, noise, t, alphas)
        ctx = embed(captions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_lr, 200)
        pred = unet(xt[:, :, None].to(device), t.to(device), ctx.to(device))[:, :, 0]
        loss = F.mse_loss(pred, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        acc.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            log.append({"step": step + 1, "loss": float(np.mean(acc)), "seconds": time.time() - t0})
            print(f"unet {step + 1}/{args.unet_steps} loss {np.mean(acc):.4f} "
                  f"({(time.time() - t0) / max(step + 1 - start, 1):.2f} s/step)", flush=True)
            acc = []
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.unet_steps:
            save_state(out, "unet", step + 1, unet, ema, opt, rng, gen, log)
    save_state(out, "unet", args.unet_steps, unet, ema, opt, rng, gen, log)
    _write_log(out, "unet", log)
    return round_fp16(ema.model.float().cpu().eval())


# --- Saving in SD's layout ------------------------------------------------------------------------------------------


def _fp16(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v) for k, v in module.state_dict().items()}


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_text(out: Path, seed: int) -> TextEncoder:
    """Write tokenizer/ and text_encoder/ (fp16) and load them back as the frozen fp32 encoder training uses."""
    write_tiny_text_model(out, world.VOCAB, seed=seed, **TEXT)
    path = out / "text_encoder" / "model.safetensors"
    state = read_state_dict(path)
    save_safetensors({k: v.half() for k, v in state.items()}, path, metadata={"format": "pt"})
    return TextEncoder.from_pretrained(out).float()


def save_vae(out: Path, vae: AutoencoderKL) -> None:
    _write_json(out / "vae" / "config.json", {**vae.config.to_diffusers_dict(), "_diffusers_version": "0.42.1"})
    save_safetensors(_fp16(vae), out / "vae" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def save_unet(out: Path, unet: UNet) -> None:
    _write_json(out / "unet" / "config.json", {**unet.config.to_diffusers_dict(), "_diffusers_version": "0.42.1"})
    save_safetensors(_fp16(unet), out / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def scheduler_config(snr_shift: float = 1.0) -> dict:
    """SD v1-4's scheduler config; with snr_shift != 1 its schedule shifted to SNR'(t) = snr_shift * SNR(t)
    (ei2.ddim.snr_shifted), stored as diffusers stores any other schedule: the 1000 `trained_betas`."""
    if snr_shift == 1:
        return SCHEDULER_CONFIG
    betas = betas_of(snr_shifted(schedule(SCHEDULER_CONFIG).double(), snr_shift))
    return SCHEDULER_CONFIG | {"trained_betas": [float(b) for b in betas], "snr_shift": snr_shift}


def save_pipeline_files(out: Path, snr_shift: float = 1.0) -> None:
    _write_json(out / "model_index.json", MODEL_INDEX)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(snr_shift))


def _write_log(out: Path, phase: str, entries: list) -> None:
    path = out / "train_log.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    log[phase] = entries
    _write_json(path, log)


# --- CLI ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ei2.mini.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="weights/mini", help="output model folder (SD layout)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--downsample", type=int, default=8, choices=DOWNSAMPLE,
                   help="the VAE's downsampling: 8 (SD's; 8x8 latents, the shipped model) or 4 (16x16 latents)")
    p.add_argument("--p-two", type=float, default=0.0,
                   help="fraction of two-object still scenes in the training images (0 for the 8x8 model)")
    p.add_argument("--snr-shift", type=float, default=1.0,
                   help="train and sample with SD's noise schedule shifted to SNR'(t) = shift * SNR(t): (64 / latent "
                        "size)^2 hides a layout as SD does at 64x64 latents (16 for --downsample 4); 1 = SD's")
    p.add_argument("--vae-steps", type=int, default=2200)
    p.add_argument("--decoder-steps", type=int, default=1500,
                   help="decoder-only fine-tuning after the UNet (the encoder, hence the latents, stay fixed)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-4, help="weight of the mean KL term")
    p.add_argument("--n-latents", type=int, default=30000, help="training images encoded for the UNet")
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--uncond", type=float, default=0.1, help="fraction of empty captions (classifier-free guidance)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; on a shared CPU 1 is fastest (2 OpenMP threads competing with other jobs "
                        "ran 10-20x slower in our runs)")
    p.add_argument("--resume", action="store_true", help="continue from --out/.train_state")
    p.add_argument("--skip-vae", action="store_true", help="reuse the VAE already saved in --out")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the model saved in --out")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Ei2Error("--device cuda but CUDA is not available; use --device cpu")
    if args.eval_only:
        print(json.dumps(evaluate(out, args.seed), indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    save_pipeline_files(out, args.snr_shift)
    text = save_text(out, args.seed)
    timings = {}
    if args.skip_vae:
        vae = AutoencoderKL.from_pretrained(out)
    else:
        t = time.time()
        vae = train_vae(args, out, device)
        timings["vae_s"] = time.time() - t
    t = time.time()
    means, stds, scenes, motions = encode_dataset(vae, args.n_latents, args.seed + 400, p_two=args.p_two)
    scale = 1.0 / float((means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(7))).std())
    vae.config.scaling_factor = float(f"{scale:.5f}")
    save_vae(out, vae)
    timings["encode_s"] = time.time() - t
    print(f"encoded {len(scenes)} images in {timings['encode_s']:.0f} s; scaling_factor {vae.config.scaling_factor}",
          flush=True)
    t = time.time()
    latents, stds = means * vae.config.scaling_factor, stds * vae.config.scaling_factor
    unet = train_unet(args, out, device, latents, stds, scenes, motions, text)
    timings["unet_s"] = time.time() - t
    save_unet(out, unet)
    if args.decoder_steps:
        t = time.time()
        scaling = vae.config.scaling_factor
        vae = train_vae(args, out, device, frozen_encoder=vae)
        vae.config.scaling_factor = scaling
        save_vae(out, vae)
        timings["decoder_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start
    path = out / "train_log.json"
    log = json.loads(path.read_text())
    log["args"] = vars(args)
    log["timings"] = log.get("timings", {}) | timings
    vae_config, unet_config = configs(args.downsample)
    log["configs"] = {"vae": asdict(vae_config) | {"scaling_factor": vae.config.scaling_factor},
                      "unet": asdict(unet_config), "text": TEXT, "held_out": HELD_OUT}
    _write_json(path, log)
    print(f"saved to {out} in {timings['total_s'] / 60:.1f} min; evaluating", flush=True)
    result = evaluate(out, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
