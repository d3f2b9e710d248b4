"""`python -m ei2.mini.benchmark`: the paper's comparison (Table 1, Fig. 4) in the miniature world, scored exactly.

    python -m ei2.mini.benchmark                       # the default suite (prints its size and time estimate)
    python -m ei2.mini.benchmark --model weights/mini16 # another model folder
    python -m ei2.mini.benchmark --quick               # 1 clip, 1 edit, 1 seed, EI² vs Tune-A-Video (CI)
    python -m ei2.mini.benchmark --methods untuned --seeds 0 --clips 8 --no-diagnose  # the floor alone (~2 min)
    python -m ei2.mini.benchmark --methods ei2,tav,sca_stam --seeds 0,1,2 --steps 150 --clips 8

The suite (ei2.mini.suite_clips): clips whose motion must be kept (translation, orbit, growth), one object or two
(the first moving, the second still beside it), x one edit of each kind (colour, shape, background; with two
objects the colour or shape of ONE object, and the other must stay) x --seeds. For every method, clip and seed the
inflated model is tuned on the clip and its caption (ei2.pipeline.tune_steps: AdamW, weight decay 1e-2, gradient clip
1.0, as `python -m ei2.train`; same steps, lr and seeds for all methods), the clip is DDIM-inverted with the tuned
model (ei2.pipeline.invert) and every edit prompt is rendered from that latent (ei2.pipeline.render), with the demo's
editing settings by default (DEFAULT_GUIDANCE, DEFAULT_INVERSION_PROMPT: docs/mini.md says why). The seed fixes
the fresh temporal modules' initialization and the tuning's noise; inversion and rendering are deterministic. Each
edited clip is scored against its prompt and its ideal edit (world.edit_clip: same motion, edited attributes), whose
masks and centroids are the fidelity reference: one object by ei2.mini.parse.clip_metrics, two objects per object by
suite_clips.two_object_metrics (its docstring says how).

The default size, in named constants (calibrate them here): DEFAULT_CLIPS clips (suite_clips), DEFAULT_SEEDS,
DEFAULT_METHODS scored in the table (EI², Tune-A-Video, SCA + STAM, the untuned image model); the Fig. 4 norm
variants (FIG4_METHODS) are tuned once, on the first clip with the first seed, for the covariate-shift chart only
(name them in --methods to score them too). Before it starts the run prints its number of runs and a time estimate
(SECONDS: times measured on weights/mini), and after every run the projected total from the runs so far.

Tuning length (DEFAULT_STEPS at DEFAULT_LR): the paper tunes 500 steps at lr 3e-5 on Stable Diffusion. Adam moves
each weight by about lr per step, so 500 x 3e-5 = 0.015 bounds how far the paper's tuning can take a weight; 100
steps at 3e-4 (configs/demo.yaml's, the demo this suite should explain) bound it at 0.03: at least the paper's
movement, in a fifth of the updates, which is what fits the CPU time (a tuned run is mostly tuning). The paper's claim
that TA loses editing power is about long tuning, so the suite errs on the long side rather than matching 0.015 with
50 steps. --steps / --lr change it for every method alike.

Outputs in --out: results.json, results.md (the table, per edit kind and scene, the paired differences; also
printed), grids/<clip>-<edit>.png (source | ideal | each method, first seed), diagnose/ and diagnose-fig4/
(ei2.diagnose on the first clip with the tuned models: TA vs STAM, and the Fig. 4 norm variants: chart, table, json),
tuned/ (those models' tuned tensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import diagnose as diag
from ..config import INVERSION_PROMPTS, check_value, inversion_text
from ..errors import Ei2Error, cli_main
from ..files import atomic_path, check_writable_dir
from ..pipeline import (Phase, encode_video, invert, load_models, make_optimizer, render, resolve_device,
                        resolve_precision, tune_steps)
from ..tuned import save_tuned
from ..unet import VARIANTS, Variant
from ..video import frame_grid, to_uint8, write_image
from . import parse, suite_clips
from .suite_clips import CLIPS, DEFAULT_CLIPS, suite


# --methods names the keys of ei2.unet.VARIANTS (EI², Tune-A-Video, SCA + STAM, FFAM + TA, Fig. 4 rows, untuned)
DEFAULT_METHODS = "ei2,tav,sca_stam,untuned"
FIG4_METHODS = "ta_ln,ta_ln_noaffine,ta_no_norm,ta_instancenorm,ta_ic"
QUICK_METHODS = "ei2,tav"
DEFAULT_SEEDS = "0,1,2"
DEFAULT_STEPS, DEFAULT_LR = 100, 3e-4  # the module docstring says how this was chosen
# the demo's editing settings (configs/demo.yaml; docs/mini.md, "The inversion prompt and the guidance")
DEFAULT_GUIDANCE, DEFAULT_INVERSION_PROMPT = 1.25, "caption"
# covariate-shift charts (ei2.diagnose) of the methods tuned on the first clip: TA vs STAM, and Fig. 4's norm variants
DIAGNOSE_SETS = {"diagnose": ["tav", "sca_stam", "ei2"],
                 "diagnose-fig4": ["tav", *FIG4_METHODS.split(","), "sca_stam"]}
# seconds, measured on weights/mini, one thread, this project's 2-core CPU with the other core busy (2026-11-30): one
# run's model loading and encoding, a tuning step, an inversion step, a guided DDIM step of an edit, scoring one
# edited clip, one ei2.diagnose chart. A larger model takes longer: the projection printed after each run is measured.
SECONDS = {"load": 1.0, "tuning_step": 0.25, "inversion_step": 0.12, "edit_step": 0.18, "score_edit": 0.5,
           "diagnose": 10.0}
# paired differences (a - b over the same clip, edit and seed; the untuned floor has one seed): the paper's claims
PAIRS = [("ei2", "tav", "EI² vs Tune-A-Video"), ("sca_stam", "tav", "STAM vs TA (both SCA): editing power"),
         ("ei2", "sca_stam", "FFAM vs SCA (both STAM): consistency"), ("ei2", "untuned", "EI² vs the untuned floor"),
         ("tav", "untuned", "Tune-A-Video vs the untuned floor")]
PAIRED_KEYS = ("align_edited", "align_kept", "iou", "trajectory_px", "consistency")
LOWER_IS_BETTER = {"trajectory_px", "bg_change"}

# table columns: (key, the parse.SCORES number it shows or None for a per-run number, header, decimals)
COLUMNS = [
    ("align_edited", "edited_attribute_match", "alignment (edited attr) ↑", 2),
    ("align_kept", "kept_attributes_match", "alignment (kept attrs) ↑", 2),
    ("iou", "mask_iou_vs_source", "fidelity IoU ↑", 2),
    ("trajectory_px", "trajectory_error_px", "trajectory error px ↓", 1),
    ("consistency", "attribute_stability", "consistency (attr. stability) ↑", 2),
    ("bg_change", "background_change", "background change /255 ↓", 1),
    ("tuning_s", None, "tuning s (per run)", 1),
    ("peak_mib", None, "peak memory MiB (per run)", 0),
]
RUN_KEYS = tuple(key for key, score, _, _ in COLUMNS if score is None)


def run_one(args, variant: Variant, clip: dict, seed: int, device, precision: str, tuned_path: Path | None = None):
    """Tune (unless untuned), invert, render each edit; returns (run record, [uint8 frames per edit]). peak_mib: the
    memory increase over the start of tuning + inversion (pipeline.Phase)."""
    torch.manual_seed(seed)  # the fresh temporal modules' initialization
    with Phase(device, memory=False) as loading:
        models = load_models(args.model, dataclasses.replace(variant.video), device, precision)
    frames = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    posterior = encode_video(models, frames)
    steps = args.steps if variant.tuned else 0
    losses: list[float] = []
    with Phase(device) as mem:
        with Phase(device, memory=False) as tuning:
            if steps:
                optimizer = make_optimizer(models.unet, args.lr, 1e-2)
                generator = torch.Generator(device).manual_seed(seed)
                tune_steps(models, posterior, models.text.encode([clip["caption"]]), optimizer, generator, 0, steps,
                           1.0, on_sync=lambda step, values: losses.extend(values), progress=False)
        with Phase(device, memory=False) as inversion:
            x_T = invert(models, posterior, args.inversion_steps, progress=False,
                         prompt=inversion_text(args.inversion_prompt, clip["caption"]))
    if tuned_path is not None:
        save_tuned(models.unet, tuned_path, args.model, {"steps": steps, "caption": clip["caption"]})
    with Phase(device, memory=False) as rendering:
        videos = [to_uint8(render(models, x_T, e["prompt"], args.guidance, args.inference_steps, progress=False))
                  for e in clip["edits"]]
    record = {"load_s": loading.seconds, "tuning_s": tuning.seconds, "inversion_s": inversion.seconds,
              "render_s": rendering.seconds, "peak_mib": mem.increase_mib, "steps": steps,
              "final_loss": float(np.mean(losses[-10:])) if losses else None}
    return record, videos


def sample_metrics(video: np.ndarray, edit: dict, source_caption: str) -> dict:
    """The table's numbers of one edited clip (parse.flat_scores, scored against the ideal edit), the fraction of
    frames matching each attribute of the prompt, and what the parser sees most often."""
    m = suite_clips.edit_metrics(video, edit, source_caption)
    flat = parse.flat_scores(m)
    keys = [k for k in m["alignment"] if k not in ("all", "edited", "unedited", "edited_attributes")]
    return {key: flat[score] for key, score, _, _ in COLUMNS if score} | {
        "parsed_attributes": {k: m["alignment"][k] for k in keys}, "parsed_majority": majority(video)}


def majority(video: np.ndarray) -> dict:
    """The most frequent parsed colour, shape and background over the frames (what the edit looks like to the
    parser), with the median RGB of the object's interior."""
    frames = [parse.parse_objects(f) for f in video]
    objs = [p["objects"][0] for p in frames if p["objects"]]
    common = lambda xs: max(set(xs), key=xs.count) if xs else None  # noqa: E731
    return {"color": common([o["color"] for o in objs]), "shape": common([o["shape"] for o in objs]),
            "background": common([p["background"] for p in frames]),
            "rgb": [round(float(x)) for x in np.median([o["rgb"] for o in objs], axis=0)] if objs else None}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def aggregate(records: list[dict], key: str) -> dict:
    """mean over all records; std = the spread over seeds (std of the per-seed means, each over clips x edits);
    std_samples = the spread over all records; n = number of records, n_seeds."""
    seeds = sorted({r["seed"] for r in records})
    per_seed = [float(np.mean([r[key] for r in records if r["seed"] == s])) for s in seeds]
    everything = mean_std([r[key] for r in records])
    return {"mean": everything["mean"], "std": mean_std(per_seed)["std"], "std_samples": everything["std"],
            "n": everything["n"], "n_seeds": len(seeds)}


