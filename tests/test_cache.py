"""ei2.cache and the job API the suite and the web app build on: temporal modules seeded by the job's seed alone, a
reused model set giving the same run bit for bit as a fresh load, progress events, and stopping a run on request."""

import json
import shutil
import threading

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tiny_model import write_random_model

from ei2.attention import temporal_module
from ei2.cache import ModelCache, load
from ei2.config import load_config
from ei2.edit import edit
from ei2.mini.world import make_demo_clip
from ei2.train import Cancelled, run
from ei2.unet import is_temporal_key
from ei2.weights import read_state_dict

N, SIZE = 3, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return write_random_model(root / "model"), make_demo_clip(root / "clip.gif", n_frames=4, size=SIZE)


def cfg_for(assets, out, **kw):
    model, clip = assets
    args = {"model": model, "video": clip, "caption": "a red circle moving right", "n_frames": N, "size": SIZE,
            "steps": 4, "inference_steps": 2, "inversion_steps": 2, "checkpoint_every": 2, "output_dir": out,
            "edit_prompts": ["a blue square moving right"], **kw}
    argv = []
    for k, v in args.items():
        argv += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return load_config(None, argv)


def same_tensors(a, b) -> bool:
    a, b = read_state_dict(a), read_state_dict(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def frames(run_dir):
    entry = json.loads((run_dir / "edits.json").read_text())[0]
    return iio.imread(run_dir / entry["gif"], index=None)


def test_temporal_modules_depend_on_the_seed_alone(assets, tmp_path):
    cpu = torch.device("cpu")
    a = load(cfg_for(assets, tmp_path, seed=7), cpu, "fp32")
    torch.manual_seed(123)  # another global random state, and random numbers drawn from it
    torch.randn(1000)
    b = load(cfg_for(assets, tmp_path, seed=7), cpu, "fp32")
    c = load(cfg_for(assets, tmp_path, seed=8), cpu, "fp32")
    sa, sb, sc = (m.unet.state_dict() for m in (a, b, c))
    temporal = [k for k in sa if is_temporal_key(k)]
    assert temporal and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in temporal)
    # by hand: the first block's module is the one built right after seeding the random state with 7
    block = next(m for m in a.unet.modules() if getattr(m, "attn_temp", None) is not None)
    torch.manual_seed(7)
    _, attn = temporal_module("stam", block.attn_temp.to_q.in_features, block.attn_temp.heads)
    for key, value in attn.state_dict().items():
        assert torch.equal(block.attn_temp.state_dict()[key], value), key


def test_reused_models_give_the_run_of_a_fresh_load(assets, tmp_path):
    cache = ModelCache()
    run(cfg_for(assets, tmp_path / "first", seed=1, caption="a green star moving left"), progress=False, cache=cache)
    reused = run(cfg_for(assets, tmp_path / "reused", seed=2), progress=False, cache=cache)
    assert cache.loads == 1  # same model, modules, precision and device: loaded once
    fresh = run(cfg_for(assets, tmp_path / "fresh", seed=2), progress=False)
    for name in ("tuned.safetensors", "inverted.safetensors"):
        assert same_tensors(reused / name, fresh / name), name
    assert np.array_equal(frames(reused), frames(fresh))
    run(cfg_for(assets, tmp_path / "ta", temporal="ta", steps=1), progress=False, cache=cache)
    assert cache.loads == 2  # other module options: loaded anew


def test_events_name_each_phase(assets, tmp_path):
    events = []
    out = run(cfg_for(assets, tmp_path / "run"), progress=False, on_event=events.append)
    phases = [e["phase"] for e in events]
    assert phases[:3] == ["load", "encode", "tune"] and phases[-3:] == ["edit", "write", "done"]
    assert [e["step"] for e in events if e["phase"] == "tune"] == [0, 1, 2, 3, 4]
    losses = json.loads((out / "log.json").read_text())["loss"]
    assert [e["loss"] for e in events if e["phase"] == "tune"][1:] == losses
    (done_edit,) = [e for e in events if e["phase"] == "edit"]
    assert done_edit["index"] == 0 and done_edit["of"] == 1 and done_edit["prompt"] == "a blue square moving right"
    assert done_edit["video"] == str((out / "edits/00-a-blue-square-moving-right.mp4").resolve())
    assert events[-1]["run_dir"] == str(out.resolve())


def test_stop_writes_the_state_and_resume_finishes_the_run(assets, tmp_path, capsys):
    whole = run(cfg_for(assets, tmp_path / "whole", steps=6), progress=False)
    stop = threading.Event()

    def on_event(e):
        if e["phase"] == "tune" and e["step"] == 2:
            stop.set()  # asked during step 3: it finishes, then the run stops

    part = tmp_path / "part"
    with pytest.raises(Cancelled, match="stopped at step 3 of 6.*--resume"):
        run(cfg_for(assets, part, steps=6), progress=False, on_event=on_event, stop=stop)
    assert not (part / "tuned.safetensors").exists()
    run(cfg_for(assets, part, steps=6), resume=True, progress=False)
    assert same_tensors(whole / "tuned.safetensors", part / "tuned.safetensors")


def test_edit_with_a_cache_swaps_only_the_tuned_tensors(assets, tmp_path):
    cache = ModelCache()
    out = run(cfg_for(assets, tmp_path / "run"), progress=False, cache=cache)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    events = []
    (entry,) = edit(copy, ["a blue square moving right"], progress=False, cache=cache, on_event=events.append)
    assert cache.loads == 1
    assert np.array_equal(iio.imread(copy / entry["gif"], index=None), frames(out))
    assert [e["phase"] for e in events] == ["load", "edit", "done"]
