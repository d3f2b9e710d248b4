"""The miniature world: determinism under a seed, the caption grammar, geometry and motion of the clips, the
hard-edged drawing and the project's demo clip."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ei2.mini import world
from ei2.mini.tokenizer import _bpe, tiny_bpe
from ei2.video import read_frames, to_uint8


def test_dataset_is_deterministic_under_a_seed():
    a, scenes_a, motions_a = world.dataset(24, seed=5)
    b, scenes_b, motions_b = world.dataset(24, seed=5)
    c, _, _ = world.dataset(24, seed=6)
    assert a.dtype == np.uint8 and a.shape == (24, 64, 64, 3)
    assert np.array_equal(a, b) and scenes_a == scenes_b and motions_a == motions_b
    assert not np.array_equal(a, c)


def test_clip_is_deterministic_and_has_n_frames():
    a = world.make_clip("star", "yellow", "gray", "orbiting", seed=3)
    b = world.make_clip("star", "yellow", "gray", "orbiting", seed=3)
    assert a == b and np.array_equal(a.render(), b.render())
    assert a.render().shape == (world.N_FRAMES, 64, 64, 3)
    assert a.caption == "a yellow star orbiting on a gray background"
    assert world.make_clip(seed=4).frames != a.frames


def test_captions_follow_the_grammar_and_use_only_vocab_words():
    rng = np.random.default_rng(0)
    for _ in range(200):
        clip = world.random_clip(rng)
        scene = world.random_scene(rng, n_objects=int(rng.integers(1, 3)))
        for cap in (clip.caption, scene.caption(), clip.frames[0].caption()):
            assert set(cap.split()) <= set(world.VOCAB), cap
        parsed = world.parse_caption(clip.caption)
        o = clip.frames[0].objects[0]
        assert (parsed["color"], parsed["shape"], parsed["background"], parsed["motion"]) == \
            (o.color, o.shape, clip.frames[0].background, clip.motion)
        assert world.parse_caption(scene.caption())["objects"] == [(o.color, o.shape) for o in scene.objects]


def test_parse_caption_examples_and_errors():
    p = world.parse_caption("a red circle moving right and a blue square on a gray background")
    assert p["objects"] == [("red", "circle"), ("blue", "square")]
    assert (p["background"], p["motion"], p["color"], p["shape"]) == ("gray", "right", "red", "circle")
    assert world.parse_caption("a white star on a black background")["motion"] is None
    for bad in ("a red circle", "a red dog on a white background", "a red circle on a pink background", ""):
        with pytest.raises(ValueError):
            world.parse_caption(bad)


def test_every_vocab_word_is_one_token():
    vocab, merges = tiny_bpe(world.VOCAB)
    ranks = {m: i for i, m in enumerate(merges)}
    for w in world.VOCAB:
        assert _bpe(tuple(w[:-1]) + (w[-1] + "</w>",), ranks) == (w + "</w>",)
        assert w + "</w>" in vocab


def test_objects_never_match_the_background_and_stay_inside():
    rng = np.random.default_rng(1)
    for _ in range(300):
        clip = world.random_clip(rng)
        for s in clip.frames:
            for o in s.objects:
                assert o.color != s.background
                x, y = o.center
                assert o.radius < x < 64 - o.radius and o.radius < y < 64 - o.radius
    with pytest.raises(ValueError):
        world.random_clip(rng, color="white", background="white")


def test_render_colors_and_antialiasing():
    scene = world.Scene((world.Obj("square", "blue", (32.0, 32.0), 14.5),), "white")
    img = world.render(scene)
    assert tuple(img[0, 0]) == world.BACKGROUNDS["white"]
    assert tuple(img[32, 32]) == world.COLORS["blue"]
    # circumradius 14.5 gives half-side 10.25: the left edge at x = 21.75 falls inside pixel 21 -> a blended color
    row = img[32, 20:24]
    assert any(tuple(p) not in (world.COLORS["blue"], world.BACKGROUNDS["white"]) for p in row)
    # coverage sums to the exact area to within the supersampling error
    area = world.coverage("circle", (32.0, 32.0), 10.0).sum()
    assert abs(area - np.pi * 100) < 3


def test_motions_move_as_named():
    for motion in world.MOTIONS:
        clip = world.make_clip("circle", "red", "white", motion, seed=2)
        xs = [s.objects[0].center[0] for s in clip.frames]
        ys = [s.objects[0].center[1] for s in clip.frames]
        rs = [s.objects[0].radius for s in clip.frames]
        if motion == "right":
            assert np.all(np.diff(xs) > 0) and np.ptp(ys) == 0
        if motion == "left":
            assert np.all(np.diff(xs) < 0)
        if motion == "up":  # image y grows downwards
            assert np.all(np.diff(ys) < 0) and np.ptp(xs) == 0
        if motion == "down":
            assert np.all(np.diff(ys) > 0)
        if motion == "growing":
            assert np.all(np.diff(rs) > 0) and len(set(xs)) == 1
        if motion == "shrinking":
            assert np.all(np.diff(rs) < 0)
        if motion == "orbiting":
            c = np.array([np.mean(xs), np.mean(ys)])
            d = np.hypot(np.array(xs) - c[0], np.array(ys) - c[1])
            assert np.ptp(d) < 0.35 * d.mean() and np.ptp(xs) > 4 and np.ptp(ys) > 4
        if motion == "bouncing":  # hops twice: y reaches the floor at the first, middle and last frames
            assert ys[0] > ys[2] and ys[-1] > ys[-3] and np.ptp(ys) > 3


def test_edit_clip_keeps_the_motion():
    clip = world.make_clip("circle", "red", "white", "right", seed=0)
    edited = world.edit_clip(clip, shape="square", color="blue")
    assert edited.caption == "a blue square moving right on a white background"
    assert [s.objects[0].center for s in edited.frames] == [s.objects[0].center for s in clip.frames]
    assert world.edit_clip(clip, background="black").caption == "a red circle moving right on a black background"


def test_two_object_scenes_do_not_overlap():
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = world.random_scene(rng, n_objects=2)
        a, b = s.objects
        assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) >= a.radius + b.radius
        assert (a.shape, a.color) != (b.shape, b.color)


# --- the hard-edged drawing and the project's demo clip ------------------------------------------------------------


def test_draw_scene_shapes():
    areas = {}
    for shape in world.SHAPES:
        img = world.draw_scene(shape, "blue", "white", (32, 32), 20, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        mask = (img == (30, 70, 220)).all(-1)
        assert mask.any() and ((img == 255).all(-1) | mask).all()
        np.testing.assert_array_equal(mask, world.shape_mask(shape, (32, 32), 20, 64))
        ys, xs = np.nonzero(mask)
        assert ((xs + 0.5 - 32) ** 2 + (ys + 0.5 - 32) ** 2 <= 20**2 + 1e-6).all()  # inscribed in the circle
        areas[shape] = mask.sum()
    assert areas["circle"] > areas["square"] > areas["triangle"] > areas["star"]
    assert np.array_equal(world.draw_scene("circle", (1, 2, 3), (4, 5, 6), (10, 10), 3, 16)[0, 0], (4, 5, 6))
    with pytest.raises(ValueError):
        world.draw_scene("hexagon", "red", "white", (8, 8), 4, 16)


def test_make_demo_clip_is_deterministic_and_moves_right(tmp_path):
    a = world.make_demo_clip(tmp_path / "a.gif", seed=1)
    b = world.make_demo_clip(tmp_path / "b.gif", seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != world.make_demo_clip(tmp_path / "c.gif", seed=2).read_bytes()
    folder = world.make_demo_clip(tmp_path / "frames", n_frames=8, size=64, seed=1)
    assert len(list(folder.glob("*.png"))) == 8
    x, y = read_frames(a, n_frames=8, size=64), read_frames(folder, n_frames=8, size=64)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    red = (to_uint8(x) == (220, 30, 30)).all(-1)  # (n, H, W)
    cx = [np.nonzero(m)[1].mean() for m in red]
    assert all(c1 > c0 for c0, c1 in zip(cx, cx[1:]))
    assert (to_uint8(x)[:, 0, 0] == 255).all()  # white background


def test_committed_demo_clip_is_make_demo_clip(tmp_path):
    """assets/demo/red-circle.gif (configs/demo.yaml's video) is make_demo_clip's default output."""
    committed = Path(__file__).resolve().parents[1] / "assets" / "demo" / "red-circle.gif"
    fresh = world.make_demo_clip(tmp_path / "c.gif")
    np.testing.assert_array_equal(to_uint8(read_frames(fresh, 8, size=64)), to_uint8(read_frames(committed, 8, size=64)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_demo_clip_lies_inside_the_training_distribution(seed):
    """The demo circle's radius is within the training clips' (world.RADIUS_RANGE) and it keeps the clips' 1 px
    margin from the border in every frame (issue 13: a smaller circle touching the border was redrawn by the model)."""
    frames = world.demo_frames(seed=seed)
    rng = np.random.default_rng(seed)
    radius = 64 * rng.uniform(*world.DEMO_RADIUS)
    assert world.RADIUS_RANGE[0] <= radius <= world.RADIUS_RANGE[1]
    for f in frames:
        ys, xs = np.nonzero((f != 255).any(-1))
        assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= 62 and ys.max() <= 62
        assert (xs.max() - xs.min() + 1) >= 2 * world.RADIUS_RANGE[0] - 1