def summarize(samples: list[dict], runs: list[dict], methods: list[str]) -> list[dict]:
    """One table row per method (in the order given) that has results."""
    table = []
    for name in methods:
        s = [r for r in samples if r["method"] == name]
        if not s:
            continue
        row = {"method": name, "description": VARIANTS[name].label if name in VARIANTS else name}
        for key, _, _, _ in COLUMNS:
            row[key] = aggregate([r for r in runs if r["method"] == name] if key in RUN_KEYS else s, key)
        row["by_edit"] = {kind: aggregate([r for r in s if group(r) == kind], "align_edited")["mean"]
                          for kind in dict.fromkeys(group(r) for r in s)}
        row["by_scene"] = {n: {key: aggregate([r for r in s if r.get("objects", 1) == n], key)["mean"]
                               for key in PAIRED_KEYS}
                           for n in sorted({r.get("objects", 1) for r in s})}
        table.append(row)
    return table


def group(sample: dict) -> str:
    """The by-edit column of a sample: its edit kind, ", 2 obj" for a two-object clip."""
    return sample["edit"] + (", 2 obj" if sample.get("objects", 1) == 2 else "")


def paired(samples: list[dict], a: str, b: str, key: str) -> dict | None:
    """Method a minus method b on the same clip, edit and seed (b's only seed when b is not tuned): mean, std = the
    spread over seeds (std of the per-seed mean differences), std_samples, n, and how many pairs favour a ("better",
    by the key's direction), b ("worse") or neither; None when no pair exists."""
    other = {(r["clip"], r["edit_name"], r["seed"]): r for r in samples if r["method"] == b}
    single = {(r["clip"], r["edit_name"]): r for r in samples if r["method"] == b} if not VARIANTS[b].tuned else {}
    diffs = []
    for r in samples:
        if r["method"] != a:
            continue
        o = other.get((r["clip"], r["edit_name"], r["seed"])) or single.get((r["clip"], r["edit_name"]))
        if o is not None:
            diffs.append({"seed": r["seed"], "d": r[key] - o[key]})
    if not diffs:
        return None
    sign = -1 if key in LOWER_IS_BETTER else 1
    return aggregate(diffs, "d") | {"better": sum(sign * d["d"] > 0 for d in diffs),
                                    "worse": sum(sign * d["d"] < 0 for d in diffs)}


