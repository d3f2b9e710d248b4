"""All weight plumbing: reading files safely, exact loading, the SD folder, and the CompVis single-file names.

ei2's modules use diffusers' tensor names, so a diffusers-layout folder loads by identity (`load_exact`: load_state_dict
guarded by a check that lists every missing, unexpected and mis-shaped tensor in one error). `.ckpt`/`.bin` files are
read with `torch.load(weights_only=True)`, which never runs pickled code. A CompVis checkpoint (`sd-v1-4.ckpt`) holds
the same tensors under other names; its maps are generated from the config's block structure, not a fixed table.
This module imports no model file: configs are read by their fields (block_out_channels, layers_per_block, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from . import ddim
from .errors import Ei2Error, first_line
from .files import atomic_path, read_json

SAFETENSORS = (".safetensors",)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE = SAFETENSORS + PICKLED

# --- Reading and writing weight files --------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one weight file. Raises Ei2Error naming the file when it is missing, truncated or not weights."""
    path = Path(path)
    if not path.is_file():
        raise Ei2Error(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        try:
            return load_file(str(path), device=device)
        except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or foreign files
            raise Ei2Error(f"{path} is not a readable safetensors file ({first_line(e)}); re-download it") from None
    if suffix in PICKLED:
        try:
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=False)
        except Exception as e:
            raise Ei2Error(
                f"{path} could not be read as a weights-only checkpoint ({first_line(e)}); "
                "ei2 never unpickles arbitrary code: convert it to .safetensors or re-download it"
            ) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]  # CompVis training checkpoints nest the weights
        if not isinstance(obj, Mapping):
            raise Ei2Error(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise Ei2Error(f"unknown weight file type {path.suffix!r} for {path}; expected .safetensors or .ckpt")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors as safetensors atomically (metadata values must be strings)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# --- Exact loading ---------------------------------------------------------------------------------------------------


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


# --- The SD folder (diffusers layout) --------------------------------------------------------------------------------

# weight file names per component, the first being the one to download; the text encoder is read by transformers,
# which takes model.safetensors or pytorch_model.bin
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def model_not_found(path: Path) -> Ei2Error:
    return Ei2Error(
        f"model not found at {path}: put Stable Diffusion v1-4 there in the diffusers folder layout "
        f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or pass a single-file checkpoint; "
        "see weights/README.md"
    )


def check_sd_folder(path: str | os.PathLike, parts: tuple[str, ...] = SD_PARTS) -> None:
    """Before loading anything: every file of an SD folder's `parts` that is missing, in one message.
    A single file passes (its keys are checked when it is read)."""
    root = Path(path)
    if root.is_file():
        return
    if not root.is_dir():
        raise model_not_found(root)
    missing = []
    for part in parts:
        if part == "tokenizer":
            missing += [f"tokenizer/{f}" for f in TOKENIZER_FILES if not (root / "tokenizer" / f).is_file()]
            continue
        if not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
        if not any((root / part / w).is_file() for w in WEIGHT_NAMES[part]):
            missing.append(f"{part}/{WEIGHT_NAMES[part][0]}")
    if missing:
        raise Ei2Error(f"incomplete model folder {root}: missing {', '.join(missing)}; see weights/README.md for "
                       "what goes where and how to download it")


def read_schedule(path: str | os.PathLike) -> torch.Tensor | None:
    """The model's DDIM schedule alpha_t (ddim.schedule) from <folder>/scheduler/scheduler_config.json; None (SD v1-4's
    schedule) for a single checkpoint file or a folder without that file. The miniature models store a shifted
    schedule there (issue 13); SD v1-4's own file gives SD's numbers."""
    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    try:
        return ddim.schedule(read_json(file))
    except (ValueError, TypeError) as e:
        raise Ei2Error(f"{file}: {first_line(e)}; use Stable Diffusion v1-4's scheduler_config.json") from None


class Component:
    """Where one component's weights are: `weights` (a file), `config` (its config.json as a dict, or None) and
    `single_file` (True when `weights` is a whole CompVis checkpoint whose keys still need mapping)."""

    def __init__(self, name: str, weights: Path, config: dict | None, single_file: bool):
        self.name, self.weights, self.config, self.single_file = name, weights, config, single_file

    def __repr__(self) -> str:
        return f"Component({self.name!r}, {str(self.weights)!r}, single_file={self.single_file})"


def open_component(path: str | os.PathLike, name: str) -> Component:
    """Find component `name` (unet, vae) under `path`: an SD folder (`path/<name>/config.json` and weights), the
    component's own folder (`path/config.json`, weights), or a single-file CompVis checkpoint holding every component."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE:
            raise Ei2Error(f"{path} is not a model folder or a .safetensors/.ckpt checkpoint")
        return Component(name, path, None, single_file=True)
    if not path.exists():
        raise model_not_found(path)
    folder = path / name if (path / name).is_dir() else path
    for weights_name in WEIGHT_NAMES[name]:
        if (folder / weights_name).is_file():
            config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
            return Component(name, folder / weights_name, config, single_file=False)
    raise Ei2Error(
        f"no {name} weights in {path}: expected {path / name / WEIGHT_NAMES[name][0]} "
        f"(with {path / name / 'config.json'}); see weights/README.md"
    )


def unet_state_dict(component: Component, config) -> dict[str, torch.Tensor]:
    """The UNet tensors of a component under diffusers names (a CompVis file mapped through `compvis_unet_key_map`)."""
    state = read_state_dict(component.weights)
    if component.single_file:
        state = from_compvis(state, compvis_unet_key_map(config), str(component.weights))
    return state


def vae_state_dict(component: Component, config) -> dict[str, torch.Tensor]:
    """The VAE tensors of a component under diffusers names, legacy attention names translated."""
    state = read_state_dict(component.weights)
    if component.single_file:
        state = vae_from_single_file(state, config, source=str(component.weights))
    return convert_attention_keys(state, source=str(component.weights))


# --- CompVis names ---------------------------------------------------------------------------------------------------
# UNet: `model.diffusion_model.` + input_blocks / middle_block / output_blocks / time_embed / out. `input_blocks.0` is
# conv_in; each level then has `layers_per_block` entries (ResNet at `.0`, transformer at `.1`) and, except the last
# level, one downsampler. `output_blocks` have `layers_per_block + 1` entries per level; the upsampler sits in the
# level's last entry, at `.1` without attention and `.2` with it. SD v1's proj_in/proj_out are 1x1 convs in both.
# Text encoder: `cond_stage_model.transformer.` + the transformers CLIPTextModel key (`text_model.…`).
# VAE: `first_stage_model.` + encoder.down.* / decoder.up.* / mid.block_1, attn_1 (1x1-conv attention weights).

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
PUBLISHED_TEXT_PREFIX = "text_model."


def _resnet(d: str, c: str, shortcut: bool) -> dict[str, str]:
    """diffusers ResnetBlock2D `d` -> CompVis ResBlock `c` (both without the trailing dot)."""
    parts = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3"}
    if shortcut:
        parts["conv_shortcut"] = "skip_connection"
    return {f"{d}.{dn}.{p}": f"{c}.{cn}.{p}" for dn, cn in parts.items() for p in ("weight", "bias")}


def _transformer(d: str, c: str, num_blocks: int) -> dict[str, str]:
    """diffusers Transformer2DModel `d` -> CompVis SpatialTransformer `c`: same inner names, so a prefix swap."""
    names = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]
    for b in range(num_blocks):
        t = f"transformer_blocks.{b}"
        for norm in ("norm1", "norm2", "norm3"):
            names += [f"{t}.{norm}.weight", f"{t}.{norm}.bias"]
        for attn in ("attn1", "attn2"):
            names += [f"{t}.{attn}.to_q.weight", f"{t}.{attn}.to_k.weight", f"{t}.{attn}.to_v.weight",
                      f"{t}.{attn}.to_out.0.weight", f"{t}.{attn}.to_out.0.bias"]
        names += [f"{t}.ff.net.0.proj.weight", f"{t}.ff.net.0.proj.bias", f"{t}.ff.net.2.weight", f"{t}.ff.net.2.bias"]
    return {f"{d}.{n}": f"{c}.{n}" for n in names}


def _pair(d: str, c: str) -> dict[str, str]:
    return {f"{d}.weight": f"{c}.weight", f"{d}.bias": f"{c}.bias"}


def compvis_unet_key_map(config) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> CompVis key, for a UNet config (block_out_channels, cross_attention,
    layers_per_block)."""
    ch = tuple(config.block_out_channels)
    attn = tuple(config.cross_attention)
    if len(attn) != len(ch):
        raise Ei2Error(f"UNet config: cross_attention has {len(attn)} entries but block_out_channels has {len(ch)}")
    n_levels, layers = len(ch), config.layers_per_block
    n_tf = getattr(config, "transformer_layers_per_block", 1)  # SD v1: one transformer block per attention
    P = UNET_PREFIX
    m: dict[str, str] = {}
    m.update(_pair("conv_in", P + "input_blocks.0.0"))
    m.update(_pair("time_embedding.linear_1", P + "time_embed.0"))
    m.update(_pair("time_embedding.linear_2", P + "time_embed.2"))

    idx = 1  # down path: after conv_in, per level `layers` entries and (not last level) one downsampler
    for lvl in range(n_levels):
        c_in = ch[lvl - 1] if lvl > 0 else ch[0]
        for j in range(layers):
            ins = c_in if j == 0 else ch[lvl]
            m.update(_resnet(f"down_blocks.{lvl}.resnets.{j}", f"{P}input_blocks.{idx}.0", shortcut=ins != ch[lvl]))
            if attn[lvl]:
                m.update(_transformer(f"down_blocks.{lvl}.attentions.{j}", f"{P}input_blocks.{idx}.1", n_tf))
            idx += 1
        if lvl < n_levels - 1:
            m.update(_pair(f"down_blocks.{lvl}.downsamplers.0.conv", f"{P}input_blocks.{idx}.0.op"))
            idx += 1

    m.update(_resnet("mid_block.resnets.0", P + "middle_block.0", shortcut=False))
    m.update(_transformer("mid_block.attentions.0", P + "middle_block.1", n_tf))
    m.update(_resnet("mid_block.resnets.1", P + "middle_block.2", shortcut=False))

    # Up path: up block i mirrors down level n-1-i, `layers + 1` entries each. Every up ResNet takes a concatenated
    # skip, so its input is wider than its output and it always has a 1x1 shortcut.
    idx = 0
    for i in range(n_levels):
        lvl = n_levels - 1 - i
        for j in range(layers + 1):
            m.update(_resnet(f"up_blocks.{i}.resnets.{j}", f"{P}output_blocks.{idx}.0", shortcut=True))
            if attn[lvl]:
                m.update(_transformer(f"up_blocks.{i}.attentions.{j}", f"{P}output_blocks.{idx}.1", n_tf))
            if j == layers and i < n_levels - 1:
                pos = 2 if attn[lvl] else 1
                m.update(_pair(f"up_blocks.{i}.upsamplers.0.conv", f"{P}output_blocks.{idx}.{pos}.conv"))
            idx += 1

    m.update(_pair("conv_norm_out", P + "out.0"))
    m.update(_pair("conv_out", P + "out.2"))
    return m


def compvis_text_key_map(num_layers: int = 12) -> dict[str, str]:
    """transformers CLIPTextModel key -> CompVis key (`cond_stage_model.transformer.` + the same key)."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(num_layers):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names += [f"{layer}.self_attn.{proj}.weight", f"{layer}.self_attn.{proj}.bias"]
        for sub in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"{layer}.{sub}.weight", f"{layer}.{sub}.bias"]
    names += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return {n: TEXT_PREFIX + n for n in names}


_VAE_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_COMPVIS_ATTENTION = {"group_norm": "norm", "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def compvis_vae_key_map(config) -> dict[str, str]:
    """diffusers VAE key (old attention spelling, as the published file) -> CompVis key, for a VAE config
    (block_out_channels, layers_per_block)."""
    ch, n, layers = config.block_out_channels, len(config.block_out_channels), config.layers_per_block
    modules: dict[str, str] = {}  # diffusers module -> CompVis module; each has a weight and a bias

    def resnet(d: str, c: str, cin: int, cout: int) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            modules[f"{d}.{name}"] = f"{c}.{name}"
        if cin != cout:
            modules[f"{d}.conv_shortcut"] = f"{c}.nin_shortcut"

    for side in ("encoder", "decoder"):
        modules[f"{side}.conv_in"] = f"{side}.conv_in"
        d, c, width = f"{side}.mid_block", f"{side}.mid", ch[-1]
        resnet(f"{d}.resnets.0", f"{c}.block_1", width, width)
        for name, compvis in _VAE_COMPVIS_ATTENTION.items():
            modules[f"{d}.attentions.0.{name}"] = f"{c}.attn_1.{compvis}"
        resnet(f"{d}.resnets.1", f"{c}.block_2", width, width)
        modules[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        modules[f"{side}.conv_out"] = f"{side}.conv_out"
    cin = ch[0]
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", cin, ch[i])
            cin = ch[i]
        if i < n - 1:
            modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    cin = ch[-1]
    for i in range(n):
        level = n - 1 - i  # CompVis numbers decoder levels by resolution, diffusers in execution order
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", cin, ch[level])
            cin = ch[level]
        if i < n - 1:
            modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    modules["quant_conv"], modules["post_quant_conv"] = "quant_conv", "post_quant_conv"
    return {f"{d}.{p}": f"{VAE_PREFIX}{c}.{p}" for d, c in modules.items() for p in ("weight", "bias")}


def from_compvis(
    state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """The tensors of `key_map` taken from a CompVis `state_dict`, renamed to diffusers keys (same objects, no copy).
    Keys outside the map (other components, EMA weights, buffers) are ignored; a mapped key that is absent raises."""
    missing = [c for c in key_map.values() if c not in state_dict]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise Ei2Error(
            f"{source} lacks {len(missing)} of the {len(key_map)} tensors expected of a Stable Diffusion v1 "
            f"CompVis checkpoint ({shown}); check that it is an SD v1 single-file checkpoint and not truncated"
        )
    return {d: state_dict[c] for d, c in key_map.items()}


def vae_from_single_file(sd: Mapping[str, torch.Tensor], config, source: str) -> dict[str, torch.Tensor]:
    """The VAE tensors of a single file, under diffusers names. Accepts a whole SD CompVis checkpoint
    (first_stage_model.*), a CompVis VAE-only file (encoder.down.*), or a lone diffusers-named VAE file."""
    if any(k.startswith(VAE_PREFIX) for k in sd):
        prefix = VAE_PREFIX
    elif "encoder.down.0.block.0.conv1.weight" in sd:
        prefix = ""
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        return dict(sd)
    else:
        raise Ei2Error(f"{source} holds no VAE weights (no {VAE_PREFIX}* keys): is it a Stable Diffusion model?")
    inverse = {c[len(VAE_PREFIX):]: d for d, c in compvis_vae_key_map(config).items()}
    out = {}
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue  # UNet / text encoder tensors of a whole-model file
        rest = key[len(prefix):]
        if rest.startswith("loss."):
            continue  # VAE training files carry the LPIPS / discriminator weights; not part of the model
        out[inverse.get(rest, key)] = t  # an unknown key keeps its file name, so load_exact reports it as such
    return out


def convert_attention_keys(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """The VAE's legacy attention names: rename query/key/value/proj_attn (the published file) to to_q/to_k/to_v/
    to_out.0 and squeeze CompVis's 1x1-conv attention weights (c, c, 1, 1) to linear ones (c, c)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if ".attentions." in key:
            *head, name, param = key.split(".")
            if name in _VAE_OLD_ATTENTION:
                key = ".".join([*head, _VAE_OLD_ATTENTION[name], param])
                if key in sd:
                    raise Ei2Error(f"{source} holds both the old and the new spelling of {key}")
            if t.ndim == 4 and t.shape[2:] == (1, 1):
                t = t[:, :, 0, 0]
        out[key] = t
    return out


def published_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under the published names (`text_model.…`, as SD v1-4's file and transformers 4),
    whichever transformers version made it; the non-persistent position_ids buffer is left out."""
    return {
        (k if k.startswith(PUBLISHED_TEXT_PREFIX) else PUBLISHED_TEXT_PREFIX + k): v
        for k, v in state_dict.items()
        if not k.endswith("embeddings.position_ids")
    }


def to_model_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename published `text_model.…` keys to what this transformers version's CLIPTextModel calls them
    (transformers 5 has no `text_model` submodule). Keys that fit neither way are passed through unchanged."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        short = k.removeprefix(PUBLISHED_TEXT_PREFIX)
        candidates = (k, short, PUBLISHED_TEXT_PREFIX + short)
        out[next((c for c in candidates if c in own), k)] = v
    return out
