"""`python -m ei2.evaluate`: CLIP scores of a run's edits (or of any video), as the paper's Table 1 reports them.

    python -m ei2.evaluate --run runs/sd-v1-4 [--clip weights/clip-vit-large-patch14]
    python -m ei2.evaluate --video edited.mp4 --prompt "a Porsche car is moving on the beach" [--json scores.json]

Protocol (notes.md section 4; the LOVEU-TGVE protocol of Tune-A-Video's authors, which the paper follows): CLIP
ViT-L/14 image embeddings of every frame (the CLIP image processor: shortest side to 224, bicubic, center crop 224)
and the text embedding of the prompt (truncated to 77 tokens), then
- frame consistency = 100 x mean cosine similarity over all pairs of distinct frames;
- textual alignment = mean over frames of 100 x cosine(frame, prompt).
For a run, the source clip is scored against its caption and each edit against its edit prompt; metrics.json is
written into the run and the table follows the layout of the paper's Table 1 (with the run's tuning + inversion
time, edit time and peak memory from log.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .config import check_value, cli_number
from .files import atomic_path, check_writable_dir
from .errors import Ei2Error, cli_main, first_line
from .pipeline import resolve_device
from .stats import frame_consistency, textual_alignment
from .unet import VARIANTS
from .video import read_all_frames

DEFAULT_CLIP = "weights/clip-vit-large-patch14"
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLIP_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
PAPER_ROWS = [  # paper Table 1 (V100, 8 frames of 512x512): FC, TA, training min, inference min, GiB train, GiB infer
    ("paper Table 1: EI² (V100)", 95.94, 29.84, 12.5, 0.5, 11.0, 5.3),
    ("paper Table 1: Tune-A-Video (V100)", 96.64, 28.72, 11.0, 0.5, 9.6, 5.3),
]


def clip_hint(folder: Path) -> str:
    return (f"put CLIP ViT-L/14 in {folder}: config.json, model.safetensors (or pytorch_model.bin), "
            "preprocessor_config.json, and the tokenizer files vocab.json, merges.txt, tokenizer_config.json "
            "(special_tokens_map.json, tokenizer.json if present); on a machine with internet: "
            f"`huggingface-cli download {CLIP_REPO} --local-dir {folder}` (or `hf download ...`), then copy the folder")


def missing_clip_files(folder: Path) -> list[str]:
    missing = [f for f in CLIP_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in CLIP_WEIGHTS):
        missing.append(CLIP_WEIGHTS[0])
    if not (folder / "tokenizer.json").is_file():
        missing += [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    return missing


def _image_processor_class():
    import transformers  # here and in ClipScorer, as in ei2.text: a slow import that only loading CLIP needs

    # transformers 5 without torchvision warns for CLIPImageProcessor and falls back to the PIL one: ask for it
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ClipScorer:
    """CLIP (transformers CLIPModel, image processor and tokenizer) from a local folder, offline."""

    def __init__(self, folder: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu", batch: int = 16):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise Ei2Error(f"CLIP not found: {folder} does not exist; {clip_hint(folder)}")
        missing = missing_clip_files(folder)
        if missing:
            raise Ei2Error(f"CLIP folder {folder} is incomplete ({', '.join(missing)} missing); {clip_hint(folder)}")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            self.processor = _image_processor_class().from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise Ei2Error(f"could not load CLIP from {folder} ({first_line(e)}); {clip_hint(folder)}") from None
        self.folder, self.device, self.batch = folder, torch.device(device), batch
        self.model = self.model.float().eval().requires_grad_(False).to(self.device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeddings(self, frames: list[np.ndarray]) -> torch.Tensor:
        """uint8 frames (H, W, 3) -> (n, D) projected CLIP image embeddings (not normalized), float32 on CPU."""
        out = []
        for i in range(0, len(frames), self.batch):
            pixels = self.processor(images=list(frames[i:i + self.batch]), return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """(D,) projected CLIP text embedding of the prompt (not normalized), float32 on CPU."""
        tok = self.tokenizer([prompt], truncation=True, max_length=self.max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                       attention_mask=tok["attention_mask"].to(self.device)).pooler_output
        return self.model.text_projection(pooled).float().cpu()[0]

    def score(self, frames: list[np.ndarray], prompt: str) -> dict:
        if len(frames) < 2:
            raise Ei2Error(f"frame consistency needs at least 2 frames, the video has {len(frames)}")
        image = self.image_embeddings(frames)
        text = self.text_embedding(prompt)
        scores = {"frame_consistency": frame_consistency(image), "textual_alignment": textual_alignment(image, text)}
        if not all(math.isfinite(v) for v in scores.values()):  # never NaN in metrics.json (not valid JSON)
            shown = ", ".join(f"{k}={v}" for k, v in scores.items())
            raise Ei2Error(f"CLIP in {self.folder} gives non-finite scores ({shown}); its weights hold NaN/inf or are "
                           "not CLIP's: re-download them")
        return {"frames": len(frames), **scores}


# --- A run ---------------------------------------------------------------------------------------------------------


def method_name(config: dict) -> str:
    """The paper's name of a run's method when it is one of Table 1's (ei2.unet.VARIANTS), else its options."""
    keys = ("frame_attention", "temporal", "temporal_norm", "spectral_norm")
    run = (config.get("frame_attention", "ffam"), config.get("temporal", "stam"), config.get("temporal_norm"),
           config.get("spectral_norm"))
    for variant in (VARIANTS["ei2"], VARIANTS["tav"]):
        if run == tuple(getattr(variant.video, k) for k in keys):
            return variant.paper
    extra = "".join(f", {k}={config[k]}" for k in keys[2:] if config.get(k) is not None)
    return f"{run[0]} + {run[1]}{extra}"


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Ei2Error(f"could not read {what} {path} ({first_line(e)})") from None


