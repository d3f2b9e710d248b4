"""`python -m ei2.diagnose`: measure the covariate shift of the temporal modules (paper section 4.2-4.3) on any model.

    python -m ei2.diagnose --run runs/sd-v1-4                          # a tuned run (python -m ei2.train)
    python -m ei2.diagnose --run runs/ei2 --run runs/tav               # two runs on one chart
    python -m ei2.diagnose --model weights/stable-diffusion-v1-4 --video clip.mp4 --caption "..." \
        --compare ta,stam [--tune-steps 100] [--timesteps 100,400,700] [--out runs/diagnose]

The clip is VAE-encoded (posterior mean), noised with one fixed noise at each timestep (the forward process, DDIM
Eq. 4) and run through the UNet with the caption's embedding. Hooks on every temporal module (a forward pre-hook
and a forward hook on `norm_temp`, a forward hook on `attn_temp`) capture its input z (b*h*w, n, d), the normalized
input z_hat = norm_temp(z) and the residual branch delta = attn_temp(z_hat); the block's output is z + delta.
Per module it records (see `ei2.stats`): mu_rv(z), mu_z, mu_rv(z_hat), the mean shift ||mu_out - mu_in|| and the
covariance ratio ||Sigma_out|| / ||Sigma_in|| (spectral norm; Frobenius alongside), averaged over locations and
timesteps. Outputs: a table on stdout and diagnose.txt, diagnose.json and diagnose.png in --out.

Untuned modules: TA's output weight starts at zero, so an untuned TA adds exactly its output bias (mean shift =
||b||, covariance ratio 1); STAM starts with b = 0 and a spectrally normalized random output map. The paper's claim
is about tuned modules: diagnose runs (`--run`), or `--tune-steps K` (K steps of the tuning loop of `ei2.pipeline`,
the same as `python -m ei2.train`, per variant, with the same seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import chart
from .config import TrainConfig, check_value, load_config
from .ddim import add_noise
from .errors import Ei2Error, cli_main
from .files import atomic_path, check_writable_dir
from .pipeline import (Models, autocast, make_optimizer, prepare_models, resolve_device, resolve_precision,
                       tune_steps)
from .stats import TemporalProbe
from .text import TextEncoder
from .tuned import load_tuned_unet, read_tuned_metadata
from .unet import VARIANTS, UNet
from .vae import AutoencoderKL
from .video import read_frames
from .weights import read_schedule

# --compare names a temporal module: the variant of ei2.unet.VARIANTS whose temporal fields it takes (its frame
# attention comes from --frame-attention / --ratio). Fig. 4's "LayerNorm" row is `ln` (affine tuned), "LayerNorm*"
# `ln_noaffine`; Tune-A-Video's own TA (`ta`) keeps the affine frozen, so it computes what `ln_noaffine` computes.
COMPARE = {"ta": "tav", "stam": "ei2", "ln": "ta_ln", "ln_noaffine": "ta_ln_noaffine", "no_norm": "ta_no_norm",
           "instancenorm": "ta_instancenorm", "ic": "ta_ic"}
TRAIN = TrainConfig()  # weight decay and gradient clip of the tuning loop, as python -m ei2.train
COLUMNS = [  # (json key, table header)
    ("mu_rv", "mu_rv(z)"),
    ("mu_rv_rms", "mu_rv/sqrt(d)"),
    ("mu_z", "mu_z"),
    ("mu_rv_hat", "mu_rv(z_hat)"),
    ("mean_shift", "mean shift"),
    ("cov_ratio", "cov ratio"),
    ("cov_ratio_fro", "cov ratio F"),
]


# --- Inputs, models, tuning --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
    video: str
    caption: str
    n_frames: int = 8
    start: int = 0
    stride: int = 1
    size: int = 512


@dataclasses.dataclass
class Subject:
    """One model to diagnose: a label, how to build its UNet, the base model (VAE, text encoder) and the clip."""
    label: str
    description: str
    model: str
    clip: Clip
    video_options: dict
    tuned: str | None = None  # a run's tuned.safetensors
    source: str = "untuned"


def parse_timesteps(text: str) -> list[int]:
    try:
        ts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise Ei2Error(f"--timesteps {text!r}: expected comma-separated integers such as 100,400,700") from None
    if not ts or any(not 0 <= t < 1000 for t in ts):
        raise Ei2Error(f"--timesteps {text!r}: need at least one timestep, each in [0, 999]")
    return ts


def parse_variants(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in COMPARE]
    if not names or unknown:
        raise Ei2Error(f"--compare {text!r}: {', '.join(unknown) or 'empty'} not known; choose from "
                       f"{', '.join(COMPARE)} (comma-separated, e.g. ta,stam)")
    if len(set(names)) != len(names):
        raise Ei2Error(f"--compare {text!r} names a variant twice")
    return names


def run_subject(run_dir: str | Path, model_override: str | None) -> Subject:
    """A tuned run directory (written by `python -m ei2.train`) as a Subject."""
    run = Path(run_dir)
    if not run.is_dir():
        raise Ei2Error(f"run directory not found: {run}; pass the output_dir of `python -m ei2.train`")
    if not (run / "config.yaml").is_file():
        raise Ei2Error(f"{run / 'config.yaml'} not found: {run} is not a run directory of `python -m ei2.train`")
    cfg = load_config(run / "config.yaml")
    meta = read_tuned_metadata(run / "tuned.safetensors")
    model = model_override or cfg.model or meta.get("base_model")
    if not Path(model).exists():
        raise Ei2Error(f"the run's base model {model} is not there (paths are relative to where training ran); "
                       "pass --model <SD folder>")
    video, n_frames, start, stride = cfg.video, cfg.n_frames, cfg.start, cfg.stride
    if not Path(video).exists() and (run / "source.mp4").is_file():
        # the original clip moved: the run's source.mp4 holds the sampled frames (H.264, so nearly the same pixels)
        video, start, stride = str(run / "source.mp4"), 0, 1
    options = meta["video_options"]
    kind = options.get("temporal", "?")
    label = run.name if run.name not in ("", ".") else "run"
    return Subject(label=label, description=f"run {run} ({options.get('frame_attention')} + {kind}, "
                   f"{meta.get('steps', '?')} tuning steps)", model=str(model),
                   clip=Clip(video, cfg.caption, n_frames, start, stride, cfg.size), video_options=options,
                   tuned=str(run / "tuned.safetensors"), source=f"tuned run {run}")


class Encoded:
    """The clip's VAE posterior and caption embedding for one base model (shared by every variant)."""

    def __init__(self, model: str, clip: Clip, device: torch.device):
        frames = read_frames(clip.video, clip.n_frames, clip.start, clip.stride, clip.size)
        if frames.shape[0] < 2:
            raise Ei2Error("the diagnostic needs at least 2 frames (a temporal module sees n frames); raise --n-frames")
        self.vae = AutoencoderKL.from_pretrained(model).to(device)
        self.text = TextEncoder.from_pretrained(model, device=device)
        with torch.no_grad():
            self.posterior = self.vae.encode(frames.to(device))
            self.context = self.text.encode([clip.caption])
        scale = self.vae.config.scaling_factor
        self.latents = (self.posterior.mean.float() * scale).transpose(0, 1)[None]  # (n, 4, h, w) -> (1, 4, n, h, w)


