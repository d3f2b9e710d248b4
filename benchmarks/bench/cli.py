"""The command line of `python -m benchmarks.bench`: options, the GPU protocol preset, one table per section printed as
it finishes, and the JSON of all results rewritten after every section (so a run cut short keeps what it measured)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback

import torch

from ei2.files import atomic_path
from ei2.pipeline import DTYPES

from .core import PAPER, SECTIONS, Row, Settings, Table
from .models import diffusers_available, diffusers_version
from .job import section_job, section_targets
from .sections import section_attention, section_forward, section_train

# The GPU protocol: one command, one H100, under 5 minutes (README / docs/bench.md). Sections run in the order of
# importance (the tuning step, the job, the targets, then forward and attention); work left when --time-budget is
# spent is skipped and says so; the job's tuning stops at --tuning-budget and projects the remaining steps.
PROTOCOLS = {
    "gpu": dict(device="cuda", size=512, frames=8, dtype="bf16", sections="train,job,targets,forward,attention",
                steps=500, inference_steps=50, repeats=10, warmup=3, gradient_checkpointing=False, compile=False,
                tuning_budget=60.0, time_budget=270.0, json="bench-gpu.json"),
}

# ----------------------------------------------------------------------------------------------------------------------
# Command line


EPILOG = """\
sections (--sections, numbers or names, run in the order given):
  1 forward    UNet forward, ei2 vs diffusers UNet2DConditionModel, same random SD weights, input and dtype.
               Rows: image UNet (identical math, with the max relative difference), and for frames > 1 the video
               variants against the same per-frame reference: video GroupNorm (Tune-A-Video's norm over frames) and
               the EI² model (FFAM r=2 + STAM).
  2 train      one tuning step (forward, backward, AdamW lr 3e-5, MSE to a random noise target): EI² video model vs
               diffusers frame by frame with the same trainable projections. One row per lever (both sides use it):
               base precision; frozen weights in bf16/fp16 with fp32 trainable tensors; + gradient checkpointing;
               + channels_last and + torch.compile when asked. Last row: the fastest ei2 row vs diffusers' base row.
  3 attention  FrameAttention self / sca / ffam r=2 / ffam r=4 / full at the largest level ((size/8)² tokens,
               block_out_channels[0] channels), forward + backward; ratio = variant / SCA, next to the key lengths.
  4 job        the whole job by ei2.pipeline's own functions: VAE encode, --steps tuning steps, DDIM inversion, one
               guided edit with VAE decode; time and peak memory per phase, next to the paper's V100 figures
               (quoted, not measured).
  5 targets    each speed and memory target (8 frames at 512² on one H100/H200) with what this run measured, the
               ratio measured / bound and pass yes/NO; measures the tuning peak with gradient checkpointing at
               --frames and at 24 frames (24 frames on CUDA or with --tiny).

memory: CUDA max_memory_allocated (absolute, only the measured model on the device); CPU the peak-RSS increase
during the measurement.

defaults: on CPU --size 128 --frames 2 --steps 2 --inference-steps 2 --repeats 3 (full SD v1-4 config);
on CUDA --size 512 --frames 8 --steps 500 --inference-steps 50 --repeats 10.

GPU protocol (one H100 or H200, under 5 minutes, writes bench-gpu.json after every section):
  python -m benchmarks.bench --protocol gpu
  = python -m benchmarks.bench --device cuda --size 512 --frames 8 --dtype bf16
    --sections train,job,targets,forward,attention --steps 500 --inference-steps 50 --repeats 10 --warmup 3
    --tuning-budget 60 --time-budget 270 --json bench-gpu.json
  then, time permitting, torch.compile's row: python -m benchmarks.bench --protocol gpu --sections train --compile
    --json bench-gpu-compile.json

CI smoke (seconds): python -m benchmarks.bench --tiny --device cpu --size 64 --frames 2 --steps 2 --inference-steps 2
  --repeats 1 --json /tmp/bench.json
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
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
                   help="checkpoint the whole job's tuning (section 2 always has a checkpointed row)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNets (slow to start)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last weights (rows / job)")
    p.add_argument("--sections", help="comma list of 1-5 or forward,train,attention,job,targets, run in that order "
                   "(default all, in number order)")
    p.add_argument("--repeats", type=int, help="timed runs per figure (median); default 3 CPU, 10 CUDA")
    p.add_argument("--warmup", type=int, help="untimed runs before timing; default 1 CPU, 3 CUDA")
    p.add_argument("--tiny", action="store_true", default=None,
                   help="UNetConfig.tiny() / VAEConfig.tiny() instead of SD v1-4 (CI smoke)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers (reference columns read n/a)")
    p.add_argument("--tuning-budget", type=float, help="seconds after which the job's tuning phase stops early")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run, after which the remaining sections "
                   "and optional rows are skipped (and say so)")
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
    for item in str(opt("sections", "1,2,3,4,5", "1,2,3,4,5")).split(","):
        item = item.strip().lower()
        if not item:
            continue
        names = {v: k for k, v in SECTIONS.items()}
        if item.isdigit() and int(item) in SECTIONS:
            sections.append(int(item))
        elif item in names:
            sections.append(names[item])
        else:
            raise SystemExit(f"--sections: unknown section {item!r} (1-5 or {', '.join(SECTIONS.values())})")
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
        sections=list(dict.fromkeys(sections)),  # the order given, each once
        repeats=opt("repeats", 3, 10),
        warmup=opt("warmup", 1, 3),
        tiny=bool(opt("tiny", False, False)),
        reference=not args.no_reference and diffusers_available(),
        tuning_budget=opt("tuning_budget", None, None),
        interleave=bool(opt("interleave", True, False)),
    )
    s.time_budget = opt("time_budget", None, None)
    s.deadline = time.monotonic() + s.time_budget if s.time_budget is not None else None
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
        "tuning_budget": s.tuning_budget, "time_budget": s.time_budget,
        "memory": "cuda max_memory_allocated, absolute" if dev.type == "cuda" else "cpu peak RSS increase",
        "paper": PAPER,
    }


