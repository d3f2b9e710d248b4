"""The tables of docs/mini-benchmark.md that `python -m ei2.mini.benchmark` does not print itself: the table and the
paired differences split by scene (one object, two objects) and by edit kind, and several runs' results.json merged
(e.g. the default run and a run of the Fig. 4 variants), with the same functions the benchmark uses.

    python tools/mini_benchmark_tables.py runs/mb-final/results.json
    python tools/mini_benchmark_tables.py runs/mb-final/results.json runs/mb-fig4/results.json --seeds 0,1 \\
        --methods tav,ta_ln,ta_ln_noaffine,ta_no_norm,ta_instancenorm,ta_ic,sca_stam --against tav
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ei2.mini import benchmark as b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files of ei2.mini.benchmark runs (merged)")
    p.add_argument("--methods", help="comma list, in table order (default: every method of the files)")
    p.add_argument("--seeds", help="keep only these seeds (comma list), e.g. the seeds every file ran")
    p.add_argument("--against", help="paired differences of every method against this one, instead of the "
                                     "benchmark's PAIRS (the paper's claims)")
    args = p.parse_args()
    samples, runs, methods = [], [], []
    for path in args.results:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        samples += data["samples"]
        runs += data["runs"]
        methods += [m for m in data["settings"]["methods"] if m not in methods]
    if args.methods:
        methods = args.methods.split(",")
    if args.seeds:
        keep = {int(s) for s in args.seeds.split(",")}
        samples = [s for s in samples if s["seed"] in keep]
        runs = [r for r in runs if r["seed"] in keep]
    if args.against:
        b.PAIRS[:] = [(m, args.against, f"{m} vs {args.against}") for m in methods if m != args.against]
    scenes = [("all clips", lambda s: True), ("one-object clips", lambda s: s.get("objects", 1) == 1),
              ("two-object clips", lambda s: s.get("objects", 1) == 2)]
    kinds = [(f"one-object {k} edits", lambda s, k=k: s.get("objects", 1) == 1 and s["edit"] == k)
             for k in dict.fromkeys(s["edit"] for s in samples)]
    for title, keep in scenes + kinds:
        part = [s for s in samples if keep(s)]
        if not part:
            continue
        print(f"## {title} ({len(part)} edited clips)\n")
        if "edits" not in title:
            print(b.format_table(b.summarize(part, runs, methods)).split("\n\nEdited")[0] + "\n")
        print(b.format_paired(b.paired_table(part, methods)) + "\n")


if __name__ == "__main__":
    main()
