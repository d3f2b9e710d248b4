"""A scene parser for mini-world frames (rendered or generated), and the exact edit metrics built on it.

Parsing one frame (uint8 (H, W, 3)):
 1. background: the median color of the 2-pixel border -> nearest of world.BACKGROUNDS (RGB distance);
 2. foreground: pixels farther than 60 (RGB, 0-255) from that background color, holes filled, components smaller than
    MIN_AREA pixels dropped; the main object is the largest component;
 3. color: median RGB of the object's interior (the mask eroded once, so anti-aliased edges do not count) -> nearest of
    world.COLORS other than the background's name; the mask is then re-thresholded half-way between the background
    and that color (so it matches the renderer's "at least half covered" ground truth on clean frames);
 4. shape: by the corners of the outline. r(theta), the distance from the mask's centroid to its edge along 90
    rays, is flat for a circle and has 3, 4 or 5 bumps for a triangle, square or star; its Fourier amplitudes a_k
    (k = 3, 4, 5, relative to the mean radius) measure them: the shape is the polygon whose a_k is largest, or a
    circle when every a_k is under CIRCLE_BELOW. On clean renders a_k is 0.27 / 0.13 / 0.36 for the triangle /
    square / star (HARMONIC_REFERENCE) and under 0.07 for every other (shape, k), under 0.01 for circles. This reads
    blurred and wobbly generated shapes (a square with pinched sides still has four corners) where area ratios fail.
    fill = area / bounding-box area and solidity = area / convex-hull area are reported too.

Metrics (all pure functions of uint8 frames and captions; see docs/mini.md):
 - textual_alignment: fraction of frames whose parsed attributes match the prompt (each attribute, all, and split into
   the edited and the unedited attributes when the source prompt is given);
 - structure_fidelity: per-frame IoU of the main object's mask with the source's, and the centroid trajectory error
   (mean distance in pixels);
 - temporal_consistency: fraction of consecutive frame pairs with identical parsed attributes, and the mean absolute
   change of the background pixels between consecutive frames (0-255 scale).
"""

from __future__ import annotations

import numpy as np

from . import world

BORDER = 2
THRESHOLD = 60.0
MIN_AREA = 12
N_RAYS = 90
POLYGONS = {3: "triangle", 4: "square", 5: "star"}
# Mean Fourier amplitude a_k of r(theta) for each polygon's own k on clean rendered frames of random training clips,
# `fit_harmonic_reference(n=2000, seed=12345)` rounded to 3 decimals (tests check it still holds).
HARMONIC_REFERENCE = {3: 0.267, 4: 0.135, 5: 0.356}
# a shape whose a_3, a_4, a_5 are all under this is a circle: 6x a clean circle's largest a_k, 45% of a clean square's a_4
CIRCLE_BELOW = 0.06


# --- Image primitives -------------------------------------------------------------------------------------------------


def _neighbors_min(lab: np.ndarray, fill: int) -> np.ndarray:
    """Minimum over each pixel's 4-neighborhood (itself included); outside the image counts as `fill`."""
    p = np.pad(lab, 1, constant_values=fill)
    return np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: labels (H, W) int (0 = not in mask, 1..k) and k, numbered in
    raster order of their first pixel."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    inside = np.nonzero(mask.ravel())[0]
    while True:  # propagate the smallest pixel index through each component: neighbour minimum + pointer jumping
        new = np.where(mask, _neighbors_min(lab, big), big).ravel()
        for _ in range(2):  # a label is a pixel of the same component: take that pixel's label
            new[inside] = new[new[inside]]
        new = new.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[mask])
    out = np.zeros((h, w), dtype=np.int64)
    if roots.size:
        out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, int(roots.size)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every non-mask region that does not touch the image border."""
    lab, k = label_components(~mask)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    holes = (lab > 0) & ~np.isin(lab, border)
    return mask | holes


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbors are all in the mask (outside the image counts as not in it)."""
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (corners of every pixel), by the shoelace formula."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return 0.0
    # the hull of all pixel squares is the hull of each row's leftmost and rightmost squares' corners
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    pts = np.concatenate([np.stack([xs, rows + dy], 1) for xs in (left, right + 1) for dy in (0, 1)])
    pts = np.unique(pts, axis=0)
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(points):
        chain: list = []
        for p in points:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) <= 0:
                    chain.pop()
                else:
                    break
            chain.append((int(p[0]), int(p[1])))
        return chain

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1], dtype=float)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


