"""Who runs what: jobs are handed out one at a time, longest first, to whichever rank asks next, through an atomic
counter in torch.distributed's store (the TCPStore torchrun's rendezvous provides, on one node or many). No rank
waits on a fixed split while another holds the long clips. Without torchrun the counter is a local one.

The store also carries the suite's tallies (jobs finished, failed, cost done) for rank 0's progress line, and the
end-of-suite meeting of the ranks (`meet`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def longest_first(jobs: list) -> list:
    """Jobs by cost (tuned frames x size² x steps), largest first; equal costs grouped by method (a rank then reuses
    its loaded models for the next job), then in the manifest's order."""
    methods = list(dict.fromkeys(job.method for job in jobs))
    return sorted(jobs, key=lambda job: (-job.cost, methods.index(job.method)))


@dataclass
class Ranks:
    """This process's place in the suite and the shared counters."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: object | None = None  # a torch.distributed Store, or None: local counters
    prefix: str = "ei2-suite/"
    local: dict = field(default_factory=dict)

    def add(self, key: str, amount: int = 1) -> int:
        """Atomically add `amount` to the counter `key` (0 at first) and return the new value."""
        if self.store is None:
            self.local[key] = self.local.get(key, 0) + amount
            return self.local[key]
        return int(self.store.add(self.prefix + key, amount))

    def get(self, key: str) -> int:
        return self.add(key, 0)

    def next_job(self) -> int:
        """The index (in longest-first order) of the next job to run: every index is handed out exactly once."""
        return self.add("next") - 1

    def meet(self, key: str, poll: float = 0.2) -> None:
        """Wait until every rank has called `meet(key)`."""
        self.add(key)
        while self.get(key) < self.world:
            time.sleep(poll)

    def device(self, name: str) -> str:
        """The device of this rank's jobs: under torchrun, `auto`/`cuda` on a CUDA machine become cuda:LOCAL_RANK
        (one GPU per rank); anything else is kept."""
        if self.store is not None and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name


def connect(timeout_min: float = 30) -> Ranks:
    """Join torchrun's rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment: the env:// rendezvous,
    which reuses torchrun's agent store), or run alone. Counter keys carry torchrun's run id and restart count, so a
    restarted suite (--max-restarts) hands out every job again (finished ones are skipped by their done marker)."""
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return Ranks()
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=timeout_min)))
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"ei2-suite/{run}/{restart}/"
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)), store, prefix)
