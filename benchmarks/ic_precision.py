"""Instance Centering (Eq. 6) under bf16 autocast: the error of IC's output, of STAM's residual branch and of the
block's temporal output against an fp32 reference, with IC centered in bf16 (the old path) and in fp32 (ei2's).

    python -m benchmarks.ic_precision                  # from the repository root: the miniature model on the demo
                                                       # clip + SD v1-4-scale streams
    python -m benchmarks.ic_precision --tune-steps 0   # untuned STAM (faster)

Why: under autocast the residual stream z that reaches the temporal module is bf16, and its temporal mean is large
next to the frames' deviations from it. IC subtracts that mean; done in bf16 the mean is rounded at the scale of the
stream, an error the same for every frame, so IC's output keeps a temporal mean (what Eq. 6 removes) and its relative
error grows with |mean| / spread. ei2 centers in fp32 and rounds the result once (ei2.attention.instance_centering).

Columns (relative errors are ||x - x_fp32|| / ||x_fp32||, Frobenius, pooled over the timesteps or samples):
  mean/spread   rms of the temporal mean of z over rms of IC(z): how much IC must cancel
  IC old/new    IC's output under bf16 autocast, centered in bf16 (old) or fp32 (new), vs the fp32 model's IC output
  IC input      the part of that error the bf16 input z already carries: fp32 IC of the bf16 z vs the fp32 reference
  left old/new  rms of the temporal mean left in IC's output, over rms of IC(z) (0 in exact arithmetic)
  delta         STAM's residual branch attn_temp(IC(z)); out: the temporal module's output z + delta
Part 1: the miniature model (weights/mini) on the demo clip, STAM tuned --tune-steps steps in fp32 (as ei2.train on
a CPU), then probed at three timesteps in fp32 and under CPU bf16 autocast, old and new path; the last row is the
UNet's output eps. Part 2: random SD v1-4-scale streams (320 / 640 / 1280 channels, 8 frames, per-channel means
--ratios times the deviations), a fresh STAM of 8 heads. Part 3: CPU time of IC and of the whole temporal module at
SD v1-4's largest level (64 x 64 locations, 8 frames, 320 channels), bf16, old and new. Part 4: whether STAM's residual
add computed in fp32 and rounded back differs from the bf16 add.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

import ei2.attention as attention
from ei2 import diagnose
from ei2.ddim import add_noise
from ei2.pipeline import prepare_models
from ei2.stats import layer_name
from ei2.unet import BasicTransformerBlock, UNet

ROOT = Path(__file__).resolve().parents[1]
FP32_IC = attention.instance_centering


def bf16_ic(z: torch.Tensor) -> torch.Tensor:
    """The old path: Eq. 6 in z's dtype (bf16 under autocast)."""
    return z - z.mean(dim=-2, keepdim=True)


@contextlib.contextmanager
def ic_path(old: bool):
    """Swap IC's implementation (InstanceCentering calls the module-level function)."""
    attention.instance_centering = bf16_ic if old else FP32_IC
    try:
        yield
    finally:
        attention.instance_centering = FP32_IC


class Capture:
    """Per temporal module: its input z, IC(z) and the residual branch delta, appended per forward."""

    def __init__(self, unet):
        self.data: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.handles = []
        for name, block in unet.named_modules():
            if isinstance(block, BasicTransformerBlock) and block.attn_temp is not None:
                d = self.data.setdefault(name, {"z": [], "zhat": [], "delta": []})
                self.handles += [block.norm_temp.register_forward_hook(self._norm(d)),
                                 block.attn_temp.register_forward_hook(self._attn(d))]

    @staticmethod
    def _norm(d):
        def hook(module, args, out):  # returns None: the output is left as it is
            d["z"].append(args[0].detach().float())
            d["zhat"].append(out.detach().float())
        return hook

    @staticmethod
    def _attn(d):
        def hook(module, args, out):
            d["delta"].append(out.detach().float())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def rel(err_sq: float, ref_sq: float) -> float:
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("nan")


