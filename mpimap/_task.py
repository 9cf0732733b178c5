"""What a running task can ask about itself: ``mpimap.task()`` and ``mpimap.rng()``.

The loop that runs a chunk appends each result to a list as it finishes, so the index of the item
running now is ``chunk start + len(results so far)``: no per-item bookkeeping on the hot path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

from ._errors import MpimapError

__all__ = ["TaskInfo", "rng", "task"]


@dataclass
class _Running:
    """State of the chunk being run on this process (one at a time: workers are single-threaded)."""

    start: int
    results: list
    seed: object
    rank: int
    size: int
    node: str
    host: str
    job: int
    scratch_root: str | None = None
    rngs: dict = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.start + len(self.results)


# Per thread: a worker runs one chunk at a time, but the in-process test transport runs several
# workers as threads of one process.
_local = threading.local()


def current() -> _Running | None:
    return getattr(_local, "state", None)


def begin(state: _Running | None) -> None:
    _local.state = state


def end() -> None:
    _local.state = None


def in_task() -> bool:
    return getattr(_local, "state", None) is not None


@dataclass(frozen=True)
class TaskInfo:
    """Where and what the current task is.

    index: position of the item in the input (0-based); rank: MPI rank running it (0 in serial
    mode); size: number of ranks computing; node / host: the node name (Slurm's SLURMD_NODENAME
    when set, else the host name) and the host name; job: the map's id on this rank.
    """

    index: int
    rank: int
    size: int
    node: str
    host: str
    job: int
    _scratch_root: str | None = None

    @property
    def scratch(self) -> str:
        """A private directory for temporary files of this rank, removed when the map ends."""
        path = scratch_dir(self.job, self.rank, self._scratch_root)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path


def scratch_dir(job: int, rank: int, root: str | None = None) -> str:
    base = root or os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
    return os.path.join(base, f"mpimap-{os.getuid()}", "scratch", f"{os.getpid()}-{job}-{rank}")


def remove_scratch(job: int, rank: int, root: str | None = None) -> None:
    shutil.rmtree(scratch_dir(job, rank, root), ignore_errors=True)


def task() -> TaskInfo:
    """Information about the task running now; only valid inside a function run by mpimap."""
    s = current()
    if s is None:
        raise MpimapError("mpimap.task() is only available inside a function that pmap, imap or "
                          "a Pool is running")
    return TaskInfo(s.index, s.rank, s.size, s.node, s.host, s.job, s.scratch_root)


def rng():
    """A numpy Generator for the current item, that depends only on (seed, item index).

    It is ``numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(index,)))``, so
    results do not change with the number of ranks or the order in which items run. Calls within
    one task return the same generator (its stream continues).
    """
    s = current()
    if s is None:
        raise MpimapError("mpimap.rng() is only available inside a function that pmap, imap or "
                          "a Pool is running")
    if s.seed is None:
        raise MpimapError("mpimap.rng() needs a seed: pass seed=<int> to pmap/imap/Pool.map")
    index = s.index
    gen = s.rngs.get(index)
    if gen is None:
        import numpy as np

        gen = np.random.default_rng(np.random.SeedSequence(s.seed, spawn_key=(index,)))
        s.rngs.clear()  # one item at a time: keep only the current generator
        s.rngs[index] = gen
    return gen
