"""The Stable Diffusion v1 autoencoder (AutoencoderKL): images (b, 3, H, W) in [-1, 1] <-> latents (b, 4, H/8, W/8).

Module names mirror the diffusers checkpoint, so loading is an identity map (`ei2.weights.load_exact`). Two
spellings need translating first: the published vae file names its mid-block attention query/key/value/proj_attn
(new saves: to_q/to_k/to_v/to_out.0), and the CompVis single file uses its own names and 1x1-conv attention weights;
both translations live in ei2/weights.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import Ei2Error
from .weights import load_exact, open_component, vae_state_dict

EPS = 1e-6  # every GroupNorm of the SD VAE (ResNets, attention, output) uses 1e-6, not PyTorch's default 1e-5


@dataclass
class VAEConfig:
    """Field names follow the published vae/config.json, so reading it is a direct copy. Defaults are SD v1-4."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A small VAE with SD's structure (4 levels, 2 layers, shortcut convs at the same levels) for CPU tests."""
        return cls(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=32)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        n = len(kw.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in d and list(d[key]) != [kind] * n:
                raise Ei2Error(f"unsupported VAE config: {key} {d[key]} (ei2 implements {n} x {kind})")
        for key, value in (("act_fn", "silu"), ("mid_block_add_attention", True), ("use_quant_conv", True),
                           ("use_post_quant_conv", True), ("shift_factor", None)):
            if d.get(key, value) != value:  # variants of later models (SDXL, SD3, ...) that SD v1 never uses
                raise Ei2Error(f"unsupported VAE config: {key}={d[key]!r} (ei2 implements SD v1's {value!r})")
        return cls(**kw)

    def to_diffusers_dict(self) -> dict:
        """The vae/config.json diffusers writes for this architecture (used to save models in the real layout)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
        }


# --- building blocks ---------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in SD; omitted
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (the VAE mid block), with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # to_out.0, as diffusers (to_out.1 is dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (b, h*w, c)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head: (b, 1, hw, c)
        t = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/sqrt(c), as SD
        t = self.to_out[0](t)
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SD pads right and bottom only (asymmetric), then convolves without padding; (1,1,1,1) would shift the grid
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `n` ResNets, then an optional down- or upsampler (diffusers Down/UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < n - 1) for i in range(n)]
        )
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        # the decoder has one more ResNet per level than the encoder
        self.up_blocks = nn.ModuleList(
            [Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < n - 1) for i in range(n)]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2) per latent element, from its (b, 2*latent, h, w) output."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as SD: keeps exp() finite for untrained or extreme inputs
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # draw on the generator's device (a CPU generator gives the same numbers on any device), as diffusers does
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class AutoencoderKL(nn.Module):
    """encode/decode work in the VAE's own latent scale (as diffusers); encode_latents/decode_latents apply
    `scaling_factor`, giving the latents the UNet sees."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1)
        self.post_quant_conv = nn.Conv2d(lat, lat, 1)

    def encode(self, images: torch.Tensor, chunk: int | None = None) -> DiagonalGaussian:
        """images (b, 3, H, W) in [-1, 1] -> posterior over (b, latent, H/8, W/8). `chunk` images at a time bound the
        memory of long clips (every layer works per image, so the numbers do not change)."""
        images = images.to(self.quant_conv.weight.dtype)
        step = chunk or len(images)
        moments = [self.quant_conv(self.encoder(images[i:i + step])) for i in range(0, len(images), step)]
        return DiagonalGaussian(torch.cat(moments))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [-1, 1] scale (not clamped)."""
        latents = latents.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(latents))

    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        post = self.encode(images)
        return (post.sample(generator) if sample else post.mean) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents / self.config.scaling_factor)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, config: VAEConfig | None = None
    ) -> "AutoencoderKL":
        """Load from an SD folder (diffusers layout), its vae/ folder, or a single-file CompVis checkpoint.
        `config` overrides the folder's config.json (a single file has none: SD v1-4's is the default)."""
        comp = open_component(path, "vae")
        if config is None:
            config = VAEConfig.from_dict(comp.config) if comp.config is not None else VAEConfig()
        sd = vae_state_dict(comp, config)
        try:
            model = cls(config)
        except (ValueError, TypeError) as e:  # e.g. channels not divisible by norm_num_groups
            raise Ei2Error(f"invalid VAE config for {comp.weights} ({e})") from None
        load_exact(model, sd, source=str(comp.weights))
        return model.to(dtype).eval().requires_grad_(False)