def errors(ref: dict, old: dict, new: dict) -> dict[str, float]:
    """The table's columns for one temporal module from the captured tensors (lists over timesteps / samples)."""
    acc = dict.fromkeys(["ic_ref", "mean_ref", "ic_old", "ic_new", "ic_input", "left_old", "left_new", "delta_ref",
                         "delta_old", "delta_new", "out_ref", "out_old", "out_new"], 0.0)
    for i in range(len(ref["z"])):
        z32, zhat32, d32 = ref["z"][i], ref["zhat"][i], ref["delta"][i]
        acc["ic_ref"] += zhat32.pow(2).sum().item()
        acc["mean_ref"] += z32.mean(dim=-2).pow(2).sum().item() * z32.shape[-2]
        acc["ic_input"] += (FP32_IC(new["z"][i]) - zhat32).pow(2).sum().item()
        acc["delta_ref"] += d32.pow(2).sum().item()
        acc["out_ref"] += (z32 + d32).pow(2).sum().item()
        for tag, run in (("old", old), ("new", new)):
            acc[f"ic_{tag}"] += (run["zhat"][i] - zhat32).pow(2).sum().item()
            acc[f"left_{tag}"] += run["zhat"][i].mean(dim=-2).pow(2).sum().item() * z32.shape[-2]
            acc[f"delta_{tag}"] += (run["delta"][i] - d32).pow(2).sum().item()
            out = (run["z"][i].bfloat16() + run["delta"][i].bfloat16()).float()  # the block's bf16 residual add
            acc[f"out_{tag}"] += (out - (z32 + d32)).pow(2).sum().item()
    r = acc["ic_ref"]
    return {"mean/spread": rel(acc["mean_ref"], r), "IC old": rel(acc["ic_old"], r), "IC new": rel(acc["ic_new"], r),
            "IC input": rel(acc["ic_input"], r), "left old": rel(acc["left_old"], r),
            "left new": rel(acc["left_new"], r), "delta old": rel(acc["delta_old"], acc["delta_ref"]),
            "delta new": rel(acc["delta_new"], acc["delta_ref"]), "out old": rel(acc["out_old"], acc["out_ref"]),
            "out new": rel(acc["out_new"], acc["out_ref"])}


COLUMNS = ["mean/spread", "IC old", "IC new", "IC input", "left old", "left new", "delta old", "delta new", "out old",
           "out new"]


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    head = f"{'':<30}" + "".join(f"{c:>12}" for c in COLUMNS)
    lines = [f"== {title}", head, "-" * len(head)]
    for name, r in rows:
        lines.append(f"{name:<30}" + "".join(f"{r[c]:>12.3g}" if c in r else f"{'':>12}" for c in COLUMNS))
    return "\n".join(lines)


def mini_model(args) -> str:
    clip = diagnose.Clip(str(ROOT / "assets/demo/red-circle.gif"), "a red circle moving right on a white background",
                         8, 0, 1, 64)
    device = torch.device("cpu")
    enc = diagnose.Encoded(args.model, clip, device)
    unet = UNet.from_pretrained(args.model)  # EI²: FFAM r=2 + STAM
    if args.tune_steps:
        diagnose.tune(prepare_models(unet, enc.vae, enc.text, device, "fp32"), enc, args.tune_steps, 3e-4, 33,
                      progress=False)
    unet.eval().requires_grad_(False)
    noise = torch.randn(enc.latents.shape, generator=torch.Generator().manual_seed(0))
    runs, eps = {}, {}
    for tag, old, amp in (("ref", False, False), ("old", True, True), ("new", False, True)):
        cap = Capture(unet)
        eps[tag] = []
        with ic_path(old), torch.no_grad():
            for t in args.timesteps:
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
                with ctx:
                    eps[tag].append(unet(add_noise(enc.latents, noise, t), torch.tensor(t), enc.context).float())
        cap.close()
        runs[tag] = cap.data
    rows = [(layer_name(name), errors(runs["ref"][name], runs["old"][name], runs["new"][name]))
            for name in runs["ref"]]
    e = {tag: sum((a - b).pow(2).sum().item() for a, b in zip(eps[tag], eps["ref"])) for tag in ("old", "new")}
    ref_sq = sum(a.pow(2).sum().item() for a in eps["ref"])
    rows.append(("UNet output eps", {"out old": rel(e["old"], ref_sq), "out new": rel(e["new"], ref_sq)}))
    return table(f"miniature model ({args.model}), demo clip, STAM tuned {args.tune_steps} steps, "
                 f"t = {', '.join(map(str, args.timesteps))}, CPU bf16 autocast", rows)


