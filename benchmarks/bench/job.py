"""Sections 4 and 5 of `python -m benchmarks.bench`: the whole job, run by the training job's own functions
(ei2.pipeline: encode_video, tune_steps, invert, render; its Phase meter) on seeded random SD weights, and the
speed-and-memory targets checked against what the run measured."""

from __future__ import annotations

import time
import zlib

import torch

from ei2.pipeline import Models, Phase, encode_video, invert, make_optimizer, prepare_models, render, tune_steps
from ei2.vae import AutoencoderKL

from .core import PAPER, Row, Settings, Table, free, measured_mib
from .models import EI2, JOB_DEFAULTS, LR, WEIGHT_DECAY, channels_last_, ei2_unet, init_sd_weights_

GIB = 1024  # MiB

# The targets (random SD v1-4 weights, 8 frames at 512², one H100 or H200): (row, bound, unit).
TARGET_SETTING = dict(device="cuda", size=512, frames=8, steps=500, inference_steps=50, dtype="bf16")
T_STEP = "tuning step: best ei2 / diffusers eager bf16"
T_JOB = "whole job (500 steps, 50-step inversion, 50-step edit, VAE)"
T_PEAK = "peak memory, default mode (tuning)"
T_PEAK_GC = "peak memory, gradient checkpointing (tuning)"
T_PEAK_24 = "peak memory, 24 frames, gradient checkpointing"
T_INFER = "inversion + one edit"
T_INFER_PEAK = "inversion + one edit, peak memory"
T_CPU = "CPU: UNet forward ei2 / diffusers (SD v1-4 config)"
TARGETS = [(T_STEP, 1.0, "ratio"), (T_JOB, 60.0, "s"), (T_PEAK, 11 * GIB, "MiB"), (T_PEAK_GC, 8 * GIB, "MiB"),
           (T_PEAK_24, 24 * GIB, "MiB"), (T_INFER, 5.0, "s"), (T_INFER_PEAK, 5.3 * GIB, "MiB"), (T_CPU, 1.05, "ratio")]


class RandomText:
    """Stands in for the CLIP text encoder of `Models`: seeded embeddings (b, 77, dim) per list of prompts, on the
    device. A job encodes each prompt once (milliseconds); what is measured here is the UNet and the VAE."""

    def __init__(self, dim: int, device: torch.device):
        self.dim, self.device = dim, device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32("\0".join(prompts).encode()))
        return torch.randn(len(prompts), 77, self.dim, generator=g).to(self.device)


def random_models(s: Settings, gradient_checkpointing: bool = False, compile: bool = False) -> Models:
    """The job's models set up as `ei2.pipeline.load_models` and `ei2.train` do (`prepare_models`, the config's
    default recompute_activations), with seeded random weights."""
    cfg = s.unet_config
    unet = ei2_unet(cfg, s.seed, **EI2)
    vae = init_sd_weights_(AutoencoderKL(s.vae_config), s.seed, skip=lambda k: False)
    models = prepare_models(unet, vae, RandomText(cfg.cross_attention_dim, s.device), s.device, s.dtype)
    models.unet.gradient_checkpointing = gradient_checkpointing
    models.unet.recompute_activations = JOB_DEFAULTS.recompute_activations
    if s.channels_last:
        channels_last_(models.unet)
    if compile:
        models.unet.compile()
    return models


def random_clip(s: Settings, frames: int) -> torch.Tensor:
    """(frames, 3, size, size) in [-1, 1], seeded, on the CPU (the job reads its frames there)."""
    g = torch.Generator().manual_seed(4)
    return torch.rand(frames, 3, s.size, s.size, generator=g) * 2 - 1


class Tuner:
    """A tuning run of the job: the clip's posterior, the caption, AdamW, the noise generator; `run(a, b)` is
    `ei2.pipeline.tune_steps` for steps a..b-1 (grad clip 1.0, as the job)."""

    def __init__(self, s: Settings, models: Models, frames: int):
        self.models = models
        self.posterior = encode_video(models, random_clip(s, frames))
        self.caption = models.text.encode(["a video"])
        self.optimizer = make_optimizer(models.unet, LR, WEIGHT_DECAY)
        self.generator = torch.Generator(s.device).manual_seed(s.seed)
        self.scaler = torch.amp.GradScaler("cuda") if s.dtype == "fp16" else None

    def run(self, start: int, stop: int) -> None:
        tune_steps(self.models, self.posterior, self.caption, self.optimizer, self.generator, start, stop, 1.0,
                   self.scaler, progress=False)

    def close(self) -> None:
        """Drop AdamW's states and the gradients, as the job does before inversion."""
        self.optimizer = None
        self.models.unet.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------------
# 4. The whole job


def section_job(s: Settings, log) -> Table:
    n, dev = s.frames, s.device
    at_paper = (n, s.size, s.steps, s.inference_steps) == (PAPER["frames"], PAPER["size"], PAPER["steps"],
                                                           PAPER["inference_steps"])
    mode = [f"frozen {s.dtype} + fp32 trainable" if s.low else "fp32"]
    mode += ["recompute activations"] if JOB_DEFAULTS.recompute_activations else []
    mode += [name for flag, name in ((s.gradient_checkpointing, "gradient checkpointing"),
                                     (s.channels_last, "channels_last"), (s.compile, "torch.compile")) if flag]
    table = Table(4, f"The whole job with random weights, run by ei2.pipeline's functions ({s.describe()}; "
                     f"{s.steps} tuning steps ({', '.join(mode)}), {s.inference_steps}-step DDIM inversion, one "
                     f"{s.inference_steps}-step guided edit (cfg 7.5, batched), VAE; text embeddings precomputed). "
                     "Paper column: Table 1 of the paper on one V100 at 8 frames 512², 500 steps, QUOTED, not "
                     "measured; ratio only at those settings", "s", "paper V100 (quoted)",
                  peak_labels=("ei2 peak MiB", "paper peak MiB (quoted)"), comparable=lambda row: at_paper)

    log("  building the UNet and VAE ...")
    models = random_models(s, s.gradient_checkpointing, s.compile)
    phases: dict[str, tuple[float, float | None]] = {}

    def phase(name, fn):
        log(f"  {name} ...")
        with Phase(dev) as mem:
            out = fn()
        phases[name] = (mem.seconds, measured_mib(mem))
        return out

    tuner = phase("vae encode", lambda: Tuner(s, models, n))
    phase("first tuning step", lambda: tuner.run(0, 1))  # AdamW allocates its states (and torch.compile compiles)
    done = [1]

    def tune():
        t0 = time.perf_counter()
        while done[0] < s.steps:
            stop = min(s.steps, done[0] + 50)
            tuner.run(done[0], stop)
            done[0] = stop
            if s.tuning_budget is not None and time.perf_counter() - t0 > s.tuning_budget:
                break

    phase("tuning", tune)
    tuner.close()
    free(dev)
    x_T = phase("ddim inversion", lambda: invert(models, tuner.posterior, s.inference_steps, progress=False))
    frames = phase("guided edit + vae decode", lambda: render(models, x_T, "an edited video", 7.5, s.inference_steps,
                                                                progress=False))
    finite = bool(torch.isfinite(frames).all())
    models = tuner = None  # free the device before the rows are built
    free(dev)

    def peak(*names):
        vals = [phases[k][1] for k in names]
        return None if any(v is None for v in vals) else max(vals)

    # the tuning phase ran steps 2..done; a run stopped by --tuning-budget is projected to all steps at its mean pace
    per_step = phases["tuning"][0] / max(done[0] - 1, 1)
    tuning_s = phases["first tuning step"][0] + per_step * (s.steps - 1)
    projected = done[0] < s.steps
    note = f"{done[0]} steps, {per_step * 1e3:.4g} ms/step after the first"
    if projected:
        note += f" (stopped at the {s.tuning_budget:g} s budget; the rows below project all {s.steps} steps)"
    inference = phases["ddim inversion"][0] + phases["guided edit + vae decode"][0]
    whole = phases["vae encode"][0] + tuning_s + inference
    tag = " (projected)" if projected else ""
    table.rows = [
        Row("vae encode", phases["vae encode"][0], None, phases["vae encode"][1], None,
            f"{n} frames, 4 at a time; + AdamW set-up"),
        Row("first tuning step", phases["first tuning step"][0], None, phases["first tuning step"][1], None,
            "allocates AdamW's states" + (", compiles" if s.compile else "")),
        Row("tuning", phases["tuning"][0], None, phases["tuning"][1], None, note),
        Row("ddim inversion", phases["ddim inversion"][0], None, phases["ddim inversion"][1], None,
            f"{s.inference_steps} steps, empty prompt, batch 1 x {n} frames"),
        Row("tuning + inversion" + tag, tuning_s + phases["ddim inversion"][0], PAPER["tuning_inversion_s"],
            peak("first tuning step", "tuning", "ddim inversion"), PAPER["training_peak_mib"],
            "paper: 12.5 min, 11.0 GiB"),
        Row("guided edit + vae decode", phases["guided edit + vae decode"][0], None,
            phases["guided edit + vae decode"][1], None,
            f"{s.inference_steps} steps, batch 2 x {n} frames; frames {'finite' if finite else 'NOT finite'}"),
        Row("inference (edit + decode)", phases["guided edit + vae decode"][0], PAPER["inference_s"],
            phases["guided edit + vae decode"][1], PAPER["inference_peak_mib"], "paper: 0.5 min, 5.3 GiB"),
        Row(T_INFER, inference, None, peak("ddim inversion", "guided edit + vae decode"), None,
            "issue target: under 5 s and 5.3 GiB"),
        Row("whole job" + tag, whole, PAPER["tuning_inversion_s"] + PAPER["inference_s"], peak(*phases),
            PAPER["training_peak_mib"], "paper: 12.5 + 0.5 min; model building excluded"),
    ]
    return table


# ----------------------------------------------------------------------------------------------------------------------
# 5. The targets


def tuning_peak(tuner: Tuner, s: Settings, checkpointing: bool, steps: int = 2) -> tuple[float | None, float]:
    """(peak MiB, seconds per step) over `steps` tuning steps after a first one (AdamW's states exist then)."""
    tuner.models.unet.gradient_checkpointing = checkpointing
    tuner.run(0, 1)
    with Phase(s.device) as mem:
        tuner.run(1, 1 + steps)
    return measured_mib(mem), mem.seconds / steps


def find_row(tables: dict[int, Table], section: int, name: str) -> Row | None:
    """The row called `name` (or `name (projected)`) of a section's table, None if the section did not run."""
    table = tables.get(section)
    return next((r for r in table.rows if r.name in (name, name + " (projected)")), None) if table else None


def section_targets(s: Settings, log, tables: dict[int, Table]) -> Table:
    """Each target of the speed-and-memory issue next to what this run measured: the ratio column is measured /
    bound, "pass" says whether it is met. Figures come from sections 1, 2 and 4 of this run where they ran; the
    memory of gradient checkpointing at --frames and at 24 frames is measured here."""
    setting = dict(device=s.device.type, size=s.size, frames=s.frames, steps=s.steps,
                   inference_steps=s.inference_steps, dtype=s.dtype)
    off = [f"{k} {setting[k]} (target {v})" for k, v in TARGET_SETTING.items() if setting[k] != v]
    if s.tiny:
        off.insert(0, "tiny config (target SD v1-4)")
    table = Table(5, f"Targets ({s.describe()}): measured vs bound, ratio = measured / bound. The targets hold for "
                     "random SD v1-4 weights, 8 frames at 512², bf16, 500 steps, 50 DDIM steps, one H100/H200 (the "
                     "CPU row: SD v1-4 config on a CPU)" + (f"; this run differs: {', '.join(off)}, so pass reads "
                                                             "n/a" if off else ""),
                  "", "bound", peak_labels=(), extra_columns=("unit", "pass"))
    measured: dict[str, tuple[float | None, str]] = {}

    step = find_row(tables, 2, "best ei2 vs diffusers base")
    measured[T_STEP] = (step.ratio, step.note) if step else (None, "section 2 with diffusers not run")
    job = find_row(tables, 4, "whole job")
    measured[T_JOB] = (job.ei2, job.name) if job else (None, "section 4 not run")
    tuning = [find_row(tables, 4, name) for name in ("first tuning step", "tuning")]
    if all(tuning) and not (s.gradient_checkpointing or s.compile):  # section 4 ran in the default mode
        measured[T_PEAK] = (max(r.ei2_peak_mib or 0 for r in tuning), "section 4, tuning phases")
    infer = find_row(tables, 4, T_INFER)
    measured[T_INFER] = (infer.ei2, "section 4") if infer else (None, "section 4 not run")
    measured[T_INFER_PEAK] = (infer.ei2_peak_mib, "section 4") if infer else (None, "section 4 not run")
    fwd = find_row(tables, 1, "image UNet (same math)")
    measured[T_CPU] = ((fwd.ratio, "section 1") if fwd and s.device.type == "cpu" and not s.tiny
                       else (None, "a CPU run of section 1 at the SD v1-4 config"))

    runs = [(T_PEAK_GC, s.frames, True), (T_PEAK_24, 24, True)]
    if T_PEAK not in measured:
        runs.insert(0, (T_PEAK, s.frames, False))
    log("  building the UNet and VAE ...")
    models = random_models(s)  # one set of models for every run; each run has its own clip and AdamW
    for name, frames, checkpointing in runs:
        if s.out_of_time():
            measured[name] = (None, "skipped: --time-budget spent")
            continue
        if frames > s.frames and s.device.type == "cpu" and not s.tiny:
            measured[name] = (None, "run on CUDA (or with --tiny): too slow on a CPU")
            continue
        log(f"  {name}: {frames} frames ...")
        try:
            mib, sec = tuning_peak(Tuner(s, models, frames), s, checkpointing)
            measured[name] = (mib, f"{frames} frames, {sec * 1e3:.4g} ms/step")
        except torch.cuda.OutOfMemoryError:
            measured[name] = (None, f"{frames} frames: out of memory")
        models.unet.zero_grad(set_to_none=True)
        free(s.device)
    del models
    free(s.device)

    table.rows = target_rows(measured, off, cpu_full=s.device.type == "cpu" and not s.tiny)
    return table


def target_rows(measured: dict[str, tuple[float | None, str]], off: list[str], cpu_full: bool) -> list[Row]:
    """One row per target: measured value (None: not measured), bound, note, unit, pass. pass is "yes" when value <=
    bound, "NO" when not, "n/a" when unmeasured or when the run's setting is not the target's (`off` lists how it
    differs; the CPU row applies to CPU runs at the SD v1-4 config instead)."""
    rows = []
    for name, bound, unit in TARGETS:
        value, note = measured.get(name, (None, "not measured"))
        applies = cpu_full if name == T_CPU else not off
        if not applies:
            verdict = "n/a"
        elif value is None:
            verdict = "NO" if "out of memory" in note else "n/a"
        else:
            verdict = "yes" if value <= bound else "NO"
        rows.append(Row(name, value, bound, note=note, extra={"unit": unit, "pass": verdict}))
    return rows
