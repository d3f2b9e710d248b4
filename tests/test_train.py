"""`python -m ei2.train` and `python -m ei2.edit` end to end on a tiny random model in the real SD folder layout:
outputs, resume, the small checkpoint, re-editing, and every bad input of the issue."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ei2.pipeline
import ei2.train
from ei2 import ddim
from ei2.config import load_config, video_options
from ei2.edit import edit
from ei2.edit import main as edit_main
from ei2.errors import Ei2Error
from ei2.pipeline import Phase, decode, encode_video, load_models, tune_steps
from ei2.text import TextEncoder
from ei2.train import main, run
from ei2.tuned import load_tuned_unet, read_tuned_metadata
from ei2.unet import UNet, VideoOptions, is_temporal_key, is_trainable_key
from ei2.vae import AutoencoderKL
from ei2.video import read_frames
from ei2.weights import read_state_dict

N, SIZE = 4, 64


def overrides(assets, out, **kw):
    model, clip = assets
    args = {"model": model, "video": clip, "caption": "a red circle moving right", "n_frames": N, "size": SIZE,
            "steps": 4, "inference_steps": 3, "inversion_steps": 3, "checkpoint_every": 2, "output_dir": out, **kw}
    argv = []
    for k, v in args.items():
        argv += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return argv


def cfg_for(assets, out, **kw):
    return load_config(None, overrides(assets, out, **kw))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = cfg_for(assets, out, edit_prompts=["a blue square moving right", "a green star moving right"])
    run(cfg, progress=False)
    return out, cfg


def test_every_output_exists_and_decodes(finished):
    out, cfg = finished
    for name in ["config.yaml", "tuned.safetensors", "inverted.safetensors", "edits.json", "log.json",
                 "comparison.png", "checkpoints/last.safetensors"]:
        assert (out / name).is_file(), name
    edits = json.loads((out / "edits.json").read_text())
    assert [e["prompt"] for e in edits] == cfg.edit_prompts
    videos = [out / "source.mp4", out / "source.gif"] + [out / e[k] for e in edits for k in ("mp4", "gif")]
    for path in videos:
        frames = iio.imread(path, index=None)
        assert frames.shape[:3] == (N, SIZE, SIZE), path
    comparison = iio.imread(out / "comparison.mp4", index=None)
    assert comparison.shape[0] == N and comparison.shape[2] == SIZE * 3
    grid = iio.imread(out / "comparison.png")
    assert grid.shape[1] == N * SIZE and grid.shape[0] >= 3 * SIZE
    log = json.loads((out / "log.json").read_text())
    assert len(log["loss"]) == cfg.steps and all(np.isfinite(log["loss"]))
    assert {"tuning_s", "inversion_s", "edit_s"} <= set(log["timings"]) and len(log["timings"]["edit_s"]) == 2
    assert log["peak_memory_gib"]["training"] > 0 and log["versions"]["torch"] == torch.__version__
    assert log["peak_memory_gib"]["inference"] > 0 and log["timings"]["load_s"] > 0
    assert read_state_dict(out / "inverted.safetensors")["latent"].shape == (1, 4, N, SIZE // 8, SIZE // 8)


def test_tuned_checkpoint_holds_exactly_the_trainable_tensors(finished):
    out, cfg = finished
    unet = load_tuned_unet(cfg.model, out / "tuned.safetensors")
    tuned = read_state_dict(out / "tuned.safetensors")
    expected = {k for k in unet.state_dict() if is_trainable_key(k) or is_temporal_key(k)}
    assert set(tuned) == expected
    assert {k for k in tuned if k.endswith((".u", ".v"))} == {k for k in expected if k.endswith((".u", ".v"))} != set()
    assert read_tuned_metadata(out / "tuned.safetensors")["video_options"]["frame_attention"] == "ffam"
    # the tuned model's output: re-running the inversion with the loaded model gives the cached x_T bit for bit
    vae = AutoencoderKL.from_pretrained(cfg.model)
    frames = read_frames(cfg.video, cfg.n_frames, cfg.start, cfg.stride, cfg.size)
    with torch.no_grad():
        x0 = (vae.encode(frames).mean * vae.config.scaling_factor).transpose(0, 1)[None]
        x_T = ddim.invert(unet.eval(), x0, TextEncoder.from_pretrained(cfg.model).encode([""]), cfg.inversion_steps)
    assert torch.equal(x_T, read_state_dict(out / "inverted.safetensors")["latent"])
    # and tuning changed the trainable tensors away from SD's weights
    base = read_state_dict(Path(cfg.model) / "unet/diffusion_pytorch_model.safetensors")
    key = next(k for k in tuned if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(tuned[key], base[key])


def test_inversion_prompt_caption_inverts_with_the_caption(assets, tmp_path):
    """inversion_prompt: caption -> x_T = DDIM inversion conditioned on the caption (the demo's setting), not on ""."""
    out = tmp_path / "run"
    cfg = cfg_for(assets, out, steps=0, inversion_prompt="caption")
    run(cfg, progress=False)
    unet = load_tuned_unet(cfg.model, out / "tuned.safetensors").eval()
    vae, text = AutoencoderKL.from_pretrained(cfg.model), TextEncoder.from_pretrained(cfg.model)
    frames = read_frames(cfg.video, cfg.n_frames, cfg.start, cfg.stride, cfg.size)
    with torch.no_grad():
        x0 = (vae.encode(frames).mean * vae.config.scaling_factor).transpose(0, 1)[None]
        by_caption = ddim.invert(unet, x0, text.encode([cfg.caption]), cfg.inversion_steps)
        by_empty = ddim.invert(unet, x0, text.encode([""]), cfg.inversion_steps)
    stored = read_state_dict(out / "inverted.safetensors")["latent"]
    assert torch.equal(stored, by_caption) and not torch.allclose(stored, by_empty)
    with safe_open(str(out / "inverted.safetensors"), "pt") as f:
        assert f.metadata()["inversion_prompt"] == "caption"


def test_edit_reproduces_the_training_edit(finished, tmp_path):
    out, cfg = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (entry,) = edit(copy, [cfg.edit_prompts[0]], progress=False)
    first = json.loads((out / "edits.json").read_text())[0]
    for k in ("gif", "mp4"):
        assert np.array_equal(iio.imread(copy / entry[k], index=None), iio.imread(out / first[k], index=None))
    assert len(json.loads((copy / "edits.json").read_text())) == 3


def as_format_1(path: Path) -> None:
    """Rewrite a tuned file or checkpoint with the metadata an older ei2 (format 1) wrote: no "format", no "computes",
    no temporal_norm_trainable among the video options."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ei2"])
    del meta["format"], meta["computes"], meta["video_options"]["temporal_norm_trainable"]
    save_file(read_state_dict(path), str(path), metadata={"ei2": json.dumps(meta)})


def test_tuned_metadata_records_the_format(finished):
    out, _ = finished
    for path in (out / "tuned.safetensors", out / "checkpoints/last.safetensors"):
        meta = read_tuned_metadata(path)
        assert meta["format"] == 2
        assert meta["computes"] == {"conv_norm_out": "over frames", "temporal_heads": 2, "instance_centering": "fp32"}


def test_old_tuned_run_is_refused_with_how_to_redo_it(finished, tmp_path, capsys):
    out, cfg = finished
    copy = tmp_path / "old-run"
    shutil.copytree(out, copy)
    as_format_1(copy / "tuned.safetensors")
    with pytest.raises(Ei2Error) as e:
        load_tuned_unet(cfg.model, copy / "tuned.safetensors")
    message = str(e.value)
    assert "older ei2 (format 1)" in message and "conv_norm_out" in message and "\n" not in message
    assert f"re-run `python -m ei2.train --config {copy / 'config.yaml'}`" in message
    with pytest.raises(SystemExit) as exit_:
        edit_main(["--run", str(copy), "--prompt", "a cat", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "older ei2 (format 1)" in err and "\n" not in err


def test_resume_of_an_old_checkpoint_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "old"
    run(cfg_for(assets, out, steps=2), progress=False)
    as_format_1(out / "checkpoints/last.safetensors")
    err = error_of(["--config", str(out / "config.yaml"), "--steps", "4", "--resume"], capsys)
    assert "older ei2 (format 1)" in err and "conv_norm_out" in err
    assert f"re-run `python -m ei2.train --config {out / 'config.yaml'}` (without --resume)" in err


def test_resume_equals_uninterrupted(assets, tmp_path):
    whole = run(cfg_for(assets, tmp_path / "whole", steps=6), progress=False)
    part = tmp_path / "part"
    run(cfg_for(assets, part, steps=2), progress=False)  # "interrupted" after its step-2 checkpoint
    run(cfg_for(assets, part, steps=6), resume=True, progress=False)
    a, b = read_state_dict(whole / "tuned.safetensors"), read_state_dict(part / "tuned.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "log.json").read_text())["loss"] == json.loads((part / "log.json").read_text())["loss"]


def test_resize_reaches_the_frames(assets, tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(args + tuple(kwargs.values()))
        raise Ei2Error("stop here")

    monkeypatch.setattr(ei2.train, "read_frames", spy)
    with pytest.raises(Ei2Error, match="stop here"):
        run(cfg_for(assets, tmp_path / "o", resize="squash"), progress=False)
    assert seen and "squash" in seen[0]


def test_module_keys_reach_the_model(assets, tmp_path):
    assert video_options(cfg_for(assets, tmp_path, temporal_norm_trainable=True)).temporal_norm_trainable is True
    assert video_options(cfg_for(assets, tmp_path, frame_attention="sca", temporal="ta")).temporal == "ta"


def test_same_seed_same_result(assets, tmp_path):
    a = run(cfg_for(assets, tmp_path / "a", steps=2), progress=False)
    b = run(cfg_for(assets, tmp_path / "b", steps=2), progress=False)
    assert torch.equal(read_state_dict(a / "inverted.safetensors")["latent"],
                       read_state_dict(b / "inverted.safetensors")["latent"])


# --- bad input: one line on stderr, exit code 2, nothing half-written ------------------------------------------------


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_video(assets, tmp_path, capsys):
    assert "video not found" in error_of(overrides(assets, tmp_path / "o", video=tmp_path / "nope.mp4"), capsys)


def test_corrupt_video(assets, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    assert "bad.mp4" in error_of(overrides(assets, tmp_path / "o", video=bad), capsys)


def test_too_few_frames(assets, tmp_path, capsys):
    assert "has 6 frames" in error_of(overrides(assets, tmp_path / "o", n_frames=8), capsys)


def test_size_not_multiple_of_64(assets, tmp_path, capsys):
    assert "multiple of 64" in error_of(overrides(assets, tmp_path / "o", size=96), capsys)


def test_empty_caption_and_prompt(assets, tmp_path, capsys):
    assert "caption is empty" in error_of(overrides(assets, tmp_path / "o", caption=" "), capsys)
    assert "edit prompt 2 is empty" in error_of(overrides(assets, tmp_path / "o", edit_prompts=["a cat", ""]), capsys)


def test_unknown_key(assets, tmp_path, capsys):
    assert "did you mean 'steps'" in error_of(overrides(assets, tmp_path / "o") + ["--stpes", "3"], capsys)


def test_missing_weights(assets, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(assets[0], model)
    (model / "unet/diffusion_pytorch_model.safetensors").unlink()
    err = error_of(overrides(assets, tmp_path / "o", model=model), capsys)
    assert "unet/diffusion_pytorch_model.safetensors" in err and "weights/README.md" in err
    assert not (tmp_path / "o").exists()


def test_nan_loss_keeps_last_good_checkpoint(assets, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    forward = UNet.forward

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = forward(self, *a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(UNet, "forward", poisoned)
    out = tmp_path / "o"
    err = error_of(overrides(assets, out, steps=8), capsys)
    assert "NaN" in err and "step 5" in err and "last good checkpoint" in err
    meta = read_tuned_metadata(out / "checkpoints/last.safetensors")
    assert meta["step"] == 4
    assert all(torch.isfinite(t.float()).all() for t in read_state_dict(out / "checkpoints/last.safetensors").values())
    assert not (out / "tuned.safetensors").exists()


def test_out_of_memory_message(assets, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ei2.train, "tune_steps", oom)
    assert "gradient_checkpointing" in error_of(overrides(assets, tmp_path / "o"), capsys)


def test_resume_without_checkpoint(assets, tmp_path, capsys):
    assert "no checkpoint" in error_of(overrides(assets, tmp_path / "o") + ["--resume"], capsys)


def test_cli_error_has_no_traceback(tmp_path):
    """As a user runs it: a missing config file is one line on stderr, no Python traceback."""
    r = subprocess.run([sys.executable, "-m", "ei2.train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr


# --- non-finite gradients with a finite loss: the step is skipped, on the device --------------------------------------


def inject_inf_grad(monkeypatch, bad_steps: set[int], start: int = 0) -> None:
    """The training job's first trainable tensor gets an inf gradient in the 1-based steps `bad_steps` (the loss stays
    finite); `start` is the step a resumed run begins after. Hooked where ei2.train builds its optimizer."""
    real = ei2.train.make_optimizer

    def with_hook(unet, *a, **k):
        calls = {"n": start}
        param = next(p for p in unet.parameters() if p.requires_grad)

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] in bad_steps else grad

        param.register_hook(hook)
        return real(unet, *a, **k)

    monkeypatch.setattr(ei2.train, "make_optimizer", with_hook)


@pytest.fixture(scope="module")
def tiny_job(assets):
    models = load_models(str(assets[0]), VideoOptions(), torch.device("cpu"), "fp32")
    frames = read_frames(assets[1], N, size=SIZE)
    return models, encode_video(models, frames), models.text.encode(["a red circle moving right"])


def optimizer_state(optimizer) -> list[dict]:
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_skipped_step_changes_nothing(tiny_job, fused):
    """A step whose gradient is inf (finite loss) leaves the tuned tensors, AdamW's moments and its step count bit for
    bit as they were, the step total advances and the skip is reported 1-based. Both optimizer kinds: fused (the
    device-side `found_inf`, as on CUDA) and foreach (asked on the host, as on the CPU)."""
    models, posterior, context = tiny_job
    params = [p for p in models.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        saved = [p.clone() for p in params]
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=fused)
        generator = torch.Generator().manual_seed(0)
        synced, skipped = [], []

        def tune(a, b):
            tune_steps(models, posterior, context, optimizer, generator, a, b, 1.0, sync_every=2, progress=False,
                       on_sync=lambda step, v: synced.append((step, v)), skipped=skipped)

        tune(0, 3)
        before, state = [p.detach().clone() for p in params], optimizer_state(optimizer)
        handle = params[5].register_hook(lambda g: g * float("inf"))
        tune(3, 4)
        handle.remove()
        assert skipped == [4] and synced[-1][0] == 4 and np.isfinite(synced[-1][1]).all()
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        after = optimizer_state(optimizer)
        assert all(s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s) for s, t in zip(state, after))
        assert int(after[0]["step"]) == 3
        tune(4, 5)  # the next finite step updates again
        assert skipped == [4] and not torch.equal(before[0], params[0]) and int(optimizer_state(optimizer)[0]["step"]) == 4
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            models.unet.zero_grad(set_to_none=True)


def test_skips_logged_and_resume_repeats_them(assets, tmp_path, monkeypatch):
    """log.json lists the skipped steps; a run resumed after a checkpoint skips the same ones and ends equal."""
    inject_inf_grad(monkeypatch, {3, 4})
    whole = run(cfg_for(assets, tmp_path / "whole", steps=6), progress=False)
    assert json.loads((whole / "log.json").read_text())["skipped_steps"] == [3, 4]
    part = tmp_path / "part"
    run(cfg_for(assets, part, steps=4), progress=False)  # "interrupted" after its step-4 checkpoint, mid-way
    assert read_tuned_metadata(part / "checkpoints/last.safetensors")["skipped_steps"] == [3, 4]
    inject_inf_grad(monkeypatch, {3, 4}, start=4)
    run(cfg_for(assets, part, steps=6), resume=True, progress=False)
    a, b = read_state_dict(whole / "tuned.safetensors"), read_state_dict(part / "tuned.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = (json.loads((d / "log.json").read_text()) for d in (whole, part))
    assert log_a["skipped_steps"] == log_b["skipped_steps"] == [3, 4] and log_a["loss"] == log_b["loss"]


def test_ten_skips_in_a_row_stop_with_finite_checkpoint(assets, tmp_path, capsys, monkeypatch):
    """Steps 3..12 skipped: one error line at step 12; the step-10 checkpoint holds the step-2 tensors and AdamW state
    exactly (8 skipped steps changed nothing) with a step of 10; no tuned.safetensors. (Spectral norm's u, v are not
    compared: every training forward, a skipped step's too, runs its power iteration.)"""
    early = tmp_path / "early"
    main(overrides(assets, early, steps=2, score="none") + ["--no-progress"])  # on the demo config, as error_of
    inject_inf_grad(monkeypatch, set(range(3, 13)))
    out = tmp_path / "o"
    err = error_of(overrides(assets, out, steps=14), capsys)
    assert "gradients were NaN/inf at steps 3-12" in err and "10 in a row" in err and "last good checkpoint" in err
    ckpt = out / "checkpoints/last.safetensors"
    meta = read_tuned_metadata(ckpt)
    assert meta["step"] == 10 and meta["skipped_steps"] == list(range(3, 11))
    got, ref = read_state_dict(ckpt), read_state_dict(early / "checkpoints/last.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in got.values())
    kept = [k for k in ref if k.startswith(("model/", "optim/")) and not k.endswith((".u", ".v"))]
    assert kept and all(torch.equal(got[k], ref[k]) for k in kept)
    assert not (out / "tuned.safetensors").exists()


def test_skip_streak_survives_resume(assets, tmp_path, monkeypatch):
    """The count of skips in a row is part of the training state: 4 skips before the checkpoint and 6 after it stop
    the resumed run, as 10 in one run would."""
    out = tmp_path / "o"
    inject_inf_grad(monkeypatch, {1, 2, 3, 4})
    run(cfg_for(assets, out, steps=4), progress=False)
    inject_inf_grad(monkeypatch, set(range(5, 11)), start=4)
    with pytest.raises(Ei2Error, match="steps 1-10"):
        run(cfg_for(assets, out, steps=12), resume=True, progress=False)


def test_non_finite_weights_are_never_saved(assets, tmp_path, capsys, monkeypatch):
    """Were an inf gradient applied (the skip switched off), the weights would turn NaN: step 4's update, after its
    finite loss and right before the step-4 checkpoint; that checkpoint is refused with one line, the step-2 one
    stays."""
    monkeypatch.setattr(ei2.pipeline, "step_unless_skipped", lambda optimizer, ok: optimizer.step())
    inject_inf_grad(monkeypatch, {4})
    out = tmp_path / "o"
    err = error_of(overrides(assets, out, steps=6), capsys)
    assert "NaN/inf at step 4 and were not saved" in err and "last good checkpoint" in err
    assert read_tuned_metadata(out / "checkpoints/last.safetensors")["step"] == 2
    assert all(torch.isfinite(t.float()).all() for t in read_state_dict(out / "checkpoints/last.safetensors").values())


# --- VAE: the clip is encoded in fp32 in every job -------------------------------------------------------------------


def test_bf16_job_encodes_the_clip_in_fp32(assets):
    """In a bf16 job the decoder is stored in bf16, the encoder is not: encode_video's posterior equals an fp32 VAE's
    bit for bit (fp32 moments), and decoding runs in bf16."""
    models = load_models(str(assets[0]), VideoOptions(), torch.device("cpu"), "bf16")
    frames = read_frames(assets[1], N, size=SIZE)
    got = encode_video(models, frames)
    ref = AutoencoderKL.from_pretrained(assets[0]).encode(frames, chunk=4)
    assert got.mean.dtype == got.logvar.dtype == torch.float32
    assert torch.equal(got.mean, ref.mean) and torch.equal(got.logvar, ref.logvar)
    assert models.vae.decoder.conv_in.weight.dtype == models.vae.post_quant_conv.weight.dtype == torch.bfloat16
    assert decode(models, got.mean[:1] * models.vae.config.scaling_factor).shape == (1, 3, SIZE, SIZE)


# --- the one phase timer + peak-memory meter (train, the mini benchmark and benchmarks/bench read it) ---------------


@pytest.mark.parametrize("reset", [True, False], ids=["VmHWM", "sampled"])
def test_phase_reports_absolute_peak_and_increase(monkeypatch, reset):
    """A phase that holds 256 MiB: `increase` is about that, `peak` is the absolute high-water mark above it; where
    VmHWM cannot be reset the resident set is sampled instead; memory=False times only."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("the CPU meter reads /proc (Linux)")
    if not reset:
        monkeypatch.setattr(ei2.pipeline, "_reset_peak_rss", lambda: False)
    with Phase("cpu") as phase:
        held = torch.ones(64 * 2**20)  # 256 MiB, touched
        time.sleep(0.05)
        del held
    assert phase.seconds >= 0.05
    assert 250 <= phase.increase_mib <= 300 and phase.peak_mib >= phase.start_bytes / 2**20 + phase.increase_mib - 1
    assert phase.peak_gib == pytest.approx(phase.peak_mib / 1024)
    assert phase.increase_gib == pytest.approx(phase.increase_mib / 1024)
    with Phase("cpu", memory=False) as timed:
        pass
    assert timed.seconds >= 0 and timed.peak_gib is None and timed.increase_gib is None