# --- Attributes -------------------------------------------------------------------------------------------------------


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], exclude=()) -> str:
    names = [n for n in palette if n not in exclude]
    d = [float(np.linalg.norm(np.asarray(palette[n], float) - rgb)) for n in names]
    return names[int(np.argmin(d))]


def background_color(img: np.ndarray) -> np.ndarray:
    """Median RGB (float) of the BORDER-pixel frame around the image."""
    b = BORDER
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[b:-b, :b].reshape(-1, 3),
                             img[b:-b, -b:].reshape(-1, 3)])
    return np.median(border.astype(float), axis=0)


def radial_profile(mask: np.ndarray, center: tuple[float, float], n_rays: int = N_RAYS) -> np.ndarray:
    """r(theta) for n_rays angles: the distance from `center` (x, y in pixel units, pixel centers at +0.5) along each
    ray to the first pixel outside the mask, in 1/4-pixel steps."""
    cx, cy = center
    h, w = mask.shape
    ang = 2 * np.pi * np.arange(n_rays) / n_rays
    steps = np.arange(0.0, float(np.hypot(h, w)), 0.25)
    x = np.floor(cx + steps[None] * np.cos(ang)[:, None]).astype(int)
    y = np.floor(cy + steps[None] * np.sin(ang)[:, None]).astype(int)
    valid = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    inside = valid & mask[y.clip(0, h - 1), x.clip(0, w - 1)]
    return steps[np.argmax(~inside, axis=1)]


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """fill (area / bounding-box area), solidity (area / convex-hull area) and the Fourier amplitudes a3, a4, a5 of
    the radial profile around the centroid (relative to the mean radius) of a boolean mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return {"fill": 0.0, "solidity": 0.0, "a3": 0.0, "a4": 0.0, "a5": 0.0}
    area = float(ys.size)
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    r = radial_profile(mask, (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
    amp = np.abs(np.fft.rfft(r)) * 2 / (len(r) * max(float(r.mean()), 1e-6))
    return {"fill": area / box, "solidity": area / max(convex_hull_area(mask), 1.0),
            **{f"a{k}": float(amp[k]) for k in POLYGONS}}


def classify_shape(features: dict[str, float]) -> str:
    """The polygon whose corner harmonic a_k (k = 3, 4, 5) is strongest, or circle when all are under CIRCLE_BELOW."""
    amp = {k: features[f"a{k}"] for k in POLYGONS}
    k = max(amp, key=amp.get)
    return POLYGONS[k] if amp[k] >= CIRCLE_BELOW else "circle"


def foreground_mask(img: np.ndarray, bg_rgb: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Pixels farther than `threshold` from the background color, holes filled, tiny components dropped."""
    dist = np.linalg.norm(img.astype(float) - bg_rgb, axis=-1)
    mask = fill_holes(dist > threshold)
    lab, k = label_components(mask)
    if k:
        keep = np.nonzero(np.bincount(lab.ravel(), minlength=k + 1) >= MIN_AREA)[0]
        mask = np.isin(lab, keep[keep > 0])
    return mask


