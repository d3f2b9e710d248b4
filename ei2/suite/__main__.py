"""`python -m ei2.suite SUITE.yaml`: run every job of a suite manifest (ei2/suite/manifest.py) on this process, or on
every rank of torchrun:

    python -m ei2.suite configs/suite-mini.yaml                              # one process (one GPU, or the CPU)
    torchrun --nproc_per_node=4 -m ei2.suite configs/loveu-tgve-2023.yaml    # one GPU per rank
    python -m ei2.suite SUITE.yaml --steps 100 --output_dir runs/quick       # any ei2.train key for every job

The exit status is the number of jobs that are not done (0: all done; at most 99); a manifest or command problem
stops before any work with `error: ...` and status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import _split_overrides
from ..errors import Ei2Error, cli_main
from ..evaluate import DEFAULT_CLIP
from ..files import check_writable_dir
from ..weights import check_sd_folder
from .manifest import cli_overrides, load_suite
from .run import Options, run_suite
from .schedule import connect


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ei2.suite", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Any other --KEY VALUE is an ei2.train key applied to every job (it wins over "
                                       "the manifest). Results: <output_dir>/summary.md and summary.json; one "
                                       "folder per job, <output_dir>/<method>/<job>, in ei2.train's layout.")
    p.add_argument("manifest", help="the suite YAML (e.g. configs/suite-mini.yaml)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="where the suite goes (default: the "
                   "manifest's output_dir, else runs/<manifest name>)")
    p.add_argument("--video_root", "--video-root", default=None, help="the folder the jobs' videos are in (default: "
                   "the manifest's video_root)")
    p.add_argument("--strict", action="store_true", help="a missing video stops the suite before any work")
    p.add_argument("--retry-failed", action="store_true", help="run the jobs that failed before again")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP ViT-L/14 folder for the CLIP columns, used when "
                   f"complete (default: {DEFAULT_CLIP})")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    suite = load_suite(args.manifest, cli_overrides(_split_overrides(rest)), args.output_dir, args.video_root)
    for model in sorted({job.cfg.model for job in suite.jobs}):
        check_sd_folder(model)  # before any work: every job would fail
    if suite.missing and args.strict:
        raise Ei2Error(f"--strict: {len(suite.missing)} video(s) missing, nothing was started: "
                       + "; ".join(f"{j.id}: {j.cfg.video}" for j in suite.missing))
    check_writable_dir(suite.output_dir)
    ranks = connect()
    failed = run_suite(suite, ranks, Options(args.retry_failed, Path(args.clip).expanduser(),
                                             not args.no_progress))
    return min(failed, 99)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
