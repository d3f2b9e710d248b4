"""The Stable Diffusion v1 UNet, written out, taking video-shaped input; inflated for EI² (FFAM + STAM)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import (FRAME_ATTENTIONS, TEMPORAL_NORMS, Attention, FrameAttention, SpectralNormLinear,
                        temporal_module)
from .errors import Ei2Error
from .layers import GEGLU, Downsample, FeedForward, TimestepEmbedding, Upsample, recomputed, timestep_embedding
from .norms import GroupNorm, LayerNorm, group_norm
from .weights import load_exact, open_component, unet_state_dict


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


TEMPORALS = ("stam", "ta", "none")  # the module after each feed-forward (VideoOptions.temporal)
RESNET_NORMS = ("video", "frame")  # GroupNorm statistics over all frames or per frame


@dataclass
class VideoOptions:
    """How the image UNet is inflated for video (section 4 of the paper; Tune-A-Video for the baseline).

    frame_attention: attn1 of every transformer block, "ffam" (EI², Eq. 10), "sca" (Tune-A-Video), "self" (image SD)
        or "full" (all frames at full resolution).
    ratio: r of FFAM, the stride of the other frames' token grid.
    temporal: the module after each feed-forward, "stam" (EI², Eq. 9), "ta" (Tune-A-Video) or "none".
    temporal_norm, spectral_norm: override the temporal module's normalization / spectral norm (Fig. 4 ablation).
    temporal_norm_trainable: add the temporal norm's affine (norm_temp.weight, .bias of a LayerNorm) to the trainable
        set: Fig. 4's "LayerNorm" row. Tune-A-Video keeps it frozen (False), which makes TA compute what Fig. 4's
        "LayerNorm*" (no learnable weights) computes.
    resnet_norm: "video" computes the GroupNorm statistics of the ResNets and of the output norm (conv_norm_out) over
        all frames jointly, as Tune-A-Video does; "frame" per frame, as the image model. The transformers' GroupNorm
        is always per frame.
    """

    frame_attention: str = "ffam"
    ratio: int = 2
    temporal: str = "stam"
    temporal_norm: str | None = None
    spectral_norm: bool | None = None
    resnet_norm: str = "video"
    temporal_norm_trainable: bool = False

    def __post_init__(self):
        checks = [
            ("frame_attention", self.frame_attention, FRAME_ATTENTIONS),
            ("temporal", self.temporal, TEMPORALS),
            ("temporal_norm", self.temporal_norm, (None,) + TEMPORAL_NORMS),
            ("resnet_norm", self.resnet_norm, RESNET_NORMS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise Ei2Error(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")
        if not (isinstance(self.ratio, int) and self.ratio >= 1):
            raise Ei2Error(f"ratio={self.ratio!r}: the FFAM ratio r must be an integer >= 1")
        if not isinstance(self.temporal_norm_trainable, bool):
            raise Ei2Error(f"temporal_norm_trainable={self.temporal_norm_trainable!r} is not true or false")


@dataclass(frozen=True)
class Variant:
    """A variant of the paper: `label` as tables print it, `paper` the paper's name, `module` its temporal module alone
    (for tools that set the frame attention themselves), its VideoOptions (copy them with dataclasses.replace)."""

    label: str
    paper: str
    module: str
    video: VideoOptions
    tuned: bool = True  # False: the image model as loaded, no tuning


_TA = "Tune-A-Video TA: LayerNorm (affine frozen), plain W_v, W_L (W_L = 0 at creation)"
_STAM = "EI² STAM: Instance Centering, spectral norm, b = 0 at creation"
_SCA, _FFAM = dict(frame_attention="sca"), dict(frame_attention="ffam", ratio=2)


def _fig4(label: str, paper: str, module: str, norm: str, **kw) -> Variant:  # SCA + TA with another norm, no SN
    video = VideoOptions(**_SCA, temporal="ta", temporal_norm=norm, spectral_norm=False, **kw)
    return Variant(f"SCA + TA, {label}", f"Fig. 4 {paper}", module, video)


# The paper's variants, read by every tool: ei2.mini.benchmark --methods (the keys), ei2.diagnose --compare (by temporal
# module), ei2.evaluate (Table 1's names), benchmarks/bench. Tune-A-Video keeps its LayerNorm's affine frozen at the
# identity, so `tav` computes what Fig. 4's "LayerNorm*" computes.
VARIANTS: dict[str, Variant] = {
    "ei2": Variant("EI² (FFAM r=2 + STAM)", "EI² (FFAM + STAM)", _STAM, VideoOptions(**_FFAM, temporal="stam")),
    "tav": Variant("Tune-A-Video (SCA + TA, LayerNorm, affine frozen)", "Tune-A-Video (SCA + TA)", _TA,
                   VideoOptions(**_SCA, temporal="ta")),
    "sca_stam": Variant("SCA + STAM (TAV with TA -> STAM)", "SCA + STAM", _STAM, VideoOptions(**_SCA, temporal="stam")),
    "ffam_ta": Variant("FFAM r=2 + TA (EI² with STAM -> TA)", "FFAM + TA", _TA, VideoOptions(**_FFAM, temporal="ta")),
    "ta_ln": _fig4("LayerNorm with its affine tuned (Fig. 4 LayerNorm)", "LayerNorm",
                   "TA with LayerNorm's affine tuned (Fig. 4 LayerNorm)", "layernorm", temporal_norm_trainable=True),
    "ta_ln_noaffine": _fig4("LayerNorm w/o affine (Fig. 4 LayerNorm*)", "LayerNorm*",
                            "TA with LayerNorm without affine (Fig. 4 LayerNorm*)", "layernorm_noaffine"),
    "ta_no_norm": _fig4("no norm (Fig. 4)", "No Norm", "TA without norm (Fig. 4)", "none"),
    "ta_instancenorm": _fig4("InstanceNorm (Fig. 4)", "InstanceNorm", "TA with InstanceNorm over frames (Fig. 4)",
                             "instancenorm"),
    "ta_ic": _fig4("Instance Centering, no SN (Fig. 4)", "IC (without spectral norm)",
                   "TA with Instance Centering, no spectral norm (Fig. 4)", "ic"),
    "untuned": Variant("image model frame by frame, untuned (floor)", "the image model (SD v1-4)", "none",
                       VideoOptions(frame_attention="self", temporal="none", resnet_norm="frame"), tuned=False),
}


# --- Building blocks, named as in the published checkpoint -------------------------------------------------------------


class VideoGroupNorm(GroupNorm):
    """GroupNorm whose statistics span all n frames of a video (Tune-A-Video's inflated ResNets) when `video`."""

    def __init__(self, groups: int, channels: int, eps: float, video: bool = True):
        super().__init__(groups, channels, eps=eps)
        self.video = video

    def forward(self, x: torch.Tensor, n: int = 1) -> torch.Tensor:
        if n == 1 or not self.video:
            return super().forward(x)
        bn, c, h, w = x.shape
        # (b*n, c, h, w) -> (b, c, n*h*w): group statistics over frames and pixels together
        y = x.view(bn // n, n, c, h * w).transpose(1, 2).reshape(bn // n, c, n * h * w)
        y = group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.view(bn // n, c, n, h * w).transpose(1, 2).reshape(bn, c, h, w)


class ResnetBlock(nn.Module):
    """SD's ResNet block with the time embedding added between the two 3x3 convolutions (pseudo-3D: per frame)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, video_norm: bool = True):
        super().__init__()
        self.recompute = False  # UNet.recompute_activations
        self.norm1 = VideoGroupNorm(groups, in_ch, eps, video_norm)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = VideoGroupNorm(groups, out_ch, eps, video_norm)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb, n: int = 1):
        h = self.conv1(self._norm_act(self.norm1, x, n))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self._norm_act(self.norm2, h, n))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))

    def _norm_act(self, norm, x, n):
        """SiLU(GroupNorm(x)). With `recompute` its output, which SiLU's backward would keep, is rebuilt from x."""
        if self.recompute and self.training:
            return recomputed(lambda x: F.silu(norm(x, n)), x)
        return F.silu(norm(x, n))


class BasicTransformerBlock(nn.Module):
    """Eq. 4 three times (frame attention, cross-attention, feed-forward), then the temporal module (Eq. 9 for STAM):
    z <- z + attn1(norm1 z); z <- z + attn2(norm2 z, c); z <- z + ff(norm3 z); z <- z + attn_temp(norm_temp z)."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float, video: VideoOptions):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = FrameAttention(dim, heads, mode=video.frame_attention, ratio=video.ratio)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)
        if video.temporal == "none":
            self.norm_temp = self.attn_temp = None
        else:
            # the level's head count, as Tune-A-Video's attn_temp (SD v1-4: 8 heads at every level)
            self.norm_temp, self.attn_temp = temporal_module(video.temporal, dim, heads, video.temporal_norm,
                                                             video.spectral_norm)

    def forward(self, x, context, n: int, hw: tuple[int, int]):
        x = x + self.attn1(self.norm1(x), n, hw)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        if self.attn_temp is not None:  # with one frame IC(z) = 0, so STAM is then the identity (b starts at 0)
            bn, l, d = x.shape
            # (b*n, l, d) -> (b*l, n, d): the n frames at each spatial location form one sequence. contiguous(): with
            # b = 1 the reshape is a strided view, and each of W_q, W_k, W_v would then copy (and keep for the
            # backward pass) its own contiguous input; one copy here serves all three
            z = x.view(bn // n, n, l, d).transpose(1, 2).reshape(-1, n, d).contiguous()
            z = z + self.attn_temp(self.norm_temp(z))
            x = z.view(bn // n, l, n, d).transpose(1, 2).reshape(bn, l, d)  # a copy back to frame-major order
        return x


class Transformer2D(nn.Module):
    """SD's spatial transformer: GroupNorm (per frame), 1x1 proj_in, the blocks over h*w tokens, 1x1 proj_out, residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int, eps: float, video: VideoOptions):
        super().__init__()
        self.norm = GroupNorm(groups, dim, eps=eps)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, context_dim, eps, video)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, n: int = 1):
        bn, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.permute(0, 2, 3, 1).reshape(bn, h * w, c)  # (b*n, c, h, w) -> (b*n, h*w, c) tokens
        for block in self.transformer_blocks:
            y = block(y, context, n, (h, w))
        y = y.view(bn, h, w, c).permute(0, 3, 1, 2)  # tokens -> (b*n, c, h, w)
        return self.proj_out(y) + x


class Level(nn.Module):
    """One resolution of the UNet (a down or an up block): resnets, optional transformers, optional resampler."""

    def __init__(self, resnets, attentions, sampler_name: str | None, sampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if sampler_name:
            setattr(self, sampler_name, nn.ModuleList([sampler]))


# --- The UNet ----------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The SD v1 UNet over video: sample (b, 4, n, h, w), timestep, text (b, 77, 768) -> noise (b, 4, n, h, w).

    Frames travel as a batch of images (b*n, c, h, w) through every 2D layer (pseudo-3D convolutions); the video
    modules (FFAM / SCA in attn1, STAM / TA after the feed-forward, ResNet GroupNorm over frames) see the frames
    together. With n = 1 this is exactly SD's image UNet.
    """

    def __init__(self, config: UNetConfig = UNetConfig(), video: VideoOptions = VideoOptions()):
        super().__init__()
        self.config, self.video = config, video
        self.gradient_checkpointing = False
        c = config
        ch = c.block_out_channels
        temb = ch[0] * 4
        heads, groups = c.attention_head_dim, c.norm_num_groups

        def resnet(i, o):
            return ResnetBlock(i, o, temb, groups, c.norm_eps, video.resnet_norm == "video")

        def transformer(d):
            return Transformer2D(d, heads, c.cross_attention_dim, groups, c.transformer_norm_eps, video)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            inp = ch[max(i - 1, 0)]
            last = i == len(ch) - 1
            self.down_blocks.append(Level(
                [resnet(inp if j == 0 else out, out) for j in range(c.layers_per_block)],
                [transformer(out) for _ in range(c.layers_per_block)] if c.cross_attention[i] else None,
                None if last else "downsamplers", None if last else Downsample(out)))

        self.mid_block = Level([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])], [transformer(ch[-1])], None, None)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        for i, out in enumerate(rev):
            prev = rev[max(i - 1, 0)]
            skip_in = rev[min(i + 1, len(ch) - 1)]  # channels of the down block's input at this level
            last = i == len(ch) - 1
            layers = c.layers_per_block + 1
            self.up_blocks.append(Level(
                [resnet((prev if j == 0 else out) + (skip_in if j == layers - 1 else out), out) for j in range(layers)],
                [transformer(out) for _ in range(layers)] if c.cross_attention[::-1][i] else None,
                None if last else "upsamplers", None if last else Upsample(out)))

        # Tune-A-Video normalizes the 5-D video here too: statistics over all frames, as the ResNets' (resnet_norm)
        self.conv_norm_out = VideoGroupNorm(groups, ch[0], c.norm_eps, video.resnet_norm == "video")
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        self.spectral_norms = [m for m in self.modules() if isinstance(m, SpectralNormLinear)]
        for m in self.spectral_norms:
            m.iterate_in_forward = False

    @property
    def recompute_activations(self) -> bool:
        """Selective recomputation: the ResNets' GroupNorm + SiLU and the feed-forwards' GEGLU gate are rebuilt in the
        backward pass instead of kept (elementwise work; 1.3 GiB of the 7.8 kept at 8 frames of 512², see
        benchmarks/saved_activations.py). Gradient checkpointing (`gradient_checkpointing`) recomputes whole
        blocks instead."""
        return any(m.recompute for m in self.modules() if isinstance(m, (ResnetBlock, GEGLU)))

    @recompute_activations.setter
    def recompute_activations(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, (ResnetBlock, GEGLU)):
                m.recompute = bool(on)

    def _run(self, module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:
            for m in self.spectral_norms:  # one power iteration per training forward (Eq. 8), none in eval
                m.power_iteration(1)
        b, _, n, h, w = sample.shape
        # (b, c, n, h, w) -> (b*n, c, h, w): frames of a video stay consecutive
        x = sample.transpose(1, 2).reshape(b * n, -1, h, w)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                                     self.config.freq_shift).to(x.dtype))
        emb = emb.repeat_interleave(n, dim=0)  # (b, temb) -> (b*n, temb)
        context = encoder_hidden_states.repeat_interleave(n, dim=0)  # (b, 77, 768) -> (b*n, 77, 768)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                x = self._run(res, x, emb, n)
                if block.attentions is not None:
                    x = self._run(block.attentions[j], x, context, n)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self._run(self.mid_block.resnets[0], x, emb, n)
        x = self._run(self.mid_block.attentions[0], x, context, n)
        x = self._run(self.mid_block.resnets[1], x, emb, n)

        for block in self.up_blocks:
            for j, res in enumerate(block.resnets):
                x = self._run(res, torch.cat([x, skips.pop()], dim=1), emb, n)
                if block.attentions is not None:
                    x = self._run(block.attentions[j], x, context, n)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x, skips[-1].shape[-2:])

        x = self.conv_out(F.silu(self.conv_norm_out(x, n)))
        return x.view(b, n, -1, h, w).transpose(1, 2)  # (b*n, c, h, w) -> (b, c, n, h, w)

    # --- Loading and the trainable set -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", config: UNetConfig | None = None,
                        **video_options) -> "UNet":
        """SD weights from a diffusers folder (`path/unet/`), the unet folder itself, or a single CompVis checkpoint.

        `config` overrides the folder's config.json (a single file has none: SD v1-4's is the default).
        `video_options` are the fields of VideoOptions (frame_attention, ratio, temporal, temporal_norm,
        spectral_norm, resnet_norm, temporal_norm_trainable). The temporal modules are not in SD's file: they are
        created fresh."""
        unknown = set(video_options) - set(VideoOptions.__dataclass_fields__)
        if unknown:
            raise Ei2Error(f"unknown video option(s) {sorted(unknown)}; valid: {list(VideoOptions.__dataclass_fields__)}")
        component = open_component(path, "unet")
        if config is None:
            config = UNetConfig.from_dict(component.config) if component.config else UNetConfig()
        model = cls(config, VideoOptions(**video_options))
        load_exact(model, unet_state_dict(component, config), f"UNet weights {component.weights}", fresh=is_temporal_key)
        return model.to(device=device, dtype=dtype)


def is_temporal_key(name: str) -> bool:
    """Tensors of the temporal modules (STAM / TA), which an image checkpoint does not hold."""
    return ".attn_temp." in name or ".norm_temp." in name


def is_trainable_key(name: str, temporal_norm: bool = False) -> bool:
    """The paper's trainable set (section 5): W_Q of FFAM (attn1.to_q) and of cross-attention (attn2.to_q), and every
    parameter of the temporal attention (STAM; for `ta` Tune-A-Video's attn_temp). Norms stay frozen, except the
    temporal norm's affine with `temporal_norm` (VideoOptions.temporal_norm_trainable, Fig. 4's "LayerNorm")."""
    return (name.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".attn_temp." in name
            or (temporal_norm and ".norm_temp." in name))


def mark_trainable(unet: nn.Module) -> int:
    """Freeze everything but the paper's trainable set (with the temporal norm's affine when the UNet's VideoOptions
    say temporal_norm_trainable); return the number of trainable parameters."""
    video = getattr(unet, "video", None)
    temporal_norm = bool(video is not None and video.temporal_norm_trainable)
    count = 0
    for name, p in unet.named_parameters():
        p.requires_grad_(is_trainable_key(name, temporal_norm))
        count += p.numel() if p.requires_grad else 0
    return count
