"""The settings of one tuning + editing run: a YAML file, then `--key value` overrides from the command line.

Defaults are the paper's (section 5: 8 frames of 512x512, AdamW at 3e-5 for 500 steps, guidance 7.5 from a DDIM
inversion) and, where the paper is silent, Tune-A-Video's, which it follows (grad clip 1.0, weight decay 1e-2, 50 DDIM
steps, seed 33). The one-line help of every field is also the README's table of config keys (`describe_keys`).

Paths (`resolve_path`, the same rule for every CLI): `~` is expanded; a relative `model` or `video` is looked up in the
working directory first, then in the repository the config comes from (the parent of the config's folder when that
folder is configs/, else the config's folder); the resolved config holds absolute paths, so a run's config.yaml works
from any directory. A relative output_dir is the working directory's.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .attention import TEMPORAL_NORMS
from .errors import Ei2Error
from .files import atomic_path
from .unet import VideoOptions
from .video import RESIZES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = r"auto|cpu|cuda(:\d+)?|mps"  # the pattern of a device name
SCORES = ("none", "mini")
INVERSION_PROMPTS = ("empty", "caption")


def _key(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = _key("weights/stable-diffusion-v1-4", "Stable Diffusion v1-4: diffusers folder or one-file checkpoint")
    video: str = _key("", "input video: an mp4 (or any ffmpeg video), a gif or a folder of frames")
    caption: str = _key("", "text prompt describing the input video, used for tuning and inversion")
    edit_prompts: list[str] = _key([], "prompts to render edited videos with (one output video each)")
    n_frames: int = _key(8, "number of frames sampled from the video (paper: 8)")
    start: int = _key(0, "index of the first frame sampled")
    stride: int = _key(1, "take every stride-th frame from start on")
    size: int = _key(512, "frames are brought to size x size (see resize); a multiple of 64")
    resize: str = _key("crop", "crop: short side to size, then the center square; squash: both sides to size "
                               "(Tune-A-Video)")
    steps: int = _key(500, "tuning steps (paper: 500)")
    learning_rate: float = _key(3e-5, "AdamW learning rate (paper: 3e-5)")
    weight_decay: float = _key(1e-2, "AdamW weight decay (Tune-A-Video: 1e-2)")
    grad_clip: float = _key(1.0, "gradient norm clipping (Tune-A-Video: 1.0)")
    seed: int = _key(33, "random seed of tuning noise, timesteps and sampling (Tune-A-Video: 33)")
    guidance: float = _key(7.5, "classifier-free guidance scale of the edits (paper: 7.5; 1 turns it off)")
    inference_steps: int = _key(50, "DDIM steps when rendering edits")
    inversion_steps: int = _key(50, "DDIM inversion steps that give the edits' starting noise")
    inversion_prompt: str = _key("empty", "the inversion's prompt: empty (Tune-A-Video's; the paper does not say) or "
                                          "caption (the video's caption)")
    frame_attention: str = _key("ffam", "attn1 of each transformer: ffam (EI²), sca (Tune-A-Video), self, full")
    ratio: int = _key(2, "FFAM ratio r: stride of the other frames' coarse token grid")
    temporal: str = _key("stam", "temporal module: stam (EI²), ta (Tune-A-Video) or none")
    temporal_norm: str | None = _key(None, "temporal module's norm override (ablation): " + "/".join(TEMPORAL_NORMS))
    spectral_norm: bool | None = _key(None, "override the temporal module's spectral norm (ablation): true or false")
    resnet_norm: str = _key("video", "ResNet and output GroupNorm statistics over all frames (video) or per frame")
    temporal_norm_trainable: bool = _key(False, "also tune the temporal LayerNorm's affine (Fig. 4 'LayerNorm'); "
                                                "Tune-A-Video: false")
    precision: str = _key("auto", "auto (bf16 on CUDA if supported, else fp16; fp32 on CPU), fp32, bf16 or fp16")
    recompute_activations: bool = _key(True, "rebuild norm+SiLU, GEGLU outputs in backward (1.3 GiB less at 8x512²)")
    gradient_checkpointing: bool = _key(False, "recompute whole blocks in the backward pass: least memory, slower")
    compile: bool = _key(False, "torch.compile the UNet: faster CUDA steps after a one-off compile of a few minutes")
    checkpoint_every: int = _key(100, "save the tuned weights every this many steps (0: only at the end)")
    output_dir: str = _key("runs/<name>", "where outputs go; <name> is the config file's name")
    fps: int = _key(8, "frame rate of the written videos")
    device: str = _key("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    score: str = _key("none", "mini: score each edit with the miniature world's exact metrics (docs/mini.md); none")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)
NULLS = ("null", "Null", "NULL", "~")
BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
VIDEO_KEYS = tuple(f.name for f in dataclasses.fields(VideoOptions))  # the TrainConfig keys that shape the UNet


def video_options(cfg: TrainConfig) -> VideoOptions:
    return VideoOptions(**{k: getattr(cfg, k) for k in VIDEO_KEYS})


def describe_keys() -> list[tuple[str, object, str]]:
    """(key, default, one-line description) of every setting, in declaration order."""
    defaults = TrainConfig()
    return [(name, getattr(defaults, name), f.metadata["help"]) for name, f in FIELDS.items()]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then the YAML file `path` (if any), then command-line `overrides` such as
    ["--steps", "10", "--edit_prompts", "a", "b", "--learning-rate=1e-4"]; validated. `<name>` in output_dir becomes
    the config file's stem ("run" without a file)."""
    values: dict[str, object] = {}
    if path is not None:
        for key, value in _read_yaml(Path(path)).items():
            name = _field_name(str(key), f"in {path}")
            values[name] = _coerce(name, value)
    for key, raw in _split_overrides(overrides or []):
        name = _field_name(key, "on the command line")
        values[name] = _coerce(name, _parse_cli(name, raw))
    cfg = TrainConfig(**values)
    cfg.output_dir = cfg.output_dir.replace("<name>", Path(path).stem if path is not None else "run")
    validate(cfg)
    cfg.model, cfg.video = (resolve_path(p, path) for p in (cfg.model, cfg.video))
    cfg.output_dir = str(Path(cfg.output_dir).expanduser())
    return cfg


