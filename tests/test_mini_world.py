"""The miniature world: determinism under a seed, the caption grammar, geometry and motion of the clips."""

import numpy as np
import pytest

from ei2.mini import world
from ei2.text import _bpe, tiny_bpe


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
