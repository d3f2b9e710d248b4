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
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import describe_keys, load_config, save_config
from .errors import Ei2Error, cli_main
from .files import slug, write_json
from .pipeline import (MAX_SKIPS, NonFiniteGradients, NonFiniteLoss, all_finite, encode_video, invert,
                       load_models, make_optimizer, render, resolve_device, resolve_precision, tune_steps)
from .tuned import (load_training_state, read_tuned_metadata, save_training_state, save_tuned,
                    trainable_parameters)
from .unet import VideoOptions
from .video import frame_grid, read_frames, side_by_side, to_uint8, write_image, write_video
from .weights import check_sd_folder, save_safetensors

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
VIDEO_KEYS = ("frame_attention", "ratio", "temporal", "temporal_norm", "spectral_norm", "resnet_norm",
              "temporal_norm_trainable")
# settings that may change between an interrupted run and its --resume without changing what was computed so far
RESUMABLE = {"steps", "checkpoint_every", "compile", "recompute_activations", "gradient_checkpointing", "edit_prompts",
             "guidance", "inference_steps", "fps", "device", "output_dir"}


def video_options(cfg) -> VideoOptions:
    return VideoOptions(**{k: getattr(cfg, k) for k in VIDEO_KEYS})


class Memory:
    """Peak memory of a phase: CUDA allocator peak on a GPU, the process's peak RSS on a CPU (in GiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss / 2**20


def versions(device: torch.device) -> dict:
    import transformers

    info = {"ei2": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_clip(frames_uint8, stem: Path, fps: int) -> dict:
    write_video(frames_uint8, stem.with_suffix(".mp4"), fps=fps)
    write_video(frames_uint8, stem.with_suffix(".gif"), fps=fps)
    return {"mp4": stem.with_suffix(".mp4").name, "gif": stem.with_suffix(".gif").name}


def run(cfg, resume: bool = False, progress: bool = True) -> Path:
    """The whole job for a resolved TrainConfig; returns the run directory."""
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoints" / "last.safetensors"
    if resume:
        check_resumable(cfg, out, ckpt)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision != "fp32" and device.type != "cuda":
        raise Ei2Error(f"precision {precision} needs a CUDA device; use precision fp32 (or auto) on the CPU")
    check_sd_folder(cfg.model)  # both inputs are checked before anything is written or loaded
    frames = read_frames(cfg.video, cfg.n_frames, cfg.start, cfg.stride, cfg.size, cfg.resize)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    memory = Memory(device)
    log = {"loss": [], "skipped_steps": [], "timings": {}, "peak_memory_gib": {}, "versions": versions(device),
           "precision": precision}

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    models = load_models(cfg.model, video_options(cfg), device, precision)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    models.unet.recompute_activations = cfg.recompute_activations
    if cfg.compile:
        models.unet.compile()  # in place: parameter names, checkpoints and hooks stay those of the plain module
    log["timings"]["load_s"] = time.perf_counter() - t0

    # --- tuning (Eq. 2) ---------------------------------------------------------------------------------------
    memory.reset()
    t0 = time.perf_counter()
    posterior = encode_video(models, frames)
    caption = models.text.encode([cfg.caption])
    names, params = trainable_parameters(models.unet)
    optimizer = make_optimizer(models.unet, cfg.learning_rate, cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
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

    def on_sync(step: int, values: list[float]) -> None:
        losses.extend(values)
        if every and (step % every == 0 or step == cfg.steps):
            check_finite(step)
            save_training_state(ckpt, models.unet, optimizer, names, step, generator, losses, cfg.model,
                                extra={"skipped_steps": skipped})

    try:
        tune_steps(models, posterior, caption, optimizer, generator, start, cfg.steps, cfg.grad_clip, scaler,
                   sync_every=math.gcd(10, every) if every else 10, on_sync=on_sync, progress=progress,
                   skipped=skipped)
    except NonFiniteGradients as e:
        raise Ei2Error(f"the gradients were NaN/inf at steps {e.first}-{e.step} ({MAX_SKIPS} in a row, each skipped); "
                       f"stopped, {kept()}; lower learning_rate or use precision fp32 and start the run again "
                       "(--resume would repeat the same steps)") from None
    except NonFiniteLoss as e:
        raise Ei2Error(f"the loss became NaN/inf at step {e.step}; stopped, {kept()}; lower learning_rate or use "
                       "precision fp32, then run again (with --resume to continue from the checkpoint)") from None
    log["loss"] = losses
    log["skipped_steps"] = skipped
    log["timings"]["tuning_s"] = time.perf_counter() - t0
    check_finite(cfg.steps)
    save_tuned(models.unet, out / "tuned.safetensors", cfg.model, {"steps": cfg.steps, "caption": cfg.caption})

    # --- inversion --------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    x_T = invert(models, posterior, cfg.inversion_steps, progress=progress)
    log["timings"]["inversion_s"] = time.perf_counter() - t0
    log["peak_memory_gib"]["training"] = memory.peak_gib()
    save_safetensors({"latent": x_T.float()}, out / "inverted.safetensors",
                     metadata={"caption": cfg.caption, "inversion_steps": str(cfg.inversion_steps)})

    # --- edits ------------------------------------------------------------------------------------------------
    memory.reset()
    source = to_uint8(frames)
    write_clip(source, out / "source", cfg.fps)
    edits, rendered = [], []
    log["timings"]["edit_s"] = []
    for i, prompt in enumerate(cfg.edit_prompts):
        t0 = time.perf_counter()
        video = to_uint8(render(models, x_T, prompt, cfg.guidance, cfg.inference_steps, progress=progress))
        log["timings"]["edit_s"].append(time.perf_counter() - t0)
        files = write_clip(video, out / "edits" / f"{i:02d}-{slug(prompt)}", cfg.fps)
        edits.append({"prompt": prompt, **{k: f"edits/{v}" for k, v in files.items()}, "seed": cfg.seed,
                      "guidance": cfg.guidance, "steps": cfg.inference_steps})
        if cfg.score == "mini":
            edits[-1]["mini_metrics"] = mini_scores(video, prompt, source, cfg.caption)
        rendered.append(video)
    log["peak_memory_gib"]["inference"] = memory.peak_gib()
    write_json(edits, out / "edits.json")
    labels = ["source: " + cfg.caption] + [e["prompt"] for e in edits]
    write_video(side_by_side([source] + rendered, labels), out / "comparison.mp4", fps=cfg.fps)
    write_image(frame_grid([source] + rendered, labels), out / "comparison.png")
    write_json(log, out / "log.json")
    return out


def mini_scores(video, prompt: str, source, caption: str) -> dict:
    """The miniature world's exact metrics of one edit (ei2.mini.parse): per-frame attribute alignment, structure
    fidelity to the source, temporal consistency."""
    from .mini.parse import clip_metrics

    m = clip_metrics(video, prompt, source_frames=source, source_prompt=caption)
    a, f, c = m["alignment"], m["fidelity"], m["consistency"]
    return {"edited_attribute_match": a["edited"], "kept_attributes_match": a["unedited"], "all_attributes_match": a["all"],
            "mask_iou_vs_source": f["iou"], "trajectory_error_px": f["trajectory_error"],
            "attribute_stability": c["attribute_stability"], "background_change": c["background_change"]}


def check_resumable(cfg, out: Path, ckpt: Path) -> None:
    if not ckpt.is_file():
        raise Ei2Error(f"--resume: no checkpoint at {ckpt}; run without --resume to start this run")
    from .config import load_config as _load

    saved = dataclasses.asdict(_load(out / "config.yaml"))
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
            m = e["mini_metrics"]
            lines.append(f"  exact metrics of {e['prompt']!r} (fraction of frames; docs/mini.md): edited attribute "
                         f"{m['edited_attribute_match']:.2f}, kept attributes {m['kept_attributes_match']:.2f}, "
                         f"mask IoU vs source {m['mask_iou_vs_source']:.2f}, "
                         f"trajectory error {m['trajectory_error_px']:.1f} px, stability {m['attribute_stability']:.2f}")
    if Path(cfg.model).resolve() != (REPO / "weights/stable-diffusion-v1-4").resolve():
        lines.append("real model: put Stable Diffusion v1-4 in weights/stable-diffusion-v1-4 (weights/README.md), then "
                     "python -m ei2.train --config configs/sd-v1-4.yaml on a GPU")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  --{k:<24} {desc} (default: {d!r})" for k, d, desc in describe_keys())
    p = argparse.ArgumentParser(
        prog="python -m ei2.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One-shot tuning of EI² (FFAM + STAM) on a video, DDIM inversion, and text-driven edits.",
        epilog="Any config key can be overridden on the command line:\n" + keys)
    p.add_argument("--config", default=None,
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
        raise Ei2Error(f"out of GPU memory with {cfg.n_frames} frames at {cfg.size}px; set gradient_checkpointing: "
                       "true (--resume then continues from the last checkpoint), use fewer n_frames or a smaller size"
                       ) from None
    print(summary(out, cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
