"""Small checkpoints of a tuned model: only what tuning changes (section 5's trainable set) plus the temporal modules'
buffers (spectral-norm u, v) and the inflation options, as safetensors: megabytes, not a copy of Stable Diffusion.

Also the resumable training state (optimizer moments, step, random generator) for `python -m ei2.train --resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_state_dict, save_safetensors
from .errors import Ei2Error
from .unet import UNet, VideoOptions, is_temporal_key, is_trainable_key


def tuned_state_dict(unet: UNet) -> dict[str, torch.Tensor]:
    """The trainable tensors and every tensor of the temporal modules (incl. spectral-norm u, v), by UNet name."""
    return {k: v for k, v in unet.state_dict().items() if is_trainable_key(k) or is_temporal_key(k)}


def save_tuned(unet: UNet, path: str | os.PathLike, base_model: str, extra: dict | None = None) -> None:
    """Write the tuned tensors with the base model's path and the VideoOptions in the metadata (atomically)."""
    meta = {"ei2": json.dumps({"base_model": str(base_model), "video_options": dataclasses.asdict(unet.video),
                               **(extra or {})})}
    save_safetensors({k: v.float() for k, v in tuned_state_dict(unet).items()}, path, metadata=meta)


def read_tuned_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise Ei2Error(f"tuned weights not found: {path}; run `python -m ei2.train` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["ei2"])
    except Exception:
        raise Ei2Error(f"{path} is not an ei2 tuned checkpoint (no ei2 metadata); re-run the training") from None


def load_tuned(unet: UNet, path: str | os.PathLike) -> None:
    """Copy a tuned checkpoint into `unet`, which must be inflated with the same VideoOptions; exact key check."""
    meta = read_tuned_metadata(path)
    if VideoOptions(**meta["video_options"]) != unet.video:
        raise Ei2Error(f"{path} was tuned with {meta['video_options']} but the model has {dataclasses.asdict(unet.video)}")
    state = read_state_dict(path)
    expected = tuned_state_dict(unet)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or bad:
        raise Ei2Error(f"{path} does not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
                       f"{len(bad)} mis-shaped tensors (first: {(missing + unexpected + bad)[0]})")
    with torch.no_grad():
        own = unet.state_dict()
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def load_tuned_unet(base_model: str | os.PathLike, tuned_path: str | os.PathLike, **kwargs) -> UNet:
    """SD's UNet inflated with the options recorded in `tuned_path`, with the tuned tensors loaded."""
    meta = read_tuned_metadata(tuned_path)
    unet = UNet.from_pretrained(base_model, **meta["video_options"], **kwargs)
    load_tuned(unet, tuned_path)
    return unet


# --- Resumable training state ------------------------------------------------------------------------------------


def save_training_state(path, unet: UNet, optimizer: torch.optim.Optimizer, names: list[str], step: int,
                        generator: torch.Generator, losses: list[float], base_model: str) -> None:
    """Tuned tensors + AdamW moments (by parameter name) + generator state + step, in one atomic safetensors file."""
    tensors = {f"model/{k}": v.float() for k, v in tuned_state_dict(unet).items()}
    state = optimizer.state_dict()["state"]
    for i, name in enumerate(names):
        for key, value in state.get(i, {}).items():
            tensors[f"optim/{name}/{key}"] = torch.as_tensor(value).float() if key != "step" else torch.as_tensor(value)
    tensors["rng"] = generator.get_state()
    tensors["loss"] = torch.tensor(losses, dtype=torch.float64)
    meta = {"ei2": json.dumps({"step": step, "base_model": str(base_model),
                               "video_options": dataclasses.asdict(unet.video)})}
    save_safetensors(tensors, path, metadata=meta)


def load_training_state(path, unet: UNet, optimizer: torch.optim.Optimizer, names: list[str],
                        generator: torch.Generator) -> tuple[int, list[float]]:
    """Restore what `save_training_state` wrote; returns (step, losses so far)."""
    meta = read_tuned_metadata(path)
    tensors = read_state_dict(path)
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = unet.state_dict()
    if set(model) != set(tuned_state_dict(unet)):
        raise Ei2Error(f"{path} was written by a model with other modules; start a new run without --resume")
    with torch.no_grad():
        for k, v in model.items():
            own[k].copy_(v.to(own[k].dtype))
    params = dict(unet.named_parameters())
    state = optimizer.state_dict()
    for i, name in enumerate(names):
        entry = {key.rsplit("/", 1)[1]: v for key, v in tensors.items() if key.startswith(f"optim/{name}/")}
        if entry:
            p = params[name]
            state["state"][i] = {k: (v if k == "step" else v.to(device=p.device, dtype=p.dtype)) for k, v in entry.items()}
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return int(meta["step"]), tensors["loss"].tolist()


def trainable_parameters(unet: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]
