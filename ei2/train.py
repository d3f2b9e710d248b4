"""`python -m ei2.train`: tune the inflated model on one video and its caption, DDIM-invert it, render every edit prompt.

    python -m ei2.train                                   # the embedded demo (configs/demo.yaml), a minute on a CPU
    python -m ei2.train --config configs/sd-v1-4.yaml     # the paper's settings with Stable Diffusion v1-4 on a GPU
    python -m ei2.train --config X.yaml --steps 100 --edit_prompts "a cat surfing" "a dog surfing"
    python -m ei2.train --config X.yaml --resume          # continue an interrupted run from its last checkpoint

A run directory holds: config.yaml (resolved), tuned.safetensors (trainable tensors + spectral-norm buffers + module
options), inverted.safetensors (x_T), source.mp4/.gif, edits/NN-<prompt>.mp4/.gif, edits.json, comparison.mp4 and
comparison.png (source | edits), log.json (loss per step, steps skipped for a non-finite gradient, timings, peak
memory, versions), checkpoints/last.safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from .cache import load as load_fresh
from .config import add_help, inversion_text, load_config, save_config
from .errors import Ei2Error, cli_main
from .files import RunLock, check_writable_dir, clean_stale_temp_files, slug, write_json
from .mini import world
from .mini.parse import IDEAL_SCORES, SCORES, clip_metrics, edit_scores, structure_fidelity, temporal_consistency
from .pipeline import (MAX_SKIPS, NonFiniteGradients, NonFiniteLoss, Phase, Stopped, all_finite, encode_video,
                       invert, make_optimizer, render, resolve_device, resolve_precision, to_video, tune_steps,
                       versions)
from .tuned import (base_fingerprint, load_training_state, read_tuned_metadata, save_training_state, save_tuned,
                    trainable_parameters)
from .video import frame_grid, read_frames, side_by_side, to_uint8, write_clip, write_image, write_video
from .weights import check_sd_folder, save_safetensors

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# settings that may change between an interrupted run and its --resume without changing what was computed so far
RESUMABLE = {"steps", "checkpoint_every", "compile", "recompute_activations", "gradient_checkpointing", "edit_prompts",
             "guidance", "inference_steps", "fps", "device", "output_dir"}


class Cancelled(Ei2Error):
    """A run stopped on request (`run`'s `stop`) during tuning, its resumable state written."""


def run(cfg, resume: bool = False, progress: bool = True, *, cache=None, on_event=None, stop=None) -> Path:
    """The whole job for a resolved TrainConfig (Fig. 2 a-b): read the clip, encode it, tune (Eq. 2), invert, render
    every edit, write the run; returns the run directory.

    cache: an `ei2.cache.ModelCache` to take the models from (reused between jobs, reset to a fresh load's state);
    None loads them. on_event(dict): told each phase, {"phase": "load"|"encode"|"tune"|"invert"|"edit"|"write"|"done",
    ...}: per read loss window {"phase": "tune", "step", "steps", "loss"}, per edit {"phase": "edit", "index", "of",
    "prompt", "video" (absolute path), "scores"}, at the end {"phase": "done", "run_dir"}. stop: a threading.Event;
    set during tuning, the step in progress finishes, the resumable state is written and `Cancelled` is raised.

    log.json: timings (load_s, tuning_s: encoding and tuning, inversion_s, edit_s: one per edit) and
    peak_memory_gib, the absolute peaks (`Phase.peak_gib`) of training (tuning + inversion) and inference (edits)."""
    out = check_writable_dir(cfg.output_dir)
    device, precision = check_job(cfg, out, resume)
    with RunLock(out):  # one run per folder at a time, for the whole run (also under --resume)
        clean_stale_temp_files(out)
        return run_locked(cfg, out, resume, progress, device, precision, cache, on_event, stop)


def run_locked(cfg, out: Path, resume: bool, progress: bool, device, precision, cache=None, on_event=None,
               stop=None) -> Path:
    """`run` once the output folder is checked writable and locked."""
    on_event = on_event or (lambda event: None)
    frames = read_frames(cfg.video, cfg.n_frames, cfg.start, cfg.stride, cfg.size, cfg.resize)
    if not resume:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log = {"loss": [], "skipped_steps": [], "timings": {}, "peak_memory_gib": {}, "versions": versions(device),
           "precision": precision}
    timings = log["timings"]

    torch.manual_seed(cfg.seed)
    on_event({"phase": "load"})
    with Phase(device, memory=False) as loading:  # the temporal modules' initial weights: from cfg.seed alone
        models = cache.models(cfg, device, precision) if cache is not None else load_fresh(cfg, device, precision)
    timings["load_s"] = loading.seconds

    with Phase(device) as training:
        with Phase(device, memory=False) as tuning:
            on_event({"phase": "encode"})
            posterior = encode_video(models, frames)
            log["loss"], log["skipped_steps"] = tune(cfg, models, posterior, out, resume, progress, on_event, stop)
        timings["tuning_s"] = tuning.seconds
        save_tuned(models.unet, out / "tuned.safetensors", cfg.model, {"steps": cfg.steps, "caption": cfg.caption,
                   "base_fingerprint": base_fingerprint(cfg.model), "inverted_shape": list(to_video(posterior.mean).shape)})
        on_event({"phase": "invert"})
        with Phase(device, memory=False) as inversion:
            x_T = invert(models, posterior, cfg.inversion_steps, progress=progress,
                         prompt=inversion_text(cfg.inversion_prompt, cfg.caption))
        timings["inversion_s"] = inversion.seconds
    log["peak_memory_gib"]["training"] = training.peak_gib
    save_safetensors({"latent": x_T.float()}, out / "inverted.safetensors",
                     metadata={"caption": cfg.caption, "inversion_steps": str(cfg.inversion_steps),
                               "inversion_prompt": cfg.inversion_prompt})

    with Phase(device) as inference:
        source = to_uint8(frames)
        write_clip(source, out / "source", cfg.fps)
        edits, videos = render_edits(cfg, models, x_T, source, out, timings, progress, on_event)
    log["peak_memory_gib"]["inference"] = inference.peak_gib
    on_event({"phase": "write"})
    write_outputs(cfg, out, source, edits, videos, log)
    on_event({"phase": "done", "run_dir": str(out.resolve())})
    return out


def check_job(cfg, out: Path, resume: bool) -> tuple[torch.device, str]:
    """Everything checkable before anything is written or loaded: the resume, the device, the model folder."""
    if resume:
        check_resumable(cfg, out, out / "checkpoints" / "last.safetensors")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision != "fp32" and device.type != "cuda":
        raise Ei2Error(f"precision {precision} needs a CUDA device; use precision fp32 (or auto) on the CPU")
    check_sd_folder(cfg.model)
    return device, precision


def tune(cfg, models, posterior, out: Path, resume: bool, progress: bool, on_event=None,
         stop=None) -> tuple[list[float], list[int]]:
    """One-shot tuning (Eq. 2) on the clip and its caption, checkpointed every checkpoint_every steps (continued
    from the checkpoint under --resume); returns (loss per step, steps skipped for a non-finite gradient). With
    `stop` (a threading.Event) set, the state after the current step is written and `Cancelled` raised."""
    on_event = on_event or (lambda event: None)
    ckpt = out / "checkpoints" / "last.safetensors"
    caption = models.text.encode([cfg.caption])
    names, params = trainable_parameters(models.unet)
    optimizer = make_optimizer(models.unet, cfg.learning_rate, cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if models.precision == "fp16" else None
    generator = torch.Generator(models.device).manual_seed(cfg.seed)
    start, losses, skipped = 0, [], []
    if resume:
        start, losses = load_training_state(ckpt, models.unet, optimizer, names, generator)
        skipped = list(read_tuned_metadata(ckpt).get("skipped_steps", []))
        print(f"resuming {out} from step {start}")
    every = cfg.checkpoint_every

    def kept() -> str:
        return f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written before it"

    def check_finite(step: int) -> None:
        """Never write non-finite weights (the skipped steps should make this unreachable)."""
        if not all_finite(params):
            raise Ei2Error(f"the tuned weights are NaN/inf at step {step} and were not saved; stopped, {kept()}; "
                           "lower learning_rate or use precision fp32, then run again")

    def save(step: int) -> None:
        check_finite(step)
        save_training_state(ckpt, models.unet, optimizer, names, step, generator, losses, cfg.model,
                            extra={"skipped_steps": skipped})

    def on_sync(step: int, values: list[float]) -> None:
        first = step - len(values) + 1
        losses.extend(values)
        for i, v in enumerate(values):
            on_event({"phase": "tune", "step": first + i, "steps": cfg.steps, "loss": v})
        if every and (step % every == 0 or step == cfg.steps):
            save(step)

    on_event({"phase": "tune", "step": start, "steps": cfg.steps, "loss": None})
    try:
        tune_steps(models, posterior, caption, optimizer, generator, start, cfg.steps, cfg.grad_clip, scaler,
                   sync_every=math.gcd(10, every) if every else 10, on_sync=on_sync, progress=progress,
                   skipped=skipped, should_stop=None if stop is None else stop.is_set)
    except Stopped as e:
        save(e.step)
        raise Cancelled(f"stopped at step {e.step} of {cfg.steps}, the training state saved in {ckpt}; continue with "
                        f"python -m ei2.train --config {out / 'config.yaml'} --resume") from None
    except NonFiniteGradients as e:
        raise Ei2Error(f"the gradients were NaN/inf at steps {e.first}-{e.step} ({MAX_SKIPS} in a row, each skipped); "
                       f"stopped, {kept()}; lower learning_rate or use precision fp32 and start the run again "
                       "(--resume would repeat the same steps)") from None
    except NonFiniteLoss as e:
        raise Ei2Error(f"the loss became NaN/inf at step {e.step}; stopped, {kept()}; lower learning_rate or use "
                       "precision fp32, then run again (with --resume to continue from the checkpoint)") from None
    check_finite(cfg.steps)
    return losses, skipped


def render_edits(cfg, models, x_T, source, out: Path, timings: dict, progress: bool,
                 on_event=None) -> tuple[list[dict], list]:
    """Each edit prompt rendered from x_T with guided DDIM (Eq. 1) and written to edits/; returns (edits.json's
    entries, the uint8 videos). Appends each render's seconds to timings["edit_s"]."""
    edits, videos, said = [], [], set()
    timings["edit_s"] = []
    for i, prompt in enumerate(cfg.edit_prompts):
        with Phase(models.device, memory=False) as rendering:
            video = to_uint8(render(models, x_T, prompt, cfg.guidance, cfg.inference_steps, progress=progress))
        timings["edit_s"].append(rendering.seconds)
        files = write_clip(video, out / "edits" / f"{i:02d}-{slug(prompt)}", cfg.fps)
        edits.append({"prompt": prompt, **{k: f"edits/{v}" for k, v in files.items()}, "seed": cfg.seed,
                      "guidance": cfg.guidance, "steps": cfg.inference_steps})
        if cfg.score == "mini":
            edits[-1]["mini_metrics"], skipped = mini_scores(video, prompt, source, cfg.caption)
            if skipped:
                edits[-1]["mini_skipped"] = skipped
                if skipped not in said:  # once per reason, not once per edit
                    said.add(skipped)
                    print(f"note: score mini: {skipped}", file=sys.stderr)
        videos.append(video)
        if on_event is not None:
            on_event({"phase": "edit", "index": i, "of": len(cfg.edit_prompts), "prompt": prompt,
                      "video": str((out / edits[-1]["mp4"]).resolve()), "scores": edits[-1].get("mini_metrics")})
    return edits, videos


def write_outputs(cfg, out: Path, source, edits: list[dict], videos: list, log: dict) -> None:
    """edits.json, the comparison (source | edits) as a video and a frame grid, log.json."""
    write_json(edits, out / "edits.json")
    labels = ["source: " + cfg.caption] + [e["prompt"] for e in edits]
    write_video(side_by_side([source] + videos, labels), out / "comparison.mp4", fps=cfg.fps)
    write_image(frame_grid([source] + videos, labels), out / "comparison.png")
    write_json(log, out / "log.json")


def mini_scores(video, prompt: str, source, caption: str) -> tuple[dict, str | None]:
    """The miniature world's exact metrics of one edit (ei2.mini.parse): per-frame attribute alignment, structure
    fidelity to the source, temporal consistency; and why some were not scored (None: all were). Scoring never breaks
    a run: an edit prompt outside the miniature grammar leaves the attribute scores None (fidelity and consistency
    need no text), a caption outside it the edited/kept ones; any other failure leaves every score None."""
    outside = [name for name, text in (("edit prompt", prompt), ("caption", caption)) if not _in_grammar(text)]
    try:
        if not outside:  # in the grammar: also scored against the ideal edit (parse.ideal_edit)
            return edit_scores(video, prompt, source, caption), None
        if "edit prompt" not in outside:
            m = clip_metrics(video, prompt, source_frames=source, source_prompt=None)
        else:
            m = {"fidelity": structure_fidelity(video, source), "consistency": temporal_consistency(video)}
    except Exception as e:  # a scoring bug must not cost the user the run's outputs
        return dict.fromkeys([*SCORES, *IDEAL_SCORES]), f"not scored ({type(e).__name__}: {str(e)[:200]})"
    scores = {name: m.get(section, {}).get(key) for name, (section, key) in SCORES.items()}
    scores |= dict.fromkeys(IDEAL_SCORES)  # the ideal edit needs both texts in the grammar
    missing = ", ".join(k for k, v in scores.items() if v is None)
    return scores, (f"the {' and the '.join(outside)} {'are' if len(outside) > 1 else 'is'} outside the miniature "
                    "world's grammar ('a <color> <shape> [motion] on a <background> background', docs/mini.md), so "
                    f"{missing} are not scored (null)")


def _in_grammar(text: str) -> bool:
    try:
        world.parse_caption(text)
    except ValueError:
        return False
    return True


# what a run writes in its folder (`clear_run` removes these and nothing else: a lock or the user's own files stay)
RUN_FILES = ("config.yaml", "tuned.safetensors", "inverted.safetensors", "source.*", "edits", "edits.json",
             "comparison.*", "log.json", "checkpoints")


def clear_run(out: Path) -> None:
    """A new run into a used run folder replaces that run: its outputs (RUN_FILES) are removed, with a notice, so
    the folder never mixes two runs (--resume continues a run instead; ei2.edit adds to one)."""
    if not out.is_dir():
        return
    found = sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})
    if not found:
        return
    print(f"{out} holds an earlier run: replacing it (removed {', '.join(p.name for p in found)}; "
          "--resume continues a run instead)")
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_resumable(cfg, out: Path, ckpt: Path) -> None:
    if not ckpt.is_file():
        raise Ei2Error(f"--resume: no checkpoint at {ckpt}; run without --resume to start this run")
    step = int(read_tuned_metadata(ckpt).get("step", 0))
    if cfg.steps < step:
        raise Ei2Error(f"--resume: the checkpoint {ckpt} is at step {step} but steps={cfg.steps}; pass --steps {step} "
                       "or more, or start a new run (without --resume)")
    saved = dataclasses.asdict(load_config(out / "config.yaml"))
    changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        raise Ei2Error(f"--resume: {', '.join(changed)} differ from the interrupted run's {out / 'config.yaml'}; "
                       "resume with the same settings or start a new run (another output_dir)")