def sd_scale(args) -> str:
    rows = []
    for d in (320, 640, 1280):
        for ratio in args.ratios:
            torch.manual_seed(d + int(ratio))
            norm, attn = attention.temporal_module("stam", d, 8)
            attn.eval()
            g = torch.Generator().manual_seed(d)
            locations, n = args.locations, 8
            mean = torch.randn(d, generator=g) * ratio  # per-channel temporal mean, ratio times the spread
            z32 = mean + torch.randn(locations, n, d, generator=g) * (1 + 0.5 * torch.rand(d, generator=g))
            z16 = z32.bfloat16()  # the stream as autocast's residual adds leave it
            runs = {}
            with torch.no_grad():
                zhat = norm(z32)
                runs["ref"] = {"z": [z32], "zhat": [zhat], "delta": [attn(zhat)]}
                for tag, old in (("old", True), ("new", False)):
                    with ic_path(old), torch.autocast("cpu", dtype=torch.bfloat16):
                        zhat = norm(z16)
                        runs[tag] = {"z": [z16.float()], "zhat": [zhat.float()], "delta": [attn(zhat).float()]}
            rows.append((f"d={d}, mean = {ratio:g} x spread", errors(runs["ref"], runs["old"], runs["new"])))
    return table(f"SD v1-4-scale random streams ({args.locations} locations x 8 frames), fresh STAM, 8 heads, "
                 "CPU bf16 autocast", rows)


def timing(args) -> str:
    torch.manual_seed(0)
    d, locations, n = 320, 64 * 64, 8
    norm, attn = attention.temporal_module("stam", d, 8)
    attn.eval()
    z = (torch.randn(d) * 30 + torch.randn(locations, n, d)).bfloat16()

    def best(fn, repeats: int = args.repeats) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    lines = [f"== CPU time, bf16 autocast, z ({locations}, {n}, {d}) (SD v1-4's largest level), "
             f"{torch.get_num_threads()} thread(s), best of {args.repeats}",
             f"{'':<44}{'old (bf16 IC) ms':>18}{'new (fp32 IC) ms':>18}{'new / old':>11}"]
    for what, fn in (("IC forward", lambda: norm(z)), ("temporal module forward (IC, attention, add)",
                                                       lambda: z + attn(norm(z)))):
        ms = {}
        for tag, old in (("old", True), ("new", False)):
            with ic_path(old), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                ms[tag] = best(fn)
        lines.append(f"{what:<44}{ms['old']:>18.1f}{ms['new']:>18.1f}{ms['new'] / ms['old']:>11.2f}")
    return "\n".join(lines)


def residual_check(args) -> str:
    """STAM's residual add in fp32, rounded back to the stream's bf16, against the bf16 add: the same bits?"""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(320, generator=g) * 30 + torch.randn(4096, 8, 320, generator=g)).bfloat16()
    delta = (torch.randn(4096, 8, 320, generator=g) * 0.1).bfloat16()
    same = torch.equal(z + delta, (z.float() + delta.float()).bfloat16())
    return ("== residual add z + delta (bf16 z, bf16 delta): fp32 add rounded to bf16 "
            f"{'is bit-identical to' if same else 'differs from'} the bf16 add")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights/mini"))
    p.add_argument("--tune-steps", type=int, default=100, help="tune STAM this many steps first (0: untuned)")
    p.add_argument("--timesteps", type=lambda s: [int(x) for x in s.split(",")], default=[100, 500, 900])
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 30.0])
    p.add_argument("--locations", type=int, default=1024, help="spatial locations of the SD-scale streams")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="mini,sd,time,residual")
    args = p.parse_args(argv)
    parts = {"mini": mini_model, "sd": sd_scale, "time": timing, "residual": residual_check}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        print(parts[name](args), f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