def parse_objects(img: np.ndarray, max_objects: int = 2) -> dict:
    """{"background": name, "objects": [ {color, shape, mask, centroid (x, y), area, fill, solidity}, ... ]}, the
    objects largest first (at most max_objects)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) frame, got {img.dtype} {img.shape}")
    bg_rgb = background_color(img)
    bg = _nearest(bg_rgb, world.BACKGROUNDS)
    mask = foreground_mask(img, bg_rgb)
    lab, k = label_components(mask)
    objects = []
    if k:
        areas = np.bincount(lab.ravel(), minlength=k + 1)[1:]
        for idx in np.argsort(-areas, kind="stable")[:max_objects]:
            comp = lab == idx + 1
            objects.append(_parse_object(img, comp, bg_rgb, bg))
    return {"background": bg, "background_rgb": bg_rgb, "objects": objects}


def _parse_object(img: np.ndarray, comp: np.ndarray, bg_rgb: np.ndarray, bg: str) -> dict:
    core = erode(comp)
    pixels = img[core if core.sum() >= 4 else comp].astype(float)
    rgb = np.median(pixels, axis=0)
    color = _nearest(rgb, world.COLORS, exclude=(bg,))
    # re-threshold half-way between the background and the object's color, inside a 1-pixel margin of the component
    half = 0.5 * float(np.linalg.norm(np.asarray(world.COLORS[color], float) - bg_rgb))
    grown = ~erode(~comp)
    dist_bg = np.linalg.norm(img.astype(float) - bg_rgb, axis=-1)
    refined = fill_holes(grown & (dist_bg > half))
    lab, k = label_components(refined)
    if k:
        areas = np.bincount(lab.ravel())[1:]
        refined = lab == int(np.argmax(areas)) + 1
    else:
        refined = comp
    feats = shape_features(refined)
    ys, xs = np.nonzero(refined)
    return {"color": color, "rgb": rgb, "shape": classify_shape(feats), "mask": refined,
            "centroid": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), "area": int(ys.size), **feats}


def parse_frame(img: np.ndarray) -> dict:
    """The main (largest) object's attributes: {"background", "color", "shape", "mask", "centroid", "area",
    "n_objects"}; color/shape None and an empty mask when no object is found."""
    p = parse_objects(img)
    if not p["objects"]:
        h, w = np.asarray(img).shape[:2]
        return {"background": p["background"], "color": None, "shape": None, "mask": np.zeros((h, w), bool),
                "centroid": None, "area": 0, "n_objects": 0}
    o = p["objects"][0]
    return {"background": p["background"], "color": o["color"], "shape": o["shape"], "mask": o["mask"],
            "centroid": o["centroid"], "area": o["area"], "n_objects": len(p["objects"])}


# --- Validation of the parser on rendered scenes ------------------------------------------------------------------


def fit_harmonic_reference(n: int = 2000, seed: int = 12345) -> dict[int, float]:
    """Mean a_k of each polygon (k = 3 triangle, 4 square, 5 star) over the ground-truth masks of n rendered frames of
    random clips."""
    rng = np.random.default_rng(seed)
    amps: dict[int, list] = {k: [] for k in POLYGONS}
    for _ in range(n):
        scene, _ = world.training_example(rng)
        o = scene.objects[0]
        k = {v: k for k, v in POLYGONS.items()}.get(o.shape)
        if k is not None:
            amps[k].append(shape_features(world.object_mask(o))[f"a{k}"])
    return {k: float(np.mean(v)) for k, v in amps.items()}


def parser_accuracy(n: int = 500, seed: int = 2024) -> dict:
    """Accuracy of parse_frame on n held-out rendered frames (random clips, a seed the centroids never saw):
    color, shape, background, all three, and the mean IoU of the parsed mask with the ground truth."""
    rng = np.random.default_rng(seed)
    hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
    ious = []
    for _ in range(n):
        scene, _ = world.training_example(rng)
        got = parse_frame(world.render(scene))
        o = scene.objects[0]
        ok = {"color": got["color"] == o.color, "shape": got["shape"] == o.shape,
              "background": got["background"] == scene.background}
        for key, v in ok.items():
            hits[key] += v
        hits["all"] += all(ok.values())
        ious.append(iou(got["mask"], world.object_mask(o)))
    return {k: v / n for k, v in hits.items()} | {"mask_iou": float(np.mean(ious)), "n": n}


# --- Metrics ------------------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


ATTRIBUTES = ("color", "shape", "background")


def _frames(frames) -> list[np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (n, H, W, 3), got {frames.dtype} {frames.shape}")
    return list(frames)


def textual_alignment(frames, prompt: str, source_prompt: str | None = None, parsed: list | None = None) -> dict:
    """Fraction of frames whose parsed attributes match `prompt`'s: per attribute, "all" three, and with
    `source_prompt` "edited" (every attribute the prompts differ in matches the prompt) and "unedited" (every other
    attribute matches; 1.0 vacuously when the edit changes all three)."""
    parsed = parsed or [parse_frame(f) for f in _frames(frames)]
    want = world.parse_caption(prompt)
    edited = set()
    if source_prompt is not None:
        src = world.parse_caption(source_prompt)
        edited = {a for a in ATTRIBUTES if src[a] != want[a]}
    match = [{a: p[a] == want[a] for a in ATTRIBUTES} for p in parsed]
    n = max(len(match), 1)
    out = {a: sum(m[a] for m in match) / n for a in ATTRIBUTES}
    out["all"] = sum(all(m.values()) for m in match) / n
    if source_prompt is not None:
        out["edited"] = sum(all(m[a] for a in edited) for m in match) / n
        out["unedited"] = sum(all(m[a] for a in ATTRIBUTES if a not in edited) for m in match) / n
        out["edited_attributes"] = sorted(edited)
    return out


def structure_fidelity(frames, source_frames, parsed: list | None = None, source_parsed: list | None = None) -> dict:
    """Per-frame IoU of the main object's mask with the source's, and the centroid trajectory error (pixels): the
    mean, over frames, of the distance between the two centroids (frames where either has no object count as the
    image diagonal)."""
    parsed = parsed or [parse_frame(f) for f in _frames(frames)]
    source_parsed = source_parsed or [parse_frame(f) for f in _frames(source_frames)]
    if len(parsed) != len(source_parsed):
        raise ValueError(f"{len(parsed)} frames vs {len(source_parsed)} source frames")
    ious = [iou(p["mask"], s["mask"]) for p, s in zip(parsed, source_parsed)]
    h, w = parsed[0]["mask"].shape
    diag = float(np.hypot(h, w))
    errs = [diag if p["centroid"] is None or s["centroid"] is None else
            float(np.hypot(p["centroid"][0] - s["centroid"][0], p["centroid"][1] - s["centroid"][1]))
            for p, s in zip(parsed, source_parsed)]
    return {"iou": float(np.mean(ious)), "trajectory_error": float(np.mean(errs)), "iou_per_frame": ious,
            "trajectory_error_per_frame": errs}


def temporal_consistency(frames, parsed: list | None = None) -> dict:
    """attribute_stability: fraction of consecutive frame pairs whose parsed (color, shape, background) are equal;
    background_change: mean |difference| (0-255) between consecutive frames over the pixels that are background in
    both (outside both object masks grown by one pixel); 0 for a still background."""
    frames = _frames(frames)
    parsed = parsed or [parse_frame(f) for f in frames]
    if len(frames) < 2:
        return {"attribute_stability": 1.0, "background_change": 0.0}
    same, changes = [], []
    for i in range(len(frames) - 1):
        a, b = parsed[i], parsed[i + 1]
        same.append(all(a[k] == b[k] for k in ATTRIBUTES))
        bg = ~(~erode(~a["mask"]) | ~erode(~b["mask"]))
        if bg.any():
            d = np.abs(frames[i].astype(float) - frames[i + 1].astype(float))[bg]
            changes.append(float(d.mean()))
    return {"attribute_stability": float(np.mean(same)),
            "background_change": float(np.mean(changes)) if changes else 0.0}


def clip_metrics(frames, prompt: str, source_frames=None, source_prompt: str | None = None) -> dict:
    """All metrics of one edited clip (parsing each frame once): alignment, fidelity (with source frames) and
    consistency."""
    frames = _frames(frames)
    parsed = [parse_frame(f) for f in frames]
    out = {"alignment": textual_alignment(frames, prompt, source_prompt, parsed=parsed),
           "consistency": temporal_consistency(frames, parsed=parsed)}
    if source_frames is not None:
        out["fidelity"] = structure_fidelity(frames, source_frames, parsed=parsed)
    return out


# clip_metrics' numbers of an edit scored against its source, flat: name -> (section, key). `python -m ei2.train`'s
# edits.json (mini_metrics, score: mini) and the mini benchmark's table read them.
SCORES = {
    "edited_attribute_match": ("alignment", "edited"),
    "kept_attributes_match": ("alignment", "unedited"),
    "all_attributes_match": ("alignment", "all"),
    "mask_iou_vs_source": ("fidelity", "iou"),
    "trajectory_error_px": ("fidelity", "trajectory_error"),
    "attribute_stability": ("consistency", "attribute_stability"),
    "background_change": ("consistency", "background_change"),
}


def flat_scores(metrics: dict) -> dict[str, float]:
    """`clip_metrics(frames, prompt, source_frames, source_prompt)`'s nested result as the flat numbers of SCORES."""
    return {name: metrics[section][key] for name, (section, key) in SCORES.items()}