def paired_table(samples: list[dict], methods: list[str]) -> list[dict]:
    """PAIRS of which both methods ran: {a, b, claim, key: paired(...)} per PAIRED_KEYS."""
    return [{"a": a, "b": b, "claim": claim} | {key: paired(samples, a, b, key) for key in PAIRED_KEYS}
            for a, b, claim in PAIRS if a in methods and b in methods]


def format_table(table: list[dict]) -> str:
    head = ["method"] + [h for _, _, h, _ in COLUMNS] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["method"]] + [f"{row[k]['mean']:.{d}f} ± {row[k]['std']:.{d}f}" for k, _, _, d in COLUMNS]
        lines.append("| " + " | ".join(cells + [str(row["align_edited"]["n"])]) + " |")
    kinds = list(dict.fromkeys(k for row in table for k in row["by_edit"]))
    lines += ["", "Edited-attribute alignment by edit kind:", "",
              "| method | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for row in table:
        lines.append(f"| {row['method']} | " + " | ".join(
            f"{row['by_edit'][k]:.2f}" if k in row["by_edit"] else "-" for k in kinds) + " |")
    heads = {k: h for k, _, h, _ in COLUMNS}
    lines += ["", "By scene (mean over seeds, clips and edits):", "",
              "| method | objects | " + " | ".join(heads[k] for k in PAIRED_KEYS) + " |",
              "|" + "---|" * (len(PAIRED_KEYS) + 2)]
    for row in table:
        for n, values in row["by_scene"].items():
            lines.append(f"| {row['method']} | {n} | " + " | ".join(f"{values[k]:.2f}" for k in PAIRED_KEYS) + " |")
    return "\n".join(lines)


def format_paired(pairs: list[dict]) -> str:
    """The paired differences: mean ± spread over seeds, (pairs a is better / worse in)."""
    heads = {k: h for k, _, h, _ in COLUMNS}
    lines = ["Paired differences a - b (same clip, edit and seed): mean ± std of the per-seed means (pairs where a is "
             "better / worse):", "", "| a - b | claim | " + " | ".join(heads[k] for k in PAIRED_KEYS) + " |",
             "|" + "---|" * (len(PAIRED_KEYS) + 2)]
    for p in pairs:
        cells = ["-" if p[k] is None else f"{p[k]['mean']:+.3f} ± {p[k]['std']:.3f} ({p[k]['better']}/{p[k]['worse']})"
                 for k in PAIRED_KEYS]
        lines.append(f"| {p['a']} - {p['b']} | {p['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, settings: dict, table: list[dict], samples: list[dict], runs: list[dict]) -> None:
    pairs = paired_table(samples, settings["methods"])
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"settings": settings, "table": table, "paired": pairs, "samples": samples,
                                   "runs": runs}, indent=2))
    md = [f"# Mini benchmark ({settings['status']})", "",
          f"model `{settings['model']}`, {settings['steps']} tuning steps at lr {settings['lr']:g}, seeds "
          f"{settings['seeds']}, {settings['inversion_steps']} inversion / {settings['inference_steps']} DDIM steps, "
          f"guidance {settings['guidance']}, inverted with the {settings.get('inversion_prompt', 'empty')} prompt, "
          f"device {settings['device']}.", "",
          "mean ± std over seeds (std of the per-seed means over clips x edits); n = edited clips per method. "
          "Tuning time and memory per tuning run (memory: " + settings["memory"] + ").", "", format_table(table), "",
          format_paired(pairs), ""]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(md))


