"""What a running task can ask about itself: ``mpimap.task()`` and ``mpimap.rng()``.

The loop that runs a chunk appends each result to a list as it finishes, so the index of the item
running now is ``chunk start + len(results so far)``: no per-item bookkeeping on the hot path.

Scratch.  ``mpimap.task().scratch`` is ``<scratch root>/r<rank>-<pid>/j<job>/scratch`` (the
scratch root is ``$MPIMAP_SCRATCH_DIR``, else ``$SLURM_TMPDIR``, else the system temporary
directory, plus ``mpimap-<uid>``: see _cache), private to one rank and one map, created on first
use. A worker reports that the job directory exists with its results, and rank 0 sends a prompt
DROP at the end of the map -- also after an error -- that removes it (``remove_scratch``); a
cancelled map's directory goes when the worker sees the CANCEL, and a rank's whole directory when
the worker exits. In serial mode each map gets its own id and its directory goes when the map
ends.
"""

from __future__ import annotations

import itertools
import os
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
    dirs: object = None  # a worker's _workdir.JobDirs for this map; None in serial mode
    scratch_job: object = None  # serial mode: this map's own scratch key (job is 0 there)
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
    _node: str | None = None
    _scratch_job: object = None
    _dirs: object = None  # the worker's JobDirs: told that scratch was used

    @property
    def scratch(self) -> str:
        """A private directory for temporary files of this rank and map, removed when the map
        ends (also after an error). Under $SLURM_TMPDIR when set; MPIMAP_SCRATCH_DIR moves it."""
        job = self.job if self._scratch_job is None else self._scratch_job
        path = scratch_dir(job, self.rank, self._node)
        if self._dirs is not None:
            self._dirs.used = True
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            from ._cache import scratch_base

            base, why = scratch_base(self._node)
            raise OSError(exc.errno, f"{exc.strerror}: cannot create the scratch directory "
                          f"{path} (under {base}, from {why}); point MPIMAP_SCRATCH_DIR at a "
                          f"node-local directory with room", path) from None
        return path


def job_dir(job, rank: int, node: str | None = None) -> str:
    from ._cache import scratch_root

    return os.path.join(scratch_root(node), f"r{rank}-{os.getpid()}", f"j{job}")


def scratch_dir(job, rank: int, node: str | None = None) -> str:
    return os.path.join(job_dir(job, rank, node), "scratch")


def remove_scratch(job, rank: int, node: str | None = None) -> None:
    """Remove everything of one map on this rank: scratch, working directory, outputs."""
    from ._cache import remove_tree, scratch_root

    try:
        path = os.path.join(scratch_root(node), f"r{rank}-{os.getpid()}", f"j{job}")
    except Exception:
        return
    if os.path.lexists(path):
        remove_tree(path)


def remove_rank_dir(rank: int, node: str | None = None) -> None:
    from ._cache import remove_tree, scratch_root

    try:
        root = scratch_root(node)
    except Exception:
        return
    remove_tree(os.path.join(root, f"r{rank}-{os.getpid()}"))


_serial_ids = itertools.count(1)


def serial_job() -> str:
    """A job id for one serial map (nested serial maps must not share a scratch directory)."""
    return f"s{next(_serial_ids)}"


def task() -> TaskInfo:
    """Information about the task running now; only valid inside a function run by mpimap."""
    s = current()
    if s is None:
        raise MpimapError("mpimap.task() is only available inside a function that pmap, imap or "
                          "a Pool is running")
    return TaskInfo(s.index, s.rank, s.size, s.node, s.host, s.job,
                    getattr(s.dirs, "node", None), s.scratch_job, s.dirs)


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
