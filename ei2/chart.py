"""Line charts drawn with Pillow (no plotting library): ei2.diagnose's per-layer panels, ei2.mini.samples' loss curves.

    img, draw = canvas(900, 320)
    panel(draw, (60, 40, 880, 280), [Series("loss", losses, RED, xs=steps, markers=False)], title="loss",
          x_lim=(0, steps[-1]), x_ticks=[(0, "0"), (steps[-1], str(steps[-1]))], log_y=True)
    save(img, "losses.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .files import atomic_path

RED, BLUE = (214, 39, 40), (31, 119, 180)
COLORS = [(44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
          (188, 189, 34), (23, 190, 207)]
GRID, GREY = (225, 225, 225), (90, 90, 90)


def font(size: int):
    """DejaVu Sans at `size` when installed, else Pillow's own font."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except Exception:
            pass
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except Exception:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - max(0.5, abs(lo) * 0.1), hi + max(0.5, abs(hi) * 0.1)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


@dataclass
class Series:
    """One line: y values at xs (default 0, 1, ..., the categories of the x axis); non-finite values are skipped."""
    label: str
    ys: Sequence[float]
    color: tuple[int, int, int]
    xs: Sequence[float] | None = None
    markers: bool = True


def canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (width, height), "white")
    return img, ImageDraw.Draw(img)


def panel(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], series: list[Series], *,
          x_lim: tuple[float, float], x_ticks: list[tuple[float, str]], title: str = "", ref: float | None = None,
          log_y: bool = False) -> None:
    """One panel in the plot area box = (left, top, right, bottom): the title above it, a light grid at round y
    values (log_y: of log10 y, labelled in y), a dashed line at y = ref, the axes, x tick labels and the lines."""
    left, y0, right, y1 = box
    text_font, small = font(13), font(11)

    def fy(v):
        return math.log10(v) if log_y else v

    def finite(v):
        return v is not None and math.isfinite(v) and (v > 0 or not log_y)

    values = [fy(v) for s in series for v in s.ys if finite(v)] + ([fy(ref)] if ref is not None else [])
    ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    lo, hi = ticks[0], ticks[-1]

    def ypix(v):
        return y1 - (fy(v) - lo) / (hi - lo) * (y1 - y0)

    def xpix(x):
        return left + (x - x_lim[0]) / ((x_lim[1] - x_lim[0]) or 1) * (right - left)

    if title:
        draw.text((left, y0 - 20), title, fill="black", font=text_font)
    for t in ticks:  # grid and y labels
        yy = y1 - (t - lo) / (hi - lo) * (y1 - y0)
        draw.line([(left, yy), (right, yy)], fill=GRID)
        label = f"{10 ** t:.3g}" if log_y else f"{t:g}"
        draw.text((left - 8 - draw.textlength(label, font=small), yy - 6), label, fill="black", font=small)
    if ref is not None:
        yr = ypix(ref)
        for xx in range(int(left), int(right), 10):
            draw.line([(xx, yr), (min(xx + 5, right), yr)], fill=GREY)
    draw.line([(left, y0), (left, y1), (right, y1)], fill="black", width=1)  # axes
    for x, name in x_ticks:
        xx = xpix(x)
        draw.line([(xx, y1), (xx, y1 + 4)], fill="black")
        draw.text((xx - draw.textlength(name, font=small) / 2, y1 + 6), name, fill="black", font=small)
    for s in series:
        xs = s.xs if s.xs is not None else range(len(s.ys))
        pts = [(xpix(x), ypix(v)) for x, v in zip(xs, s.ys) if finite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=s.color, width=2)
        for x, yy in pts if s.markers else ():
            draw.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=s.color)


def legend(draw: ImageDraw.ImageDraw, xy: tuple[float, float], entries: list[tuple[str, tuple[int, int, int]]],
           line_height: int = 22) -> None:
    """One row per (text, color): a short line with a marker, then the text."""
    left, y = xy
    text_font = font(13)
    for text, c in entries:
        draw.line([(left, y + 8), (left + 30, y + 8)], fill=c, width=3)
        draw.ellipse([left + 11, y + 4, left + 19, y + 12], fill=c)
        draw.text((left + 40, y), text.replace("²", "2"), fill="black", font=text_font)  # not in every font
        y += line_height


def save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
