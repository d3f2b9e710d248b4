"""The mini benchmark's clips and edits (ei2.mini.benchmark), and the exact scoring of an edit of a two-object clip.

The suite (CLIPS): clips whose motion an edit must keep (translation, orbit, growth) with one object, and two-object
clips (world.make_two_object_clip: the first object moves, the second stays beside its path) of which an edit changes
ONE object's colour or shape, or the background, and must keep the other object as it is. Every clip has one edit of
each kind (colour, shape, background); the ideal result of an edit is world.edit_clip (same centers and radii, the
edited attribute replaced). No source or edit lands on ei2.mini.samples.HELD_OUT.

Scoring a two-object edit (two_object_metrics; one-object edits keep ei2.mini.parse.clip_metrics unchanged). Each
frame's parsed objects (parse.parse_objects, at most 2) are matched to the ideal edit's two objects by mask overlap
(the assignment with the largest total IoU, then the smallest total centroid distance; an object the model did not
draw stays unmatched), and everything is then read PER OBJECT, in the caption's order (0: the moving one, 1: the
still one):
 - alignment: the attributes are (color, 0), (shape, 0), (color, 1), (shape, 1) and background; "edited" is the
   fraction of frames where every attribute the prompt changes matches it, "unedited" where every other attribute
   (the other object's colour and shape included) matches, "all" where all five do;
 - fidelity: IoU of each matched object's mask with its ideal mask (0 when unmatched) and the distance of their
   centroids (the image diagonal when unmatched), averaged over the frames and the two objects; per object too.
   Per object and not the union of the masks: a union IoU would not see the edited attribute drawn on the wrong
   object, or the still object moved into the other's place;
 - consistency: attribute_stability is the fraction of consecutive frame pairs with equal (object 0, object 1,
   background) attributes; background_change the mean |difference| of the pixels outside every object mask (grown
   by one pixel) of both frames.
The result has parse.clip_metrics' sections and keys, so parse.flat_scores reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from . import parse, world


@dataclass(frozen=True)
class Edit:
    """One edit of a suite clip: attribute kind (color, shape, background), its new value, and for color and shape
    the object it changes (0: the first, moving object; 1: a two-object clip's still second object)."""

    kind: str
    value: str
    target: int = 0


# (world.make_clip / world.make_two_object_clip arguments, edits): pairs of a one-object and a two-object clip with
# the same motion: translation (right), orbit, growth, translation (down / up).
CLIPS: list[tuple[dict, tuple[Edit, ...]]] = [
    (dict(shape="circle", color="red", background="white", motion="right", seed=0),
     (Edit("color", "blue"), Edit("shape", "square"), Edit("background", "green"))),
    (dict(first=("red", "circle"), second=("yellow", "square"), background="black", motion="right", seed=0),
     (Edit("color", "green", 0), Edit("shape", "star", 1), Edit("background", "white"))),
    (dict(shape="star", color="yellow", background="black", motion="orbiting", seed=2),
     (Edit("color", "red"), Edit("shape", "circle"), Edit("background", "blue"))),
    (dict(first=("blue", "triangle"), second=("orange", "circle"), background="white", motion="orbiting", seed=1),
     (Edit("color", "green", 1), Edit("shape", "square", 0), Edit("background", "gray"))),
    (dict(shape="triangle", color="green", background="gray", motion="growing", seed=3),
     (Edit("color", "purple"), Edit("shape", "square"), Edit("background", "white"))),
    (dict(first=("purple", "star"), second=("white", "circle"), background="blue", motion="growing", seed=2),
     (Edit("color", "yellow", 0), Edit("shape", "triangle", 1), Edit("background", "black"))),
    (dict(shape="square", color="blue", background="black", motion="down", seed=1),
     (Edit("color", "yellow"), Edit("shape", "triangle"), Edit("background", "white"))),
    (dict(first=("yellow", "circle"), second=("orange", "triangle"), background="gray", motion="up", seed=3),
     (Edit("color", "green", 1), Edit("shape", "square", 0), Edit("background", "white"))),
]
# the default run uses the first DEFAULT_CLIPS (one- and two-object clips alternate, so any prefix is balanced)
DEFAULT_CLIPS = 6


def make(spec: dict) -> world.Clip:
    """The world.Clip of a CLIPS entry: two objects when it names `first` and `second`."""
    return world.make_two_object_clip(**spec) if "second" in spec else world.make_clip(**spec)


def clip_name(spec: dict) -> str:
    if "second" in spec:
        (c1, s1), (c2, s2) = spec["first"], spec["second"]
        return f"{c1}-{s1}-{spec['motion']}-and-{c2}-{s2}-on-{spec['background']}"
    return f"{spec['color']}-{spec['shape']}-{spec['motion']}-on-{spec['background']}"


def edit_name(edit: Edit, n_objects: int) -> str:
    """color, shape, background; with two objects the object too: color-first, shape-second."""
    if edit.kind == "background" or n_objects == 1:
        return edit.kind
    return f"{edit.kind}-{('first', 'second')[edit.target]}"


def suite(n_clips: int, kinds: list[str]) -> list[dict]:
    """[{name, caption, frames (uint8), n_objects, edits: [{kind, name, target, value, prompt, ideal (uint8)}]}] for
    the first n_clips, their edits of the given kinds."""
    out = []
    for spec, edits in CLIPS[:n_clips]:
        clip = make(spec)
        n_objects = len(clip.frames[0].objects)
        items = []
        for e in edits:
            if e.kind not in kinds:
                continue
            ideal = world.edit_clip(clip, **{e.kind: e.value}, index=e.target if e.kind != "background" else 0)
            items.append({"kind": e.kind, "name": edit_name(e, n_objects), "target": e.target, "value": e.value,
                          "prompt": ideal.caption, "ideal": ideal.render()})
        out.append({"name": clip_name(spec), "caption": clip.caption, "frames": clip.render(),
                    "n_objects": n_objects, "edits": items})
    return out


# --- Scoring an edit of a two-object clip -----------------------------------------------------------------------------


def match_objects(found: list[dict], ideal: list[dict]) -> list[dict | None]:
    """For each ideal object (dicts with mask and centroid), the parsed object assigned to it or None: the
    assignment of at most one found object per ideal object with the largest total mask IoU, then the most objects
    matched, then the smallest total centroid distance."""
    best, best_key = [None] * len(ideal), None
    for assign in permutations(list(range(len(found))) + [None] * len(ideal), len(ideal)):
        pairs = [(found[a], ideal[j]) for j, a in enumerate(assign) if a is not None]
        key = (sum(parse.iou(f["mask"], i["mask"]) for f, i in pairs), len(pairs),
               -sum(float(np.hypot(*np.subtract(f["centroid"], i["centroid"]))) for f, i in pairs))
        if best_key is None or key > best_key:
            best, best_key = [None if a is None else found[a] for a in assign], key
    return best


def _ideal_objects(frame: np.ndarray, objects: list[tuple[str, str]]) -> list[dict]:
    """The ideal frame's parsed objects in the caption's order, found by their (color, shape)."""
    parsed = parse.parse_objects(frame)["objects"]
    out = []
    for color, shape in objects:
        hit = [o for o in parsed if (o["color"], o["shape"]) == (color, shape)]
        if len(hit) != 1:
            raise ValueError(f"the ideal frame does not show exactly one {color} {shape}")
        out.append(hit[0])
    return out


def two_object_metrics(frames, prompt: str, ideal_frames, source_prompt: str) -> dict:
    """parse.clip_metrics' sections for an edit of a two-object clip, scored against its ideal edit (module
    docstring): alignment (edited, unedited, all and per attribute key "color0", "shape1", ...), fidelity (iou,
    trajectory_error, and per object), consistency (attribute_stability, background_change)."""
    frames, ideal_frames = parse._frames(frames), parse._frames(ideal_frames)
    if len(frames) != len(ideal_frames):
        raise ValueError(f"{len(frames)} frames vs {len(ideal_frames)} ideal frames")
    want, src = world.parse_caption(prompt), world.parse_caption(source_prompt)
    if len(want["objects"]) != 2 or len(src["objects"]) != 2:
        raise ValueError(f"two objects expected in {source_prompt!r} and {prompt!r}")
    keys = [f"{a}{j}" for j in (0, 1) for a in ("color", "shape")] + ["background"]
    target = {f"{a}{j}": want["objects"][j][i] for j in (0, 1) for i, a in enumerate(("color", "shape"))}
    source = {f"{a}{j}": src["objects"][j][i] for j in (0, 1) for i, a in enumerate(("color", "shape"))}
    target["background"], source["background"] = want["background"], src["background"]
    edited = [k for k in keys if target[k] != source[k]]
    h, w = frames[0].shape[:2]
    diag = float(np.hypot(h, w))
    got, ious, errs, masks = [], [], [], []
    for frame, ideal_frame in zip(frames, ideal_frames):
        ideal = _ideal_objects(ideal_frame, want["objects"])
        p = parse.parse_objects(frame)
        matched = match_objects(p["objects"], ideal)
        attrs = {"background": p["background"]}
        for j, o in enumerate(matched):
            attrs[f"color{j}"], attrs[f"shape{j}"] = (o["color"], o["shape"]) if o else (None, None)
        got.append(attrs)
        ious.append([parse.iou(o["mask"], i["mask"]) if o else 0.0 for o, i in zip(matched, ideal)])
        errs.append([float(np.hypot(*np.subtract(o["centroid"], i["centroid"]))) if o else diag
                     for o, i in zip(matched, ideal)])
        union = np.zeros((h, w), bool)
        for o in p["objects"]:
            union |= o["mask"]
        masks.append(union)
    n = len(frames)
    match = [{k: g[k] == target[k] for k in keys} for g in got]
    alignment = {k: sum(m[k] for m in match) / n for k in keys} | {
        "all": sum(all(m.values()) for m in match) / n,
        "edited": sum(all(m[k] for k in edited) for m in match) / n,
        "unedited": sum(all(m[k] for k in keys if k not in edited) for m in match) / n,
        "edited_attributes": edited}
    ious, errs = np.asarray(ious), np.asarray(errs)
    fidelity = {"iou": float(ious.mean()), "trajectory_error": float(errs.mean()),
                "iou_per_object": ious.mean(axis=0).tolist(), "trajectory_error_per_object": errs.mean(axis=0).tolist()}
    same, changes = [], []
    for i in range(n - 1):
        same.append(got[i] == got[i + 1])
        bg = ~(~parse.erode(~masks[i]) | ~parse.erode(~masks[i + 1]))
        if bg.any():
            changes.append(float(np.abs(frames[i].astype(float) - frames[i + 1].astype(float))[bg].mean()))
    consistency = {"attribute_stability": float(np.mean(same)) if same else 1.0,
                   "background_change": float(np.mean(changes)) if changes else 0.0}
    return {"alignment": alignment, "fidelity": fidelity, "consistency": consistency}


def edit_metrics(video, edit: dict, source_caption: str) -> dict:
    """The metrics of one edited clip against its ideal: parse.clip_metrics for one object (unchanged), or
    two_object_metrics for two."""
    if len(world.parse_caption(edit["prompt"])["objects"]) == 2:
        return two_object_metrics(video, edit["prompt"], edit["ideal"], source_caption)
    return parse.clip_metrics(video, edit["prompt"], source_frames=edit["ideal"], source_prompt=source_caption)