def _video_of(run: Path, entry: dict, stem: str) -> Path:
    for key in ("mp4", "gif"):  # mp4 first: full colour, the gif has a 256-colour palette per frame
        if entry.get(key) and (run / entry[key]).is_file():
            return run / entry[key]
    names = ", ".join(str(run / entry[k]) for k in ("mp4", "gif") if entry.get(k)) or f"{stem}.mp4/.gif"
    raise Ei2Error(f"video of {stem} not found ({names}); is the run complete?")


def resources(log: dict | None) -> dict:
    """Table 1's resource columns from log.json: training = tuning + inversion, inference = mean edit time."""
    if not log:
        return {}
    t, mem = log.get("timings", {}), log.get("peak_memory_gib", {})
    edit_s = [s for s in t.get("edit_s", []) if s is not None]
    train_s = [t.get("tuning_s"), t.get("inversion_s")]
    return {
        "training_min": sum(train_s) / 60 if all(s is not None for s in train_s) else None,
        "inference_min": sum(edit_s) / len(edit_s) / 60 if edit_s else None,
        "training_gib": mem.get("training"),
        "inference_gib": mem.get("inference"),
        "device": (log.get("versions") or {}).get("gpu") or (log.get("versions") or {}).get("device"),
    }


def evaluate_run(run_dir: str | Path, scorer: ClipScorer, max_frames: int | None = None,
                 progress: bool = True) -> dict:
    """Score the run's source clip (with its caption) and every edit (with its prompt); write run/metrics.json."""
    run = Path(run_dir)
    if max_frames is not None:
        check_value("max_frames", max_frames, "--max-frames")
    if not (run / "config.yaml").is_file():
        raise Ei2Error(f"{run / 'config.yaml'} not found: {run} is not a run directory of `python -m ei2.train`")
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise Ei2Error(f"{run / 'config.yaml'} is not valid YAML ({first_line(e)})") from None
    edits = _read_json(run / "edits.json", "edit list") if (run / "edits.json").is_file() else []
    log = _read_json(run / "log.json", "run log") if (run / "log.json").is_file() else None
    edit_s = (log or {}).get("timings", {}).get("edit_s", [])

    jobs = [("source", config.get("caption", ""), _video_of(run, {"mp4": "source.mp4", "gif": "source.gif"},
                                                           "the source clip"), {})]
    for i, e in enumerate(edits):
        extra = {k: e[k] for k in ("seed", "guidance", "steps") if k in e}
        if i < len(edit_s) and edit_s[i] is not None:
            extra["inference_min"] = edit_s[i] / 60
        jobs.append(("edit", e["prompt"], _video_of(run, e, f"edit {i} ({e['prompt']!r})"), extra))
    scored = []
    for kind, prompt, video, extra in tqdm(jobs, desc="CLIP scores", disable=not progress):
        s = scorer.score(read_all_frames(video, max_frames), prompt)
        scored.append({"prompt": prompt, "video": str(video.relative_to(run)), **s, **extra})
    edit_rows = scored[1:]
    mean = {k: (sum(r[k] for r in edit_rows) / len(edit_rows) if edit_rows else None)
            for k in ("frame_consistency", "textual_alignment")}
    metrics = {
        "protocol": "CLIP ViT-L/14; frame consistency = 100 x mean cosine over pairs of distinct frames; textual "
                    "alignment = mean over frames of 100 x cosine(frame, prompt) (notes.md section 4)",
        "clip": str(scorer.folder),
        "method": method_name(config),
        "source": scored[0],
        "edits": edit_rows,
        "mean_edits": mean,
        "resources": resources(log),
    }
    with atomic_path(run / "metrics.json") as tmp:  # a NaN/inf of an old log.json is null: JSON has no NaN
        tmp.write_text(json.dumps(_finite(metrics), indent=2, ensure_ascii=False, allow_nan=False))
    return metrics


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --- Table ---------------------------------------------------------------------------------------------------------

