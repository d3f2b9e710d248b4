"""GroupNorm and LayerNorm that keep a bf16 / fp16 input in its dtype under autocast.

CUDA's autocast policy runs group_norm and layer_norm in fp32 and returns fp32, although their kernels accumulate the
statistics in fp32 for a bf16 input anyway and every layer after them computes in bf16 again. The fp32 output costs
twice the memory where the backward pass keeps it (SiLU after each ResNet GroupNorm keeps its input) and twice the
traffic of every elementwise op up to the next cast. These layers run the kernel on the low-precision input and
return that dtype: the statistics stay fp32, only the output is rounded (as CPU autocast and pure-bf16 inference
already do). fp32 inputs, and any input without autocast, take the plain nn.Module path. Same parameter names, so
checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOW = (torch.bfloat16, torch.float16)


def _autocast_off(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _affine(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p.to(x.dtype)  # frozen weights are stored in x's dtype already: no copy


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """F.group_norm, in x's dtype when x is bf16 / fp16 (statistics in fp32 inside the kernel)."""
    if x.dtype in LOW and x.device.type in ("cuda", "cpu"):
        with _autocast_off(x):
            return F.group_norm(x, groups, _affine(weight, x), _affine(bias, x), eps)
    return F.group_norm(x, groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in LOW and x.device.type in ("cuda", "cpu"):
            with _autocast_off(x):
                return F.layer_norm(x, self.normalized_shape, _affine(self.weight, x), _affine(self.bias, x),
                                    self.eps)
        return super().forward(x)
