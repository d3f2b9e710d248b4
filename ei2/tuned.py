"""Small checkpoints of a tuned model: only what tuning changes (section 5's trainable set) plus the temporal modules'
buffers (spectral-norm u, v) and the inflation options, as safetensors: megabytes, not a copy of Stable Diffusion.

Also the resumable training state (optimizer moments, step, random generator) for `python -m ei2.train --resume`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import Ei2Error
from .unet import UNet, VideoOptions, is_temporal_key, is_trainable_key
from .weights import open_component, read_state_dict, save_safetensors


# The version of what a tuned model computes. Format 2: conv_norm_out takes its statistics over all frames (with
# resnet_norm "video"), the temporal attention has the level's head count (UNetConfig.attention_head_dim), and
# Instance Centering runs in fp32 under autocast. Format 1 (no "format" in the metadata): per-frame conv_norm_out,
# 8 temporal heads everywhere, IC in the autocast dtype; its tensors would be used by a different network.
FORMAT = 2
MIB = 1 << 20


def computes(unet: UNet) -> dict:
    """The choices of this ei2 version that a tuned model's numbers depend on, recorded in its metadata."""
    heads = unet.config.attention_head_dim if unet.video.temporal != "none" else 0
    return {"conv_norm_out": "per frame" if unet.video.resnet_norm == "frame" else "over frames",
            "temporal_heads": heads, "instance_centering": "fp32"}


def _metadata(unet: UNet, base_model: str, **more) -> dict[str, str]:
    return {"ei2": json.dumps({"format": FORMAT, "base_model": str(base_model),
                               "video_options": dataclasses.asdict(unet.video), "computes": computes(unet), **more})}


def _redo(path: Path) -> str:
    """How to redo the run that wrote `path` (runs/<name>/tuned.safetensors or its checkpoints/last.safetensors)."""
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    config = run / "config.yaml"
    if config.is_file():
        return f"re-run `python -m ei2.train --config {config}` (without --resume)"
    return "re-run `python -m ei2.train` with that run's config (without --resume)"


def check_format(meta: dict, path: str | os.PathLike) -> None:
    """Refuse a tuned file or checkpoint written by another format of ei2, with how to redo the run."""
    path = Path(path)
    fmt = meta.get("format", 1)
    if fmt == FORMAT:
        return
    if fmt < FORMAT:
        raise Ei2Error(f"{path} was tuned with an older ei2 (format {fmt}) whose conv_norm_out took per-frame "
                       "statistics, whose temporal attention had 8 heads at every level and whose Instance Centering "
                       f"ran in bf16/fp16 under autocast: this ei2 (format {FORMAT}) computes another network; "
                       f"{_redo(path)}")
    raise Ei2Error(f"{path} was written by a newer ei2 (format {fmt}; this one reads format {FORMAT}); update ei2")


def base_fingerprint(model: str | os.PathLike) -> str:
    """A cheap fingerprint of a base model's weights: sha256 over the UNet weight file's size, first MiB and last MiB
    (the file itself for a single-file checkpoint), so a swapped or retrained base model is told apart from the one
    a run was tuned on without reading gigabytes."""
    weights = open_component(model, "unet").weights
    size = weights.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(weights, "rb") as f:
        h.update(f.read(MIB))
        f.seek(max(size - MIB, 0))
        h.update(f.read(MIB))
    return h.hexdigest()