def build(subject: Subject, enc: Encoded, device: torch.device, precision: str) -> Models:
    """The subject's UNet (a run's tuned one, or SD's inflated with its options) set up as `python -m ei2.train` sets
    up its models (ei2.pipeline.prepare_models: the trainable set marked, frozen weights in the job's dtype)."""
    if subject.tuned:
        unet = load_tuned_unet(subject.model, subject.tuned)
    else:
        unet = UNet.from_pretrained(subject.model, **subject.video_options)
    return prepare_models(unet, enc.vae, enc.text, device, precision, read_schedule(subject.model))


def tune(models: Models, enc: Encoded, steps: int, lr: float, seed: int, progress: bool) -> list[float]:
    """`steps` steps of the training loop of `python -m ei2.train` (ei2.pipeline.tune_steps: Eq. 2, its AdamW and
    gradient clip) on the trainable set that `prepare_models` marked; returns the losses."""
    optimizer = make_optimizer(models.unet, lr, TRAIN.weight_decay)
    generator = torch.Generator(models.device).manual_seed(seed)
    losses: list[float] = []
    tune_steps(models, enc.posterior, enc.context, optimizer, generator, 0, steps, TRAIN.grad_clip,
               sync_every=min(10, steps), on_sync=lambda step, values: losses.extend(values), progress=progress)
    return losses


