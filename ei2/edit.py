"""`python -m ei2.edit`: render new edits from a finished run, without tuning again.

    python -m ei2.edit --run runs/demo --prompt "a blue square moving right on a white background"
    python -m ei2.edit --run runs/demo --prompt "..." --prompt "..." --guidance 10 --steps 50

Loads the run's base model, its small tuned checkpoint and its cached inverted latent (x_T), renders each prompt with
classifier-free guided DDIM (Eq. 1), and adds the videos to the run's edits/ and edits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config import check_value, load_config, video_options
from .errors import Ei2Error, cli_main
from .files import slug, write_json
from .pipeline import load_models, render, resolve_device, resolve_precision
from .tuned import load_tuned
from .video import to_uint8, write_clip
from .weights import read_state_dict


def edit(run_dir, prompts: list[str], guidance: float | None = None, steps: int | None = None,
         device: str | None = None, precision: str | None = None, progress: bool = True) -> list[dict]:
    """Render `prompts` from the run in `run_dir`; returns the new entries of edits.json."""
    for key, flag, value in (("inference_steps", "--steps", steps), ("guidance", "--guidance", guidance)):
        if value is not None:  # the config's range table, before anything is read
            check_value(key, value, flag)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise Ei2Error(f"{run_dir} is not a finished ei2 run (no config.yaml); run python -m ei2.train first")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise Ei2Error(f"prompt {i + 1} is empty; write the edit, e.g. --prompt \"a cat surfing\"")
    cfg = load_config(run_dir / "config.yaml")
    guidance = cfg.guidance if guidance is None else guidance
    steps = cfg.inference_steps if steps is None else steps
    check_value("inference_steps", steps, "--steps")
    check_value("guidance", guidance, "--guidance")
    dev = resolve_device(device or cfg.device)
    models = load_models(cfg.model, video_options(cfg), dev, resolve_precision(precision or cfg.precision, dev))
    load_tuned(models.unet, run_dir / "tuned.safetensors")
    models.unet.eval()
    x_T = read_state_dict(run_dir / "inverted.safetensors")["latent"]
    torch.manual_seed(cfg.seed)

    listing = run_dir / "edits.json"
    entries = json.loads(listing.read_text()) if listing.is_file() else []
    new = []
    for prompt in prompts:
        video = to_uint8(render(models, x_T, prompt, guidance, steps, progress=progress))
        stem = f"{len(entries):02d}-{slug(prompt)}"
        files = write_clip(video, run_dir / "edits" / stem, cfg.fps)
        entry = {"prompt": prompt, **{k: f"edits/{v}" for k, v in files.items()}, "seed": cfg.seed,
                 "guidance": guidance, "steps": steps}
        entries.append(entry)
        new.append(entry)
        write_json(entries, listing)
    return new


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ei2.edit", description=__doc__.split("\n\n")[0],
                                epilog="Outputs go to <run>/edits/ (mp4 + gif per prompt) and <run>/edits.json.")
    p.add_argument("--run", required=True, help="output directory of a finished `python -m ei2.train` run")
    p.add_argument("--prompt", action="append", required=True, help="edit prompt (repeat for several)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="DDIM sampling steps (default: the run's)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    p.add_argument("--precision", default=None, help="auto, fp32, bf16, fp16 (default: the run's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for e in edit(args.run, args.prompt, args.guidance, args.steps, args.device, args.precision,
                  progress=not args.no_progress):
        print(f"{e['prompt']!r}: {Path(args.run) / e['mp4']}")


if __name__ == "__main__":
    main(sys.argv[1:])
