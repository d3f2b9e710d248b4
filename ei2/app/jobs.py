"""The page's glue to ei2's job, without Gradio: the page's settings -> a TrainConfig (read by the CLI's own
`load_config`, so the same checks and one-line errors), the job's events -> progress lines and results, one job at a
time on the device, cancel. The work itself is `ei2.train.run` and `ei2.edit.edit`, on one `ModelCache`."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .. import train
from ..cache import ModelCache
from ..config import TrainConfig, load_config, validate
from ..edit import PARTS, edit
from ..errors import Ei2Error, first_line, user_error_line
from ..mini.parse import IDEAL_SCORES, SCORES
from ..unet import VARIANTS

REPO = train.REPO
DEMO_CLIP = REPO / "assets" / "demo" / "red-circle.gif"
# the presets the page starts from: (config file, whether the miniature world's exact metrics score the edits)
PRESETS = {"miniature model (CPU demo)": REPO / "configs" / "demo.yaml",
           "Stable Diffusion v1-4 (GPU, paper settings)": REPO / "configs" / "sd-v1-4.yaml"}
# method label on the page -> ei2.unet.VARIANTS key (every variant that is tuned: EI², Tune-A-Video, Fig. 4)
METHODS = {v.paper: key for key, v in VARIANTS.items() if v.tuned}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Settings:
    """What the page's Tune tab sets; every other key comes from the preset's config file."""

    video: str
    caption: str
    edit_prompts: list[str] = field(default_factory=list)
    n_frames: int = 8
    stride: int = 1
    size: int = 64
    steps: int = 100
    learning_rate: float = 3e-4
    method: str = "ei2"  # a VARIANTS key
    precision: str = "auto"
    ddim_steps: int = 25  # inversion and sampling
    guidance: float = 7.5
    name: str = "app"  # the run folder: <runs>/<name>
    preset: str = next(iter(PRESETS))
    model: str | None = None  # None: the preset's


def _text(value) -> str:
    """A number as the command line writes it (8.0 from a slider -> "8": an int key refuses "8.0")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return str(value)


def prompt_lines(text: str) -> list[str]:
    """The edit prompts of a text box: one per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def to_config(s: Settings, runs: str | Path) -> TrainConfig:
    """The TrainConfig of a page's settings: the preset's YAML, then the settings as command-line overrides, checked
    as `python -m ei2.train` checks them; the run goes to <runs>/<name>."""
    if s.preset not in PRESETS:
        raise Ei2Error(f"preset {s.preset!r} is not one of {', '.join(PRESETS)}")
    if s.method not in VARIANTS or not VARIANTS[s.method].tuned:
        raise Ei2Error(f"method {s.method!r} is not one of {', '.join(METHODS.values())}")
    name = (s.name or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name == "uploads":
        raise Ei2Error(f"run name {s.name!r}: give a folder name (no slashes), e.g. my-clip")
    video = {f.name: getattr(VARIANTS[s.method].video, f.name) for f in dataclasses.fields(VARIANTS[s.method].video)}
    values = {"n_frames": s.n_frames, "stride": s.stride, "size": s.size, "steps": s.steps,
              "learning_rate": s.learning_rate, "precision": s.precision, "inference_steps": s.ddim_steps,
              "inversion_steps": s.ddim_steps, "guidance": s.guidance, **video}
    overrides = [f"--{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else _text(v)}"
                 for k, v in values.items()]
    overrides += [f"--video={Path(s.video).expanduser().resolve()}", f"--caption={s.caption}",
                  f"--output_dir={Path(runs).expanduser().resolve() / name}"]
    if s.model:
        overrides.append(f"--model={s.model}")
    cfg = load_config(PRESETS[s.preset], overrides)
    cfg.edit_prompts = list(s.edit_prompts)  # set as a list: a prompt is never read as an option
    validate(cfg)
    return cfg


def describe(event: dict) -> str:
    """One progress line for an event of ei2.train.run / ei2.edit.edit."""
    phase = event.get("phase")
    if phase == "tune":
        loss = "" if event.get("loss") is None else f", loss {event['loss']:.4f}"
        return f"tuning: step {event['step']}/{event['steps']}{loss}"
    if phase == "edit":
        return f"edit {event['index'] + 1}/{event['of']} rendered: {event['prompt']!r}"
    if phase == "done":
        return f"done: {event['run_dir']}"
    return {"load": "loading the model (kept loaded for the next job)", "encode": "encoding the clip (VAE)",
            "invert": "tuned; DDIM inversion of the clip", "write": "writing the comparison video and frame grid",
            "queued": "waiting for the job before this one to finish"}.get(phase, str(event.get("message", phase)))


class ProgressLog:
    """The progress text: one line per event, the tuning lines replacing each other (the latest step and loss)."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, event: dict) -> str:
        line = describe(event)
        if event.get("phase") == "tune" and self.lines and self.lines[-1].startswith("tuning: "):
            self.lines[-1] = line
        else:
            self.lines.append(line)
        return self.text

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def metrics_line(prompt: str, scores: dict | None) -> str:
    """The miniature world's exact metrics of one edit (ei2.mini.parse.SCORES, then IDEAL_SCORES: IoU and trajectory
    error against the ideal edit), '-' for one not scored."""
    if not scores:
        return f"{prompt!r}: not scored (score: none, or a model outside the miniature world)"
    shown = [f"{name.replace('_', ' ')} {'-' if scores.get(name) is None else f'{scores[name]:.3g}'}"
             for name in (*SCORES, *IDEAL_SCORES) if name in SCORES or name in scores]
    return f"{prompt!r}: " + ", ".join(shown)


