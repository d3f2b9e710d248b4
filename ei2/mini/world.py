"""The miniature world: seeded procedural scenes of simple shapes on plain backgrounds, with captions from a small
grammar, as still images and as 8-frame clips in motion.

Everything is a pure function of its arguments and a `numpy.random.Generator`, so a seed fixes every pixel.

    scene:   one object (optionally two) of SHAPES x COLORS on one of BACKGROUNDS, image SIZE x SIZE (64)
    caption: "a red circle on a white background"
             "a red circle moving right on a white background"            (clip / motion phrase)
             "a red circle and a blue square on a black background"        (two objects)
    clip:    N_FRAMES (8) frames of one object in one of MOTIONS (translation left/right/up/down, bouncing, orbiting,
             growing, shrinking); every frame is a full scene, the caption names the motion. A two-object clip
             (make_two_object_clip) moves the first object and keeps the second still beside its path:
             "a red circle moving right and a blue square on a white background".

An object is given by its center (x, y) in pixels and its circumradius; squares are axis-aligned, triangles and stars
point up. Scenes' edges are anti-aliased by 4x4 supersampling (a softer target for the tiny VAE); objects always lie
fully inside the frame and their color is never the background's. The project's demo clip (`make_demo_clip`, a red
circle moving right on white, assets/demo/red-circle.gif) is drawn with the same geometry and palette, hard-edged
(`draw_scene`: pixel centers sampled), so it lies inside this world.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..video import write_image, write_video

SIZE = 64
N_FRAMES = 8
SUPERSAMPLE = 4

# Object colors (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
# Plain backgrounds. An object never has its background's color name (so never its RGB either).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "blue": (30, 70, 220),
    "green": (30, 170, 50),
}
SHAPES = ("circle", "square", "triangle", "star")
# motion name -> the phrase the caption carries ("a red circle <phrase> on a white background")
MOTIONS: dict[str, str] = {
    "right": "moving right",
    "left": "moving left",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing",
    "orbiting": "orbiting",
    "growing": "growing",
    "shrinking": "shrinking",
}
STAR_INNER = math.sin(math.pi / 10) / math.sin(3 * math.pi / 10)  # regular pentagram: inner/outer radius ~ 0.382
RADIUS_RANGE = (12.0, 19.0)  # circumradius of still objects, pixels (at SIZE 64)

# Every word a caption can contain: the tokenizer of the mini model has one token per word (ei2.mini.tokenizer).
VOCAB: list[str] = list(dict.fromkeys(
    ["a", "and", "on", "background", *COLORS, *BACKGROUNDS, *SHAPES,
     *(w for phrase in MOTIONS.values() for w in phrase.split())]
))


@dataclass(frozen=True)
class Obj:
    """One object: shape and color names, center (x, y) in pixels, circumradius in pixels."""

    shape: str
    color: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    def caption(self, motion: str | None = None) -> str:
        return caption(self.objects, self.background, motion)


@dataclass(frozen=True)
class Clip:
    """N frames of scenes with the same objects (names) and background; `motion` moves the first object."""

    frames: tuple[Scene, ...]
    motion: str

    @property
    def caption(self) -> str:
        return self.frames[0].caption(self.motion)

    def render(self, size: int = SIZE) -> np.ndarray:
        """uint8 (n, size, size, 3)."""
        return np.stack([render(s, size) for s in self.frames])


# --- Captions ---------------------------------------------------------------------------------------------------------


def caption(objects, background: str, motion: str | None = None) -> str:
    """The grammar: "a <color> <shape> [<motion phrase>] [and a <color> <shape>] on a <background> background"."""
    parts = []
    for i, o in enumerate(objects):
        words = f"a {o.color} {o.shape}"
        if i == 0 and motion is not None:
            words += " " + MOTIONS[motion]
        parts.append(words)
    return " and ".join(parts) + f" on a {background} background"


def parse_caption(text: str) -> dict:
    """The attributes a caption names: {"objects": [(color, shape), ...], "background": name, "motion": name or None,
    plus "color"/"shape" of the first object}. ValueError for text outside the grammar."""
    words = text.strip().lower().split()
    if len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background" or words[-2] not in BACKGROUNDS:
        raise ValueError(f"not a caption of the mini world: {text!r} (expected '... on a <background> background')")
    background, body = words[-2], words[:-4]
    motion = None
    for name, phrase in MOTIONS.items():
        p = phrase.split()
        for start in range(len(body) - len(p) + 1):
            if body[start:start + len(p)] == p:
                motion = name
                body = body[:start] + body[start + len(p):]
                break
        if motion:
            break
    objects, chunk = [], []
    for w in body + ["and"]:
        if w != "and":
            chunk.append(w)
            continue
        if len(chunk) != 3 or chunk[0] != "a" or chunk[1] not in COLORS or chunk[2] not in SHAPES:
            raise ValueError(f"not a caption of the mini world: {text!r} (expected 'a <color> <shape>', got {chunk})")
        objects.append((chunk[1], chunk[2]))
        chunk = []
    return {"objects": objects, "background": background, "motion": motion,
            "color": objects[0][0], "shape": objects[0][1]}


# --- Rendering --------------------------------------------------------------------------------------------------------


def inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for the points (x, y) against the polygon's vertices (k, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


def polygon(shape: str, center: tuple[float, float], radius: float) -> np.ndarray | None:
    """Vertices (k, 2) of a triangle / star / square inscribed in the circle (center, radius); None for a circle."""
    cx, cy = center
    if shape == "circle":
        return None
    if shape == "square":
        h = radius / math.sqrt(2)
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if shape in ("triangle", "star"):
        k = 3 if shape == "triangle" else 10
        r = np.full(k, radius) if shape == "triangle" else np.where(np.arange(k) % 2 == 0, radius, STAR_INNER * radius)
        a = -math.pi / 2 + 2 * math.pi * np.arange(k) / k
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def coverage(shape: str, center: tuple[float, float], radius: float, size: int = SIZE,
             supersample: int = SUPERSAMPLE) -> np.ndarray:
    """float32 (size, size) in [0, 1]: the fraction of each pixel the shape covers (supersample^2 samples/pixel).
    Only the shape's bounding box is sampled."""
    out = np.zeros((size, size), dtype=np.float32)
    poly = polygon(shape, center, radius)
    cx, cy = center
    x0, x1 = max(int(math.floor(cx - radius)) - 1, 0), min(int(math.ceil(cx + radius)) + 1, size)
    y0, y1 = max(int(math.floor(cy - radius)) - 1, 0), min(int(math.ceil(cy + radius)) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return out
    s = supersample
    offs = (np.arange(s) + 0.5) / s
    ys = (np.arange(y0, y1)[:, None] + offs[None]).reshape(-1)
    xs = (np.arange(x0, x1)[:, None] + offs[None]).reshape(-1)
    y, x = np.meshgrid(ys, xs, indexing="ij")
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2 if poly is None else inside_polygon(x, y, poly)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """uint8 (size, size, 3): the background, then each object alpha-composited by its coverage."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        a = coverage(o.shape, o.center, o.radius, size)[..., None]
        img = img * (1 - a) + np.asarray(COLORS[o.color], dtype=np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_mask(obj: Obj, size: int = SIZE) -> np.ndarray:
    """The ground-truth boolean mask of one object (pixels at least half covered)."""
    return coverage(obj.shape, obj.center, obj.radius, size) >= 0.5


# --- Hard-edged drawing and the project's demo clip -------------------------------------------------------------------


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape inscribed in the circle (center=(x, y), radius), pixel centers sampled
    (no anti-aliasing)."""
    return coverage(shape, center, radius, size, supersample=1) > 0


def rgb(color) -> np.ndarray:
    """uint8 (3,) of a name of COLORS or BACKGROUNDS, or of an RGB tuple."""
    if isinstance(color, str):
        if color not in COLORS and color not in BACKGROUNDS:
            raise ValueError(f"unknown color {color!r}; one of {', '.join(dict.fromkeys([*COLORS, *BACKGROUNDS]))}")
        color = COLORS.get(color) or BACKGROUNDS[color]
    return np.asarray(color, dtype=np.uint8)


def draw_scene(shape: str, color, background, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """A uint8 (size, size, 3) image: one `shape` of `color` (a name of COLORS or an RGB tuple) centered at (x, y)
    with circumradius `radius`, on a plain `background` (a name or RGB), hard-edged (`shape_mask`)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = rgb(background)
    img[shape_mask(shape, center, radius, size)] = rgb(color)
    return img


DEMO_RADIUS = (0.22, 0.27)  # of the frame size: 14-17 px at 64, inside the training clips' 12-18 px


def demo_frames(n_frames: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a red circle moving left to right on white; radius and height from the seed.

    Inside the training distribution (issue 13): radius within the clips' range, 1 px from the border at both ends
    (an earlier demo circle of radius 11 touching the border was redrawn by the model at its usual size and place)."""
    rng = np.random.default_rng(seed)
    radius = size * rng.uniform(*DEMO_RADIUS)
    cy = rng.uniform(radius + 1, size - radius - 1)
    xs = np.linspace(radius + 1, size - radius - 1, n_frames) if n_frames > 1 else [size / 2]
    return np.stack([draw_scene("circle", "red", "white", (float(cx), cy), radius, size) for cx in xs])


def make_demo_clip(folder_or_path: str | os.PathLike, n_frames: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `demo_frames` to a .gif or .mp4 path, or otherwise as frame_0000.png ... into that folder; returns the
    path. The same arguments always give the same pixels (and, for gif and png, the same bytes)."""
    path = Path(folder_or_path)
    frames = demo_frames(n_frames, size, seed)
    if path.suffix.lower() in (".gif", ".mp4"):
        return write_video(frames, path, fps=8)
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        write_image(frame, path / f"frame_{i:04d}.png")
    return path


# --- Random scenes and clips ------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator, n_objects: int = 1, size: int = SIZE, shape: str | None = None,
                 color: str | None = None, background: str | None = None) -> Scene:
    """A still scene; unspecified attributes are drawn uniformly (object colors exclude the background's; with two
    objects they differ in color or shape and do not overlap)."""
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    if color is not None and color == background:
        raise ValueError(f"object color {color!r} equals the background")
    background = background or _pick(rng, BACKGROUNDS)
    objects: list[Obj] = []
    scale = size / 64
    for i in range(n_objects):
        for _ in range(1000):
            r = float(rng.uniform(*RADIUS_RANGE)) * scale * (0.7 if n_objects == 2 else 1.0)
            c = (float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
            s = shape if (shape and i == 0) else _pick(rng, SHAPES)
            col = color if (color and i == 0) else _pick(rng, COLORS, exclude=(background,))
            if any(math.dist(c, o.center) < r + o.radius + 2 or (o.shape, o.color) == (s, col) for o in objects):
                continue
            objects.append(Obj(s, col, c, r))
            break
        else:  # pragma: no cover - a 64x64 frame always fits two objects of these sizes
            raise RuntimeError("could not place the objects")
    return Scene(tuple(objects), background)


def trajectory(motion: str, rng: np.random.Generator, radius: float, n_frames: int = N_FRAMES,
               size: int = SIZE) -> tuple[list[tuple[float, float]], list[float]]:
    """Centers and radii over n frames for one motion, staying inside the frame. t runs over [0, 1]."""
    t = np.linspace(0.0, 1.0, n_frames) if n_frames > 1 else np.zeros(1)
    r = radius
    lo = lambda rad: rad + 1  # noqa: E731 - nearest allowed center coordinate
    hi = lambda rad: size - rad - 1  # noqa: E731
    if motion in ("right", "left", "up", "down"):
        span = hi(r) - lo(r)
        dist = float(rng.uniform(0.6, 1.0)) * span
        start = float(rng.uniform(lo(r), hi(r) - dist))
        other = float(rng.uniform(lo(r), hi(r)))
        pos = start + dist * t
        if motion in ("left", "up"):
            pos = pos[::-1]
        centers = [(p, other) if motion in ("right", "left") else (other, p) for p in pos]
        return centers, [r] * n_frames
    if motion == "bouncing":  # a ball hopping twice on a floor: y = floor - height * |sin(2 pi t)|
        floor = float(rng.uniform(hi(r) - 0.15 * (hi(r) - lo(r)), hi(r)))
        height = float(rng.uniform(0.5, 1.0)) * (floor - lo(r))
        x0 = float(rng.uniform(lo(r), hi(r)))
        drift = float(rng.uniform(-1, 1)) * min(x0 - lo(r), hi(r) - x0)  # a little sideways travel
        centers = [(x0 + drift * float(s), floor - height * abs(math.sin(2 * math.pi * float(s)))) for s in t]
        return centers, [r] * n_frames
    if motion == "orbiting":  # clockwise on screen around a point, 7/8 of a turn over the clip
        R = float(rng.uniform(0.35, 1.0)) * (hi(r) - lo(r)) / 2
        cx = float(rng.uniform(lo(r) + R, hi(r) - R))
        cy = float(rng.uniform(lo(r) + R, hi(r) - R))
        a0 = float(rng.uniform(0, 2 * math.pi))
        ang = a0 + 2 * math.pi * t * (n_frames - 1) / max(n_frames, 1)
        return [(cx + R * math.cos(a), cy + R * math.sin(a)) for a in ang], [r] * n_frames
    if motion in ("growing", "shrinking"):
        r0, r1 = r / 1.5, r  # grow from r/1.5 to r
        c = (float(rng.uniform(lo(r1), hi(r1))), float(rng.uniform(lo(r1), hi(r1))))
        radii = [float(r0 + (r1 - r0) * s) for s in t]
        return [c] * n_frames, radii if motion == "growing" else radii[::-1]
    raise ValueError(f"unknown motion {motion!r}; one of {', '.join(MOTIONS)}")


def random_clip(rng: np.random.Generator, n_frames: int = N_FRAMES, size: int = SIZE, motion: str | None = None,
                shape: str | None = None, color: str | None = None, background: str | None = None,
                radius: float | None = None) -> Clip:
    """One object in motion over n frames (unspecified attributes drawn uniformly)."""
    motion = motion or _pick(rng, MOTIONS)
    background = background or _pick(rng, BACKGROUNDS)
    shape = shape or _pick(rng, SHAPES)
    color = color or _pick(rng, COLORS, exclude=(background,))
    if color == background:
        raise ValueError(f"object color {color!r} equals the background")
    if radius is None:
        radius = float(rng.uniform(14.0, 20.0)) * size / 64 if motion in ("growing", "shrinking") else \
            float(rng.uniform(RADIUS_RANGE[0], 18.0)) * size / 64
    centers, radii = trajectory(motion, rng, radius, n_frames, size)
    frames = tuple(Scene((Obj(shape, color, c, rr),), background) for c, rr in zip(centers, radii))
    return Clip(frames, motion)


def make_clip(shape: str = "circle", color: str = "red", background: str = "white", motion: str = "right",
              seed: int = 0, n_frames: int = N_FRAMES, size: int = SIZE) -> Clip:
    """A named clip, e.g. make_clip("circle", "red", "white", "right") is "a red circle moving right on a white
    background"; the seed draws radius and path."""
    return random_clip(np.random.default_rng(seed), n_frames, size, motion, shape, color, background)


def edit_clip(clip: Clip, shape: str | None = None, color: str | None = None, background: str | None = None,
              index: int = 0) -> Clip:
    """The same motion (centers, radii) with some attributes replaced: the ideal result of an edit. shape and color
    apply to object `index` (0: the first, the moving one; 1: a two-object clip's still second object)."""
    if not 0 <= index < len(clip.frames[0].objects):
        raise ValueError(f"object index {index} out of range for {len(clip.frames[0].objects)} object(s)")
    frames = tuple(
        Scene(tuple(replace(o, shape=shape or o.shape, color=color or o.color) if i == index else o
                    for i, o in enumerate(s.objects)), background or s.background)
        for s in clip.frames)
    return Clip(frames, clip.motion)


TWO_OBJECT_SCALE = 0.7  # two-object scenes' radii, of one object's (as random_scene's two-object stills)


def random_two_object_clip(rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str],
                           background: str, motion: str, n_frames: int = N_FRAMES, size: int = SIZE) -> Clip:
    """Two objects over n frames: the first, (color, shape), in `motion`; the second still, never overlapping the
    first in any frame (2 px apart at least); radii TWO_OBJECT_SCALE of one-object clips'. The caption names the
    first object's motion: "a red circle moving right and a blue square on a white background"."""
    if background in (first[0], second[0]):
        raise ValueError(f"an object's color equals the background {background!r}")
    if first == second:
        raise ValueError(f"the two objects must differ in color or shape, got {first} twice")
    scale = size / 64 * TWO_OBJECT_SCALE
    for _ in range(1000):
        r1 = float(rng.uniform(14.0, 20.0) if motion in ("growing", "shrinking") else
                   rng.uniform(RADIUS_RANGE[0], 18.0)) * scale
        centers, radii = trajectory(motion, rng, r1, n_frames, size)
        r2 = float(rng.uniform(RADIUS_RANGE[0], 18.0)) * scale
        c2 = (float(rng.uniform(r2 + 1, size - r2 - 1)), float(rng.uniform(r2 + 1, size - r2 - 1)))
        if all(math.dist(c, c2) >= rr + r2 + 2 for c, rr in zip(centers, radii)):
            still = Obj(second[1], second[0], c2, r2)
            frames = tuple(Scene((Obj(first[1], first[0], c, rr), still), background)
                           for c, rr in zip(centers, radii))
            return Clip(frames, motion)
    raise RuntimeError(f"could not place a still object beside a {motion} path")  # pragma: no cover


def make_two_object_clip(first: tuple[str, str] = ("red", "circle"), second: tuple[str, str] = ("blue", "square"),
                         background: str = "white", motion: str = "right", seed: int = 0,
                         n_frames: int = N_FRAMES, size: int = SIZE) -> Clip:
    """A named two-object clip (see random_two_object_clip); the seed draws radii, path and the still one's place."""
    return random_two_object_clip(np.random.default_rng(seed), first, second, background, motion, n_frames, size)


def training_example(rng: np.random.Generator, size: int = SIZE, p_two: float = 0.0) -> tuple[Scene, str]:
    """One still training image: a random frame of a random clip (so positions and sizes follow the clips'
    distribution) and its motion name; with probability p_two a two-object still scene instead (motion "")."""
    if p_two and rng.random() < p_two:
        return random_scene(rng, 2, size), ""
    clip = random_clip(rng, size=size)
    return clip.frames[int(rng.integers(len(clip.frames)))], clip.motion


def dataset(n: int, seed: int, size: int = SIZE, p_two: float = 0.0) -> tuple[np.ndarray, list[Scene], list[str]]:
    """n training images uint8 (n, size, size, 3), their scenes and motion names; deterministic in seed."""
    rng = np.random.default_rng(seed)
    scenes, motions = [], []
    for _ in range(n):
        s, m = training_example(rng, size, p_two)
        scenes.append(s)
        motions.append(m)
    return np.stack([render(s, size) for s in scenes]), scenes, motions
