"""A tiny Stable-Diffusion-shaped model with seeded random weights, written in the real SD folder layout.

Tests load it through exactly the same loaders as SD v1-4; nothing in ei2 uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ei2.mini.tokenizer import write_tiny_text_model
from ei2.unet import UNet, UNetConfig, VideoOptions
from ei2.vae import AutoencoderKL, VAEConfig
from ei2.weights import save_safetensors

WORDS = ["a", "an", "the", "on", "in", "of", "and", "with", "moving", "right", "left", "background",
         "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
         "circle", "square", "triangle", "star", "cat", "dog", "car", "surfing", "painting", "style"]

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "prediction_type": "epsilon", "timestep_spacing": "leading"}


def write_component(folder: Path, config: dict, state: dict, dtype=torch.float32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors({k: v.to(dtype) for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors",
                     metadata={"format": "pt"})


def write_random_model(folder, seed: int = 0, unet_config: UNetConfig | None = None,
                       vae_config: VAEConfig | None = None, words=WORDS) -> Path:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ with seeded random weights."""
    folder = Path(folder)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet_config = unet_config or UNetConfig.tiny()
        unet = UNet(unet_config, VideoOptions(frame_attention="self", temporal="none"))
        write_component(folder / "unet", unet_config.to_diffusers_dict(), unet.state_dict())
        vae_config = vae_config or VAEConfig.tiny()
        write_component(folder / "vae", vae_config.to_diffusers_dict(), AutoencoderKL(vae_config).state_dict())
    finally:
        torch.random.set_rng_state(state)
    write_tiny_text_model(folder, list(words), seed=seed, hidden_size=unet_config.cross_attention_dim)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2))
    return folder
