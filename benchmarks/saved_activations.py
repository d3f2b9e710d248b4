"""Activation memory of one tuning step, counted: the bytes autograd saves for the backward pass, per kind of module,
for diffusers frame by frame, ei2's image UNet and the EI² model, side by side.

    python -m benchmarks.saved_activations --frames 8 --latent 64     # from the repository root; 8 frames at 512²:
                                                                       # 3 x about 1 min, 12 GB RAM

Each model runs one forward pass of a tuning step on the CPU with the training job's levers (frozen weights in bf16,
fp32 trainable tensors, bf16 autocast, the paper's trainable set); a saved_tensors_hooks pack hook records every
tensor autograd keeps, de-duplicated by storage, parameters excluded (autocast's bf16 copies of the fp32 trainable
weights are counted: they are memory too). Each storage is charged to the innermost module running when it was first
saved (named without block numbers).

This counts what the backward pass holds on to, not a GPU peak (no allocator, no workspaces, no transient tensors).
The CPU stands in for CUDA with two known differences: CPU autocast runs LayerNorm and GroupNorm in bf16 where CUDA's
runs them in fp32 (so on CUDA the norms' outputs, and the bf16 copies the next layers make of them, weigh more), and
the CPU's fused attention keeps, like CUDA's flash kernel, the output and the log-sum-exp rather than the
probabilities. Full SD v1-4 config, random weights.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import diffusers_reference as reference
from benchmarks.bench.models import EI2, IMAGE
from ei2.pipeline import freeze_to_dtype_
from ei2.unet import VARIANTS, UNet, UNetConfig, VideoOptions, mark_trainable

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"diffusers": (None, False), "ei2 image UNet": (IMAGE, False), VARIANTS["ei2"].label: (EI2, False),
          "EI² + recompute_activations": (EI2, True)}


def saved_bytes(video: dict | None, recompute: bool, frames: int, latent: int, tiny: bool = False) -> dict[str, int]:
    """{module name: bytes saved for backward} for one tuning-step forward; video=None is diffusers; `recompute` sets
    the UNet's recompute_activations; `tiny`: UNetConfig.tiny() instead of SD v1-4."""
    torch.manual_seed(0)
    cfg = UNetConfig.tiny() if tiny else UNetConfig()
    if video is None:
        model = reference.unet(cfg)
    else:
        model = UNet(cfg, VideoOptions(**video))
        model.recompute_activations = recompute
    mark_trainable(model)  # the same attn1.to_q / attn2.to_q names in diffusers' UNet
    freeze_to_dtype_(model, torch.bfloat16)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = ["(top)"]
    # a module's name without block numbers and parents: "attn_temp.to_q", "attn1", "norm1", "conv_shortcut"
    names = {m: ".".join(p for p in k.split(".")[-2:] if not p.isdigit()) or "(top)" for k, m in model.named_modules()}

    def enter(module, args):
        stack.append(names[module])

    def leave(module, args, output):
        stack.pop()  # returns None: the output stays the module's

    for module in model.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    storages: dict[int, tuple[object, int, str]] = {}  # data_ptr -> (storage kept alive, bytes, module)

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in storages:
            storages[ptr] = (st, st.nbytes(), stack[-1])
        return t

    x = torch.randn(1, 4, frames, latent, latent)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim)
    t = torch.tensor(500)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        if video is None:  # frames as a batch
            model(x[0].transpose(0, 1).contiguous(), t, ctx.expand(frames, -1, -1))
        else:
            model(x, t, ctx)
    out: dict[str, int] = collections.Counter()
    for _, nbytes, where in storages.values():
        out[where] += nbytes
    return dict(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8); 64 is 512², the target")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="UNetConfig.tiny() (a smoke run, seconds)")
    p.add_argument("--one", choices=list(MODELS), help=argparse.SUPPRESS)  # a child process: one model, JSON out
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(saved_bytes(*MODELS[args.one], args.frames, args.latent, args.tiny)))
        return 0
    results = {}
    for name in MODELS:  # one process per model: each starts from an empty heap (a full-size run needs ~12 GB)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.saved_activations", "--one", name, "--frames",
                               str(args.frames), "--latent", str(args.latent), "--threads", str(args.threads),
                               *(["--tiny"] if args.tiny else [])], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {sum(results[name].values()) / 2**30:.3f} GiB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    names = list(results)
    kinds = sorted({k for r in results.values() for k in r}, key=lambda k: -max(r.get(k, 0) for r in results.values()))
    print(f"Saved for backward, MiB: one tuning step, {args.frames} frames at {args.latent * 8}² (latent "
          f"{args.latent}x{args.latent}), {'tiny' if args.tiny else 'SD v1-4'} config, frozen bf16 + bf16 autocast, "
          "counted on the CPU\n")
    print("| module | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{results[n].get(kind, 0) / 2**20:.1f}" for n in names) + " |")
    totals = [sum(results[n].values()) for n in names]
    print("| **total** | " + " | ".join(f"**{v / 2**20:.1f}**" for v in totals) + " |")
    print("| ratio to diffusers | " + " | ".join(f"{v / totals[0]:.3f}" for v in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
