"""The benchmark's models and training levers: ei2's and diffusers' UNets with identical seeded random weights, the
paper's variants, one tuning step, its FLOP count, and the rows of section 2 (which levers a step uses). The trainable
set, the frozen low-precision weights and AdamW are the training job's own (ei2.unet, ei2.pipeline)."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import diffusers_reference as reference
from ei2.config import TrainConfig
from ei2.pipeline import freeze_to_dtype_, make_optimizer
from ei2.unet import VARIANTS, UNet, UNetConfig, VideoOptions, is_temporal_key, mark_trainable

from .core import Settings

JOB_DEFAULTS = TrainConfig()  # the training job's defaults: AdamW's lr and weight decay, recompute_activations
LR, WEIGHT_DECAY = JOB_DEFAULTS.learning_rate, JOB_DEFAULTS.weight_decay


# ----------------------------------------------------------------------------------------------------------------------
# Models with identical random weights


@torch.no_grad()
def init_sd_weights_(model: nn.Module, seed: int = 0, skip: Callable[[str], bool] = is_temporal_key) -> nn.Module:
    """Seeded random values for every parameter, each from its own generator seeded by (seed, name), so two models
    with the same parameter names (ei2's UNet and diffusers') get identical weights whatever their order. Scales keep
    activations O(1) through the depth (weights ~ N(0, 1/fan_in), norm weights ~ 1, biases ~ 0.05): with PyTorch's
    default init activations shrink, and small floats (denormals) would make CPU timings meaningless.
    `skip(name)` keeps a parameter's own init (default: ei2's new temporal modules, which SD does not hold)."""
    for name, p in model.named_parameters():
        if skip(name):
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.05 * noise)
        else:
            p.copy_(0.05 * noise)
    return model


def diffusers_version() -> str | None:
    """None without diffusers: the reference columns then read n/a."""
    return reference.version()


def diffusers_available() -> bool:
    return diffusers_version() is not None


def reference_unet(config: UNetConfig, seed: int = 0) -> nn.Module:
    """diffusers' UNet2DConditionModel with the architecture of `config` and `init_sd_weights_` (CPU, fp32)."""
    return init_sd_weights_(reference.unet(config), seed)


def ei2_unet(config: UNetConfig, seed: int = 0, **video) -> UNet:
    """ei2's UNet with `init_sd_weights_` (CPU, fp32); its temporal modules keep their fresh init, as when loading
    SD."""
    return init_sd_weights_(UNet(config, VideoOptions(**video)), seed)


# The variants the bench measures, from ei2's one table, as VideoOptions keyword arguments (rows derive others).
IMAGE = dataclasses.asdict(VARIANTS["untuned"].video)  # exactly SD's image UNet, per frame
EI2 = dataclasses.asdict(VARIANTS["ei2"].video)  # the paper's model (Tune-A-Video's video GroupNorm)


# ----------------------------------------------------------------------------------------------------------------------
# Training levers


def channels_last_(model: nn.Module) -> nn.Module:
    """NHWC layout for the 4-D weights (convolutions); tensor cores and oneDNN prefer it."""
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def tuning_step(model: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """One step of Eq. 2's loss: MSE(eps_theta(x_t, t, c), eps), backward, AdamW. Returns the loss, detached; nothing
    here waits for the device (no .item())."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        pred = model(x, t, context)
    loss = F.mse_loss(pred.float(), target.float())
    loss.backward()
    optimizer.step()
    return loss.detach()


def tuning_flops(config: UNetConfig, frames: int, latent: int, video: dict | None = EI2) -> int:
    """FLOPs of one tuning step's forward and backward (AdamW's are negligible) with the paper's trainable set, for
    ei2's UNet with `video` options (default the EI² model) or, with video=None, diffusers frame by frame: counted by
    torch's FlopCounterMode (matrix products, convolutions, attention) on the meta device, where tensors have shapes
    and no values, so the count is exact for the shapes, takes seconds and needs no GPU. Attention is counted as its
    two products forward and the products the needed gradients take backward; a fused GPU kernel may do a little more
    (it recomputes the scores). Gradient checkpointing's recomputation is not counted ("model FLOPs")."""
    ei2 = video is not None
    with torch.device("meta"):
        model = UNet(config, VideoOptions(**video)) if ei2 else reference.unet(config)
        x = torch.randn(1, 4, frames, latent, latent) if ei2 else torch.randn(frames, 4, latent, latent)
        ctx = torch.randn(1 if ei2 else frames, 77, config.cross_attention_dim)
        t = torch.tensor(500)
    mark_trainable(model)  # the same names in diffusers' UNet: attn1.to_q, attn2.to_q
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x, t, ctx)
        (out if ei2 else out.sample).float().square().mean().backward()
    return counter.get_total_flops()


