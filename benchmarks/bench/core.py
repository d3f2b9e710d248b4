"""The benchmark's machinery: tables, timing and peak memory, the settings of a run, models with identical random
weights on both sides, and the training levers. The sections (ei2.bench.sections, ei2.bench.job) and the command
line (ei2.bench.cli) are built from these."""

from __future__ import annotations

import gc
import math
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

from ..pipeline import freeze_to_dtype_, make_optimizer
from ..unet import UNet, UNetConfig, VideoOptions, is_temporal_key, mark_trainable
from ..vae import VAEConfig

LR = 3e-5  # the paper's learning rate (section 5), constant
WEIGHT_DECAY = 1e-2  # Tune-A-Video's AdamW setting, which EI² keeps
MIB = 2**20

# The paper's Table 1 (one V100, 8 frames at 512², 500 tuning steps, 50 DDIM steps): quoted, never measured here.
PAPER = {"frames": 8, "size": 512, "steps": 500, "inference_steps": 50,
         "tuning_inversion_s": 12.5 * 60, "inference_s": 0.5 * 60,
         "training_peak_mib": 11.0 * 1024, "inference_peak_mib": 5.3 * 1024}

SECTIONS = {1: "forward", 2: "train", 3: "attention", 4: "job", 5: "targets"}

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
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    def columns(self) -> list[str]:
        return (["name", f"ei2 {self.unit}".strip(), f"{self.ref_label} {self.unit}".strip(), "ratio",
                 *self.peak_labels, *self.extra_columns, "note"])

    def ratio(self, row: Row) -> float | None:
        return row.ratio if self.comparable(row) else None

    def header(self) -> str:
        return f"## {self.section}. {self.title}"

    def markdown(self) -> str:
        cols = self.columns()
        lines = [self.header(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            peaks = [fmt(r.ei2_peak_mib), fmt(r.ref_peak_mib)] if self.peak_labels else []
            cells = [r.name, fmt(r.ei2), fmt(r.ref), fmt_ratio(self.ratio(r)), *peaks,
                     *(str(r.extra.get(c, "")) for c in self.extra_columns), r.note]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + ([""] + self.notes if self.notes else []))

    def to_json(self) -> dict:
        return {"section": self.section, "key": SECTIONS[self.section], "title": self.title, "unit": self.unit,
                "ref_label": self.ref_label, "columns": self.columns(),
                "rows": [{"name": r.name, "ei2": r.ei2, "ref": r.ref, "ratio": self.ratio(r),
                          "ei2_peak_mib": r.ei2_peak_mib, "ref_peak_mib": r.ref_peak_mib, "note": r.note, **r.extra}
                         for r in self.rows], "notes": self.notes}


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

    root = str(Path(__file__).resolve().parents[2])  # the repository: ei2/bench/core.py -> ./
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


def tuning_flops(config: UNetConfig, frames: int, latent: int, video: dict | None = EI2) -> int:
    """FLOPs of one tuning step's forward and backward (AdamW's are negligible) with the paper's trainable set, for
    ei2's UNet with `video` options (default the EI² model) or, with video=None, diffusers frame by frame: counted by
    torch's FlopCounterMode (matrix products, convolutions, attention) on the meta device, where tensors have shapes
    and no values, so the count is exact for the shapes, takes seconds and needs no GPU. Attention is counted as its
    two products forward and the products the needed gradients take backward; a fused GPU kernel may do a little more
    (it recomputes the scores). Gradient checkpointing's recomputation is not counted ("model FLOPs")."""
    from torch.utils.flop_counter import FlopCounterMode

    ei2 = video is not None
    with torch.device("meta"):
        model = UNet(config, VideoOptions(**video)) if ei2 else _reference().unet(config)
        x = torch.randn(1, 4, frames, latent, latent) if ei2 else torch.randn(frames, 4, latent, latent)
        ctx = torch.randn(1 if ei2 else frames, 77, config.cross_attention_dim)
        t = torch.tensor(500)
    if ei2:
        mark_trainable(model)
    else:
        mark_trainable_reference(model)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x, t, ctx)
        (out if ei2 else out.sample).float().square().mean().backward()
    return counter.get_total_flops()


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
    time_budget: float | None = None  # seconds for the whole run (--time-budget)
    deadline: float | None = None  # time.monotonic() after which optional work is skipped

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

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


# ----------------------------------------------------------------------------------------------------------------------
# The rows of section 2: which levers a tuning step uses


@dataclass
class Lever:
    """One row of section 2: which training levers both sides use."""

    name: str
    amp: torch.dtype | None = None  # autocast dtype
    frozen_low: bool = False  # freeze_to_dtype_
    checkpointing: bool = False
    recompute: bool = False  # ei2's recompute_activations (diffusers has no counterpart: reference n/a)
    channels_last: bool = False
    compile: bool = False


def levers(s: Settings) -> list[Lever]:
    """Base precision; frozen low-precision weights; + recompute activations (with frozen weights: the training job's
    default mode); + gradient checkpointing (its memory-saving mode, a target of its own); + channels_last and
    + torch.compile when asked."""
    low, name = s.low, s.dtype
    rows = [Lever(f"tuning step ({'fp32' if low is None else name + ' autocast'})", amp=low)]
    if low is not None:
        rows.append(Lever(f"tuning step (frozen {name}, fp32 trainable)", amp=low, frozen_low=True))
    prefix = f"frozen {name} + " if low is not None else ""
    frozen = low is not None
    rows.append(Lever(f"tuning step ({prefix}recompute activations)", amp=low, frozen_low=frozen, recompute=True))
    rows.append(Lever(f"tuning step ({prefix}gradient checkpointing)", amp=low, frozen_low=frozen, checkpointing=True))
    if s.channels_last:
        rows.append(Lever(f"tuning step ({prefix}channels_last)", amp=low, frozen_low=frozen, channels_last=True))
    if s.compile:
        rows.append(Lever(f"tuning step ({prefix}torch.compile)", amp=low, frozen_low=frozen, compile=True))
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
    if lever.recompute and ei2:
        model.recompute_activations = True
    if lever.checkpointing:
        if ei2:
            model.gradient_checkpointing = True
        else:
            model.enable_gradient_checkpointing()
    opt = make_optimizer(model, LR, WEIGHT_DECAY)  # the training job's: fused on CUDA, both sides alike
    fn = compile_model(model) if lever.compile else model
    return fn, opt, count