def config_repo(config: str | Path | None) -> Path | None:
    """The folder a config's relative paths may also be relative to: the parent of the config's folder when that
    folder is named configs/ (configs/demo.yaml -> the repository), else the config's own folder (a run's
    config.yaml -> the run folder); None without a config file."""
    if config is None:
        return None
    folder = Path(config).expanduser().resolve().parent
    return folder.parent if folder.name == "configs" else folder


def resolve_path(value: str, config: str | Path | None = None) -> str:
    """The one rule of every CLI for a model or video path: `~` expanded; an absolute path kept; a relative path
    looked up in the working directory first, then under `config_repo(config)`; returned absolute (the working
    directory's when it exists nowhere, so the not-found error names the full path)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here = Path.cwd() / path
    repo = config_repo(config)
    if not here.exists() and repo is not None and (repo / path).exists():
        return str(repo / path)
    return str(here)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(path)` gives it back."""
    text = "# resolved ei2 config\n" + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- the command line: argparse prints the help, the values are read from the field types ---------------------------


def add_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """-h/--help for a parser made with add_help=False: its own options, then every config key with its default and
    help (the README's table). The keys are listed only when the help is printed: their values are not argparse's
    but what parse_known_args leaves, read by `load_config` (--key value or --key=value, dashes or underscores,
    several values for a list, a bare --flag for true, null or ~ for an optional key)."""
    parser.add_argument("-h", "--help", action=_HelpWithKeys, nargs=0, help="show this help message and exit")
    return parser


class _HelpWithKeys(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.usage = parser.format_usage().removeprefix("usage: ").strip() + " [--KEY VALUE ...]"
        keys = parser.add_argument_group("config keys", "each overrides the YAML's value")
        for name, default, text in describe_keys():
            tp, optional = _field_type(name)
            nargs = "*" if tp == list[str] else "?" if tp is bool and not optional else None
            keys.add_argument(f"--{name}", metavar=METAVARS[tp] + "|null" * optional, nargs=nargs,
                              help=f"{text} (default: {default!r})".replace("%", "%%"))
        parser.print_help()
        parser.exit()


def _field_type(name: str) -> tuple[type, bool]:
    """(the field's type, whether it may be None): `str | None` -> (str, True)."""
    tp = TYPES[name]
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _as_int(v):
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError
    return v


def _as_float(v):
    if isinstance(v, str):
        v = float(v)  # PyYAML reads 3e-5 (no dot) as text
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError
    return float(v)


def _as_bool(v):
    if isinstance(v, str) and v.lower() in BOOLS:
        return BOOLS[v.lower()]
    if not isinstance(v, bool):
        raise ValueError
    return v


def _as_text(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise ValueError
    return v


def _as_texts(v):
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list):
        raise ValueError
    return [_as_text(x) for x in v]


# field type -> (its reader of a YAML value or a YAML-read command-line value, what the error says it must be)
COERCE = {int: (_as_int, "an integer"), float: (_as_float, "a number"), bool: (_as_bool, "true or false"),
          str: (_as_text, "a text"), list[str]: (_as_texts, "a list of texts")}
METAVARS = {int: "N", float: "X", bool: "BOOL", str: "TEXT", list[str]: "TEXT"}


def _coerce(name: str, value):
    tp, optional = _field_type(name)
    if optional and value is None:
        return None
    read, wanted = COERCE[tp]
    try:
        return read(value)
    except (ValueError, TypeError, OverflowError):
        raise Ei2Error(f"{name} must be {wanted}, got {value!r}") from None


def _parse_cli(name: str, raw: list[str]):
    """Command-line text -> a Python value: YAML scalars for numbers and booleans; text fields stay verbatim (a
    caption such as "a cat: sitting" is not YAML-parsed), except null/~ for an optional field."""
    tp, optional = _field_type(name)
    if tp == list[str]:
        return list(raw)
    if tp is bool and not optional and not raw:
        return True  # a bare --gradient_checkpointing
    if len(raw) != 1:
        raise Ei2Error(f"--{name} takes one value, got {len(raw)}: {' '.join(raw) or '(none)'}; quote text with spaces")
    if tp is str:
        return None if optional and raw[0] in NULLS else raw[0]
    try:
        return yaml.safe_load(raw[0])
    except yaml.YAMLError:
        return raw[0]


def _split_overrides(args: list[str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            out.append((key, [value] if eq else []))
        elif out:
            out[-1][1].append(arg)
        else:
            raise Ei2Error(f"unexpected argument {arg!r}; overrides look like --key value (e.g. --steps 100)")
    return out


def _field_name(key: str, where: str) -> str:
    name = key.replace("-", "_")
    if name in FIELDS:
        return name
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(FIELDS)}"
    raise Ei2Error(f"unknown config key '{key}'; {hint}{f' ({where})' if where else ''}")


def yaml_syntax_error(path: Path, e: yaml.YAMLError) -> Ei2Error:
    """The one-line message of a YAML syntax error: the file, where the parser stopped, and its words."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return Ei2Error(f"YAML syntax error in {path}{where}: {problem}; fix that line")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise Ei2Error(f"config file not found: {path}; give --config the path of an existing YAML file (examples in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise yaml_syntax_error(path, e) from None
    except UnicodeDecodeError:
        raise Ei2Error(f"{path} is not a UTF-8 text file; pass a YAML config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Ei2Error(f"{path} must hold `key: value` lines at the top level, not a {type(data).__name__}")
    return data


# The one range table of every numeric key (int and float fields): name -> (low, high, low excluded); None: unbounded.
# `check_value` applies it for the config, ei2.edit's --guidance/--steps and ei2.diagnose's numbers alike.
RANGES = {
    "n_frames": (1, None, False), "start": (0, None, False), "stride": (1, None, False), "size": (64, None, False),
    "steps": (0, None, False), "learning_rate": (0, 1, True), "weight_decay": (0, 1, False),
    "grad_clip": (0, None, True), "seed": (-2**63, 2**64 - 1, False), "guidance": (1, 100, False),
    "inference_steps": (1, 1000, False), "inversion_steps": (1, 1000, False), "ratio": (1, None, False),
    "checkpoint_every": (0, None, False), "fps": (0, 1000, True),
}
# Numbers of a CLI that are not config keys, in the same table's terms: name -> (type, low, high, low excluded)
CLI_RANGES = {"max_frames": (int, 2, None, False)}  # ei2.evaluate --max-frames
HINTS = {"steps": " (0 skips tuning)", "guidance": " (1 turns classifier-free guidance off)",
         "checkpoint_every": " (0: only at the end)", "max_frames": " (frame consistency compares pairs of frames)"}
_NUMERIC = {name for name in FIELDS if _field_type(name)[0] in (int, float)}
assert set(RANGES) == _NUMERIC, f"RANGES must cover exactly the numeric keys: {set(RANGES) ^ _NUMERIC}"


def check_value(name: str, value, flag: str | None = None):
    """`value` of the numeric key `name` (a TrainConfig field, or a CLI_RANGES name), checked for type, finiteness and
    its range; returns it. Ei2Error names `flag` (e.g. "--lr") instead of the key when given."""
    shown = flag or name
    tp = _field_type(name)[0] if name in RANGES else CLI_RANGES[name][0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Ei2Error(f"{shown} must be {COERCE[tp][1]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Ei2Error(f"{shown}={value} must be a finite number, not inf or nan")
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise Ei2Error(f"{shown}={value} must be an integer")
    low, high, excluded = RANGES[name] if name in RANGES else CLI_RANGES[name][1:]
    too_low = low is not None and (value <= low if excluded else value < low)
    if too_low or (high is not None and value > high):
        if high is None:
            rule = f"> {low}" if excluded else f">= {low}"
        elif tp is int and not excluded:
            rule = f"in {low}..{high}"
        else:
            rule = f"{'>' if excluded else '>='} {low} and <= {high}"
        raise Ei2Error(f"{shown}={value} must be {rule}{HINTS.get(name, '')}")
    return value


def cli_number(name: str, text: str, flag: str):
    """A number typed on the command line for `name` (a CLI_RANGES name or a numeric config key), read as the config
    reads it (YAML: 12, 1e3, .inf, nan) and checked by `check_value`; a one-line Ei2Error naming `flag` otherwise."""
    tp = CLI_RANGES[name][0] if name in CLI_RANGES else _field_type(name)[0]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    try:
        value = COERCE[tp][0](value)
    except (ValueError, TypeError, OverflowError):
        raise Ei2Error(f"{flag} must be {COERCE[tp][1]}, got {text!r}") from None
    return check_value(name, value, flag)


def validate(cfg: TrainConfig) -> None:
    """Raise Ei2Error for the first setting that cannot work, naming it and what it accepts."""
    checks = [
        (cfg.model.strip(), "model is empty; set `model:` to the Stable Diffusion v1-4 folder or checkpoint"),
        (cfg.video.strip(), "no video set; set `video:` in the config (or --video) to an mp4, gif or frame folder"),
        (cfg.caption.strip(), "caption is empty; set `caption:` to a prompt describing the input video"),
        (cfg.size > 0 and cfg.size % 64 == 0,
         f"size={cfg.size} must be a positive multiple of 64 (SD's UNet halves the 1/8 latent 3 times); e.g. 512"),
        (cfg.output_dir.strip(), "output_dir is empty; set it to a folder for the outputs"),
        (re.fullmatch(DEVICES, cfg.device),
         f"device={cfg.device!r} must be auto, cpu, cuda, cuda:N or mps"),
    ]
    checks.append((cfg.resize in RESIZES, _not_one_of("resize", cfg.resize, RESIZES)))
    for ok, message in checks:
        if not ok:
            raise Ei2Error(message)
    for name in RANGES:
        check_value(name, getattr(cfg, name))
    video_options(cfg)  # frame_attention, temporal, temporal_norm, resnet_norm: VideoOptions checks their values
    for name, value, allowed in (("precision", cfg.precision, PRECISIONS), ("score", cfg.score, SCORES),
                                 ("inversion_prompt", cfg.inversion_prompt, INVERSION_PROMPTS)):
        if value not in allowed:
            raise Ei2Error(_not_one_of(name, value, allowed))
    for i, prompt in enumerate(cfg.edit_prompts):
        if not prompt.strip():
            raise Ei2Error(f"edit prompt {i + 1} is empty; remove it or write the edit")


def inversion_text(inversion_prompt: str, caption: str) -> str:
    """The text the clip is DDIM-inverted with: `inversion_prompt` "caption" -> the caption, "empty" -> ""."""
    return caption if inversion_prompt == "caption" else ""


def _not_one_of(name: str, value, allowed) -> str:
    return f"{name}={value!r} is not one of {', '.join(str(a) for a in allowed)}"
