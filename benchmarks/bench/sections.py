"""Sections 1-3 of `python -m benchmarks.bench`: the UNet forward, one tuning step and the frame attentions, each next
to its reference measured in the same process (diffusers, or Tune-A-Video's SCA for the attentions)."""

from __future__ import annotations

import copy
import math

import torch

from benchmarks import diffusers_reference as reference
from ei2.attention import FrameAttention
from ei2.pipeline import DTYPES
from ei2.unet import VARIANTS, UNet, VideoOptions

from .core import Case, Row, Settings, Table, fmt, free, inputs, run_cases
from .models import (EI2, IMAGE, LR, channels_last_, compile_model, ei2_unet, init_sd_weights_, levers,
                     prepare_for_tuning, reference_unet, share_weights_, tuning_flops, tuning_step)

# ----------------------------------------------------------------------------------------------------------------------
# 1. UNet forward


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
        variants += [("video GroupNorm (TAV)", dict(IMAGE, resnet_norm="video")), (VARIANTS["ei2"].label, EI2)]
    cases = []
    if s.reference:
        cases.append(case("diffusers", lambda: share_weights_(reference.unet(cfg), base),
                          lambda m: m(x_frames, t, ctx_frames).sample))
    for name, video in variants:
        cases.append(case(name, lambda video=video: share_weights_(UNet(cfg, VideoOptions(**video)), base),
                          lambda m: m(x, t, ctx)))
    results = run_cases(cases, s, log)
    base = None  # the CPU copy of the weights
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



def section_train(s: Settings, log) -> Table:
    cfg, dev, n = s.unet_config, s.device, s.frames
    table = Table(2, f"One tuning step (forward + backward + AdamW lr {LR:g}): ei2 EI² video model (FFAM r=2 + STAM) "
                     f"vs diffusers frame by frame, trainable attn1.to_q + attn2.to_q (+ STAM for ei2) "
                     f"({s.describe()}, median of {s.repeats})", "ms", "diffusers",
                  extra_columns=("ei2 TFLOP/s", "ref TFLOP/s"))
    flops = {True: tuning_flops(cfg, n, s.latent, EI2)}
    if s.reference:
        flops[False] = tuning_flops(cfg, n, s.latent, video=None)
    x, ctx, t = inputs(s, cfg.cross_attention_dim)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    x_frames, target_frames = (v[0].transpose(0, 1).contiguous() for v in (x, target))
    ctx_frames = ctx.expand(n, -1, -1)
    info: dict[str, dict] = {}
    # On CUDA every row copies one CPU template per side (seeding 860 M weights takes seconds); on CPU the template
    # would be one more resident copy of the weights, so each case builds its own.
    templates: dict[bool, torch.nn.Module] = {}

    def build(ei2: bool) -> torch.nn.Module:
        if dev.type != "cuda":
            return ei2_unet(cfg, s.seed, **EI2) if ei2 else reference_unet(cfg, s.seed)
        if ei2 not in templates:
            templates[ei2] = ei2_unet(cfg, s.seed, **EI2) if ei2 else reference_unet(cfg, s.seed)
        return copy.deepcopy(templates[ei2])

    def case(name, lever, ei2):
        def setup():
            model = build(ei2)
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
        if rows and s.out_of_time():
            rows.append(Row(lever.name, None, None, note="skipped: --time-budget spent"))
            continue
        cases = [case(f"ei2 {lever.name}", lever, True)]
        if s.reference and not lever.recompute:
            cases.insert(0, case(f"diffusers {lever.name}", lever, False))
        results = run_cases(cases, s, log)
        ours, ours_info = results[f"ei2 {lever.name}"], info.pop(f"ei2 {lever.name}")
        ref, ref_info = results.get(f"diffusers {lever.name}"), info.pop(f"diffusers {lever.name}", None)
        note = f"trainable {ours_info['count'] / 1e6:.3g} M"
        if ref_info is not None:
            note += f" vs {ref_info['count'] / 1e6:.3g} M; loss {ours_info['loss'].item():.4g} vs " \
                    f"{ref_info['loss'].item():.4g}"
        rate = {"ei2 TFLOP/s": fmt(flops[True] / ours[0] / 1e12),
                "ref TFLOP/s": fmt(flops[False] / ref[0] / 1e12) if ref else "n/a"}
        rows.append(Row(lever.name, ours[0] * 1e3, ref[0] * 1e3 if ref else None, ours[1], ref[1] if ref else None,
                        note, extra=rate))
    templates.clear()
    table.rows = rows
    work = f"ei2 {flops[True] / 1e12:.4g} TFLOP"
    if s.reference:
        work += (f", diffusers {flops[False] / 1e12:.4g} TFLOP, ratio {flops[True] / flops[False]:.3f}: ei2's step "
                 f"matches diffusers' time only at {flops[True] / flops[False]:.3f}x its throughput")
    table.notes.append("Work per step (forward + backward, counted by FlopCounterMode on the meta device, "
                       f"recomputation not counted; TFLOP/s = this work / the row's time): {work}.")
    measured = [r for r in rows if r.ei2 is not None]
    if len(measured) > 1 and rows[0].ref is not None:
        best = min(measured, key=lambda r: r.ei2)
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

