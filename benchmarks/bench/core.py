"""The benchmark's machinery: tables, timing and peak memory, and the settings of a run. The seeded models and the
training levers are in models.py; the sections (sections.py, job.py) and the command line (cli.py) are built from
these."""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ei2.pipeline import DTYPES, Phase
from ei2.unet import UNetConfig
from ei2.vae import VAEConfig


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


def measured_mib(phase: Phase) -> float | None:
    """The bench's memory figure of a measured phase: on CUDA the absolute peak of allocated memory (only the measured
    model is on the device), on the CPU the peak resident set's increase over the start (the process holds more)."""
    return phase.peak_mib if phase.device.type == "cuda" else phase.increase_mib


def median_time(fn: Callable[[], object], device: torch.device, warmup: int,
                repeats: int) -> tuple[float, float | None]:
    """(median seconds of `repeats` calls after `warmup` calls, peak MiB over the timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    with Phase(device) as mem:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), measured_mib(mem)


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
        with Phase(dev) as mem:
            fn()
        out[name] = (statistics.median(times[name]), measured_mib(mem))
    fns.clear()
    free(dev)
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Settings



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