def summary(out: Path, cfg) -> str:
    lines = [f"done: outputs in {out}/",
             f"  comparison.mp4 / comparison.png  source | {len(cfg.edit_prompts)} edit(s)",
             "  edits/                           one mp4 + gif per edit prompt",
             "  tuned.safetensors                the tuned tensors (re-edit: python -m ei2.edit --run "
             f"{out} --prompt \"...\")"]
    for e in json.loads((out / "edits.json").read_text()):
        if "mini_metrics" in e:
            m = {k: "-" if v is None else f"{v:.{1 if k.endswith('_px') else 2}f}"
                 for k, v in e["mini_metrics"].items()}
            lines.append(f"  exact metrics of {e['prompt']!r} (fraction of frames; docs/mini.md): edited attribute "
                         f"{m['edited_attribute_match']}, kept attributes {m['kept_attributes_match']}, "
                         f"vs the ideal edit: mask IoU {m.get('mask_iou_vs_ideal', '-')}, trajectory error "
                         f"{m.get('trajectory_error_vs_ideal_px', '-')} px; vs the source: mask IoU "
                         f"{m['mask_iou_vs_source']}, {m['trajectory_error_px']} px; "
                         f"stability {m['attribute_stability']}"
                         + (" (- : not scored, see mini_skipped in edits.json)" if "mini_skipped" in e else ""))
    if Path(cfg.model).resolve() != (REPO / "weights/stable-diffusion-v1-4").resolve():
        lines.append("real model: put Stable Diffusion v1-4 in weights/stable-diffusion-v1-4 (weights/README.md), then "
                     "python -m ei2.train --config configs/sd-v1-4.yaml on a GPU")
    return "\n".join(lines)


def out_of_memory(cfg) -> str:
    return (f"out of GPU memory with {cfg.n_frames} frames at {cfg.size}px; set gradient_checkpointing: true "
            "(--resume then continues from the last checkpoint), use fewer n_frames or a smaller size")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ei2.train", add_help=False,
        description="One-shot tuning of EI² (FFAM + STAM) on a video, DDIM inversion, and text-driven edits.")
    add_help(p)
    p.add_argument("--config", default=None, metavar="YAML",
                   help=f"YAML config (default: the embedded demo, {DEMO_CONFIG.relative_to(REPO)})")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args, overrides = parser().parse_known_args(argv)
    config = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    if config is None:
        raise Ei2Error("no --config given and the demo config configs/demo.yaml is missing; pass --config <yaml>")
    cfg = load_config(config, overrides)
    try:
        out = run(cfg, resume=args.resume, progress=not args.no_progress)
    except torch.OutOfMemoryError:
        raise Ei2Error(out_of_memory(cfg)) from None
    print(summary(out, cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
