"""A suite's manifest: what to run, read and checked as a whole before any work starts.

    output_dir: runs/my-suite            # optional; --output_dir wins; default runs/<manifest name>
    video_root: data/loveu-tgve-2023     # job videos are relative to it (without it: as ei2.train's video)
    defaults:                            # every job: a config file, then any ei2.train key
      config: configs/sd-v1-4.yaml
      steps: 500
    methods:                             # optional (default: ei2 with the defaults); every job runs once per method
      ei2: {}
      tav: {frame_attention: sca, temporal: ta}
    jobs:
      - name: bmx-rider                  # unique; the job's folder is <output_dir>/<method>/<name>
        video: DAVIS_480p/480p_frames/bmx-rider
        caption: A person does a trick on a BMX bike at a skatepark.
        edits: {style: "..., grayscale.", object: "..."}   # named edit prompts (the tables group by name)
        overrides: {n_frames: 32}        # optional: any ei2.train key for this job

A job's settings, later ones winning: ei2.train's defaults, the config file, `defaults`, the method, the job's
`overrides`, the command line's --KEY VALUE. Every problem (an unknown key, a bad value, a duplicate job name, a
missing config file) is collected with its line and reported at once; a video that does not exist is not a problem
of the manifest: the job is listed as missing and recorded as failed (`--strict` makes it fatal).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import (FIELDS, RANGES, TrainConfig, _coerce, _field_name, _parse_cli, check_value, resolve_path,
                      validate, yaml_syntax_error)
from ..errors import Ei2Error

TOP_KEYS = ("output_dir", "video_root", "defaults", "methods", "jobs")
JOB_KEYS = ("name", "video", "caption", "edits", "overrides")
PER_JOB = {"video": "the job's video:", "caption": "the job's caption:", "edit_prompts": "the job's edits:",
           "output_dir": "the manifest's output_dir: (or --output_dir)"}  # train keys a suite sets itself
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_METHODS = {"ei2": {}}


@dataclass
class Job:
    """One run of ei2.train: a manifest job under one method."""
    name: str  # the manifest job's name
    method: str
    cfg: TrainConfig  # resolved; output_dir = <suite output_dir>/<method>/<name>
    kinds: list[str]  # the edit prompts' names, in cfg.edit_prompts' order
    line: int
    missing: str | None = None  # why the video cannot be read (it does not exist), else None

    @property
    def id(self) -> str:
        return f"{self.method}/{self.name}"

    @property
    def cost(self) -> int:
        """Tuned frames x size² x steps: the order of the work (longest first)."""
        return self.cfg.n_frames * self.cfg.size ** 2 * max(self.cfg.steps, 1)


@dataclass
class Suite:
    path: Path
    output_dir: Path
    jobs: list[Job] = field(default_factory=list)

    @property
    def missing(self) -> list[Job]:
        return [j for j in self.jobs if j.missing]


def read_yaml_lines(path: Path) -> tuple[object, dict[tuple, int]]:
    """A YAML file's data and the line (1-based) of every mapping key and list item, by path of str keys/int indices."""
    if not path.is_file():
        raise Ei2Error(f"suite manifest not found: {path}; give the path of a suite YAML, e.g. configs/suite-mini.yaml")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_syntax_error(path, e) from None
    except UnicodeDecodeError:
        raise Ei2Error(f"{path} is not a UTF-8 text file") from None
    lines: dict[tuple, int] = {}

    def walk(n, at: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[at + (str(k.value),)] = k.start_mark.line + 1
                walk(v, at + (str(k.value),))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[at + (i,)] = item.start_mark.line + 1
                walk(item, at + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


class Problems:
    """The manifest's problems, each with its file and line, raised together."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, line: int | None, message: str) -> None:
        self.items.append(f"{where}{f' line {line}' if line else ''}: {message}")

    def raise_any(self, path: Path) -> None:
        if self.items:
            raise Ei2Error(f"{len(self.items)} problem(s) in the suite {path}, nothing was started:\n  "
                           + "\n  ".join(self.items))


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"


def train_keys(mapping, at: tuple, lines: dict, where: str, problems: Problems, base: Path | None,
               config_file: bool = False) -> dict:
    """Checked ei2.train keys of one mapping (defaults, a method, a job's overrides, a config file): name, type,
    range; `model` resolved against `base` (the file it is written in). Bad entries are reported and left out. The
    keys the suite sets per job (PER_JOB) are refused, except in a config file, where they are ignored."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        problems.add(where, lines.get(at), f"{at[-1] if at else 'the file'} must be a mapping of ei2.train keys")
        return {}
    values = {}
    for key, value in mapping.items():
        line = lines.get(at + (str(key),))
        try:
            name = _field_name(str(key), "")
            if name in PER_JOB and config_file:
                continue
            if name in PER_JOB:
                raise Ei2Error(f"{name} is set by the suite: use {PER_JOB[name]}")
            value = _coerce(name, value)
            if name in RANGES:
                check_value(name, value)
            if name == "model":
                value = resolve_path(value, base)
        except Ei2Error as e:
            problems.add(where, line, str(e))
            continue
        values[name] = value
    return values


def config_file_keys(value, line, where: str, manifest: Path, problems: Problems) -> dict:
    """The ei2.train keys of `defaults: config:` (a path: working directory first, then the manifest's repository)."""
    if not isinstance(value, str) or not value.strip():
        problems.add(where, line, "config must be the path of an ei2.train YAML config")
        return {}
    path = Path(resolve_path(value, manifest))
    if not path.is_file():
        problems.add(where, line, f"config file not found: {path}")
        return {}
    try:
        data, lines = read_yaml_lines(path)
    except Ei2Error as e:
        problems.add(where, line, str(e))
        return {}
    return train_keys(data or {}, (), lines, str(path), problems, path, config_file=True)


def load_suite(path: str | Path, overrides: dict | None = None, output_dir: str | None = None,
               video_root: str | None = None) -> Suite:
    """Read and check the manifest at `path`; `overrides` are checked ei2.train keys from the command line (they win
    over everything), `output_dir` and `video_root` the command line's. Raises one Ei2Error listing every problem."""
    path = Path(path).expanduser()
    data, lines = read_yaml_lines(path)
    where = str(path)
    problems = Problems()
    if not isinstance(data, dict):
        raise Ei2Error(f"{path} must hold a mapping with {', '.join(TOP_KEYS)} (jobs is required)")
    for key in data:
        if str(key) not in TOP_KEYS:
            problems.add(where, lines.get((str(key),)), f"unknown key '{key}'; {_suggest(str(key), TOP_KEYS)}")

    defaults = data.get("defaults") or {}
    base: dict = {}
    if not isinstance(defaults, dict):
        problems.add(where, lines.get(("defaults",)), "defaults must be a mapping (config: and ei2.train keys)")
        defaults = {}
    if "config" in defaults:
        base = config_file_keys(defaults["config"], lines.get(("defaults", "config")), where, path, problems)
    base.update(train_keys({k: v for k, v in defaults.items() if k != "config"}, ("defaults",), lines, where,
                           problems, path))

    methods = data.get("methods") or DEFAULT_METHODS
    if not isinstance(methods, dict):
        problems.add(where, lines.get(("methods",)), "methods must map a method name to its ei2.train keys")
        methods = DEFAULT_METHODS
    method_keys = {}
    for name, keys in methods.items():
        if not NAME.fullmatch(str(name)):
            problems.add(where, lines.get(("methods", str(name))), f"method name {name!r}: use letters, digits, . _ -")
        method_keys[str(name)] = train_keys(keys, ("methods", str(name)), lines, where, problems, path)

    root = data.get("video_root")
    if root is not None and not isinstance(root, str):
        problems.add(where, lines.get(("video_root",)), "video_root must be a folder path")
        root = None
    if video_root is not None:
        root = resolve_path(video_root)
    elif root is not None:
        root = resolve_path(root, path)
    out = output_dir or data.get("output_dir") or f"runs/{path.stem}"
    suite = Suite(path, Path(str(out)).expanduser())

    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        problems.add(where, lines.get(("jobs",)), "jobs must be a non-empty list of jobs (name, video, caption, edits)")
        jobs = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(jobs):
        line = lines.get(("jobs", i))
        parsed = parse_job(entry, i, lines, where, problems, path, seen)
        if parsed is None:
            continue
        name, video, caption, kinds, prompts, job_keys = parsed
        for method, keys in method_keys.items():
            video_path = resolve_path(video, path) if root is None else str(Path(root) / Path(video).expanduser())
            values = {**base, **keys, **job_keys, **(overrides or {}), "caption": caption, "edit_prompts": prompts,
                      "video": video_path,
                      "output_dir": str(suite.output_dir / method / name)}
            try:
                cfg = TrainConfig(**values)
                validate(cfg)
                cfg.model = resolve_path(cfg.model, path)  # ei2.train's default, when no file sets it
            except Ei2Error as e:
                problems.add(where, line, f"job {name} ({method}): {e}")
                continue
            cfg.video = str(Path(cfg.video).expanduser())
            missing = None if Path(cfg.video).exists() else (
                f"video not found: {cfg.video}; put the clip there or fix video_root/video in {path}")
            suite.jobs.append(Job(name, method, cfg, kinds, line or 0, missing))
    problems.raise_any(path)
    return suite


def parse_job(entry, i: int, lines: dict, where: str, problems: Problems, manifest: Path, seen: dict):
    """One entry of jobs: (name, video, caption, kinds, prompts, override keys), or None after reporting problems."""
    line = lines.get(("jobs", i))
    if not isinstance(entry, dict):
        problems.add(where, line, "a job must be a mapping with name, video, caption, edits (and overrides)")
        return None
    before = len(problems.items)
    for key in entry:
        if str(key) not in JOB_KEYS:
            hint = "put ei2.train keys under overrides:" if str(key) in FIELDS else _suggest(str(key), JOB_KEYS)
            problems.add(where, lines.get(("jobs", i, str(key))), f"unknown job key '{key}'; {hint}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems.add(where, line, f"job name {name!r}: a job needs a name of letters, digits, . _ - (its folder)")
    elif name in seen:
        problems.add(where, line, f"duplicate job name '{name}' (first at line {seen[name]})")
    else:
        seen[name] = line
    for key in ("video", "caption"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            problems.add(where, lines.get(("jobs", i, key), line), f"job {name}: {key} must be a non-empty text")
    edits = entry.get("edits")
    if isinstance(edits, list):
        edits = {str(k + 1): v for k, v in enumerate(edits)}
    kinds, prompts = [], []
    if not isinstance(edits, dict) or not edits:
        problems.add(where, lines.get(("jobs", i, "edits"), line),
                     f"job {name}: edits must name the edit prompts, e.g. {{style: '...', object: '...'}}")
    else:
        for kind, prompt in edits.items():
            if not isinstance(prompt, str) or not prompt.strip():
                problems.add(where, lines.get(("jobs", i, "edits", str(kind)), line),
                             f"job {name}: edit {kind} must be a non-empty prompt")
            kinds.append(str(kind))
            prompts.append(prompt)
    keys = train_keys(entry.get("overrides"), ("jobs", i, "overrides"), lines, where, problems, manifest)
    if len(problems.items) > before:
        return None
    return name, entry["video"], entry["caption"], kinds, prompts, keys


def cli_overrides(pairs: list[tuple[str, list[str]]]) -> dict:
    """The command line's --KEY VALUE pairs as checked ei2.train keys (model resolved against the working folder)."""
    values = {}
    for key, raw in pairs:
        name = _field_name(key, "on the command line")
        if name in PER_JOB:
            raise Ei2Error(f"--{key} is set per job by the suite; use {PER_JOB[name]}" if name != "output_dir" else
                           "--output_dir is read by the suite itself")
        values[name] = _coerce(name, _parse_cli(name, raw))
        if name in RANGES:
            check_value(name, values[name], f"--{key}")
        if name == "model":
            values[name] = resolve_path(values[name])
    return values