@torch.no_grad()
def probe(unet: nn.Module, enc: Encoded, timesteps: list[int], seed: int, device: torch.device, precision: str,
          progress: bool, desc: str, alphas: torch.Tensor | None = None) -> list[dict]:
    """Run the UNet on the clip noised to each timestep (one fixed noise; `alphas`: the model's schedule, None for
    SD's) with hooks on; per-layer statistics."""
    noise = torch.randn(enc.latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    with TemporalProbe(unet) as p:
        for t in tqdm(timesteps, desc=desc, disable=not progress):
            p.tag = t
            x_t = add_noise(enc.latents, noise, t, alphas)
            with autocast(device, precision):
                unet(x_t, torch.tensor(t, device=device), enc.context)
    return p.report()


def summarize(layers: list[dict]) -> dict:
    """Mean over layers of each statistic (each layer counts once), and the ranges of mu_rv and mu_z."""
    keys = [k for k, _ in COLUMNS] + ["cov_ratio_pooled"]
    out = {}
    for k in keys:
        vals = [l["stats"].get(k, math.nan) for l in layers]
        vals = [v for v in vals if math.isfinite(v)]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    for k in ("mu_rv", "mu_rv_rms", "mu_z", "mu_rv_hat"):
        vals = [l["stats"][k] for l in layers if math.isfinite(l["stats"].get(k, math.nan))]
        out[f"{k}_range"] = [min(vals), max(vals)] if vals else None
    return out


def diagnose(subjects: list[Subject], timesteps: list[int], seed: int = 0, device: str = "auto",
             precision: str = "fp32", tune_steps: int = 0, lr: float = 3e-5, progress: bool = True) -> dict:
    """Build, optionally tune, and probe each subject in turn (one UNet in memory at a time); returns the report."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    encoded: dict[tuple, Encoded] = {}
    variants = []
    for subject in subjects:
        key = (subject.model, dataclasses.astuple(subject.clip))
        if key not in encoded:
            encoded.clear()  # one base model's VAE and text encoder in memory at a time
            gc.collect()
            encoded[key] = Encoded(subject.model, subject.clip, dev)
        enc = encoded[key]
        torch.manual_seed(seed)  # the fresh temporal modules' initialization
        models = build(subject, enc, dev, precision)
        losses = []
        if tune_steps and not subject.tuned:
            losses = tune(models, enc, tune_steps, lr, seed, progress)
            subject.source = f"tuned here: {tune_steps} steps, lr {lr:g}"
        unet, alphas = models.unet.eval().requires_grad_(False), models.alphas
        del models
        layers = probe(unet, enc, timesteps, seed, dev, precision, progress, desc=f"probe {subject.label}",
                       alphas=alphas)
        variants.append({"label": subject.label, "description": subject.description, "source": subject.source,
                         "model": subject.model, "clip": dataclasses.asdict(subject.clip),
                         "video_options": dataclasses.asdict(unet.video), "tune_losses": losses,
                         "layers": layers, "summary": summarize(layers)})
        del unet
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": {"timesteps": timesteps, "seed": seed, "device": str(dev), "precision": precision,
                         "tune_steps": tune_steps, "learning_rate": lr, "latent": "VAE posterior mean",
                         "covariance_norm": "spectral (largest eigenvalue) for cov_ratio; Frobenius for *_fro",
                         "averaging": "each statistic per spatial location, then the mean over locations and "
                                      "timesteps (cov_ratio skips locations whose input does not vary over frames)"},
            "variants": variants}


# --- Output: table, chart, files ---------------------------------------------------------------------------------


def _fmt(v, ratio: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if ratio:  # ratios sit near 1: show the deviation
        return f"{v:.4f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _cells(stats: dict, width: int = 13) -> str:
    return " ".join(f"{_fmt(stats.get(k), ratio=k.startswith('cov')):>{width}}" for k, _ in COLUMNS)


def format_table(report: dict) -> str:
    """Per variant: one row per layer with every statistic; then, when comparing, shift and ratio side by side."""
    lines = []
    for v in report["variants"]:
        lines.append(f"== {v['label']}: {v['description']} [{v['source']}]")
        header = f"{'layer':<28} {'d':>5} " + " ".join(f"{h:>13}" for _, h in COLUMNS)
        lines += [header, "-" * len(header)]
        for l in v["layers"]:
            lines.append(f"{l['layer']:<28} {l['dim']:>5} " + _cells(l["stats"]))
        s = v["summary"]
        lines.append(f"{'mean over layers':<28} {'':>5} " + _cells(s))
        r, z = s.get("mu_rv_range"), s.get("mu_z_range")
        rr = s.get("mu_rv_rms_range")
        if r and z and rr:
            lines.append(f"ranges over layers: mu_rv(z) {_fmt(r[0])}..{_fmt(r[1])} (per channel {_fmt(rr[0])}.."
                         f"{_fmt(rr[1])}), mu_z {_fmt(z[0])}..{_fmt(z[1])}  (paper: mu_rv 1e-1..1, mu_z < 1e-2)")
        lines.append("")
    if len(report["variants"]) > 1:
        labels = [v["label"] for v in report["variants"]]
        lines.append("== comparison: mean shift ||mu_out - mu_in|| | covariance ratio ||Sigma_out||/||Sigma_in||")
        header = f"{'layer':<28} " + " ".join(f"{'shift ' + x:>14}" for x in labels) + " " + \
                 " ".join(f"{'ratio ' + x:>14}" for x in labels)
        lines += [header, "-" * len(header)]
        for i, l in enumerate(report["variants"][0]["layers"]):
            row = [v["layers"][i]["stats"] for v in report["variants"]]
            lines.append(f"{l['layer']:<28} " + " ".join(f"{_fmt(s.get('mean_shift')):>14}" for s in row) + " " +
                         " ".join(f"{_fmt(s.get('cov_ratio'), True):>14}" for s in row))
        lines.append("")
    st = report["settings"]
    lines.append(f"timesteps {st['timesteps']}, seed {st['seed']}, {st['precision']} on {st['device']}; covariance "
                 "norm: spectral (cov ratio F: Frobenius); statistics per location, averaged over locations and "
                 "timesteps")
    return "\n".join(lines)


PALETTE = {"ta": chart.RED, "stam": chart.BLUE}


def draw_chart(report: dict, path: str | Path) -> Path:
    """Two panels over the layers (x: the UNet's temporal modules in forward order): the mean shift and the
    covariance ratio (spectral), one line per variant; a dashed line at ratio 1."""
    variants = report["variants"]
    layers = [l["short"] for l in variants[0]["layers"]]
    panels = [("mean shift ||mu_out - mu_in|| (L2 over channels, mean over locations)", "mean_shift", 0.0),
              ("covariance ratio ||Sigma_out|| / ||Sigma_in|| (spectral norm, mean over locations)", "cov_ratio", 1.0)]
    left, right, top, panel_h, gap, bottom = 80, 30, 70, 250, 80, 60
    step_x = max(44, min(90, 900 // max(1, len(layers))))
    width = max(760, left + right + step_x * len(layers))
    legend_h = 22 * len(variants)
    height = top + legend_h + len(panels) * panel_h + (len(panels) - 1) * gap + bottom
    img, draw = chart.canvas(width, height)
    small = chart.font(11)
    st = report["settings"]
    draw.text((left, 12), "Temporal-module covariate shift per layer", fill="black", font=chart.font(16))
    draw.text((left, 34), f"timesteps {st['timesteps']}, seed {st['seed']}; "
              f"D = down, M = mid, U = up block (level.attention)", fill=(80, 80, 80), font=small)

    # TA red, STAM blue: by variant name, or for runs by their temporal module when only one run has it
    temporals = [v["video_options"].get("temporal") for v in variants]
    colors, used = {}, set()
    others = iter(chart.COLORS * 4)
    for v, temporal in zip(variants, temporals):
        key = v["label"] if v["label"] in PALETTE else temporal if temporals.count(temporal) == 1 else None
        if key in PALETTE and key not in used:
            colors[v["label"]] = PALETTE[key]
            used.add(key)
        else:
            colors[v["label"]] = next(others)
    chart.legend(draw, (left, top - 12),
                 [(f"{v['label']}: {v['description']} [{v['source']}]", colors[v["label"]]) for v in variants])
    x_ticks = list(enumerate(layers))
    for p, (title, key, ref) in enumerate(panels):
        y0 = top + legend_h + p * (panel_h + gap) + 20
        series = [chart.Series(v["label"], [l["stats"].get(key, math.nan) for l in v["layers"]], colors[v["label"]])
                  for v in variants]
        chart.panel(draw, (left, y0, width - right, y0 + panel_h - 20), series, x_lim=(-0.5, len(layers) - 0.5),
                    x_ticks=x_ticks, title=title, ref=ref)
    draw.text((left, height - 24), "layer (temporal module after the feed-forward of each transformer block)",
              fill=(80, 80, 80), font=small)
    return chart.save(img, path)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(report: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "diagnose.json", "png": out / "diagnose.png", "txt": out / "diagnose.txt"}
    with atomic_path(files["json"]) as tmp:
        tmp.write_text(json.dumps(_json_safe(report), indent=2))
    with atomic_path(files["txt"]) as tmp:
        tmp.write_text(format_table(report) + "\n")
    draw_chart(report, files["png"])
    return files


# --- CLI ---------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ei2.diagnose", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the covariate shift of the temporal modules (TA, STAM, Fig. 4 variants): hook every "
                    "temporal module while the UNet denoises the clip's noisy latents, and report per layer the "
                    "temporal mean of the input (mu_rv(z)), the whole-tensor mean LayerNorm uses (mu_z), the temporal "
                    "mean after the norm (mu_rv(z_hat)), the mean shift ||mu_out - mu_in|| and the covariance ratio "
                    "||Sigma_out|| / ||Sigma_in||. See docs/diagnose.md for how to read the output.",
        epilog="examples:\n"
               "  python -m ei2.diagnose --run runs/sd-v1-4\n"
               "  python -m ei2.diagnose --run runs/ei2 --run runs/tav --out runs/diagnose\n"
               "  python -m ei2.diagnose --model weights/stable-diffusion-v1-4 --video data/car-turn.mp4 \\\n"
               "      --caption \"a jeep car is moving on the road\" --compare ta,stam --tune-steps 100\n"
               f"variants for --compare: {', '.join(COMPARE)}")
    src = p.add_argument_group("what to diagnose (either --run, or --model with --video and --caption)")
    src.add_argument("--run", action="append", default=[], metavar="DIR",
                     help="a run directory of python -m ei2.train (its tuned model, clip and caption); repeat to "
                          "put several runs on one chart")
    src.add_argument("--model", help="Stable Diffusion folder or single file (with --run: overrides the run's base "
                                     "model path)")
    src.add_argument("--video", help="clip: mp4, gif or folder of frames")
    src.add_argument("--caption", help="the clip's caption (the text condition of the forward passes)")
    src.add_argument("--compare", default="stam", metavar="V1,V2",
                     help=f"temporal variants to build on the same weights and clip (default: stam); one of "
                          f"{', '.join(COMPARE)}")
    src.add_argument("--frame-attention", default="ffam", choices=("ffam", "sca", "self", "full"),
                     help="attn1 of every variant (default ffam; the same for all, so only the temporal module "
                          "differs)")
    src.add_argument("--ratio", type=int, default=2, help="FFAM ratio r (default 2)")
    src.add_argument("--n-frames", type=int, default=8, help="frames sampled from the clip (default 8)")
    src.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    src.add_argument("--stride", type=int, default=1, help="frame stride (default 1)")
    src.add_argument("--size", type=int, default=512, help="frame size in pixels, a multiple of 64 (default 512)")
    src.add_argument("--tune-steps", type=int, default=0, metavar="K",
                     help="tune each --compare variant for K steps of ei2.train's loop (same seed) before probing; "
                          "0 (default) probes the modules as created. The paper tunes 500 steps")
    src.add_argument("--lr", type=float, default=3e-5, help="learning rate of --tune-steps (default 3e-5, the paper's)")
    p.add_argument("--timesteps", default="100,400,700", help="noise levels to probe at (default 100,400,700)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, module init and tuning (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                   help="forward precision (default fp32: the statistics are small differences)")
    p.add_argument("--out", help="output folder (default: the run directory for one --run, else runs/diagnose)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def subjects_from_args(args) -> list[Subject]:
    if args.run:
        if args.video or args.caption or args.tune_steps:
            raise Ei2Error("--run takes its clip, caption and tuned weights from the run; drop --video/--caption/"
                           "--tune-steps (or use --model without --run)")
        return [run_subject(r, args.model) for r in args.run]
    if not (args.model and args.video and args.caption):
        raise Ei2Error("give --run <dir>, or --model <SD folder> with --video <clip> and --caption \"...\"")
    if args.tune_steps < 0:
        raise Ei2Error("--tune-steps must be >= 0")
    clip = Clip(args.video, args.caption, args.n_frames, args.start, args.stride, args.size)
    variants = {name: VARIANTS[COMPARE[name]] for name in parse_variants(args.compare)}
    return [Subject(name, v.module, args.model, clip,
                    dataclasses.asdict(dataclasses.replace(v.video, frame_attention=args.frame_attention,
                                                        ratio=args.ratio)))
            for name, v in variants.items()]


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for key, flag in (("learning_rate", "lr"), ("steps", "tune_steps"), ("ratio", "ratio"), ("n_frames", "n_frames"),
                      ("start", "start"), ("stride", "stride"), ("size", "size"), ("seed", "seed")):
        check_value(key, getattr(args, flag), "--" + flag.replace("_", "-"))  # the config's ranges, one table
    timesteps = parse_timesteps(args.timesteps)
    subjects = subjects_from_args(args)
    labels = [s.label for s in subjects]
    for i, s in enumerate(subjects):  # two runs with the same folder name
        if labels.count(s.label) > 1:
            s.label = f"{s.label}#{i + 1}"
    out = args.out or (args.run[0] if len(args.run) == 1 else "runs/diagnose")
    check_writable_dir(out, "--out folder")  # before the compute, not after it
    report = diagnose(subjects, timesteps, seed=args.seed, device=args.device, precision=args.precision,
                      tune_steps=args.tune_steps, lr=args.lr, progress=not args.no_progress)
    files = write_outputs(report, out)
    print(format_table(report))
    print(f"wrote {files['json']}, {files['png']}, {files['txt']}")


if __name__ == "__main__":
    main(sys.argv[1:])
