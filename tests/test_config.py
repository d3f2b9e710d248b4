"""ei2.config: defaults, YAML + command-line overrides, type coercion, validation and the round trip."""

import dataclasses
from pathlib import Path

import pytest
import torch

from ei2.attention import FRAME_ATTENTIONS, TEMPORAL_NORMS
from ei2.config import (COERCE, TYPES, VIDEO_KEYS, TrainConfig, describe_keys, load_config, save_config,
                        video_options)
from ei2.errors import Ei2Error
from ei2.pipeline import resolve_precision
from ei2.train import main as train_main, parser as train_parser
from ei2.unet import RESNET_NORMS, TEMPORALS, VideoOptions

REQUIRED = ["--video", "data/man-running.mp4", "--caption", "a man is running"]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_papers_settings():
    c = TrainConfig()
    assert (c.n_frames, c.size, c.steps, c.learning_rate) == (8, 512, 500, 3e-5)
    assert (c.weight_decay, c.grad_clip, c.guidance, c.inference_steps, c.inversion_steps) == (1e-2, 1.0, 7.5, 50, 50)
    assert (c.frame_attention, c.ratio, c.temporal, c.temporal_norm, c.spectral_norm) == ("ffam", 2, "stam", None, None)
    assert (c.resnet_norm, c.precision, c.device, c.seed, c.fps) == ("video", "auto", "auto", 33, 8)
    assert c.model == "weights/stable-diffusion-v1-4" and c.output_dir == "runs/<name>"
    assert (c.start, c.stride, c.gradient_checkpointing, c.checkpoint_every, c.edit_prompts) == (0, 1, False, 100, [])
    assert c.resize == "crop"
    assert TrainConfig().edit_prompts is not c.edit_prompts  # no shared mutable default


def test_describe_keys_covers_every_field():
    rows = describe_keys()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert dict((k, d) for k, d, _ in rows)["learning_rate"] == 3e-5
    assert all(isinstance(h, str) and h and "\n" not in h for _, _, h in rows)


def test_yaml_then_cli_overrides(tmp_path):
    path = write(tmp_path, "video: clips/a.gif\ncaption: a red circle\nsteps: 20\nedit_prompts: [a blue circle]\n"
                           "learning_rate: 1e-4\nspectral_norm: true\n", name="circle.yaml")
    c = load_config(path, [])
    assert (c.video, c.caption, c.steps) == (str(Path.cwd() / "clips/a.gif"), "a red circle", 20)  # absolute
    assert c.learning_rate == 1e-4 and c.spectral_norm is True  # 1e-4 is text to PyYAML, still a float here
    assert c.edit_prompts == ["a blue circle"] and c.output_dir == "runs/circle"
    c = load_config(path, ["--steps", "5", "--edit_prompts", "a green circle", "a star", "--learning-rate=2e-5"])
    assert (c.steps, c.learning_rate, c.caption) == (5, 2e-5, "a red circle")  # the CLI wins, the rest stays
    assert c.edit_prompts == ["a green circle", "a star"]


def test_cli_type_coercion():
    c = load_config(None, REQUIRED + [
        "--steps", "10", "--spectral_norm", "false", "--temporal_norm", "null", "--guidance=5", "--size", "256",
        "--gradient_checkpointing", "--caption", "a cat: sitting # on a mat", "--temporal", "none", "--seed", "-1",
    ])
    assert c.steps == 10 and type(c.steps) is int
    assert c.spectral_norm is False and c.temporal_norm is None
    assert c.guidance == 5.0 and type(c.guidance) is float
    assert c.size == 256 and c.gradient_checkpointing is True and c.seed == -1
    assert c.caption == "a cat: sitting # on a mat"  # text is taken verbatim, not parsed as YAML
    assert c.temporal == "none" and c.output_dir == "runs/run"
    c = load_config(None, REQUIRED + ["--temporal_norm", "none", "--spectral_norm", "null", "--edit_prompts", "x"])
    assert c.temporal_norm == "none" and c.spectral_norm is None and c.edit_prompts == ["x"]
    assert load_config(None, REQUIRED + ["--edit_prompts"]).edit_prompts == []
    assert load_config(None, REQUIRED + ["--gradient-checkpointing", "no"]).gradient_checkpointing is False


