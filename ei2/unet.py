"""The Stable Diffusion v1 UNet, written out, taking video-shaped input; inflated for EI² (FFAM + STAM)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class UNetConfig:
    """Field names follow the published unet/config.json, so reading it is a direct copy. Defaults are SD v1-4."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # which down blocks carry transformers (CrossAttnDownBlock2D); the up blocks mirror it in reverse order
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    attention_head_dim: int = 8  # SD v1's config calls the number of heads "attention_head_dim"
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6  # inside the transformer (GroupNorm and LayerNorms), as SD v1
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """A small UNet with SD v1's structure (4 levels, 2 layers, cross-attention) for CPU tests."""
        return cls(sample_size=16, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, attention_head_dim=2,
                   cross_attention_dim=32)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        if "down_block_types" in d:
            kw["cross_attention"] = tuple(t.startswith("CrossAttn") for t in d["down_block_types"])
        return cls(**kw)

    def to_diffusers_dict(self) -> dict:
        """The unet/config.json diffusers writes for this architecture (used to save models in the real layout)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(self.cross_attention)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }
