"""`python -m ei2.bench`: speed and memory of ei2, measured side by side with diffusers in the same process.

Four sections, one table each (see docs/bench.md for what every row means):
  1. forward    UNet forward, ei2 `UNet` vs diffusers `UNet2DConditionModel` on the same random SD weights.
  2. train      one tuning step (forward, backward, AdamW) of the EI² video model vs diffusers frame by frame.
  3. attention  the frame attentions (self, sca, ffam r=2, ffam r=4, full) at the largest UNet level; reference = SCA.
  4. job        the whole job: VAE encode, N tuning steps, DDIM inversion, one guided edit, VAE decode, per phase,
                next to the paper's V100 figures (quoted, not measured).

Every table row is `| name | ei2 | ref | ratio | ... |` with ratio = ei2 / ref. Times are medians of --repeats runs
after --warmup runs (synchronized on CUDA). Peak memory: on CUDA `torch.cuda.max_memory_allocated` with only the
measured model on the device (absolute: weights + activations + optimizer state); on CPU the increase of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set at the start of the
measurement, "n/a" where the kernel does not allow the reset.

diffusers is the reference; its side lives in benchmarks/diffusers_reference.py, outside the ei2 package (ei2 never
imports diffusers). Without diffusers, or without that folder, the reference columns read n/a.
Random weights everywhere: speed does not depend on the values, and each parameter's values are seeded by its name, so
ei2 and diffusers get identical weights without a checkpoint on disk.

The training levers are small functions: `ei2.pipeline.freeze_to_dtype_` (shared with the training job),
`channels_last_`, `make_optimizer`, `compile_model`, `tuning_step`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import ddim
from .attention import FrameAttention
from .checkpoint import atomic_path
from .pipeline import freeze_to_dtype_
from .unet import UNet, UNetConfig, VideoOptions, is_temporal_key, mark_trainable
from .vae import AutoencoderKL, VAEConfig

LR = 3e-5  # the paper's learning rate (section 5), constant
WEIGHT_DECAY = 1e-2  # Tune-A-Video's AdamW setting, which EI² keeps
MIB = 2**20

# The paper's Table 1 (one V100, 8 frames at 512², 500 tuning steps, 50 DDIM steps): quoted, never measured here.
PAPER = {"frames": 8, "size": 512, "steps": 500, "inference_steps": 50,
         "tuning_inversion_s": 12.5 * 60, "inference_s": 0.5 * 60,
         "training_peak_mib": 11.0 * 1024, "inference_peak_mib": 5.3 * 1024}

SECTIONS = {1: "forward", 2: "train", 3: "attention", 4: "job"}

# The GPU protocol: one command, one H100, under 5 minutes (README / docs/bench.md). The tuning phase of the whole job
# stops at `tuning_budget` seconds if 500 steps would take longer, and then says how many steps it ran.
PROTOCOLS = {
    "gpu": dict(device="cuda", size=512, frames=8, dtype="bf16", sections="1,2,3,4", steps=500, inference_steps=50,
                repeats=10, warmup=3, gradient_checkpointing=True, compile=False, tuning_budget=90.0,
                json="bench-gpu.json"),
}

# ----------------------------------------------------------------------------------------------------------------------
# Tables


@dataclass
class Row:
    name: str
    ei2: float | None
    ref: float | None
    ei2_peak_mib: float | None = None
    ref_peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)  # more columns (section 3: key lengths), in column order

    @property
    def ratio(self) -> float | None:
        if self.ei2 is None or self.ref is None or self.ref == 0:
            return None
        return self.ei2 / self.ref


@dataclass
class Table:
    section: int
    title: str
    unit: str  # of the ei2 / ref figures
    ref_label: str  # what the reference column holds
    peak_labels: tuple[str, str] = ("ei2 peak MiB", "ref peak MiB")
    extra_columns: tuple[str, ...] = ()
    rows: list[Row] = field(default_factory=list)
    comparable: Callable[[Row], bool] = lambda row: True  # rows whose ratio is meaningful

    def columns(self) -> list[str]:
        return (["name", f"ei2 {self.unit}", f"{self.ref_label} {self.unit}", "ratio", *self.peak_labels,
                 *self.extra_columns, "note"])

    def ratio(self, row: Row) -> float | None:
        return row.ratio if self.comparable(row) else None

    def header(self) -> str:
        return f"## {self.section}. {self.title}"

    def markdown(self) -> str:
        cols = self.columns()
        lines = [self.header(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [r.name, fmt(r.ei2), fmt(r.ref), fmt_ratio(self.ratio(r)), fmt(r.ei2_peak_mib),
                     fmt(r.ref_peak_mib), *(str(r.extra.get(c, "")) for c in self.extra_columns), r.note]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"section": self.section, "key": SECTIONS[self.section], "title": self.title, "unit": self.unit,
                "ref_label": self.ref_label, "columns": self.columns(),
                "rows": [{"name": r.name, "ei2": r.ei2, "ref": r.ref, "ratio": self.ratio(r),
                          "ei2_peak_mib": r.ei2_peak_mib, "ref_peak_mib": r.ref_peak_mib, "note": r.note, **r.extra}
                         for r in self.rows]}


def fmt(v: float | None, digits: int = 4) -> str:
    """`digits` significant digits in plain notation (never an exponent); None -> n/a."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so the resident set afterwards tracks live memory: pages
    the allocator kept from earlier runs would otherwise hide new allocations from the peak-RSS figure."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory (MiB) of the code inside `with`: CUDA max_memory_allocated (absolute) or CPU peak-RSS increase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None
        self.absolute_mib: float | None = None  # CPU: the peak resident set itself

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self._ok = _reset_peak_rss()
            self._start = _proc_status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            peak = _proc_status_mib("VmHWM")
            if self._ok and peak is not None and self._start is not None:
                self.mib = max(0.0, peak - self._start)
                self.absolute_mib = peak
        return False


def median_time(fn: Callable[[], object], device: torch.device, warmup: int,
                repeats: int) -> tuple[float, float | None]:
    """(median seconds of `repeats` calls after `warmup` calls, peak MiB over the timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.mib


@dataclass
class Case:
    """Something to time: `setup()` builds it (models, optimizer) and returns the function to time."""

    name: str
    setup: Callable[[], Callable[[], object]]


def run_cases(cases: list[Case], s: "Settings", log) -> dict[str, tuple[float, float | None]]:
    """{name: (median seconds, peak MiB)} for every case.

    Sequential (default on CUDA): one case at a time, so only its model is on the device and the absolute peak is
    its own. Interleaved (default on CPU): all cases built first, then timed in rounds (a, b, c, a, b, c, ...), so
    load from other processes on a shared machine falls on every case alike and the ratios stay meaningful; the peak
    is then measured on one extra call of each case."""
    dev, out = s.device, {}
    if not s.interleave:
        for case in cases:
            log(f"  {case.name} ...")
            fn = case.setup()
            out[case.name] = median_time(fn, dev, s.warmup, s.repeats)
            del fn
            free(dev)
        return out
    fns = {}
    for case in cases:
        log(f"  building {case.name} ...")
        fns[case.name] = case.setup()
    log(f"  timing {len(fns)} case(s) in {s.repeats} interleaved round(s) ...")
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(s.repeats):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    for name, fn in fns.items():
        with PeakMemory(dev) as mem:
            fn()
        out[name] = (statistics.median(times[name]), mem.mib)
    fns.clear()
    free(dev)
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 / fp16 autocast on `device`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------------------------
# Models with identical random weights


@torch.no_grad()
def init_sd_weights_(model: nn.Module, seed: int = 0, skip: Callable[[str], bool] = is_temporal_key) -> nn.Module:
    """Seeded random values for every parameter, each from its own generator seeded by (seed, name), so two models
    with the same parameter names (ei2's UNet and diffusers') get identical weights whatever their order. Scales keep
    activations O(1) through the depth (weights ~ N(0, 1/fan_in), norm weights ~ 1, biases ~ 0.05): with PyTorch's
    default init activations shrink, and small floats (denormals) would make CPU timings meaningless.
    `skip(name)` keeps a parameter's own init (default: ei2's new temporal modules, which SD does not hold)."""
    for name, p in model.named_parameters():
        if skip(name):
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.05 * noise)
        else:
            p.copy_(0.05 * noise)
    return model


def _reference():
    """benchmarks/diffusers_reference.py of the repository (a dev module: ei2 itself never imports diffusers)."""
    import importlib
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("benchmarks.diffusers_reference")
    except ImportError:  # an installed ei2 without the repository's benchmarks/ folder
        return None


def diffusers_version() -> str | None:
    ref = _reference()
    return ref.version() if ref is not None else None


def diffusers_available() -> bool:
    return diffusers_version() is not None


def reference_unet(config: UNetConfig, seed: int = 0) -> nn.Module:
    """diffusers' UNet2DConditionModel with the architecture of `config` and `init_sd_weights_` (CPU, fp32)."""
    return init_sd_weights_(_reference().unet(config), seed)


def ei2_unet(config: UNetConfig, seed: int = 0, **video) -> UNet:
    """ei2's UNet with `init_sd_weights_` (CPU, fp32); its temporal modules keep their fresh init, as when loading
    SD."""
    return init_sd_weights_(UNet(config, VideoOptions(**video)), seed)


IMAGE = dict(frame_attention="self", temporal="none", resnet_norm="frame")  # exactly SD's image UNet, per frame
EI2 = dict(frame_attention="ffam", ratio=2, temporal="stam")  # the paper's model (Tune-A-Video's video GroupNorm)


# ----------------------------------------------------------------------------------------------------------------------
# Training levers (candidates for ei2.train)


def mark_trainable_reference(model: nn.Module) -> int:
    """diffusers' UNet with the paper's trainable projections (attn1.to_q, attn2.to_q); returns their count."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("attn1.to_q.weight", "attn2.to_q.weight")))
        count += p.numel() if p.requires_grad else 0
    return count


def channels_last_(model: nn.Module) -> nn.Module:
    """NHWC layout for the 4-D weights (convolutions); tensor cores and oneDNN prefer it."""
    return model.to(memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, lr 3e-5 (paper), weight decay 1e-2 (Tune-A-Video); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")


def compile_model(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def tuning_step(model: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """One step of Eq. 2's loss: MSE(eps_theta(x_t, t, c), eps), backward, AdamW. Returns the loss, detached; nothing
    here waits for the device (no .item())."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        pred = model(x, t, context)
    loss = F.mse_loss(pred.float(), target.float())
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------------------
# Settings


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Settings:
    device: torch.device
    size: int
    frames: int
    steps: int
    inference_steps: int
    dtype: str
    gradient_checkpointing: bool
    compile: bool
    channels_last: bool
    sections: list[int]
    repeats: int
    warmup: int
    tiny: bool
    reference: bool
    tuning_budget: float | None
    interleave: bool = False
    seed: int = 0

    @property
    def latent(self) -> int:
        return self.size // 8

    @property
    def low(self) -> torch.dtype | None:
        """The low precision of the run (autocast / frozen weights), None for fp32."""
        return None if self.dtype == "fp32" else DTYPES[self.dtype]

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig.tiny() if self.tiny else UNetConfig()

    @property
    def vae_config(self) -> VAEConfig:
        return VAEConfig.tiny() if self.tiny else VAEConfig()

    def describe(self) -> str:
        return (f"{'tiny' if self.tiny else 'SD v1-4'} config, {self.frames} frame(s) at {self.size}² "
                f"(latent {self.latent}x{self.latent}), {self.dtype}, {self.device.type}")


def inputs(s: Settings, ctx_dim: int, batch: int = 1, seed: int = 1):
    """Seeded latents (batch, 4, f, h, w), text context (batch, 77, ctx_dim), timestep (0-d int64) on the device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, s.frames, s.latent, s.latent, generator=g)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g)
    return x.to(s.device), ctx.to(s.device), torch.tensor(500, device=s.device)


# ----------------------------------------------------------------------------------------------------------------------
# 1. UNet forward


def share_weights_(dst: nn.Module, src: nn.Module, fresh: Callable[[str], bool] = is_temporal_key) -> nn.Module:
    """Make `dst`'s parameters the very tensors of `src` (same names: ei2 and diffusers UNets, or two ei2 variants),
    so several models cost the memory of one. Only keys with `fresh(key)` may be missing from `src`."""
    own, theirs = dst.state_dict(), src.state_dict()
    missing = [k for k in own if k not in theirs and not fresh(k)]
    unexpected = [k for k in theirs if k not in own and not fresh(k)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dst.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False, assign=True)
    return dst


def section_forward(s: Settings, log) -> Table:
    cfg, dev, n = s.unet_config, s.device, s.frames
    dtype = DTYPES[s.dtype]
    table = Table(1, f"UNet forward: ei2 UNet vs diffusers UNet2DConditionModel ({s.describe()}, median of "
                     f"{s.repeats}; batch = frames)", "ms", "diffusers")
    x, ctx, t = inputs(s, cfg.cross_attention_dim)
    x, ctx = x.to(dtype), ctx.to(dtype)
    x_frames = x[0].transpose(0, 1).contiguous()  # (1, 4, f, h, w) -> (f, 4, h, w): diffusers sees frames as a batch
    ctx_frames = ctx.expand(n, -1, -1)
    log("  initializing the SD weights ...")
    base = ei2_unet(cfg, s.seed, **IMAGE)  # CPU fp32 weights, shared by every model of this section
    outputs = {}

    def case(name, build, call):
        def setup():
            model = build().to(dev, dtype).eval()
            if s.channels_last:
                channels_last_(model)
            fn = compile_model(model) if s.compile else model

            @torch.no_grad()
            def run():
                outputs[name] = call(fn)

            return run

        return Case(name, setup)

    variants = [("image UNet (same math)", IMAGE)]
    if n > 1:
        variants += [("video GroupNorm (TAV)", dict(IMAGE, resnet_norm="video")), ("EI² (FFAM r=2 + STAM)", EI2)]
    cases = []
    if s.reference:
        cases.append(case("diffusers", lambda: share_weights_(_reference().unet(cfg), base),
                          lambda m: m(x_frames, t, ctx_frames).sample))
    for name, video in variants:
        cases.append(case(name, lambda video=video: share_weights_(UNet(cfg, VideoOptions(**video)), base),
                          lambda m: m(x, t, ctx)))
    results = run_cases(cases, s, log)
    del base
    free(dev)
    ref = results.get("diffusers")
    ref_ms, ref_mib = (ref[0] * 1e3, ref[1]) if ref else (None, None)
    for name, video in variants:
        note = ""
        if video is IMAGE and "diffusers" in outputs:
            got = outputs[name].float()[0].transpose(0, 1)  # (4, f, h, w) -> (f, 4, h, w)
            want = outputs["diffusers"].float()
            note = f"max rel diff {((got - want).abs().max() / want.abs().max()).item():.1e}"
        elif video is not IMAGE:
            note = "ref: diffusers per frame (different math)"
        sec, mib = results[name]
        table.rows.append(Row(name, sec * 1e3, ref_ms, mib, ref_mib, note))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# 2. One tuning step


@dataclass
class Lever:
    """One row of section 2: which training levers both sides use."""

    name: str
    amp: torch.dtype | None = None  # autocast dtype
    frozen_low: bool = False  # freeze_to_dtype_
    checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False


def levers(s: Settings) -> list[Lever]:
    low, name = s.low, s.dtype
    base = Lever(f"tuning step ({'fp32' if low is None else name + ' autocast'})", amp=low)
    rows = [base]
    best = base
    if low is not None:
        best = Lever(f"tuning step (frozen {name}, fp32 trainable)", amp=low, frozen_low=True)
        rows.append(best)
    plus = " + " if low is not None else ""
    prefix = f"frozen {name}{plus}" if low is not None else ""
    if s.gradient_checkpointing:
        rows.append(Lever(f"tuning step ({prefix}gradient checkpointing)", amp=low, frozen_low=low is not None,
                          checkpointing=True))
    if s.channels_last:
        rows.append(Lever(f"tuning step ({prefix}channels_last)", amp=low, frozen_low=low is not None,
                          channels_last=True))
    if s.compile:
        rows.append(Lever(f"tuning step ({prefix}torch.compile)", amp=low, frozen_low=low is not None, compile=True))
    return rows


def prepare_for_tuning(model: nn.Module, lever: Lever, device: torch.device, ei2: bool):
    """Trainable set, levers, device and optimizer for one side; returns (callable model, optimizer, trainable
    count)."""
    count = mark_trainable(model) if ei2 else mark_trainable_reference(model)
    model.to(device).train()
    if lever.frozen_low:
        freeze_to_dtype_(model, lever.amp)
    if lever.channels_last:
        channels_last_(model)
    if lever.checkpointing:
        if ei2:
            model.gradient_checkpointing = True
        else:
            model.enable_gradient_checkpointing()
    opt = make_optimizer(model, device)
    fn = compile_model(model) if lever.compile else model
    return fn, opt, count


def section_train(s: Settings, log) -> Table:
    cfg, dev, n = s.unet_config, s.device, s.frames
    table = Table(2, f"One tuning step (forward + backward + AdamW lr {LR:g}): ei2 EI² video model (FFAM r=2 + STAM) "
                     f"vs diffusers frame by frame, trainable attn1.to_q + attn2.to_q (+ STAM for ei2) "
                     f"({s.describe()}, median of {s.repeats})", "ms", "diffusers")
    x, ctx, t = inputs(s, cfg.cross_attention_dim)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    x_frames, target_frames = (v[0].transpose(0, 1).contiguous() for v in (x, target))
    ctx_frames = ctx.expand(n, -1, -1)
    info: dict[str, dict] = {}

    def case(name, lever, ei2):
        def setup():
            model = ei2_unet(cfg, s.seed, **EI2) if ei2 else reference_unet(cfg, s.seed)
            fn, opt, count = prepare_for_tuning(model, lever, dev, ei2)
            if ei2:
                args = (fn, opt, x, t, ctx, target, lever.amp)
            else:
                args = (lambda xx, tt, cc: fn(xx, tt, cc).sample, opt, x_frames, t, ctx_frames, target_frames,
                        lever.amp)
            info[name] = {"count": count}
            for _ in range(2 if lever.compile else 1):  # AdamW allocates its states in the first step
                tuning_step(*args)

            def run():
                info[name]["loss"] = tuning_step(*args)

            return run

        return Case(name, setup)

    rows = []
    for lever in levers(s):
        cases = [case(f"ei2 {lever.name}", lever, True)]
        if s.reference:
            cases.insert(0, case(f"diffusers {lever.name}", lever, False))
        results = run_cases(cases, s, log)
        ours, ours_info = results[f"ei2 {lever.name}"], info.pop(f"ei2 {lever.name}")
        ref, ref_info = results.get(f"diffusers {lever.name}"), info.pop(f"diffusers {lever.name}", None)
        note = f"trainable {ours_info['count'] / 1e6:.3g} M"
        if ref_info is not None:
            note += f" vs {ref_info['count'] / 1e6:.3g} M; loss {ours_info['loss'].item():.4g} vs " \
                    f"{ref_info['loss'].item():.4g}"
        rows.append(Row(lever.name, ours[0] * 1e3, ref[0] * 1e3 if ref else None, ours[1], ref[1] if ref else None,
                        note))
    table.rows = rows
    if len(rows) > 1 and rows[0].ref is not None:
        best = min(rows, key=lambda r: r.ei2)
        table.rows.append(Row("best ei2 vs diffusers base", best.ei2, rows[0].ref, best.ei2_peak_mib,
                              rows[0].ref_peak_mib, f"ei2: {best.name}; ref: {rows[0].name}"))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# 3. Attention variants


ATTENTIONS = [("self", "self", 1), ("sca", "sca", 1), ("ffam r=2", "ffam", 2), ("ffam r=4", "ffam", 4),
              ("full", "full", 1)]


def key_length(mode: str, r: int, n: int, h: int, w: int) -> int:
    """Keys per query frame: self l, SCA 2l, FFAM l + (n-1) ceil(h/r) ceil(w/r) (about l + (n-1) l / r²), full n l."""
    l = h * w
    if n == 1 or mode == "self":
        return l
    if mode == "sca":
        return 2 * l
    if mode == "ffam":
        return l + (n - 1) * math.ceil(h / r) * math.ceil(w / r)
    return n * l


def section_attention(s: Settings, log) -> Table:
    cfg, dev, n = s.unet_config, s.device, s.frames
    dim, heads = cfg.block_out_channels[0], cfg.attention_head_dim
    h = w = s.latent
    l = h * w
    dtype = DTYPES[s.dtype]
    table = Table(3, f"Frame attention at the largest level (attn1 only, forward + backward): {l} tokens "
                     f"({h}x{w}), {dim} channels, {heads} heads x {dim // heads}, {n} frame(s), {s.dtype}, "
                     f"{dev.type}, median of {s.repeats}; reference = Tune-A-Video's SCA, ratio = variant / SCA",
                  "ms", "SCA", peak_labels=("peak MiB", "SCA peak MiB"),
                  extra_columns=("keys per query frame", "keys / SCA keys", "formula"))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, l, dim, generator=g).to(dev, dtype)
    grad = torch.randn(n, l, dim, generator=g).to(dev, dtype)
    formulas = {"self": "l", "sca": "2l", "ffam r=2": "l+(n-1)l/4", "ffam r=4": "l+(n-1)l/16", "full": "n l"}

    def case(name, mode, r):
        def setup():
            attn = FrameAttention(dim, heads, mode=mode, ratio=r)
            init_sd_weights_(attn, s.seed, skip=lambda k: False)
            attn.to(dev, dtype)
            for pname, p in attn.named_parameters():
                p.requires_grad_(pname == "to_q.weight")  # the paper tunes W_Q of the frame attention
            x = x0.detach().clone().requires_grad_(True)  # the gradient flows on to the layers below, as in tuning

            def run():
                x.grad = None
                attn.to_q.weight.grad = None
                attn(x, n, (h, w)).backward(grad)

            return run

        return Case(name, setup)

    timed = run_cases([case(*a) for a in ATTENTIONS], s, log)
    results = {name: (timed[name][0] * 1e3, timed[name][1], key_length(mode, r, n, h, w))
               for name, mode, r in ATTENTIONS}
    sca_ms, sca_mib, sca_keys = results["sca"]
    for name, _, _ in ATTENTIONS:
        ms, mib, keys = results[name]
        table.rows.append(Row(name, ms, sca_ms, mib, sca_mib,
                              extra={"keys per query frame": str(keys), "keys / SCA keys": f"{keys / sca_keys:.3f}",
                                     "formula": formulas[name]}))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# 4. The whole job


def section_job(s: Settings, log) -> Table:
    cfg, dev, n = s.unet_config, s.device, s.frames
    low = s.low
    # the ratio to the paper's figures means something only at its settings, with every tuning step run
    at_paper = [(n, s.size, s.steps, s.inference_steps) == (PAPER["frames"], PAPER["size"], PAPER["steps"],
                                                            PAPER["inference_steps"])]
    levers_used = [f"frozen {s.dtype} + fp32 trainable" if low else "fp32"]
    levers_used += [name for flag, name in ((s.gradient_checkpointing, "gradient checkpointing"),
                                            (s.channels_last, "channels_last"), (s.compile, "torch.compile")) if flag]
    table = Table(4, f"The whole job with random weights ({s.describe()}; {s.steps} tuning steps "
                     f"({', '.join(levers_used)}), {s.inference_steps}-step DDIM inversion, one {s.inference_steps}-"
                     f"step guided edit (cfg 7.5, batched), VAE). Paper column: Table 1 of the paper on one V100 at 8 "
                     f"frames 512², 500 steps, QUOTED, not measured; ratio only at those settings",
                  "s", "paper V100 (quoted)", peak_labels=("ei2 peak MiB", "paper peak MiB (quoted)"),
                  comparable=lambda row: at_paper[0])

    log("  building the UNet and VAE ...")
    unet = ei2_unet(cfg, s.seed, **EI2)
    vae = init_sd_weights_(AutoencoderKL(s.vae_config), s.seed, skip=lambda k: False).to(dev, low or torch.float32)
    vae.eval().requires_grad_(False)
    lever = Lever("job", amp=low, frozen_low=low is not None, checkpointing=s.gradient_checkpointing,
                  channels_last=s.channels_last, compile=s.compile)
    fn, opt, _ = prepare_for_tuning(unet, lever, dev, ei2=True)
    g = torch.Generator().manual_seed(4)
    clip = (torch.rand(n, 3, s.size, s.size, generator=g) * 2 - 1).to(dev, low or torch.float32)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(dev)  # text embeddings, computed once
    empty = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(dev)  # the empty prompt's
    alphas = ddim.alphas_cumprod().to(dev)
    phases: dict[str, tuple[float, float | None]] = {}

    def phase(name, fn_):
        log(f"  {name} ...")
        sync(dev)
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            out = fn_()
            sync(dev)
            sec = time.perf_counter() - t0
        phases[name] = (sec, mem.mib)
        return out

    @torch.no_grad()
    def encode():  # (f, 3, H, W) -> (1, 4, f, h, w); the posterior mean (a sample costs the same)
        lat = vae.encode_latents(clip, sample=False).float()
        return lat.transpose(0, 1)[None].contiguous()

    latents = phase("vae encode", encode)

    done = [0]

    def tune():
        t_start = time.perf_counter()
        for i in range(s.steps):
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,), device=dev)
            x_t = ddim.add_noise(latents, noise, t, alphas)
            tuning_step(fn, opt, x_t, t, ctx, noise, low)
            done[0] = i + 1
            if s.tuning_budget is not None and time.perf_counter() - t_start > s.tuning_budget:
                break

    phase("tuning", tune)
    # tuning is over: the gradients and AdamW states go before inference, as a real job would drop them
    opt.zero_grad(set_to_none=True)
    del opt
    free(dev)
    unet.eval()

    def model(x, t, c):  # eps in fp32, so the DDIM arithmetic stays fp32
        with autocast(dev, low):
            return fn(x, t, c).float()

    x_T = phase("ddim inversion", lambda: ddim.invert(model, latents, empty, num_steps=s.inference_steps))
    edit = phase("guided edit", lambda: ddim.sample(model, x_T, ctx, uncond_context=empty,
                                                    num_steps=s.inference_steps, guidance=7.5))

    @torch.no_grad()
    def decode():  # (1, 4, f, h, w) -> (f, 3, H, W)
        return vae.decode_latents(edit[0].transpose(0, 1).to(low or torch.float32)).float()

    frames = phase("vae decode", decode)
    finite = bool(torch.isfinite(frames).all())
    del unet, vae, fn
    free(dev)

    def peak(*names):
        vals = [phases[k][1] for k in names]
        return None if any(v is None for v in vals) else max(vals)

    def total(*names):
        return sum(phases[k][0] for k in names)

    tuned = done[0]
    at_paper[0] = at_paper[0] and tuned == s.steps
    tune_note = f"{tuned} steps, {phases['tuning'][0] / max(tuned, 1) * 1e3:.4g} ms/step"
    if tuned < s.steps:
        tune_note += f" (stopped at the {s.tuning_budget:g} s budget; {s.steps} steps projected " \
                     f"{phases['tuning'][0] / tuned * s.steps:.4g} s)"
    rows = [
        Row("vae encode", phases["vae encode"][0], None, phases["vae encode"][1], None, f"{n} frames"),
        Row("tuning", phases["tuning"][0], None, phases["tuning"][1], None, tune_note),
        Row("ddim inversion", phases["ddim inversion"][0], None, phases["ddim inversion"][1], None,
            f"{s.inference_steps} steps, empty prompt"),
        Row("tuning + inversion", total("tuning", "ddim inversion"), PAPER["tuning_inversion_s"],
            peak("tuning", "ddim inversion"), PAPER["training_peak_mib"], "paper: 12.5 min, 11.0 GiB"),
        Row("guided edit", phases["guided edit"][0], None, phases["guided edit"][1], None,
            f"{s.inference_steps} steps, batch 2 x {n} frames"),
        Row("vae decode", phases["vae decode"][0], None, phases["vae decode"][1], None,
            f"{n} frames, {'finite' if finite else 'NOT finite'}"),
        Row("inference (edit + decode)", total("guided edit", "vae decode"), PAPER["inference_s"],
            peak("guided edit", "vae decode"), PAPER["inference_peak_mib"], "paper: 0.5 min, 5.3 GiB"),
        Row("whole job", total(*phases), PAPER["tuning_inversion_s"] + PAPER["inference_s"], peak(*phases),
            PAPER["training_peak_mib"], "paper: 12.5 + 0.5 min; model building excluded"),
    ]
    table.rows = rows
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Command line


EPILOG = f"""\
sections (--sections, numbers or names):
  1 forward    UNet forward, ei2 vs diffusers UNet2DConditionModel, same random SD weights, input and dtype.
               Rows: image UNet (identical math, with the max relative difference), and for frames > 1 the video
               variants against the same per-frame reference: video GroupNorm (Tune-A-Video's norm over frames) and
               the EI² model (FFAM r=2 + STAM).
  2 train      one tuning step (forward, backward, AdamW lr 3e-5, MSE to a random noise target): EI² video model vs
               diffusers frame by frame with the same trainable projections. One row per lever (both sides use it):
               base precision; frozen weights in bf16/fp16 with fp32 trainable tensors; + gradient checkpointing;
               + channels_last; + torch.compile.
  3 attention  FrameAttention self / sca / ffam r=2 / ffam r=4 / full at the largest level ((size/8)² tokens,
               block_out_channels[0] channels), forward + backward; ratio = variant / SCA, next to the key lengths.
  4 job        the whole job: VAE encode, --steps tuning steps, DDIM inversion, one guided edit, VAE decode; time and
               peak memory per phase, next to the paper's V100 figures (quoted, not measured).

memory: CUDA max_memory_allocated (absolute, only the measured model on the device); CPU the peak-RSS increase
during the measurement.

defaults: on CPU --size 128 --frames 2 --steps 2 --inference-steps 2 --repeats 3 (full SD v1-4 config);
on CUDA --size 512 --frames 8 --steps 500 --inference-steps 50 --repeats 10.

GPU protocol (one H100, under 5 minutes, writes bench-gpu.json):
  python -m ei2.bench --protocol gpu
  = python -m ei2.bench --device cuda --size 512 --frames 8 --dtype bf16 --sections 1,2,3,4 --steps 500
    --inference-steps 50 --repeats 10 --warmup 3 --gradient-checkpointing --tuning-budget 90 --json bench-gpu.json
  (the tuning phase stops after --tuning-budget seconds if 500 steps take longer, and the row says so)

CI smoke (seconds): python -m ei2.bench --tiny --device cpu --size 64 --frames 2 --steps 2 --inference-steps 2
  --repeats 1 --json /tmp/bench.json
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ei2.bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Speed and memory of ei2 (UNet forward, EI² tuning step, frame attentions, the whole job), each "
                    "next to diffusers measured in the same process (or the paper's quoted V100 figures). Prints "
                    "one markdown table per section; --json writes the same rows.")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), help="a preset; explicit options still override it")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default auto: cuda if available")
    p.add_argument("--size", type=int, help="frame size in pixels (latent = size/8); default 128 on CPU, 512 on CUDA")
    p.add_argument("--frames", type=int, help="frames per clip; default 2 on CPU, 8 on CUDA")
    p.add_argument("--steps", type=int, help="tuning steps of the whole job (section 4); default 2 CPU, 500 CUDA")
    p.add_argument("--inference-steps", type=int, help="DDIM steps of inversion and edit; default 2 CPU, 50 CUDA")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="fp32 (default on CPU) or bf16 (default on CUDA) / fp16: "
                   "sections 1 and 3 cast the modules, sections 2 and 4 use autocast (+ frozen weights in it)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="add a checkpointed row to section 2 and checkpoint the whole job's tuning")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNets (slow to start)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last weights (rows / job)")
    p.add_argument("--sections", help="comma list of 1-4 or forward,train,attention,job (default all)")
    p.add_argument("--repeats", type=int, help="timed runs per figure (median); default 3 CPU, 10 CUDA")
    p.add_argument("--warmup", type=int, help="untimed runs before timing; default 1 CPU, 3 CUDA")
    p.add_argument("--tiny", action="store_true", default=None,
                   help="UNetConfig.tiny() / VAEConfig.tiny() instead of SD v1-4 (CI smoke)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers (reference columns read n/a)")
    p.add_argument("--tuning-budget", type=float, help="seconds after which the job's tuning phase stops early")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                       help="build every case of a table first, then time them in alternating rounds (default on "
                            "CPU: fair under load from other processes)")
    order.add_argument("--sequential", dest="interleave", action="store_false",
                       help="one case at a time, only its model resident (default on CUDA: absolute peak memory)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", help="write all results to this JSON file (atomically)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[Settings, str | None]:
    preset = PROTOCOLS.get(args.protocol, {}) if args.protocol else {}

    def opt(name, cpu, cuda):
        v = getattr(args, name)
        if v is None:
            v = preset.get(name)
        if v is None:
            v = cuda if device.type == "cuda" else cpu
        return v

    dev_name = args.device or preset.get("device") or "auto"
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(dev_name)
    sections = []
    for item in str(opt("sections", "1,2,3,4", "1,2,3,4")).split(","):
        item = item.strip().lower()
        if not item:
            continue
        names = {v: k for k, v in SECTIONS.items()}
        if item.isdigit() and int(item) in SECTIONS:
            sections.append(int(item))
        elif item in names:
            sections.append(names[item])
        else:
            raise SystemExit(f"--sections: unknown section {item!r} (1-4 or {', '.join(SECTIONS.values())})")
    s = Settings(
        device=device,
        size=opt("size", 128, 512),
        frames=opt("frames", 2, 8),
        steps=opt("steps", 2, 500),
        inference_steps=opt("inference_steps", 2, 50),
        dtype=opt("dtype", "fp32", "bf16"),
        gradient_checkpointing=bool(opt("gradient_checkpointing", False, False)),
        compile=bool(opt("compile", False, False)),
        channels_last=bool(opt("channels_last", False, False)),
        sections=sorted(set(sections)),
        repeats=opt("repeats", 3, 10),
        warmup=opt("warmup", 1, 3),
        tiny=bool(opt("tiny", False, False)),
        reference=not args.no_reference and diffusers_available(),
        tuning_budget=opt("tuning_budget", None, None),
        interleave=bool(opt("interleave", True, False)),
    )
    if s.size % 8 or s.size < 8:
        raise SystemExit(f"--size {s.size}: must be a positive multiple of 8")
    min_latent = 2 ** (len(s.unet_config.block_out_channels) - 1)
    if s.latent % min_latent:
        raise SystemExit(f"--size {s.size}: the latent ({s.latent}) must be divisible by {min_latent} (UNet levels)")
    if s.frames < 1 or s.steps < 1 or s.inference_steps < 1 or s.repeats < 1 or s.warmup < 0:
        raise SystemExit("--frames, --steps, --inference-steps and --repeats must be >= 1, --warmup >= 0")
    return s, args.json or preset.get("json")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(s: Settings, argv) -> dict:
    dv = diffusers_version()
    dev = s.device
    return {
        "argv": list(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "interleave": s.interleave,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": dv,
        "reference": s.reference,
        "config": "tiny" if s.tiny else "sd-v1-4",
        "size": s.size, "latent": s.latent, "frames": s.frames, "dtype": s.dtype, "steps": s.steps,
        "inference_steps": s.inference_steps, "repeats": s.repeats, "warmup": s.warmup,
        "gradient_checkpointing": s.gradient_checkpointing, "compile": s.compile, "channels_last": s.channels_last,
        "tuning_budget": s.tuning_budget,
        "memory": "cuda max_memory_allocated, absolute" if dev.type == "cuda" else "cpu peak RSS increase",
        "paper": PAPER,
    }


RUNNERS = {1: section_forward, 2: section_train, 3: section_attention, 4: section_job}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s, json_path = settings_from(args)
    info = meta(s, argv)
    print(f"# ei2.bench: {s.describe()}; {info['device_name']}, {info['cpu_count']} CPU(s), "
          f"{info['torch_threads']} torch threads; torch {info['torch']}, diffusers {info['diffusers'] or 'n/a'}"
          f"{'' if s.reference else ' (reference not run)'}; {info['date']}; load average "
          f"{info['loadavg_1min']:.1f}; {'interleaved' if s.interleave else 'sequential'} timing", flush=True)
    load = info["loadavg_1min"]
    if s.device.type == "cpu" and load is not None and load > (os.cpu_count() or 1) - 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPU(s): other processes compete for the cores, "
              "timings are unreliable (interleaved rounds keep ratios fairer; --threads 1 avoids thread "
              "oversubscription)", file=sys.stderr, flush=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    tables = []
    for sec in s.sections:
        log(f"section {sec} ({SECTIONS[sec]}) ...")
        t0 = time.perf_counter()
        table = RUNNERS[sec](s, log)
        tables.append(table)
        print("\n" + table.markdown() + "\n", flush=True)
        log(f"section {sec} took {time.perf_counter() - t0:.1f} s")
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps({"meta": info, "sections": [t.to_json() for t in tables]}, indent=2))
        log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