def share_weights_(dst: nn.Module, src: nn.Module, fresh: Callable[[str], bool] = is_temporal_key) -> nn.Module:
    """Make `dst`'s parameters the very tensors of `src` (same names: ei2 and diffusers UNets, or two ei2 variants),
    so several models cost the memory of one. Only keys with `fresh(key)` may be missing from `src`."""
    own, theirs = dst.state_dict(), src.state_dict()
    missing = [k for k in own if k not in theirs and not fresh(k)]
    unexpected = [k for k in theirs if k not in own and not fresh(k)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dst.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False, assign=True)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# The rows of section 2: which levers a tuning step uses


@dataclass
class Lever:
    """One row of section 2: which training levers both sides use."""

    name: str
    amp: torch.dtype | None = None  # autocast dtype
    frozen_low: bool = False  # freeze_to_dtype_
    checkpointing: bool = False
    recompute: bool = False  # ei2's recompute_activations (diffusers has no counterpart: reference n/a)
    channels_last: bool = False
    compile: bool = False


def levers(s: Settings) -> list[Lever]:
    """Base precision; frozen low-precision weights; + recompute activations (with frozen weights: the training job's
    default mode); + gradient checkpointing (its memory-saving mode, a target of its own); + channels_last and
    + torch.compile when asked."""
    low, name = s.low, s.dtype
    rows = [Lever(f"tuning step ({'fp32' if low is None else name + ' autocast'})", amp=low)]
    if low is not None:
        rows.append(Lever(f"tuning step (frozen {name}, fp32 trainable)", amp=low, frozen_low=True))
    prefix = f"frozen {name} + " if low is not None else ""
    frozen = low is not None
    rows.append(Lever(f"tuning step ({prefix}recompute activations)", amp=low, frozen_low=frozen, recompute=True))
    rows.append(Lever(f"tuning step ({prefix}gradient checkpointing)", amp=low, frozen_low=frozen, checkpointing=True))
    if s.channels_last:
        rows.append(Lever(f"tuning step ({prefix}channels_last)", amp=low, frozen_low=frozen, channels_last=True))
    if s.compile:
        rows.append(Lever(f"tuning step ({prefix}torch.compile)", amp=low, frozen_low=frozen, compile=True))
    return rows


def prepare_for_tuning(model: nn.Module, lever: Lever, device: torch.device, ei2: bool):
    """Trainable set, levers, device and optimizer for one side; returns (callable model, optimizer, trainable
    count)."""
    count = mark_trainable(model)  # diffusers' UNet has the same attn1.to_q / attn2.to_q names
    model.to(device).train()
    if lever.frozen_low:
        freeze_to_dtype_(model, lever.amp)
    if lever.channels_last:
        channels_last_(model)
    if lever.recompute and ei2:
        model.recompute_activations = True
    if lever.checkpointing:
        if ei2:
            model.gradient_checkpointing = True
        else:
            model.enable_gradient_checkpointing()
    opt = make_optimizer(model, LR, WEIGHT_DECAY)  # the training job's: fused on CUDA, both sides alike
    fn = compile_model(model) if lever.compile else model
    return fn, opt, count