def check_run_parts(meta: dict, path, model: str | os.PathLike, latent_shape, force: bool = False) -> None:
    """The parts of a run belong together: the base model has the fingerprint recorded in the tuned file, the
    inverted latent has the recorded shape. A mismatch is an Ei2Error, or a warning with `force`. A tuned file
    without the records (older ei2) skips the check with a notice."""
    if "base_fingerprint" not in meta:
        print(f"note: {path} records no base-model fingerprint (an older ei2): not checking that the base model "
              "and the inverted latent belong to this run")
        return
    problems = []
    if meta["base_fingerprint"] != base_fingerprint(model):
        problems.append(f"the base model {model} is not the one the run was tuned on ({meta.get('base_model')}: "
                        "its UNet weights differ)")
    if list(meta.get("inverted_shape", latent_shape)) != list(latent_shape):
        problems.append(f"the inverted latent has shape {list(latent_shape)}, the run recorded "
                        f"{list(meta['inverted_shape'])}")
    if problems and force:
        print(f"warning: --force: rendering anyway, though {'; '.join(problems)}")
    elif problems:
        raise Ei2Error(f"{'; '.join(problems)}; use the run's own files (or --force to render anyway)")


def tuned_state_dict(unet: UNet) -> dict[str, torch.Tensor]:
    """The trainable tensors and every tensor of the temporal modules (incl. spectral-norm u, v), by UNet name."""
    return {k: v for k, v in unet.state_dict().items() if is_trainable_key(k) or is_temporal_key(k)}


def save_tuned(unet: UNet, path: str | os.PathLike, base_model: str, extra: dict | None = None) -> None:
    """Write the tuned tensors with the format, the base model's path, the VideoOptions and `computes` in the
    metadata (atomically)."""
    meta = _metadata(unet, base_model, **(extra or {}))
    save_safetensors({k: v.float() for k, v in tuned_state_dict(unet).items()}, path, metadata=meta)


def read_tuned_metadata(path: str | os.PathLike) -> dict:
    """The ei2 metadata of a tuned file or training checkpoint; refuses one written by another format."""
    path = Path(path)
    if not path.is_file():
        raise Ei2Error(f"tuned weights not found: {path}; run `python -m ei2.train` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        meta = json.loads(meta["ei2"])
    except Exception:
        raise Ei2Error(f"{path} is not an ei2 tuned checkpoint (no ei2 metadata); re-run the training") from None
    check_format(meta, path)
    return meta


def _check_computes(meta: dict, unet: UNet, path) -> None:
    if meta.get("computes") != computes(unet):
        raise Ei2Error(f"{path} was tuned by a network computing {meta.get('computes')}, this model computes "
                       f"{computes(unet)}; {_redo(Path(path))}")


def load_tuned(unet: UNet, path: str | os.PathLike) -> None:
    """Copy a tuned checkpoint into `unet`, which must be inflated with the same VideoOptions; exact key check."""
    meta = read_tuned_metadata(path)
    if VideoOptions(**meta["video_options"]) != unet.video:
        raise Ei2Error(f"{path} was tuned with {meta['video_options']} but the model has {dataclasses.asdict(unet.video)}")
    _check_computes(meta, unet, path)
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
                        generator: torch.Generator, losses: list[float], base_model: str,
                        extra: dict | None = None) -> None:
    """Tuned tensors + AdamW moments (by parameter name) + generator state + step, in one atomic safetensors file;
    `extra` (JSON) joins the metadata, read back with `read_tuned_metadata` (the trainer's skipped steps)."""
    tensors = {f"model/{k}": v.float() for k, v in tuned_state_dict(unet).items()}
    state = optimizer.state_dict()["state"]
    for i, name in enumerate(names):
        for key, value in state.get(i, {}).items():
            tensors[f"optim/{name}/{key}"] = torch.as_tensor(value).float() if key != "step" else torch.as_tensor(value)
    tensors["rng"] = generator.get_state()
    tensors["loss"] = torch.tensor(losses, dtype=torch.float64)
    save_safetensors(tensors, path, metadata=_metadata(unet, base_model, step=step, **(extra or {})))


def load_training_state(path, unet: UNet, optimizer: torch.optim.Optimizer, names: list[str],
                        generator: torch.Generator) -> tuple[int, list[float]]:
    """Restore what `save_training_state` wrote; returns (step, losses so far)."""
    meta = read_tuned_metadata(path)
    _check_computes(meta, unet, path)
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
