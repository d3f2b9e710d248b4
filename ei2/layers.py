"""Stable Diffusion's image layers that video inflation leaves unchanged (pseudo-3D: they see frames as a batch of
images), named as in the published checkpoint: the timestep embedding, the feed-forward (GEGLU) and the resamplers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps t (b,) -> (b, dim), as SD (DDPM / Transformer positional encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def recomputed(fn, *args):
    """fn(*args), keeping only args for the backward pass, which runs fn again: for the cheap elementwise tails of a
    block (GroupNorm + SiLU, GEGLU's gate) whose outputs would otherwise be kept, in full, for every layer."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)
        self.recompute = False  # UNet.recompute_activations

    def forward(self, x):
        h = self.proj(x)  # (..., 2 inner): value and gate
        if self.recompute and self.training:  # keep h only; gelu(gate) (another inner per token) is recomputed
            return recomputed(_geglu, h)
        return _geglu(h)


def _geglu(h):
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.0 GEGLU, net.1 dropout (no weights), net.2 output Linear: keys match the checkpoint's "ff.net.{0,2}"
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