def write_grid(out: Path, clip: dict, edit_index: int, videos: dict[str, list[np.ndarray]]) -> None:
    e = clip["edits"][edit_index]
    rows = [clip["frames"], e["ideal"]] + [v[edit_index] for v in videos.values()]
    labels = [f"source: {clip['caption']}", f"ideal: {e['prompt']}"] + [f"{m}: {e['prompt']}" for m in videos]
    write_image(frame_grid(rows, labels), out / "grids" / f"{clip['name']}-{e['name']}.png")


def run_diagnose(out: Path, clip: dict, tuned: dict[str, Path], args) -> list[Path]:
    """ei2.diagnose's covariate-shift chart (per layer: mean shift, covariance ratio) of the models tuned on the first
    clip with the first seed, for each DIAGNOSE_SETS entry of which at least two methods ran."""
    folder = out / "diagnose-source"
    for i, f in enumerate(clip["frames"]):
        write_image(f, folder / f"{i:02d}.png")
    dclip = diag.Clip(str(folder), clip["caption"], len(clip["frames"]), 0, 1, clip["frames"].shape[1])
    charts = []
    for name, members in DIAGNOSE_SETS.items():
        members = [m for m in members if m in tuned]
        if len(members) < 2:
            continue
        subjects = [diag.Subject(m, f"{VARIANTS[m].label}, tuned {args.steps} steps", args.model, dclip,
                                 dataclasses.asdict(VARIANTS[m].video), tuned=str(tuned[m]),
                                 source=f"seed {args.seed_list[0]}") for m in members]
        report = diag.diagnose(subjects, [100, 400, 700], seed=0, device=args.device, progress=False)
        charts.append(diag.write_outputs(report, out / name)["png"])
    return charts


def parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {k:<16} {v.label}" for k, v in VARIANTS.items())
    p = argparse.ArgumentParser(
        prog="python -m ei2.mini.benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tune, invert and edit a fixed suite of mini-world clips with EI², Tune-A-Video, the Fig. 4 "
                    "temporal-norm variants and the untuned image model, score every edit exactly with "
                    "ei2.mini.parse, and write a Table-1-style table (results.md/json), frame grids and the TA-vs-"
                    "STAM covariate-shift chart. See docs/mini-benchmark.md.",
        epilog=f"methods:\n{names}\ndefault: {DEFAULT_METHODS} (Fig. 4 variants, tuned for the chart only: "
               f"{FIG4_METHODS})\n\nsuite (default: the first {DEFAULT_CLIPS}):\n" + "\n".join(
                   f"  {suite_clips.make(c).caption}; edits: " + ", ".join(
                       f"{suite_clips.edit_name(x, 2 if 'second' in c else 1)} -> {x.value}" for x in e)
                   for c, e in CLIPS))
    p.add_argument("--model", default="weights/mini", help="SD-layout model folder (default weights/mini)")
    p.add_argument("--methods", default=None, help=f"comma list (default {DEFAULT_METHODS}; --quick: {QUICK_METHODS})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"tuning steps, every tuned method (default {DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"AdamW learning rate (default {DEFAULT_LR:g}, as configs/demo.yaml)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma list of seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--clips", type=int, default=DEFAULT_CLIPS,
                   help=f"use the first N suite clips, 1..{len(CLIPS)} (default {DEFAULT_CLIPS})")
    p.add_argument("--edits", default="color,shape,background", help="comma list of edit kinds (default all three)")
    p.add_argument("--inference-steps", type=int, default=25, help="DDIM steps of each edit (default 25)")
    p.add_argument("--inversion-steps", type=int, default=25, help="DDIM inversion steps (default 25)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance of the edits (default {DEFAULT_GUIDANCE:g}, the demo's; paper: 7.5)")
    p.add_argument("--inversion-prompt", choices=INVERSION_PROMPTS, default=DEFAULT_INVERSION_PROMPT,
                   help=f"invert with the clip's caption or with \"\" (empty, Tune-A-Video's; default "
                        f"{DEFAULT_INVERSION_PROMPT}, the demo's)")
    p.add_argument("--quick", action="store_true", help="1 clip, 1 edit (color), first seed, ei2 and tav (for CI)")
    p.add_argument("--no-diagnose", action="store_true",
                   help="skip the ei2.diagnose covariate-shift charts (and the Fig. 4 variants' tuning for them)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: on a shared 2-core machine 2 threads ran 4x slower)")
    p.add_argument("--out", default="runs/mini-benchmark", help="output folder (default runs/mini-benchmark)")
    return p


def resolve_args(args) -> argparse.Namespace:
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.edit_list = [e.strip() for e in args.edits.split(",") if e.strip()]
    if args.quick:
        args.clips, args.edit_list, args.seed_list = 1, args.edit_list[:1], args.seed_list[:1]
    args.method_list = [m.strip() for m in (args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))
                        .split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in VARIANTS] + [e for e in args.edit_list if e not in parse.ATTRIBUTES]
    if bad or not args.method_list or not args.edit_list or not args.seed_list:
        raise Ei2Error(f"unknown or empty: {', '.join(bad) or 'list'}; methods: {', '.join(VARIANTS)}; "
                       f"edits: {', '.join(parse.ATTRIBUTES)}")
    if not 1 <= args.clips <= len(CLIPS):
        raise Ei2Error(f"--clips must be 1..{len(CLIPS)}")
    # the numbers that are config keys: one place for type, finiteness and range (ei2.config.RANGES)
    for name, key in (("steps", "steps"), ("lr", "learning_rate"), ("guidance", "guidance"),
                      ("inference_steps", "inference_steps"), ("inversion_steps", "inversion_steps")):
        check_value(key, getattr(args, name), "--" + name.replace("_", "-"))
    for seed in args.seed_list:
        check_value("seed", seed, "--seeds")
    # the Fig. 4 variants not in --methods, tuned on the first clip and seed for the chart (not with --quick)
    args.chart_only = [] if args.quick or args.no_diagnose else [
        m for m in dict.fromkeys(x for members in DIAGNOSE_SETS.values() for x in members) if m not in args.method_list]
    return args


def plan(args, clips: list[dict]) -> tuple[int, float]:
    """(number of tuning / inversion runs, estimated seconds) of a benchmark run, from SECONDS."""
    t = SECONDS
    tune = args.steps * t["tuning_step"]
    base = t["load"] + args.inversion_steps * t["inversion_step"]
    runs, seconds = 0, 0.0
    for clip in clips:
        edits = len(clip["edits"]) * (args.inference_steps * t["edit_step"] + t["score_edit"])
        for m in args.method_list:
            n = len(args.seed_list) if VARIANTS[m].tuned else 1
            runs += n
            seconds += n * (base + edits + (tune if VARIANTS[m].tuned else 0))
    runs += len(args.chart_only)
    seconds += len(args.chart_only) * (base + tune)
    if not args.no_diagnose:
        seconds += t["diagnose"] * len(DIAGNOSE_SETS)
    return runs, seconds


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = resolve_args(parser().parse_args(argv))
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", device)
    out = check_writable_dir(args.out, "--out folder")
    clips = suite(args.clips, args.edit_list)
    n_runs, estimate = plan(args, clips)
    print(f"suite: {len(clips)} clips, {sum(len(c['edits']) for c in clips)} edits, seeds {args.seed_list}, methods "
          f"{','.join(args.method_list)}" + (f" (+ {','.join(args.chart_only)} for the chart)" if args.chart_only
                                             else "") + f", {args.steps} steps at lr {args.lr:g}: {n_runs} runs, "
          f"about {estimate / 60:.0f} min on weights/mini (ei2.mini.benchmark.SECONDS)", flush=True)
    settings = {k: getattr(args, k) for k in ("model", "steps", "lr", "inference_steps", "inversion_steps",
                                              "guidance", "inversion_prompt")} | {
        "seeds": args.seed_list, "methods": args.method_list, "device": str(device), "precision": precision,
        "threads": torch.get_num_threads(),
        "memory": ("CUDA allocator" if device.type == "cuda" else "resident memory, CPU") + ": peak increase over the "
                  "start of tuning + inversion",
        "suite": [{"clip": c["name"], "caption": c["caption"], "edits": [e["prompt"] for e in c["edits"]]}
                  for c in clips]}
    samples, runs, tuned = [], [], {}
    per_clip = sum(len(args.seed_list) if VARIANTS[m].tuned else 1 for m in args.method_list)
    total, done, t_start = len(clips) * per_clip, 0, time.perf_counter()
    for ci, clip in enumerate(clips):
        for si, seed in enumerate(args.seed_list):
            first_videos = {}
            for name in args.method_list:
                variant = VARIANTS[name]
                if not variant.tuned and si > 0:  # deterministic: no seed changes anything
                    continue
                keep = out / "tuned" / f"{name}.safetensors" if ci == 0 and si == 0 and variant.tuned else None
                record, videos = run_one(args, variant, clip, seed, device, precision, keep)
                if keep:
                    tuned[name] = keep
                runs.append({"method": name, "clip": clip["name"], "seed": seed, **record})
                for e, v in zip(clip["edits"], videos):
                    samples.append({"method": name, "clip": clip["name"], "edit": e["kind"], "edit_name": e["name"],
                                    "objects": clip["n_objects"], "seed": seed, "prompt": e["prompt"],
                                    **sample_metrics(v, e, clip["caption"])})
                if si == 0:
                    first_videos[name] = videos
                done += 1
                last = samples[-len(videos):]
                elapsed = time.perf_counter() - t_start
                projected = elapsed / done * (total + len(args.chart_only))
                print(f"[{done}/{total} {elapsed:.0f}s, projected {projected:.0f}s] {name} {clip['name']} seed {seed}: "
                      f"tune {record['tuning_s']:.1f}s, invert {record['inversion_s']:.1f}s, render "
                      f"{record['render_s']:.1f}s; edited-attr alignment "
                      f"{np.mean([s['align_edited'] for s in last]):.2f}", flush=True)
                settings["status"] = f"partial: {done} of {total} runs"
                write_results(out, settings, summarize(samples, runs, args.method_list), samples, runs)
            if si == 0:
                for ei in range(len(clip["edits"])):
                    write_grid(out, clip, ei, first_videos)
    for name in args.chart_only:  # tuned for the covariate-shift chart only: no edit rendered or scored
        keep = out / "tuned" / f"{name}.safetensors"
        run_one(args, VARIANTS[name], dict(clips[0], edits=[]), args.seed_list[0], device, precision, keep)
        tuned[name] = keep
        print(f"tuned {name} on {clips[0]['name']} for the chart ({time.perf_counter() - t_start:.0f}s)", flush=True)
    settings["status"] = f"complete: {done} runs, {time.perf_counter() - t_start:.0f} s"
    table = summarize(samples, runs, args.method_list)
    write_results(out, settings, table, samples, runs)
    charts = [] if args.no_diagnose else run_diagnose(out, clips[0], tuned, args)
    print(format_table(table))
    print(format_paired(paired_table(samples, args.method_list)))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'grids'}/", *charts, sep=", ")


if __name__ == "__main__":
    main(sys.argv[1:])