def test_yaml_type_coercion(tmp_path):
    c = load_config(write(tmp_path, "video: v.mp4\ncaption: 1984\nedit_prompts: a single prompt\nsteps: 10.0\n"
                                    "temporal_norm: ic\n"), [])
    assert c.caption == "1984" and c.edit_prompts == ["a single prompt"] and c.steps == 10 and c.temporal_norm == "ic"


@pytest.mark.parametrize("args, message", [
    (["--steps", "ten"], "steps must be an integer, got 'ten'"),
    (["--steps", "1.5"], "steps must be an integer"),
    (["--learning_rate", "fast"], "learning_rate must be a number"),
    (["--spectral_norm", "maybe"], "spectral_norm must be true or false"),
    (["--n_frames", "8", "16"], "--n_frames takes one value, got 2"),
    (["--steps"], "--steps takes one value, got 0"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_cli_errors(args, message):
    with pytest.raises(Ei2Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, REQUIRED + args if args != ["stray"] else args + REQUIRED)


def test_unknown_key_suggestions(tmp_path):
    with pytest.raises(Ei2Error, match=r"^unknown config key 'stpes'; did you mean 'steps'\? \(on the command line\)$"):
        load_config(None, REQUIRED + ["--stpes", "10"])
    with pytest.raises(Ei2Error, match=r"unknown config key 'learning-rat'.*did you mean 'learning_rate'\?"):
        load_config(None, REQUIRED + ["--learning-rat=1"])
    with pytest.raises(Ei2Error, match=r"unknown config key 'gudiance'; did you mean 'guidance'\? \(in .*run.yaml\)"):
        load_config(write(tmp_path, "video: v\ncaption: c\ngudiance: 5\n"), [])
    with pytest.raises(Ei2Error, match=r"unknown config key 'zzz'.*known keys: model, video"):
        load_config(None, REQUIRED + ["--zzz", "1"])


def test_file_errors(tmp_path):
    with pytest.raises(Ei2Error, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml", [])
    with pytest.raises(Ei2Error, match=r"YAML syntax error in .*bad.yaml at line 2, column 11: mapping values"):
        load_config(write(tmp_path, "video: v\ncaption: a: b\nsteps: 3\n", name="bad.yaml"), [])
    with pytest.raises(Ei2Error, match="key: value"):
        load_config(write(tmp_path, "- a\n- b\n", name="list.yaml"), [])
    assert load_config(write(tmp_path, "", name="empty.yaml"), REQUIRED).steps == 500  # empty file: defaults


@pytest.mark.parametrize("args, message", [
    (["--size", "500"], "size=500 must be a positive multiple of 64"),
    (["--size", "0"], "size=0 must be a positive multiple of 64"),
    (["--caption", " "], "caption is empty"),
    (["--video", ""], "no video set"),
    (["--edit_prompts", "a dog", ""], "edit prompt 2 is empty"),
    (["--n_frames", "0"], "n_frames=0 must be >= 1"),
    (["--stride", "0"], "stride=0 must be >= 1"),
    (["--start", "-1"], "start=-1 must be >= 0"),
    (["--steps", "-1"], "steps=-1 must be >= 0"),
    (["--learning_rate", "0"], "learning_rate=0.0 must be > 0"),
    (["--guidance", "0.5"], "guidance=0.5 must be >= 1"),
    (["--inference_steps", "0"], "inference_steps=0 must be in 1..1000"),
    (["--ratio", "0"], "ratio=0 must be >= 1"),
    (["--precision", "fp8"], "precision='fp8' is not one of auto, fp32, bf16, fp16"),
    (["--inversion_prompt", "source"], "inversion_prompt='source' is not one of empty, caption"),
    (["--frame_attention", "sparse"], "frame_attention='sparse' is not one of"),
    (["--temporal", "tam"], "temporal='tam' is not one of"),
    (["--temporal_norm", "batchnorm"], "temporal_norm='batchnorm' is not one of"),
    (["--resnet_norm", "group"], "resnet_norm='group' is not one of"),
    (["--resize", "stretch"], "resize='stretch' is not one of crop, squash"),
    (["--device", "gpu"], "device='gpu' must be auto, cpu, cuda"),
    (["--fps", "0"], "fps=0 must be > 0"),
])
def test_validation(args, message):
    with pytest.raises(Ei2Error, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config(None, REQUIRED + args)
    assert "\n" not in str(info.value)


def test_steps_zero_and_files_not_checked():
    c = load_config(None, ["--video", "does/not/exist.mp4", "--caption", "c", "--steps", "0", "--model", "nowhere"])
    assert c.steps == 0 and c.video == str(Path.cwd() / "does/not/exist.mp4")


def test_round_trip(tmp_path):
    path = write(tmp_path, "video: v.mp4\ncaption: 'a man: running'\nedit_prompts: [x, 'yes', '3']\n", name="man.yaml")
    c = load_config(path, ["--temporal_norm", "ic", "--spectral_norm", "true", "--learning_rate", "1e-5"])
    save_config(c, tmp_path / "out" / "config.yaml")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]  # no temporary file left
    again = load_config(tmp_path / "out" / "config.yaml", [])
    assert again == c and again.output_dir == "runs/man" and again.edit_prompts == ["x", "yes", "3"]
    d = TrainConfig(video="v", caption="c")
    d.output_dir = "out"
    save_config(d, tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml", []) == dataclasses.replace(d, video=str(Path.cwd() / "v"),
                                                                      model=str(Path.cwd() / d.model))


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    if torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "fp16")


def test_tav_config_is_tune_a_video_as_published():
    """configs/tav.yaml: Tune-A-Video's modules (SCA + temporal attention) and its car-turn settings (its
    configs/car-turn.yaml: 24 frames from 0 at stride 2, 512 px squashed, lr 3e-5, 500 steps, seed 33, guidance 12.5,
    DDIM 50, gradient checkpointing)."""
    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "tav.yaml")
    assert video_options(c) == VideoOptions(frame_attention="sca", temporal="ta")
    assert (c.n_frames, c.start, c.stride, c.size, c.resize) == (24, 0, 2, 512, "squash")
    assert (c.learning_rate, c.steps, c.seed, c.guidance) == (3e-5, 500, 33, 12.5)
    assert (c.inference_steps, c.inversion_steps, c.weight_decay, c.grad_clip) == (50, 50, 1e-2, 1.0)
    assert c.gradient_checkpointing and c.caption == "a jeep car is moving on the road" and len(c.edit_prompts) == 4


def test_help_lists_every_key_with_default_and_help(capsys):
    """`python -m ei2.train --help`: the tool's options, then every config key (from the fields) with its default and
    the README table's help; the keys stay out of argparse's parsing (load_config reads them)."""
    with pytest.raises(SystemExit) as info:
        train_main(["--help"])
    assert info.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at a dash): compare without spaces

    def has(text):
        return "".join(text.split()) in out

    assert has("--config YAML") and has("--resume") and has("[--KEY VALUE ...]")
    for key, default, text in describe_keys():
        assert has(f"--{key} ") and has(f"{text} (default: {default!r})"), key
    assert has("--edit_prompts [TEXT ...]") and has("--compile [BOOL]") and has("--temporal_norm TEXT|null")
    args, rest = train_parser().parse_known_args(["--config", "x.yaml", "--steps", "3", "--resume"])
    assert args.config == "x.yaml" and args.resume and rest == ["--steps", "3"]


def test_every_video_option_is_a_config_key_checked_by_video_options():
    """The UNet's options are TrainConfig keys by the same names; their allowed values are VideoOptions' (one
    definition each in ei2.attention / ei2.unet), reached through config validation."""
    assert VIDEO_KEYS == tuple(f.name for f in dataclasses.fields(VideoOptions))
    assert set(VIDEO_KEYS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert video_options(TrainConfig()) == VideoOptions()
    assert all((tp if tp in COERCE else next(a for a in tp.__args__ if a is not type(None))) in COERCE
               for tp in TYPES.values())
    for key, allowed in [("frame_attention", FRAME_ATTENTIONS), ("temporal", TEMPORALS),
                         ("temporal_norm", TEMPORAL_NORMS), ("resnet_norm", RESNET_NORMS)]:
        for value in allowed:
            assert getattr(load_config(None, REQUIRED + [f"--{key}", value]), key) == value
        with pytest.raises(Ei2Error, match=f"^{key}='bad' is not one of .*{allowed[-1]}$"):
            load_config(None, REQUIRED + [f"--{key}", "bad"])
