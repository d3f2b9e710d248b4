"""Write the miniature suite's clips (configs/suite-mini.yaml) to assets/suite-mini/: named clips of the miniature
world (ei2.mini.world.make_clip), 8 frames of 64 x 64 each, as gifs. The same code always writes the same pixels.

    python tools/suite_mini_clips.py            # from the repository root
"""

from pathlib import Path

from ei2.mini.world import make_clip
from ei2.video import write_video

ROOT = Path(__file__).resolve().parents[1]
CLIPS = {  # file name -> (shape, color, background, motion)
    "red-circle-right": ("circle", "red", "white", "right"),
    "yellow-square-up": ("square", "yellow", "black", "up"),
    "green-triangle-left": ("triangle", "green", "white", "left"),
}


def main() -> None:
    folder = ROOT / "assets" / "suite-mini"
    for name, (shape, color, background, motion) in CLIPS.items():
        clip = make_clip(shape, color, background, motion, seed=0)
        path = write_video(clip.render(), folder / f"{name}.gif", fps=8)
        print(f"{path.relative_to(ROOT)}: {clip.caption}")


if __name__ == "__main__":
    main()
