"""Reading and writing weights safely.

- `read_state_dict` reads .safetensors directly, and .ckpt/.pt/.bin through `torch.load(weights_only=True)`, which
  refuses to execute pickled code (only tensors, plain containers and numbers are rebuilt).
- `load_exact` is the identity-map loader: module names mirror the checkpoint, so loading is `load_state_dict` guarded
  by a count-and-shape check that lists every missing, unexpected and mis-shaped tensor in one error.
- `save_safetensors` and `atomic_path` write to a temporary file in the same folder and rename it into place, so a
  crash never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .errors import Ei2Error
from .files import atomic_path, first_line as _first_line, read_json

SAFETENSORS = (".safetensors",)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one weight file. Raises Ei2Error naming the file when it is missing, truncated or not weights."""
    path = Path(path)
    if not path.is_file():
        raise Ei2Error(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=device)
        except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or foreign files
            raise Ei2Error(f"{path} is not a readable safetensors file ({_first_line(e)}); re-download it") from None
    if suffix in PICKLED:
        try:
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=False)
        except Exception as e:
            raise Ei2Error(
                f"{path} could not be read as a weights-only checkpoint ({_first_line(e)}); "
                "ei2 never unpickles arbitrary code: convert it to .safetensors or re-download it"
            ) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]  # CompVis training checkpoints nest the weights
        if not isinstance(obj, Mapping):
            raise Ei2Error(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise Ei2Error(f"unknown weight file type {path.suffix!r} for {path}; expected .safetensors or .ckpt")


def load_exact(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    fresh: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy `state_dict` into `module` by name, after checking the two hold the same tensors with the same shapes.

    `fresh(key)` marks the module's own tensors that the checkpoint is not expected to hold (new temporal modules,
    spectral-norm buffers); they keep their initial values. Every other difference is an error that lists all of them.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict and not fresh(k))
    unexpected = sorted(k for k in state_dict if k not in own)
    misshaped = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        raise Ei2Error(
            f"{source} does not match the model ({'; '.join(parts)}); "
            "check that the file is the right model and that the config matches it"
        )
    with torch.no_grad():
        for k, t in own.items():
            if k in state_dict:
                t.copy_(state_dict[k].to(dtype=t.dtype))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors as safetensors atomically (metadata values must be strings)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# --- Locating one component (unet, vae, text_encoder) of a Stable Diffusion model -----------------------------------

WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}
SINGLE_FILE = SAFETENSORS + PICKLED


class Component:
    """Where one component's weights are: `weights` (a file), `config` (its config.json as a dict, or None) and
    `single_file` (True when `weights` is a whole CompVis checkpoint whose keys still need mapping)."""

    def __init__(self, name: str, weights: Path, config: dict | None, single_file: bool):
        self.name, self.weights, self.config, self.single_file = name, weights, config, single_file

    def __repr__(self) -> str:
        return f"Component({self.name!r}, {str(self.weights)!r}, single_file={self.single_file})"


def open_component(path: str | os.PathLike, name: str) -> Component:
    """Find component `name` under `path`, which is one of:
    - a model folder in the diffusers layout (`path/<name>/config.json` and `path/<name>/<weights>`),
    - the component's own folder (`path/config.json`, `path/<weights>`),
    - a single-file CompVis checkpoint (.safetensors or .ckpt) holding every component.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE:
            raise Ei2Error(f"{path} is not a model folder or a .safetensors/.ckpt checkpoint")
        return Component(name, path, None, single_file=True)
    if not path.exists():
        raise Ei2Error(
            f"model not found at {path}: put Stable Diffusion v1-4 there in the diffusers folder layout "
            f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or pass a single-file checkpoint; "
            "see weights/README.md"
        )
    folder = path / name if (path / name).is_dir() else path
    for weights_name in WEIGHT_NAMES[name]:
        if (folder / weights_name).is_file():
            config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
            return Component(name, folder / weights_name, config, single_file=False)
    raise Ei2Error(
        f"no {name} weights in {path}: expected {path / name / WEIGHT_NAMES[name][0]} "
        f"(with {path / name / 'config.json'}); see weights/README.md"
    )
