"""CLIP scores: the formulas against a hand computation, and `python -m ei2.evaluate` end to end on a tiny random CLIP
saved in the real folder layout (config.json, model.safetensors, preprocessor_config.json, tokenizer files)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from ei2.evaluate import ClipScorer, main
from ei2.mini.tokenizer import write_tiny_text_model
from ei2.mini.world import demo_frames, draw_scene
from ei2.stats import frame_consistency, textual_alignment
from ei2.video import read_all_frames, write_video

WORDS = ["a", "red", "blue", "circle", "square", "moving", "on", "white", "painting"]


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# --- formulas -----------------------------------------------------------------------------------------------------


def test_frame_consistency_by_hand():
    e = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [cos(e[i], e[j]) for i in range(5) for j in range(5) if i != j]
    assert frame_consistency(torch.tensor(e)) == pytest.approx(100 * sum(pairs) / len(pairs), rel=1e-6)
    assert frame_consistency(torch.tensor(e).double()) == pytest.approx(100 * sum(pairs) / len(pairs), rel=1e-12)


def test_textual_alignment_by_hand():
    g = torch.Generator().manual_seed(1)
    e, t = torch.randn(4, 6, generator=g).tolist(), torch.randn(6, generator=g).tolist()
    expected = sum(100 * cos(x, t) for x in e) / 4
    assert textual_alignment(torch.tensor(e), torch.tensor(t)) == pytest.approx(expected, rel=1e-6)
    assert textual_alignment(torch.tensor(e), torch.tensor([t])) == pytest.approx(expected, rel=1e-6)


def test_formula_edge_cases():
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert frame_consistency(v.repeat(3, 1)) == pytest.approx(100.0)  # identical frames
    assert frame_consistency(torch.eye(3)) == pytest.approx(0.0)  # orthogonal frames
    assert frame_consistency(torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(100.0)  # scale-free
    assert textual_alignment(-v, v[0]) == pytest.approx(-100.0)  # no clamping at zero
    with pytest.raises(ValueError):
        frame_consistency(v)  # one frame has no pairs
    with pytest.raises(ValueError):
        textual_alignment(v, torch.ones(4))


# --- the command on a tiny CLIP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel with tiny text and vision towers, saved as openai/clip-vit-large-patch14 is laid out."""
    from transformers import CLIPConfig, CLIPModel

    from ei2.evaluate import _image_processor_class

    root = tmp_path_factory.mktemp("clip")
    tok = write_tiny_text_model(root / "text", WORDS) / "tokenizer"
    vocab = json.loads((tok / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    folder = root / "clip-vit-large-patch14"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(str(folder))
    _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder))
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def moving(shape, color, n=6, size=48):
    return np.stack([draw_scene(shape, color, "white", (8 + 6 * i, 24), 8, size) for i in range(n)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `python -m ei2.train` writes it, with synthetic videos."""
    run = tmp_path_factory.mktemp("run") / "demo"
    (run / "edits").mkdir(parents=True)
    (run / "config.yaml").write_text("caption: a red circle moving\nframe_attention: ffam\ntemporal: stam\n"
                                     "temporal_norm: null\nspectral_norm: null\nn_frames: 6\n")
    source = demo_frames(6, 48, seed=0)
    write_video(source, run / "source.mp4")
    write_video(source, run / "source.gif")
    edits = []
    for i, (prompt, shape, color) in enumerate([("a blue square moving", "square", "blue"),
                                                ("a red circle painting", "circle", "red")]):
        clip = moving(shape, color)
        write_video(clip, run / "edits" / f"0{i}.mp4")
        write_video(clip, run / "edits" / f"0{i}.gif")
        edits.append({"prompt": prompt, "mp4": f"edits/0{i}.mp4", "gif": f"edits/0{i}.gif", "seed": 33,
                      "guidance": 7.5})
    (run / "edits.json").write_text(json.dumps(edits))
    (run / "log.json").write_text(json.dumps({
        "loss": [0.1, 0.09], "timings": {"tuning_s": 600.0, "inversion_s": 150.0, "edit_s": [30.0, 36.0]},
        "peak_memory_gib": {"training": 11.0, "inference": 5.3}, "versions": {"device": "cuda", "gpu": "H100"}}))
    return run


def by_hand(folder, video, prompt):
    """The scores recomputed independently: ffmpeg/Pillow decoding, the processor, the projections, Python cosines."""
    import imageio_ffmpeg
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

    from ei2.evaluate import _image_processor_class

    if video.suffix == ".gif":
        with Image.open(video) as im:
            frames = []
            for i in range(im.n_frames):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB")))
    else:
        gen = imageio_ffmpeg.read_frames(str(video))
        w, h = next(gen)["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    model = CLIPModel.from_pretrained(str(folder)).eval()
    pixels = _image_processor_class().from_pretrained(str(folder))(images=frames, return_tensors="pt").pixel_values
    ids = CLIPTokenizer.from_pretrained(str(folder))([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).tolist()
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0].tolist()
    n = len(img)
    fc = 100 * sum(cos(img[i], img[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    ta = sum(100 * cos(e, txt) for e in img) / n
    return n, fc, ta


def test_run_end_to_end(tiny_clip, run_dir, capsys):
    main(["--run", str(run_dir), "--clip", str(tiny_clip), "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"protocol", "clip", "method", "source", "edits", "mean_edits", "resources"}
    assert metrics["method"] == "EI² (FFAM + STAM)"
    rows = [metrics["source"]] + metrics["edits"]
    assert [r["prompt"] for r in rows] == ["a red circle moving", "a blue square moving", "a red circle painting"]
    assert [r["video"] for r in rows] == ["source.mp4", "edits/00.mp4", "edits/01.mp4"]
    for r in rows:
        n, fc, ta = by_hand(tiny_clip, run_dir / r["video"], r["prompt"])
        assert r["frames"] == n == 6
        assert r["frame_consistency"] == pytest.approx(fc, abs=1e-3)
        assert r["textual_alignment"] == pytest.approx(ta, abs=1e-3)
    for k in ("frame_consistency", "textual_alignment"):
        assert metrics["mean_edits"][k] == pytest.approx((rows[1][k] + rows[2][k]) / 2)
    res = metrics["resources"]
    assert res["training_min"] == pytest.approx(12.5) and res["inference_min"] == pytest.approx(0.55)
    assert (res["training_gib"], res["inference_gib"], res["device"]) == (11.0, 5.3, "H100")
    assert metrics["edits"][1]["inference_min"] == pytest.approx(0.6) and metrics["edits"][0]["seed"] == 33
    # the table: Table 1's columns, one row per clip, the run's mean, the paper's rows
    assert "frame consistency" in printed and "inference [GiB]" in printed
    assert "EI² (FFAM + STAM), mean of 2 edits" in printed and "paper Table 1: Tune-A-Video" in printed
    mean_row = next(line for line in printed.splitlines() if "mean of 2 edits" in line).split()
    assert mean_row[-4:] == ["12.50", "0.55", "11.0", "5.3"]


def test_video_mode_and_gif(tiny_clip, run_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    video = run_dir / "edits" / "00.gif"
    main(["--video", str(video), "--prompt", "a blue square", "--clip", str(tiny_clip), "--device", "cpu",
          "--json", str(out)])
    result = json.loads(out.read_text())
    n, fc, ta = by_hand(tiny_clip, video, "a blue square")
    assert result["frames"] == n and result["frame_consistency"] == pytest.approx(fc, abs=1e-3)
    assert result["textual_alignment"] == pytest.approx(ta, abs=1e-3)
    assert "00.gif: a blue square" in capsys.readouterr().out


def test_read_all_frames(run_dir, tmp_path):
    mp4, gif = read_all_frames(run_dir / "source.mp4"), read_all_frames(run_dir / "source.gif")
    assert len(mp4) == len(gif) == 6 and mp4[0].shape == (48, 48, 3) and mp4[0].dtype == np.uint8
    assert len(read_all_frames(run_dir / "source.mp4", max_frames=3)) == 3
    assert np.abs(mp4[2].astype(int) - demo_frames(6, 48)[2]).mean() < 8  # H.264 is nearly lossless at crf 18


def test_missing_clip_folder_names_the_files(tmp_path, run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--run", str(run_dir), "--clip", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    for needle in ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
                   "huggingface-cli download openai/clip-vit-large-patch14 --local-dir"):
        assert needle in err


def test_incomplete_clip_folder(tmp_path, tiny_clip):
    broken = tmp_path / "clip"
    shutil.copytree(tiny_clip, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "merges.txt").unlink()
    with pytest.raises(Exception, match="preprocessor_config.json, merges.txt missing"):
        ClipScorer(broken)


@pytest.mark.parametrize("argv, message", [
    ([], "give either --run"),
    (["--video", "x.mp4"], "--video needs --prompt"),
    (["--run", "/nonexistent"], "run directory not found"),
    (["--video", "/nonexistent.mp4", "--prompt", "p"], "video not found"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
