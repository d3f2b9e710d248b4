"""Shared test helpers: random weights in the real SD layout, and the reference key table."""

from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KEYS_TSV = HERE / "data/sd-v1-4-keys.tsv"  # every SD v1-4 tensor: diffusers key, shape, CompVis key


def sd_keys(component: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows (diffusers key, shape, CompVis key) of the SD v1-4 key table for one component."""
    rows = []
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        comp, key, shape, compvis = line.split("\t")
        if comp == component:
            rows.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), compvis))
    return rows


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter seeded random values (norm weights around 1), so no tensor is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * scale
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + noise)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        else:
            p.copy_(noise)
    return module


def diffusers_unet(config, seed: int = 0):
    """A diffusers UNet2DConditionModel with the architecture of an ei2 UNetConfig and seeded random weights."""
    from diffusers import UNet2DConditionModel

    kw = {k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")}
    return randomize(UNet2DConditionModel(**kw), seed).eval()
