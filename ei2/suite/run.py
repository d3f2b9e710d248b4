"""One rank's loop: take the next job (longest first), skip it when it finished before, else run it exactly as
`ei2.train` does into its own folder (locked with RunLock), reusing the rank's models (ei2.cache), and record the
outcome. A job's folder holds done.json, written atomically last, only when all its outputs are written; a failure
(an unreadable video, out of memory, NaN, ...) writes failed.json with its one-line error instead and the suite goes
on. A rerun skips done jobs (and failed ones, unless --retry-failed) and redoes any other: a job interrupted by a
crash or a killed rank has no marker, and ei2.train's run-folder rule replaces what it left."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import train
from ..cache import ModelCache
from ..errors import Ei2Error, first_line, user_error_line
from ..evaluate import ClipScorer, evaluate_run, missing_clip_files
from ..files import RunLock, check_writable_dir, clean_stale_temp_files, read_json, write_json
from . import tables
from .schedule import Ranks, longest_first

DONE, FAILED = "done.json", "failed.json"


@dataclass
class Options:
    retry_failed: bool = False
    clip: Path | None = None  # a CLIP ViT-L/14 folder: edits are scored with ei2.evaluate when it is complete
    progress: bool = True
    every: float = 10.0  # seconds between rank 0's progress lines while it works


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


class Rank:
    """The state of one rank while it works through the suite."""

    def __init__(self, suite, ranks: Ranks, opts: Options):
        self.suite, self.ranks, self.opts = suite, ranks, opts
        self.order = longest_first(suite.jobs)
        self.total_cost = sum(j.cost for j in self.order)
        self.cache = ModelCache()
        self.scorer: ClipScorer | None = None
        self.start = time.perf_counter()
        self.shown = 0.0
        self.log_path = suite.output_dir / "logs" / f"rank{ranks.rank}.log"

    # --- what a rank says ------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line on stdout (prefixed with the rank under torchrun) and in logs/rank<r>.log."""
        prefix = f"[rank {self.ranks.rank}] " if self.ranks.world > 1 else ""
        print(prefix + text, flush=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:  # one write per line, appended
            f.write(f"{now()} {text}\n")

    def progress(self, force: bool = False) -> None:
        """Rank 0's line for the suite: finished (done / failed / skipped), running, waiting, elapsed, estimate."""
        if self.ranks.rank != 0 or not self.opts.progress:
            return
        if not force and time.perf_counter() - self.shown < self.opts.every:
            return
        self.shown = time.perf_counter()
        r, total = self.ranks, len(self.order)
        taken, finished = min(r.get("next"), total), r.get("finished")
        elapsed = time.perf_counter() - self.start
        cost_run, cost_finished = r.get("cost_run"), r.get("cost_finished")
        left = ""
        if cost_run:  # throughput of all ranks so far, over the cost not finished yet
            left = f", about {clock(elapsed * (self.total_cost - cost_finished) / cost_run)} left"
        print(f"suite: {finished}/{total} finished ({r.get('done')} done, {r.get('failed')} failed, "
              f"{r.get('skipped')} skipped), {taken - finished} running, {total - taken} waiting; "
              f"{clock(elapsed)} elapsed{left}", flush=True)

    # --- the loop --------------------------------------------------------------------------------------------------

    def work(self) -> None:
        while (i := self.ranks.next_job()) < len(self.order):
            job = self.order[i]
            outcome = self.run_job(job)
            self.ranks.add(outcome)
            self.ranks.add("cost_finished", job.cost)
            self.ranks.add("finished")
            tables.write(self.suite)
            self.progress(force=True)

    def run_job(self, job) -> str:
        """Run or skip one job; returns done, failed or skipped."""
        folder = Path(job.cfg.output_dir)
        if (folder / DONE).is_file():
            self.say(f"skip {job.id}: finished earlier ({folder / DONE})")
            return "skipped"
        if (folder / FAILED).is_file() and not self.opts.retry_failed:
            self.say(f"skip {job.id}: failed earlier ({folder / FAILED}; --retry-failed runs it again)")
            return "failed"
        cfg = dataclasses.replace(job.cfg, device=self.ranks.device(job.cfg.device))
        self.say(f"start {job.id} ({cfg.n_frames} frames at {cfg.size}px, {cfg.steps} steps, "
                 f"{len(cfg.edit_prompts)} edits)")
        t0 = time.perf_counter()
        try:
            out = check_writable_dir(folder, "job folder")
            with RunLock(out):  # as ei2.train: one writer per folder (a dead rank's lock on this host is taken over)
                clean_stale_temp_files(out)
                for name in (DONE, FAILED):
                    (out / name).unlink(missing_ok=True)
                try:
                    record = self.tune_and_edit(job, cfg, out)
                except Exception as e:  # recorded, and the suite goes on (KeyboardInterrupt is not an Exception)
                    error = one_line(e, cfg)
                    if isinstance(e, torch.OutOfMemoryError):
                        self.cache.drop()
                    gc.collect()
                    write_json(self.record(job, "failed", t0, error=error), out / FAILED)
                    self.say(f"failed {job.id}: {error}")
                    return "failed"
                record.update(self.record(job, "done", t0))
                write_json(record, out / DONE)  # last: the job's outputs are complete
        except (Ei2Error, OSError) as e:  # the folder cannot be written or is locked by a live run: no marker
            self.say(f"failed {job.id}: {one_line(e, cfg)} (not recorded in its folder)")
            return "failed"
        self.ranks.add("cost_run", job.cost)
        self.say(f"done {job.id} in {time.perf_counter() - t0:.1f} s")
        return "done"

    def tune_and_edit(self, job, cfg, out: Path) -> dict:
        """ei2.train's job (the same code, the rank's cached models), then the CLIP scores where CLIP is present."""
        if job.missing:
            raise Ei2Error(job.missing)
        device, precision = train.check_job(cfg, out, False)
        train.run_locked(cfg, out, False, False, device, precision, self.cache, lambda event: self.progress())
        edits = read_json(out / "edits.json")
        log = read_json(out / "log.json")
        record = {"edits": [{"kind": kind, **entry} for kind, entry in zip(job.kinds, edits)],
                  "timings": log.get("timings", {}), "peak_memory_gib": log.get("peak_memory_gib", {}),
                  "device": str(device), "precision": precision}
        scorer = self.clip(device)
        if scorer is not None:
            try:
                metrics = evaluate_run(out, scorer, progress=False)
                for entry, scored in zip(record["edits"], metrics["edits"]):
                    entry["clip"] = {k: scored[k] for k in ("frame_consistency", "textual_alignment")}
            except Ei2Error as e:
                record["clip_error"] = str(e)
        return record

    def clip(self, device) -> ClipScorer | None:
        """The CLIP scorer, loaded on first use when the folder is complete; None without CLIP weights."""
        folder = self.opts.clip
        if self.scorer is None and folder is not None and folder.is_dir() and not missing_clip_files(folder):
            self.scorer = ClipScorer(folder, device=device)
        return self.scorer

    def record(self, job, status: str, t0: float, **more) -> dict:
        return {"id": job.id, "job": job.name, "method": job.method, "status": status,
                "seconds": time.perf_counter() - t0, "cost": job.cost, "rank": self.ranks.rank,
                "host": socket.gethostname(), "pid": os.getpid(), "finished": now(), **more}


def one_line(e: BaseException, cfg) -> str:
    """A failure as one line: ei2's own message, the OSError table's, out of memory with its fix, else the type."""
    line = user_error_line(e)
    if line is not None:
        return line.splitlines()[0] if line else type(e).__name__
    if isinstance(e, torch.OutOfMemoryError):
        return train.out_of_memory(cfg)
    return f"{type(e).__name__}: {first_line(e)}"


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_suite(suite, ranks: Ranks, opts: Options) -> int:
    """Every rank: work until no job is left, meet the others; rank 0 writes the final tables. Returns the number of
    jobs that are not done (failed, or never recorded)."""
    rank = Rank(suite, ranks, opts)
    if ranks.rank == 0:
        for job in suite.missing:
            print(f"missing video, job {job.id} will fail: {job.missing}", file=sys.stderr, flush=True)
    rank.work()
    ranks.meet("all-finished")
    failed = tables.count_not_done(suite)
    if ranks.rank == 0:
        path = tables.write(suite)
        rank.progress(force=True)
        print(f"suite finished: {len(suite.jobs) - failed} of {len(suite.jobs)} jobs done, {failed} failed; "
              f"tables in {path} (.md, .json)", flush=True)
        while ranks.get("left") < ranks.world - 1:  # the others' last use of the store, before rank 0 may end
            time.sleep(0.1)
    else:
        ranks.add("left")
    return failed