# --- The ideal edit of a parsed clip ---------------------------------------------------------------------------------


def unit_area(shape: str) -> float:
    """Area of `shape` with circumradius 1 (pi for a circle, 2 for a square, 3 sqrt(3) / 4 for a triangle, 5 r_in
    sin(36 deg) for the star), so a parsed area gives the circumradius sqrt(area / unit_area)."""
    if shape == "circle":
        return float(np.pi)
    poly = world.polygon(shape, (0.0, 0.0), 1.0)
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def ideal_edit(source_frames, source_caption: str, prompt: str) -> np.ndarray:
    """uint8 frames: the ideal result of editing a one-object clip of the miniature world from `source_caption` to
    `prompt`, read off the source frames themselves: each frame's main object (parsed) redrawn hard-edged
    (world.draw_scene) at its centroid with the circumradius its area gives for the source caption's shape, in the
    prompt's shape and color, on the prompt's background. For clips made by world.make_clip this is
    world.edit_clip(...).render() up to the anti-aliasing of the edges (IoU >= 0.95, tested); it also covers clips
    that are not world.Clip objects, such as the demo's (world.demo_frames)."""
    src, want = world.parse_caption(source_caption), world.parse_caption(prompt)
    out = []
    for frame in _frames(source_frames):
        p = parse_frame(frame)
        h, w = frame.shape[:2]
        if p["centroid"] is None:  # nothing to move: the ideal frame is the background alone
            out.append(world.draw_scene("circle", want["color"], want["background"], (0.0, 0.0), 0.0, h))
            continue
        radius = float(np.sqrt(p["area"] / unit_area(src["shape"])))
        out.append(world.draw_scene(want["shape"], want["color"], want["background"], p["centroid"], radius, h))
    return np.stack(out)


# the scores of an edit against its ideal (edit_scores), after SCORES in edits.json's mini_metrics
IDEAL_SCORES = ("mask_iou_vs_ideal", "trajectory_error_vs_ideal_px")


def edit_scores(video, prompt: str, source, source_caption: str) -> dict[str, float]:
    """The flat SCORES of one edit (ei2.train's edits.json, score: mini) plus its fidelity to the IDEAL edit
    (`ideal_edit`): mask_iou_vs_ideal and trajectory_error_vs_ideal_px. Against the source, a shape edit's IoU is
    bounded well below 1 (a square is not a circle); against the ideal, a perfect edit scores IoU 1 and 0 px."""
    m = clip_metrics(video, prompt, source_frames=source, source_prompt=source_caption)
    ideal = structure_fidelity(video, ideal_edit(source, source_caption, prompt))
    return flat_scores(m) | dict(zip(IDEAL_SCORES, (ideal["iou"], ideal["trajectory_error"])))
