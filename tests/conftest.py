"""Shared test helpers: random weights in the real SD layout, the reference key table, and the tiny model, clip and
finished run that the CLI tests share (session fixtures: made once per pytest run)."""

from pathlib import Path

import pytest
import torch
from tiny_model import write_random_model

from ei2.mini.world import make_demo_clip
from ei2.train import main as train_main

HERE = Path(__file__).resolve().parent
KEYS_TSV = HERE / "data/sd-v1-4-keys.tsv"  # every SD v1-4 tensor: diffusers key, shape, CompVis key
N, SIZE = 4, 64  # the tiny runs' frames and size


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


# --- the CLI tests' tiny model, clip and run ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(model, clip): a tiny random SD model (tests/tiny_model.py) and a 6-frame 64x64 demo clip, side by side in one
    folder with `model1`, a second tiny model of another seed. Tests never write into it (they copy what they break)."""
    root = tmp_path_factory.mktemp("assets")
    write_random_model(root / "model", seed=0)
    write_random_model(root / "model1", seed=1)
    make_demo_clip(root / "clip.gif", n_frames=6, size=SIZE)
    return root / "model", root / "clip.gif"


def cli_argv(args: dict) -> list[str]:
    """{"steps": 2, "edit_prompts": ["a", "b"]} -> ["--steps", "2", "--edit_prompts", "a", "b"]."""
    argv = []
    for k, v in args.items():
        argv += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return argv


@pytest.fixture(scope="session")
def train_argv(assets):
    """train_argv(out, **keys): the command line of a tiny `ei2.train` run into `out` (4 steps, a checkpoint every 2,
    one edit, 2 DDIM steps), any key overridden."""
    model, clip = assets

    def argv(out, **kw) -> list[str]:
        args = {"model": model, "video": clip, "caption": "a red circle moving right", "n_frames": N, "size": SIZE,
                "steps": 4, "inference_steps": 2, "inversion_steps": 2, "checkpoint_every": 2, "output_dir": out,
                "edit_prompts": ["a blue square moving right"], "score": "none", **kw}
        return ["--no-progress"] + cli_argv(args)

    return argv


@pytest.fixture(scope="session")
def tiny_run(assets, train_argv, tmp_path_factory) -> Path:
    """A finished tiny run (train_argv's settings), made with relative model and video paths from the folder that
    holds them. Copy it before changing it."""
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(assets[0].parent)
        train_main(train_argv(out, model="model", video="clip.gif"))
    return out
