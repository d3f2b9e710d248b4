"""Key maps from the original single-file (CompVis) Stable Diffusion checkpoint to the diffusers layout.

ei2's modules use diffusers' tensor names, so a diffusers-layout folder loads by identity. A CompVis checkpoint
(`sd-v1-4.ckpt` / `.safetensors`) holds the same tensors under other names; the maps here are generated from the
block structure (levels, layers per level, transformer blocks) so they follow the config instead of a fixed table:

- UNet: `model.diffusion_model.` + `input_blocks.*` / `middle_block.*` / `output_blocks.*` / `time_embed.*` / `out.*`.
  `input_blocks.0` is conv_in; each level then has `layers_per_block` entries (ResNet at `.0`, transformer at `.1`)
  and, except the last level, one downsampler entry. `output_blocks` have `layers_per_block + 1` entries per level;
  the upsampler sits inside the level's last entry, at `.1` without attention and `.2` with it.
  SD v1's proj_in/proj_out are 1x1 convolutions in both layouts, so no tensor is reshaped.
- Text encoder: `cond_stage_model.transformer.` + the transformers CLIPTextModel key (`text_model.…`).

The VAE's map lives in ei2/vae.py.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import Ei2Error
from .unet import UNetConfig

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def _resnet(d: str, c: str, shortcut: bool) -> dict[str, str]:
    """diffusers ResnetBlock2D `d` -> CompVis ResBlock `c` (both without the trailing dot)."""
    parts = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
    }
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


def compvis_unet_key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> CompVis key (with the `model.diffusion_model.` prefix)."""
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

    # Down path: input_blocks.0 is conv_in, then per level `layers` entries and (not last level) one downsampler.
    idx = 1
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

    # Middle: ResNet, transformer, ResNet (SD v1's UNetMidBlock2DCrossAttn).
    m.update(_resnet("mid_block.resnets.0", P + "middle_block.0", shortcut=False))
    m.update(_transformer("mid_block.attentions.0", P + "middle_block.1", n_tf))
    m.update(_resnet("mid_block.resnets.1", P + "middle_block.2", shortcut=False))

    # Up path: up block i mirrors down level n-1-i; `layers + 1` entries each. Every up ResNet takes a concatenated
    # skip, so its input is wider than its output and it always has a 1x1 shortcut.
    idx = 0
    for i in range(n_levels):
        lvl = n_levels - 1 - i
        has_attn = attn[lvl]
        for j in range(layers + 1):
            m.update(_resnet(f"up_blocks.{i}.resnets.{j}", f"{P}output_blocks.{idx}.0", shortcut=True))
            if has_attn:
                m.update(_transformer(f"up_blocks.{i}.attentions.{j}", f"{P}output_blocks.{idx}.1", n_tf))
            if j == layers and i < n_levels - 1:
                pos = 2 if has_attn else 1
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


def from_compvis(
    state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """The tensors of `key_map` taken from a CompVis `state_dict`, renamed to diffusers keys (same objects, no copy).

    Keys of `state_dict` outside the map (other components, EMA weights, buffers) are ignored; a mapped key that is
    absent raises Ei2Error naming `source`.
    """
    missing = [c for c in key_map.values() if c not in state_dict]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise Ei2Error(
            f"{source} lacks {len(missing)} of the {len(key_map)} tensors expected of a Stable Diffusion v1 "
            f"CompVis checkpoint ({shown}); check that it is an SD v1 single-file checkpoint and not truncated"
        )
    return {d: state_dict[c] for d, c in key_map.items()}