RUNNERS = {1: section_forward, 2: section_train, 3: section_attention, 4: section_job}


def run_section(sec: int, s: Settings, log, done: dict[int, Table]) -> Table:
    """One section's table; a section that fails (out of memory, a bug) becomes a one-row table saying why, so the
    sections after it still run and the JSON keeps everything measured."""
    if s.out_of_time():
        return Table(sec, f"{SECTIONS[sec]}: skipped", "", "ref", rows=[Row("skipped", None, None,
                                                                            note="--time-budget spent")])
    try:
        return section_targets(s, log, done) if sec == 5 else RUNNERS[sec](s, log)
    except (Exception, torch.cuda.OutOfMemoryError) as e:  # noqa: BLE001 - reported in the table and on stderr
        traceback.print_exc()
        reason = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return Table(sec, f"{SECTIONS[sec]}: FAILED", "", "ref", rows=[Row("error", None, None,
                                                                           note=f"{reason}: {first}")])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    s, json_path = settings_from(args)
    info = meta(s, argv)
    print(f"# benchmarks.bench: {s.describe()}; {info['device_name']}, {info['cpu_count']} CPU(s), "
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

    done: dict[int, Table] = {}
    failed = []
    for sec in s.sections:
        log(f"section {sec} ({SECTIONS[sec]}) ...")
        t0 = time.perf_counter()
        table = done[sec] = run_section(sec, s, log, done)
        if table.title.endswith("FAILED"):
            failed.append(sec)
        print("\n" + table.markdown() + "\n", flush=True)
        log(f"section {sec} took {time.perf_counter() - t0:.1f} s")
        if json_path:  # after every section: a run cut short keeps what it measured
            info["elapsed_s"] = round(time.monotonic() - started, 1)
            with atomic_path(json_path) as tmp:
                tmp.write_text(json.dumps({"meta": info, "sections": [t.to_json() for t in done.values()]}, indent=2))
    if json_path:
        log(f"wrote {json_path}")
    if failed:
        log(f"section(s) {', '.join(map(str, failed))} failed (see their tables and the tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())