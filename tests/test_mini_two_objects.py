"""Two-object clips of the miniature world and the scoring of their edits (ei2.mini.suite_clips): hand-made edited
clips with known answers (nothing done, the edit on the wrong object, the still object lost or moved, a flicker)."""

import numpy as np
import pytest

from ei2.mini import parse, world
from ei2.mini.suite_clips import match_objects, two_object_metrics

SOURCE = world.make_two_object_clip(("red", "circle"), ("yellow", "square"), "black", "right", seed=0)
PROMPT = "a green circle moving right and a yellow square on a black background"  # colour of the first object
IDEAL = world.edit_clip(SOURCE, color="green")


def scores(clip_or_frames, prompt=PROMPT, ideal=IDEAL):
    frames = clip_or_frames.render() if isinstance(clip_or_frames, world.Clip) else clip_or_frames
    return two_object_metrics(frames, prompt, ideal.render(), SOURCE.caption)


def with_objects(clip: world.Clip, fn) -> world.Clip:
    """The clip with each frame's objects replaced by fn(frame index, objects)."""
    return world.Clip(tuple(world.Scene(tuple(fn(i, s.objects)), s.background) for i, s in enumerate(clip.frames)),
                      clip.motion)


@pytest.mark.parametrize("motion", list(world.MOTIONS))
def test_two_object_clips_keep_the_still_object_apart_and_round_trip(motion):
    for seed in range(5):
        clip = world.make_two_object_clip(("blue", "triangle"), ("orange", "circle"), "white", motion, seed)
        assert world.parse_caption(clip.caption) == {
            "objects": [("blue", "triangle"), ("orange", "circle")], "background": "white", "motion": motion,
            "color": "blue", "shape": "triangle"}
        stills = {s.objects[1] for s in clip.frames}
        assert len(stills) == 1  # the second object does not move
        (b,) = stills
        for s in clip.frames:
            a = s.objects[0]
            assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) >= a.radius + b.radius + 2
            for o in s.objects:
                assert o.radius + 1 <= o.center[0] <= 63 - o.radius and o.radius + 1 <= o.center[1] <= 63 - o.radius
        if motion in ("right", "left", "up", "down"):
            axis = 0 if motion in ("right", "left") else 1
            steps = np.diff([s.objects[0].center[axis] for s in clip.frames])
            assert np.all(steps > 0) if motion in ("right", "down") else np.all(steps < 0)
    with pytest.raises(ValueError):
        world.make_two_object_clip(("white", "circle"), ("red", "square"), "white")
    with pytest.raises(ValueError):
        world.make_two_object_clip(("red", "circle"), ("red", "circle"), "white")


def test_edit_clip_of_the_second_object():
    edited = world.edit_clip(SOURCE, shape="star", index=1)
    assert edited.caption == "a red circle moving right and a yellow star on a black background"
    assert [s.objects[0] for s in edited.frames] == [s.objects[0] for s in SOURCE.frames]
    assert {s.objects[1].center for s in edited.frames} == {SOURCE.frames[0].objects[1].center}
    assert world.edit_clip(SOURCE, color="green") == IDEAL  # index 0 by default, as before
    with pytest.raises(ValueError):
        world.edit_clip(SOURCE, color="green", index=2)


def test_ideal_scores_perfectly_and_the_unedited_source_misses_only_the_edit():
    ideal = scores(IDEAL)
    assert (ideal["alignment"]["edited"], ideal["alignment"]["unedited"], ideal["alignment"]["all"]) == (1, 1, 1)
    assert ideal["fidelity"]["iou"] == 1.0 and ideal["fidelity"]["trajectory_error"] == 0.0
    assert ideal["alignment"]["edited_attributes"] == ["color0"]
    nothing = scores(SOURCE)  # the model returned the source: same masks, the edit missing in every frame
    assert nothing["alignment"]["edited"] == 0.0 and nothing["alignment"]["unedited"] == 1.0
    assert nothing["fidelity"]["iou"] == 1.0 and nothing["fidelity"]["trajectory_error"] == 0.0
    assert parse.flat_scores(nothing)["edited_attribute_match"] == 0.0


def test_the_edit_on_the_wrong_object_fails_both_alignments():
    # the second object turned green instead of the first: object 0 keeps red (edit missed), object 1 is not yellow
    wrong = world.edit_clip(SOURCE, color="green", index=1)
    m = scores(wrong)
    assert m["alignment"]["edited"] == 0.0 and m["alignment"]["unedited"] == 0.0
    assert m["alignment"]["color0"] == 0.0 and m["alignment"]["color1"] == 0.0 and m["alignment"]["shape1"] == 1.0
    assert m["fidelity"]["iou"] == 1.0  # the masks are right: the union of masks could not tell