HEADERS = ("method / edit", "frame consistency", "textual alignment", "training [min]", "inference [min]",
           "training [GiB]", "inference [GiB]")


def _cell(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(rows: list[tuple], width: int = 46) -> str:
    """rows: (name, fc, ta, training min, inference min, training GiB, inference GiB); None prints as '-'."""
    lines = [f"{HEADERS[0]:<{width}} " + " ".join(f"{h:>17}" for h in HEADERS[1:])]
    lines.append("-" * len(lines[0]))
    for name, *vals in rows:
        cells = [_cell(vals[0]), _cell(vals[1]), _cell(vals[2]), _cell(vals[3]), _cell(vals[4], 1), _cell(vals[5], 1)]
        lines.append(f"{_shorten(name, width):<{width}} " + " ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def run_table(metrics: dict) -> str:
    res = metrics.get("resources") or {}
    s = metrics["source"]
    rows = [(f"source: {s['prompt']}", s["frame_consistency"], s["textual_alignment"], None, None, None, None)]
    for e in metrics["edits"]:
        rows.append((f"edit: {e['prompt']}", e["frame_consistency"], e["textual_alignment"], None,
                     e.get("inference_min"), None, None))
    m = metrics["mean_edits"]
    n = len(metrics["edits"])
    rows.append((f"{metrics['method']}, mean of {n} edit{'s' if n != 1 else ''}", m["frame_consistency"],
                 m["textual_alignment"], res.get("training_min"), res.get("inference_min"), res.get("training_gib"),
                 res.get("inference_gib")))
    rows += PAPER_ROWS
    note = f"this run: {res.get('device') or 'device unknown'}; training = tuning + DDIM inversion, inference = one " \
           "edit; memory = peak (CUDA allocator on a GPU, process RSS on a CPU)"
    return format_table(rows) + "\n" + note


# --- CLI ---------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ei2.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="CLIP scores as the paper's Table 1: frame consistency (100 x mean cosine similarity of the CLIP "
                    "ViT-L/14 image embeddings over all pairs of distinct frames) and textual alignment (mean over "
                    "frames of 100 x cosine with the prompt's text embedding).",
        epilog="examples:\n"
               "  python -m ei2.evaluate --run runs/sd-v1-4            # writes runs/sd-v1-4/metrics.json\n"
               "  python -m ei2.evaluate --video out.mp4 --prompt \"a cat surfing\" --json scores.json\n\n"
               f"CLIP weights: {DEFAULT_CLIP} by default; get them on a machine with internet with\n"
               f"  huggingface-cli download {CLIP_REPO} --local-dir {DEFAULT_CLIP}")
    p.add_argument("--run", help="a run directory of python -m ei2.train: scores the source clip (caption) and every "
                                 "edit (its prompt); writes metrics.json into it")
    p.add_argument("--video", help="any video (mp4, gif, folder of frames) to score against --prompt")
    p.add_argument("--prompt", help="the text the --video should match")
    p.add_argument("--json", help="with --video: also write the scores to this JSON file")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP ViT-L/14 folder (default {DEFAULT_CLIP})")
    p.add_argument("--max-frames", default=None, metavar="N",
                   help="score only the first N frames, N >= 2 (default: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if bool(args.run) == bool(args.video):
        raise Ei2Error("give either --run <run dir> or --video <file> with --prompt \"...\"")
    if args.video and args.prompt is None:
        raise Ei2Error("--video needs --prompt \"...\" (the text the video should match)")
    if args.max_frames is not None:  # the config's reading and range table (config.CLI_RANGES), one line
        args.max_frames = cli_number("max_frames", args.max_frames, "--max-frames")
    device = resolve_device(args.device)  # a device this machine has, before anything is read
    if args.run and not Path(args.run).is_dir():
        raise Ei2Error(f"run directory not found: {args.run}")
    if args.video:
        read_all_frames(args.video, 1)  # a missing or broken video fails before CLIP loads
    if args.run or args.json:  # where metrics.json / --json go, before CLIP loads
        check_writable_dir(args.run or Path(args.json).parent, "run folder" if args.run else "--json folder")
    scorer = ClipScorer(args.clip, device)
    if args.run:
        metrics = evaluate_run(args.run, scorer, args.max_frames, progress=not args.no_progress)
        print(run_table(metrics))
        print(f"wrote {Path(args.run) / 'metrics.json'}")
        return
    s = scorer.score(read_all_frames(args.video, args.max_frames), args.prompt)
    result = {"video": args.video, "prompt": args.prompt, "clip": str(scorer.folder), **s}
    print(format_table([(f"{Path(args.video).name}: {args.prompt}", s["frame_consistency"], s["textual_alignment"],
                         None, None, None, None)]))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
