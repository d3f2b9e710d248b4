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

from .cache import ModelCache
from .config import check_value, load_config
from .errors import Ei2Error, cli_main
from .files import RunLock, check_writable_dir, clean_stale_temp_files, slug, write_json
from .pipeline import render, resolve_device, resolve_precision
from .tuned import check_run_parts, read_tuned_metadata
from .video import to_uint8, write_clip
from .weights import check_sd_folder, read_state_dict


# the parts of a run that ei2.edit reads, and what each is
PARTS = {"config.yaml": "the run's settings", "tuned.safetensors": "the tuned weights",
         "inverted.safetensors": "the inverted latent x_T"}


def edit(run_dir, prompts: list[str], guidance: float | None = None, steps: int | None = None,
         device: str | None = None, precision: str | None = None, progress: bool = True,
         force: bool = False, *, cache: ModelCache | None = None, on_event=None) -> list[dict]:
    """Render `prompts` from the run in `run_dir`; returns the new entries of edits.json. The run's parts are checked
    to belong together first (`check_run_parts`; `force` renders anyway, with a warning).

    cache: an `ei2.cache.ModelCache` whose base models are reused (only the tuned tensors are swapped in); None loads
    them. on_event(dict): {"phase": "load"}, then per rendered prompt {"phase": "edit", "index" (0-based among
    `prompts`), "of", "prompt", "video" (absolute path of the mp4), "scores": None}, and {"phase": "done",
    "run_dir"}."""
    for key, flag, value in (("inference_steps", "--steps", steps), ("guidance", "--guidance", guidance)):
        if value is not None:  # the config's range table, before anything is read
            check_value(key, value, flag)
    if device is not None:
        resolve_device(device)  # a device this machine has, before anything is read
    if precision is not None:
        resolve_precision(precision, torch.device("cpu"))  # one of PRECISIONS
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise Ei2Error(f"run folder not found: {run_dir}; give --run the output_dir of a `python -m ei2.train` run")
    missing = [f"{name} ({what})" for name, what in PARTS.items() if not (run_dir / name).is_file()]
    if missing:
        raise Ei2Error(f"{run_dir} is not a finished ei2 run: missing {', '.join(missing)}; run python -m ei2.train "
                       f"with output_dir {run_dir} (or --resume it if it was interrupted)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise Ei2Error(f"prompt {i + 1} is empty; write the edit, e.g. --prompt \"a cat surfing\"")
    check_writable_dir(run_dir, "run folder")
    with RunLock(run_dir):  # never two writers in one run (a train or another edit)
        clean_stale_temp_files(run_dir)
        return edit_locked(run_dir, prompts, guidance, steps, device, precision, progress, force, cache, on_event)


def edit_locked(run_dir: Path, prompts: list[str], guidance, steps, device, precision, progress: bool,
                force: bool = False, cache: ModelCache | None = None, on_event=None) -> list[dict]:
    """`edit` once the run folder is checked writable and locked."""
    on_event = on_event or (lambda event: None)
    cfg = load_config(run_dir / "config.yaml")
    guidance = cfg.guidance if guidance is None else guidance
    steps = cfg.inference_steps if steps is None else steps
    check_value("inference_steps", steps, "--steps")
    check_value("guidance", guidance, "--guidance")
    dev = resolve_device(device or cfg.device)
    tuned = run_dir / "tuned.safetensors"
    x_T = read_state_dict(run_dir / "inverted.safetensors").get("latent")
    if x_T is None:
        raise Ei2Error(f"{run_dir / 'inverted.safetensors'} holds no 'latent' tensor; run python -m ei2.train again")
    check_sd_folder(cfg.model)
    check_run_parts(read_tuned_metadata(tuned), tuned, cfg.model, x_T.shape, force)
    on_event({"phase": "load"})
    precision = resolve_precision(precision or cfg.precision, dev)
    models = (cache or ModelCache()).models_for_run(run_dir, str(dev), precision)
    torch.manual_seed(cfg.seed)

    listing = run_dir / "edits.json"
    entries = complete_listing(run_dir, json.loads(listing.read_text()) if listing.is_file() else [])
    new = []
    for i, prompt in enumerate(prompts):
        video = to_uint8(render(models, x_T, prompt, guidance, steps, progress=progress))
        stem = f"{next_index(run_dir, entries):02d}-{slug(prompt)}"
        files = write_clip(video, run_dir / "edits" / stem, cfg.fps)
        entry = {"prompt": prompt, **{k: f"edits/{v}" for k, v in files.items()}, "seed": cfg.seed,
                 "guidance": guidance, "steps": steps}
        entries.append(entry)
        new.append(entry)
        write_json(entries, listing)
        on_event({"phase": "edit", "index": i, "of": len(prompts), "prompt": prompt,
                  "video": str((run_dir / entry["mp4"]).resolve()), "scores": None})
    on_event({"phase": "done", "run_dir": str(run_dir.resolve())})
    return new


def complete_listing(run_dir: Path, entries: list[dict]) -> list[dict]:
    """edits.json's entries plus one for every video in edits/ that it does not list (written by an interrupted or an
    older run), so that the listing stays complete; such an entry has the prompt as far as the file name tells it."""
    listed = {e.get(k) for e in entries for k in ("mp4", "gif")}
    orphans: dict[str, dict] = {}
    for f in sorted((run_dir / "edits").glob("*")):
        rel = f"edits/{f.name}"
        if f.suffix in (".mp4", ".gif") and rel not in listed:
            entry = orphans.setdefault(f.stem, {"prompt": f.stem.partition("-")[2].replace("-", " "),
                                                "unlisted": "found in edits/, not in edits.json; prompt from the name"})
            entry[f.suffix[1:]] = rel
    return entries + list(orphans.values())


def next_index(run_dir: Path, entries: list[dict]) -> int:
    """The number of the next edit: past every listed entry and every file in edits/ (never overwrite one)."""
    taken = [int(f.name.partition("-")[0]) for f in (run_dir / "edits").glob("*") if f.name.partition("-")[0].isdigit()]
    return max([len(entries)] + [i + 1 for i in taken])


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
    p.add_argument("--force", action="store_true",
                   help="render even when the base model or the inverted latent is not the run's own (with a warning)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for e in edit(args.run, args.prompt, args.guidance, args.steps, args.device, args.precision,
                  progress=not args.no_progress, force=args.force):
        print(f"{e['prompt']!r}: {Path(args.run) / e['mp4']}")


if __name__ == "__main__":
    main(sys.argv[1:])