def test_a_lost_still_object_counts_zero_iou_and_the_diagonal():
    lost = with_objects(IDEAL, lambda i, objs: objs[:1])
    m = scores(lost)
    assert m["alignment"]["edited"] == 1.0 and m["alignment"]["unedited"] == 0.0
    assert m["fidelity"]["iou_per_object"] == [1.0, 0.0] and m["fidelity"]["iou"] == 0.5
    diag = float(np.hypot(64, 64))
    assert m["fidelity"]["trajectory_error_per_object"] == [0.0, pytest.approx(diag)]
    assert m["fidelity"]["trajectory_error"] == pytest.approx(diag / 2)


def test_a_moved_still_object_by_hand():
    # the still object drawn 5 px further right in every frame: an integer shift, so the same pixels shifted
    def shift(i, objs):
        o = objs[1]
        return objs[0], world.Obj(o.shape, o.color, (o.center[0] + 5, o.center[1]), o.radius)

    moved = with_objects(IDEAL, shift)
    for s in moved.frames:  # the case applies: inside the frame, apart from the moving object
        a, b = s.objects
        assert b.center[0] + b.radius < 63 and np.hypot(*np.subtract(a.center, b.center)) > a.radius + b.radius + 2
    still = next(o["mask"] for o in parse.parse_objects(IDEAL.render()[0])["objects"] if o["shape"] == "square")
    expect_iou = parse.iou(np.roll(still, 5, axis=1), still)
    assert 0.3 < expect_iou < 0.8
    m = scores(moved)
    assert m["alignment"]["all"] == 1.0
    assert m["fidelity"]["trajectory_error_per_object"] == pytest.approx([0.0, 5.0], abs=1e-9)
    assert m["fidelity"]["iou_per_object"] == pytest.approx([1.0, expect_iou])
    assert m["fidelity"]["trajectory_error"] == pytest.approx(2.5)


def test_a_flickering_shape_counts_in_the_stability():
    # frames 3 and 4 draw the still square as a triangle: 2 of 7 consecutive pairs change, 6 of 8 frames keep it
    flicker = with_objects(IDEAL, lambda i, objs: (objs[0], world.Obj("triangle", objs[1].color, objs[1].center,
                                                                      objs[1].radius)) if i in (3, 4) else objs)
    m = scores(flicker)
    assert m["consistency"]["attribute_stability"] == pytest.approx(5 / 7)
    assert m["alignment"]["shape1"] == 0.75 and m["alignment"]["unedited"] == 0.75 and m["alignment"]["edited"] == 1.0


def test_match_objects_by_overlap():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:3, :3], b[5:, 5:] = True, True
    ideal = [{"mask": a, "centroid": (1.5, 1.5)}, {"mask": b, "centroid": (6.5, 6.5)}]
    found_b, found_a = {"mask": b.copy(), "centroid": (6.5, 6.5)}, {"mask": a.copy(), "centroid": (1.5, 1.5)}
    assert match_objects([found_b, found_a], ideal) == [found_a, found_b]  # parse order (largest first) is not kept
    assert match_objects([found_b], ideal) == [None, found_b]
    assert match_objects([], ideal) == [None, None]
    # no overlap at all: the nearer centroid wins
    far = {"mask": np.zeros((8, 8), bool), "centroid": (6.0, 6.0)}
    assert match_objects([far], ideal) == [None, far]


def test_match_objects_prefers_overlap_to_distance():
    # 16 x 16: A is the left band, B the bottom-right corner; the found object touches A's edge but its centroid is
    # nearer B's (7.2 vs 7.6 px): overlap decides, so it is A's
    def obj(x0, x1, y0, y1):
        m = np.zeros((16, 16), bool)
        m[y0:y1, x0:x1] = True
        ys, xs = np.nonzero(m)
        return {"mask": m, "centroid": (xs.mean() + 0.5, ys.mean() + 0.5)}

    a, b, found = obj(0, 4, 0, 16), obj(14, 16, 14, 16), obj(3, 14, 8, 16)
    assert np.hypot(*np.subtract(found["centroid"], b["centroid"])) < \
        np.hypot(*np.subtract(found["centroid"], a["centroid"]))
    assert match_objects([found], [a, b]) == [found, None]