def error_line(e: BaseException) -> str:
    """The CLI's one-line message for an exception (`cli_main`'s wording); anything else: its first line."""
    line = user_error_line(e)
    if line is not None:
        return f"error: {line}"
    return f"error: {type(e).__name__}: {first_line(e)} (a bug in ei2; the server log has the traceback)"


def finished_runs(runs: str | Path) -> list[str]:
    """The run folders under `runs` that ei2.edit can render from (config, tuned weights, inverted latent), newest
    first."""
    root = Path(runs).expanduser()
    found = [p for p in root.iterdir() if p.is_dir() and all((p / part).is_file() for part in PARTS)] \
        if root.is_dir() else []
    return [str(p) for p in sorted(found, key=lambda p: (p / "tuned.safetensors").stat().st_mtime, reverse=True)]


def run_edits(run_dir: str | Path) -> list[dict]:
    """edits.json of a run, each entry's video paths made absolute."""
    run_dir = Path(run_dir)
    listing = run_dir / "edits.json"
    entries = json.loads(listing.read_text()) if listing.is_file() else []
    return [{**e, **{k: str(run_dir / e[k]) for k in ("mp4", "gif") if k in e}} for e in entries]


DONE = object()


class Worker:
    """Runs ei2's jobs one at a time in a thread, on one ModelCache, and streams their events to the page."""

    def __init__(self, cache: ModelCache | None = None):
        self.cache = cache if cache is not None else ModelCache()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def train(self, cfg: TrainConfig, resume: bool = False) -> Iterator[dict]:
        """ei2.train.run's events, then {"phase": "error"|"cancelled", "message"} if it did not finish."""
        return self._stream(lambda on_event: train.run(cfg, resume=resume, progress=False, cache=self.cache,
                                                       on_event=on_event, stop=self.stop))

    def edit(self, run_dir: str | Path, prompt: str, guidance: float, steps: int | None = None) -> Iterator[dict]:
        """ei2.edit.edit's events for one new prompt, rendered from the run's tuned weights and inverted latent."""
        return self._stream(lambda on_event: edit(run_dir, [prompt], guidance, steps, progress=False,
                                                  cache=self.cache, on_event=on_event))

    def cancel(self) -> str:
        if not self.lock.locked():
            return "no job is running"
        self.stop.set()
        return "cancelling: tuning stops after the step in progress and writes its checkpoint (--resume continues it)"

    def _stream(self, job: Callable[[Callable[[dict], None]], object]) -> Iterator[dict]:
        if not self.lock.acquire(blocking=False):
            yield {"phase": "queued"}
            self.lock.acquire()
        self.stop.clear()
        events: queue.Queue = queue.Queue()

        def work():
            try:
                job(events.put)
            except Exception as e:  # the page shows one line; the server keeps running
                cancelled = getattr(train, "Cancelled", None)
                if cancelled is not None and isinstance(e, cancelled):
                    events.put({"phase": "cancelled", "message": f"cancelled: {e}"})
                else:
                    if not isinstance(e, (Ei2Error, OSError)):
                        traceback.print_exc()
                    events.put({"phase": "error", "message": error_line(e)})
            finally:
                self.stop.clear()
                self.lock.release()
                events.put(DONE)

        threading.Thread(target=work, name="ei2-job", daemon=True).start()
        while (event := events.get()) is not DONE:
            yield event
