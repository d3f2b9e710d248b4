"""The suite's results, read from the jobs' markers (done.json / failed.json) and written as summary.md and
summary.json in the suite's output_dir, after every job and at the end: per method a row per edit kind and an
overall row (mean over edits of the miniature world's exact metrics, ei2.mini.parse.SCORES and IDEAL_SCORES, and of CLIP frame
consistency and textual alignment, ei2.evaluate's protocol, where CLIP weights were present), and a row per job (its
status, one-line error, time and peak memory)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import atomic_path, write_json
from ..mini.parse import IDEAL_SCORES, SCORES

CLIP = ("frame_consistency", "textual_alignment")
NAMES = {"frame_consistency": "CLIP frame consistency", "textual_alignment": "CLIP textual alignment",
         "edited_attribute_match": "edited attr", "kept_attributes_match": "kept attrs",
         "all_attributes_match": "all attrs", "mask_iou_vs_source": "mask IoU", "trajectory_error_px": "traj. px",
         "attribute_stability": "stability", "background_change": "bg change",
         "mask_iou_vs_ideal": "IoU vs ideal", "trajectory_error_vs_ideal_px": "traj. vs ideal px"}


def job_record(job) -> dict:
    """The job's marker (done.json or failed.json), or its state when it has none."""
    folder = Path(job.cfg.output_dir)
    for name in ("done.json", "failed.json"):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
    return {"id": job.id, "job": job.name, "method": job.method, "status": "not finished"}


def count_not_done(suite) -> int:
    return sum(job_record(job).get("status") != "done" for job in suite.jobs)


def edit_values(edit: dict) -> dict:
    """An edit's numbers: the mini metrics (None where not scored) and the CLIP scores."""
    values = dict(edit.get("mini_metrics") or {})
    values.update(edit.get("clip") or {})
    return values


def mean_row(edits: list[dict], metrics: list[str]) -> dict:
    row = {"edits": len(edits)}
    for m in metrics:
        got = [v for e in edits if (v := edit_values(e).get(m)) is not None]
        row[m] = sum(got) / len(got) if got else None
    return row


def summarize(suite) -> dict:
    """Everything the tables show, as JSON."""
    records = [job_record(job) for job in suite.jobs]
    done = [r for r in records if r.get("status") == "done"]
    metrics = [m for m in (*CLIP, *SCORES, *IDEAL_SCORES)
               if any(edit_values(e).get(m) is not None for r in done for e in r.get("edits", []))]
    methods = list(dict.fromkeys(job.method for job in suite.jobs))
    kinds = list(dict.fromkeys(k for job in suite.jobs for k in job.kinds))
    overall, by_kind = {}, {}
    for method in methods:
        mine = [r for r in records if r.get("method") == method]
        edits = [e for r in mine if r.get("status") == "done" for e in r.get("edits", [])]
        times = [r["seconds"] for r in mine if r.get("status") == "done"]
        peaks = [p for r in mine for p in (r.get("peak_memory_gib") or {}).values() if p is not None]
        overall[method] = {**mean_row(edits, metrics), "jobs": len(mine),
                           "done": sum(r.get("status") == "done" for r in mine),
                           "failed": sum(r.get("status") == "failed" for r in mine),
                           "mean_job_s": sum(times) / len(times) if times else None,
                           "max_peak_gib": max(peaks) if peaks else None}
        by_kind[method] = {k: mean_row([e for e in edits if e.get("kind") == k], metrics) for k in kinds}
    statuses = [r.get("status") for r in records]
    return {"manifest": str(suite.path), "output_dir": str(suite.output_dir),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "metrics": metrics,
            "counts": {s: statuses.count(s) for s in ("done", "failed", "not finished")},
            "overall": overall, "by_kind": by_kind, "jobs": records}


def _cell(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    names = [NAMES.get(m, m) for m in metrics]
    c = summary["counts"]
    lines = [f"# Suite {Path(summary['manifest']).name}", "",
             f"{c['done']} done, {c['failed']} failed, {c['not finished']} not finished; updated {summary['updated']}.",
             "Means over the edits; CLIP columns: ei2.evaluate's protocol (only with CLIP weights); the miniature "
             "world's exact metrics: docs/mini.md.", "", "## Overall", ""]
    lines += _table(["method", "edits", *names, "jobs", "done", "failed", "mean job s", "max peak GiB"],
                    [[method, row["edits"], *(row[m] for m in metrics), row["jobs"], row["done"], row["failed"],
                      row["mean_job_s"], row["max_peak_gib"]] for method, row in summary["overall"].items()])
    lines += ["", "## Per edit kind", ""]
    lines += _table(["method", "kind", "edits", *names],
                    [[method, kind, row["edits"], *(row[m] for m in metrics)]
                     for method, kinds in summary["by_kind"].items() for kind, row in kinds.items()])
    lines += ["", "## Jobs", ""]
    rows = []
    for r in summary["jobs"]:
        peak = r.get("peak_memory_gib") or {}
        rows.append([r.get("job"), r.get("method"), r.get("status"), r.get("seconds"), peak.get("training"),
                     peak.get("inference"), r.get("rank"), (r.get("error") or "").replace("|", "/")])
    lines += _table(["job", "method", "status", "time s", "peak training GiB", "peak inference GiB", "rank",
                     "error"], rows)
    return "\n".join(lines) + "\n"


def write(suite) -> Path:
    """summary.json and summary.md in the suite's output_dir (atomically); returns the .md path."""
    summary = summarize(suite)
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(summary, suite.output_dir / "summary.json")
    with atomic_path(suite.output_dir / "summary.md") as tmp:
        tmp.write_text(markdown(summary), encoding="utf-8")
    return suite.output_dir / "summary.md"
